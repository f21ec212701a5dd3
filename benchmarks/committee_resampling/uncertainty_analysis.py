"""Where a committee's force uncertainty ranks the true error, on the shared 2000-frame trajectory.

    python uncertainty_analysis.py OUT.json MEMBER.pt [MEMBER.pt ...]

Every member predicts the 2000 frames once (float32, one thread); committees are then formed from subsets of
the members. Written: Spearman rho per structure (largest atomic uncertainty vs largest atomic error, mean vs
mean, energy) for every committee size (mean over up to 70 subsets), rho within trajectory segments, and the
rank correlation of error and uncertainty with the frame index (how much of rho comes from parts of the
trajectory that lie farther from the training data).
"""

import itertools
import json
import sys
from pathlib import Path

import numpy as np
import torch
from scipy.stats import spearmanr

from so3krates.committee import load_committee
from so3krates.data.io import read_structures
from so3krates.evaluate import predict

DATA = Path(__file__).resolve().parents[3] / "shared/data/generated/ala_dipeptide_gfn2xtb_500K_2000.extxyz"
SEGMENTS = [(0, 100), (100, 500), (500, 1000), (1000, 2000)]


def rho(x, y) -> float:
    return float(spearmanr(x, y).statistic)


def main() -> None:
    out, paths = Path(sys.argv[1]), sys.argv[2:]
    torch.set_num_threads(1)
    structures = read_structures(DATA)
    energies, forces = [], []
    for path in paths:
        force_field, _ = load_committee([path, path], "cpu", torch.float32)  # one member, twice
        predictions, _ = predict(force_field, structures, 64, "cpu", False)
        energies.append(np.array(predictions["energy"]))
        forces.append(np.stack(predictions["forces"]))
    energies, forces = np.array(energies), np.array(forces)  # (K, frames), (K, frames, atoms, 3)
    reference_f = np.stack([s.forces for s in structures])
    reference_e = np.array([s.energy for s in structures])

    def committee(members):
        f = forces[list(members)]
        sigma = np.linalg.norm(f.std(0, ddof=1), axis=-1)
        error = np.linalg.norm(f.mean(0) - reference_f, axis=-1)
        e = energies[list(members)]
        return sigma, error, e.std(0, ddof=1), np.abs(e.mean(0) - reference_e)

    sizes = {}
    for k in range(2, len(paths) + 1):
        rows = []
        for members in list(itertools.combinations(range(len(paths)), k))[:70]:
            sigma, error, sigma_e, error_e = committee(members)
            rows.append(
                [
                    rho(sigma.max(1), error.max(1)),
                    rho(sigma.mean(1), error.mean(1)),
                    rho(sigma_e, error_e),
                    1e3 * np.abs(forces[list(members)].mean(0) - reference_f).mean(),
                ]
            )
        r = np.array(rows)
        sizes[k] = {
            "subsets": len(rows),
            "rho_max": float(r[:, 0].mean()),
            "rho_max_range": [float(r[:, 0].min()), float(r[:, 0].max())],
            "rho_mean": float(r[:, 1].mean()),
            "rho_energy": float(r[:, 2].mean()),
            "forces_mae_meV_per_A": float(r[:, 3].mean()),
        }
        print(f"K={k}: " + json.dumps(sizes[k]))
    sigma, error, _, _ = committee(range(min(4, len(paths))))
    frames = np.arange(len(structures))
    segments = []
    for a, b in SEGMENTS:
        segments.append(
            {
                "frames": [a, b],
                "median_max_error": float(np.median(error.max(1)[a:b])),
                "median_max_uncertainty": float(np.median(sigma.max(1)[a:b])),
                "rho_max": rho(sigma.max(1)[a:b], error.max(1)[a:b]),
            }
        )
        print(json.dumps(segments[-1]))
    result = {
        "members": paths,
        "committee_sizes": sizes,
        "segments_first_4_members": segments,
        "rho_frame_index_vs_max_error": rho(frames, error.max(1)),
        "rho_frame_index_vs_max_uncertainty": rho(frames, sigma.max(1)),
    }
    print({k: v for k, v in result.items() if k.startswith("rho")})
    out.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
