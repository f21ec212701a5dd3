"""Training configs of the two committees (see run.sh): mk.py STEPS plain|boot."""

import sys

import ase.io
import numpy as np
import yaml
from even_coverage import member_config

frames = ase.io.read("train160.extxyz", ":")
steps = int(sys.argv[1])
variant = sys.argv[2]
for m in range(4):
    train = "train160.extxyz"
    if variant == "boot":
        rng = np.random.default_rng(1000 + m)
        idx = rng.choice(len(frames), len(frames), replace=True)
        train = f"boot_{m}.extxyz"
        ase.io.write(train, [frames[i] for i in idx])
    cfg = member_config(m, f"{variant}/member_{m}", train, steps, n_train=144)
    open(f"{variant}_m{m}.yaml", "w").write(yaml.safe_dump(cfg, sort_keys=False))
