#!/usr/bin/env bash
# Committee resampling test (results: ../results/learn/committee_resampling.md). From the repository root:
#   bash benchmarks/committee_resampling/run.sh
# 1. 1,600 steps of GFN2-xTB Langevin MD at 500 K from frame 0 of the shared alanine-dipeptide trajectory,
#    every 10th frame kept (160 frames, md.py);
# 2. two committees of 4 (paper model, 2 layers, 3,000 optimizer steps each, seeds 0-3): "plain" (all members
#    on the same 160 frames, own 10 % validation split) and "boot" (each member on its own bootstrap draw);
# 3. both on the shared 2000 frames: Spearman rho of uncertainty vs true error per structure, for max / mean /
#    rms over atoms (analyze.py); committee sizes 2-8 and trajectory segments (uncertainty_analysis.py).
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
mkdir -p "$here/../runs/committee_resampling" && cd "$here/../runs/committee_resampling"
export OMP_WAIT_POLICY=PASSIVE
OMP_NUM_THREADS=2 python "$here/md.py"
python "$here/mk.py" 3000 plain
python "$here/mk.py" 3000 boot
bash "$here/train.sh" plain
bash "$here/train.sh" boot
python "$here/analyze.py" plain/member_*/best.pt | tee plain.txt
python "$here/analyze.py" boot/member_*/best.pt | tee boot.txt
python "$here/uncertainty_analysis.py" md_committees.json plain/member_*/best.pt boot/member_*/best.pt
