"""The kernel's helper thread against one thread, in one process, with or without another busy process.

    OMP_WAIT_POLICY=PASSIVE .venv/bin/python benchmarks/helper_contention.py [--structure 3bpa.extxyz] \
        [--busy] [--rounds 8] [--out FILE.json]

Two force fields of the same model (paper preset, seed-0 weights, float32, `compile="aoti"`): one whose
planner lets the pair-message kernel and the large products split with the helper
(`kernel_helper_min_edges=50`), one that keeps everything on one thread (`None`). They take turns, blocks of
300 energy + forces calls on one graph, the order swapped every round; each round's median per side and
their ratios are printed. `--busy` starts a process that spins on one core for the whole measurement (a
2-core machine shared with another job): the helper's core is then shared, and a helper that is slower than
its caller alone should be left out (`so3krates::helper_skipped` counts the tasks its callers ran
themselves).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--structure", default=None, help="extxyz file (default: 3BPA from ../shared/data)")
    parser.add_argument("--busy", action="store_true", help="another process spinning meanwhile")
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--out", type=Path, default=None, help="write the rounds as JSON here")
    args = parser.parse_args()
    structure = args.structure or str(
        Path(__file__).resolve().parents[2] / "shared" / "data" / "botnet_3bpa" / "train_300K.xyz"
    )
    if not Path(structure).is_file():
        parser.error(f"--structure {structure}: no such file")
    if args.rounds < 1:
        parser.error(f"--rounds {args.rounds}: at least 1")
    if args.out is not None and args.out.exists():
        parser.error(f"--out {args.out}: exists (not overwritten)")
    import ase.io
    import torch

    from so3krates import So3krates, atoms_to_graph, preset
    from so3krates.runtime import ForceField, Planner

    torch.set_num_threads(2)
    torch.set_num_interop_threads(1)
    atoms = ase.io.read(structure, index=0)
    torch.manual_seed(0)
    model = So3krates(preset("paper")).float().eval().requires_grad_(False)
    limits = {"one thread": None, "helper": 50}  # Planner.kernel_helper_min_edges
    sides = {
        name: ForceField(model, compile="aoti", frozen=True, planner=Planner(kernel_helper_min_edges=limit))
        for name, limit in limits.items()
    }
    graph = atoms_to_graph(atoms, model.cutoff, pairs=True)
    for force_field in sides.values():
        for _ in range(100):
            force_field(graph)
    busy = subprocess.Popen([sys.executable, "-c", "while True: pass"]) if args.busy else None
    medians: dict[str, list[float]] = {name: [] for name in sides}
    skipped = torch.ops.so3krates.helper_skipped()
    try:
        for r in range(args.rounds):
            for name in list(sides) if r % 2 == 0 else list(sides)[::-1]:
                for _ in range(10):
                    sides[name](graph)
                times = []
                for _ in range(300):
                    start = time.perf_counter()
                    sides[name](graph)
                    times.append(time.perf_counter() - start)
                medians[name].append(statistics.median(times) * 1e3)
    finally:
        if busy is not None:
            busy.kill()
    skipped = torch.ops.so3krates.helper_skipped() - skipped
    ratios = [h / o for o, h in zip(medians["one thread"], medians["helper"], strict=True)]
    print(
        f"{len(atoms)} atoms, {graph.n_edges} edges{', another busy process' if args.busy else ''}: "
        f"one thread {statistics.median(medians['one thread']):.3f} ms, helper "
        f"{statistics.median(medians['helper']):.3f} ms; rounds helper / one thread "
        + " ".join(f"{x:.2f}" for x in ratios)
        + f"; tasks the callers ran themselves: {skipped}"
    )
    if args.out is not None:
        record = {"structure": structure, "busy": args.busy, "ms": medians, "skipped_tasks": skipped}
        args.out.parent.mkdir(parents=True, exist_ok=True)
        partial = args.out.with_name(args.out.name + ".tmp")
        partial.write_text(json.dumps(record, indent=1) + "\n")
        partial.replace(args.out)  # whole or not at all


if __name__ == "__main__":
    main()
