"""Spearman rho of a committee's uncertainty against its true error on the shared 2000 frames, per
structure with max / mean / rms over atoms (see run.sh)."""

import sys
from pathlib import Path

import numpy as np
import torch
from scipy.stats import spearmanr

from so3krates.committee import ENERGY_UNCERTAINTY, FORCES_UNCERTAINTY, load_committee
from so3krates.data.io import read_structures
from so3krates.evaluate import predict

DATA = Path(__file__).resolve().parents[3] / "shared/data/generated/ala_dipeptide_gfn2xtb_500K_2000.extxyz"
paths = sys.argv[1:]
torch.set_num_threads(2)
ff, meta = load_committee(paths, "cpu", torch.float32)
S = read_structures(DATA)
pred, metrics = predict(ff, S, 32, "cpu", False)
print({k: round(v, 4) for k, v in metrics.items() if isinstance(v, float)})
sig = [np.asarray(u) for u in pred[FORCES_UNCERTAINTY]]
err = [np.linalg.norm(np.asarray(f) - s.forces, axis=1) for s, f in zip(S, pred["forces"], strict=True)]


def r(a, b):
    return spearmanr(a, b).statistic


agg = {"max": np.max, "mean": np.mean, "rms": lambda x: np.sqrt(np.mean(x**2))}
for a in agg:
    for b in agg:
        print(
            f"sigma {a:4s} vs error {b:4s}: rho = {r([agg[a](x) for x in sig], [agg[b](x) for x in err]):.3f}"
        )
print("pooled atoms", r(np.concatenate(sig), np.concatenate(err)))
se = np.array(pred[ENERGY_UNCERTAINTY])
ee = np.abs(np.array(pred["energy"]) - np.array([s.energy for s in S]))
print("energy", r(se, ee))
print("mean sigma / mean err", np.mean(np.concatenate(sig)), np.mean(np.concatenate(err)))
