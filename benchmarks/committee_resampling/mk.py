"""Training configs of the two committees (see run.sh): mk.py STEPS plain|boot."""

import sys

import ase.io
import numpy as np
import yaml

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
    cfg = {
        "run_dir": f"{variant}/member_{m}",
        "data": {
            "train_file": train,
            "energy_key": "REF_energy",
            "forces_key": "REF_forces",
            "valid_fraction": 0.1,
            "split_seed": m,
            "n_test": 0,
        },
        "model": {"preset": "paper", "n_layers": 2},
        "training": {
            "progress": False,
            "max_epochs": int(np.ceil(steps * 5 / 144)),
            "seed": m,
            "threads": 1,
            "dtype": "float32",
        },
    }
    open(f"{variant}_m{m}.yaml", "w").write(yaml.safe_dump(cfg, sort_keys=False))
