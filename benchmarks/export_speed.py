"""Energy + forces per call of the exported formats against the eager model, same process, same inputs.

    python benchmarks/export_speed.py [--threads 1] [--dtype float32] [--formats pt2 aoti]

Paper-sized model with random weights; inputs prebuilt (neighbour list excluded); 3 warm-up calls, then
the median of the timed calls of benchmarks/peers/speed_protocol.py (3 s budget). Writes
benchmarks/results/export_speed.{md,json}.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np
import torch
from ase.build import molecule

from so3krates import ForceField, So3krates, atoms_to_graph, preset
from so3krates.export import export_model, load_exported
from so3krates.runtime import Planner

sys.path.insert(0, str(Path(__file__).parent))
from peers.speed_protocol import time_calls
from speed import water_box

RESULTS = Path(__file__).parent / "results"


def timed(function) -> tuple[float, float]:
    """Median and interquartile range of wall time per call after the warm-up, s (speed_protocol's timing)."""
    _, times = time_calls(function, budget_seconds=3.0)
    q = np.percentile(times, [25, 75])
    return statistics.median(times), float(q[1] - q[0])


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--dtype", choices=["float32", "float64"], default="float32")
    parser.add_argument("--formats", nargs="+", default=["pt2", "aoti"])
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = So3krates(preset("paper"))
    systems = {"ethanol (9 atoms)": molecule("CH3CH2OH"), "water (192 atoms)": water_box(64)}
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        exported = {}
        dtype = getattr(torch, args.dtype)
        for fmt in args.formats:
            for layers in ("fused", "modules"):
                plan = Planner().complete(dtype, layers)
                path = Path(folder) / f"{fmt}-{layers}.pt2"
                start = time.perf_counter()
                export_model(model, path, fmt=fmt, dtype=args.dtype, plan=plan, species=[1, 6, 8])
                exported[(fmt, layers)] = (load_exported(path), time.perf_counter() - start)
                print(f"exported {fmt} {layers} in {exported[(fmt, layers)][1]:.0f} s", flush=True)
        eager = ForceField(model.to(dtype), frozen=True)
        for name, atoms in systems.items():
            graph = atoms_to_graph(atoms, model.cutoff)
            row = {"system": name, "atoms": graph.n_atoms, "edges": graph.n_edges}
            reference = eager(graph)["forces"]
            row["eager (planner's plan)"] = timed(lambda g=graph: eager(g))
            for (fmt, layers), (program, _) in exported.items():
                forces = program(graph)["forces"]
                error = float((forces - reference).abs().max())
                assert error < (1e-3 if args.dtype == "float32" else 1e-9), (fmt, layers, error)
                row[f"{fmt} {layers}"] = timed(lambda f=program, g=graph: f(g))
            rows.append(row)
            print(row, flush=True)
    columns = [key for key in rows[0] if key not in ("system", "atoms", "edges")]
    lines = [
        f"# Exported formats, energy + forces per call ({args.dtype}, {args.threads} thread(s))",
        "",
        f"{datetime.date.today()}, {platform.processor() or platform.machine()}, torch {torch.__version__}, "
        f"paper preset with random weights; median ms (interquartile range). Export times (s): "
        + ", ".join(f"{fmt} {layers} {t:.0f}" for (fmt, layers), (_, t) in exported.items()),
        "",
        "| system | edges | " + " | ".join(columns) + " |",
        "|---|---|" + "---|" * len(columns),
    ]
    for row in rows:
        cells = [f"{1e3 * row[c][0]:.1f} ({1e3 * row[c][1]:.1f})" for c in columns]
        lines.append(f"| {row['system']} | {row['edges']} | " + " | ".join(cells) + " |")
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "export_speed.md").write_text("\n".join(lines) + "\n")
    payload = {"args": vars(args), "python": sys.version, "rows": rows}
    (RESULTS / "export_speed.json").write_text(json.dumps(payload, indent=1) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
