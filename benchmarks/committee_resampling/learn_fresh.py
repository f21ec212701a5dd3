"""Is the `so3krates learn` committee's weak ranking due to warm starts? Train a fresh committee (no
`init_from`, paper model with 2 layers, 3,000 optimizer steps, seeds 0-3) on the bootstrap draws of the learn
run's last iteration and rank its uncertainty with analyze.py (results:
../results/learn/committee_resampling.md, section 4). From the repository root, after
`python benchmarks/learn_ala_dipeptide.py run`:

    python benchmarks/committee_resampling/learn_fresh.py benchmarks/runs/learn/run/iter_004 OUT_DIR 3000
    for m in 0 1 2 3; do OMP_NUM_THREADS=1 so3krates train OUT_DIR/fresh_m$m.yaml; done
    python benchmarks/committee_resampling/analyze.py OUT_DIR/fresh/member_*/best.pt
"""

import argparse
import math
import sys
from pathlib import Path

import ase.io
import yaml

parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
parser.add_argument("iteration", type=Path, help="a learn iteration folder (iter_NNN)")
parser.add_argument("out", type=Path, help="folder for the member configs and runs")
parser.add_argument("steps", type=int, help="optimizer steps per member")
parser.add_argument("--overwrite", action="store_true", help="replace existing configs in OUT")
args = parser.parse_args()
iteration, out, steps = args.iteration.resolve(), args.out.resolve(), args.steps
missing = [m for m in range(4) if not (iteration / "committee" / f"member_{m}_train.extxyz").is_file()]
if missing:
    sys.exit(f"{iteration}/committee: no member_{missing[0]}_train.extxyz (not a learn iteration folder?)")
if steps < 1:
    sys.exit(f"steps must be positive, got {steps}")
existing = sorted(out.glob("fresh_m*.yaml"))
if existing and not args.overwrite:
    sys.exit(f"{existing[0]} exists; pass --overwrite to replace the configs in {out}")
out.mkdir(parents=True, exist_ok=True)
for m in range(4):
    train = iteration / "committee" / f"member_{m}_train.extxyz"
    batches = math.ceil(len(ase.io.read(train, ":")) / 5)  # batch size 5 (the training default)
    config = {
        "run_dir": str(out / "fresh" / f"member_{m}"),
        "data": {
            "train_file": str(train),
            "valid_file": str(iteration / "committee" / f"member_{m}_valid.extxyz"),
            "energy_key": "REF_energy",
            "forces_key": "REF_forces",
        },
        "model": {"preset": "paper", "n_layers": 2},
        "training": {
            "progress": False,
            "max_epochs": math.ceil(steps / batches),
            "seed": m,
            "threads": 1,
            "dtype": "float32",
        },
    }
    (out / f"fresh_m{m}.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
