"""Our converted SO3LR against so3krates-torch's `SO3LRCalculator`, structure by structure (issue 17).

    .venv/bin/python benchmarks/so3lr_agreement.py        # needs the so3lr extra and ../shared/data

Structures: every frame of `../shared/data/mixed/so3krates-torch_aqm_small.xyz` (neutral), one of them
again with total charge +1 and spin ½ and with charge −1, and a 192-atom water cluster (the first frame of
the DeePMD water box without periodicity). Both calculators in float32 and float64, same process. Energy
deviations are taken against the peer's float64 energy: in float32 the peer sums its total energy in
float32, whose round-off (~1e-3 eV at 8,000 eV) would otherwise dominate; the peer's own float32 deviation
is reported next to ours. Results: `benchmarks/results/so3lr/agreement.json` and `agreement.md`.
"""

from __future__ import annotations

import contextlib
import io
import json
import sys
import warnings
from pathlib import Path

import numpy as np

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))
from accuracy import ROOT, _git_commit, write_atomically  # noqa: E402

SHARED = ROOT.parent / "shared" / "data"
OUT = BENCH / "results" / "so3lr"


def structures():
    from ase.io import read

    aqm = read(SHARED / "mixed" / "so3krates-torch_aqm_small.xyz", ":")
    cases = [(f"aqm {k} ({len(a)} atoms)", a, 0.0, 0.0) for k, a in enumerate(aqm)]
    cases += [("aqm 1, Q = +1, S = 1/2", aqm[1], 1.0, 0.5), ("aqm 1, Q = −1", aqm[1], -1.0, 0.0)]
    water = read(SHARED / "periodic" / "deepmd_water_64H2O_400.extxyz", 0)
    water.pbc, water.cell = False, None
    cases.append(("water cluster (192 atoms)", water, 0.0, 0.0))
    return cases


def main() -> int:
    warnings.filterwarnings("ignore")
    import torch
    from so3krates_torch.calculator.so3 import SO3LRCalculator

    from so3krates import So3kratesCalculator
    from so3krates.pretrained import so3lr

    cases = structures()
    results: dict = {}
    for dtype in ("float64", "float32"):
        with contextlib.redirect_stdout(io.StringIO()):
            peer = SO3LRCalculator(default_dtype=dtype)
        ours = So3kratesCalculator(so3lr(dtype=getattr(torch, dtype)), dtype=dtype)
        for name, atoms, charge, spin in cases:
            for who, calc in (("peer", peer), ("ours", ours)):
                a = atoms.copy()
                a.info.update(charge=charge, total_spin=spin)
                calc.reset()
                a.calc = calc
                energy, forces = a.get_potential_energy(), a.get_forces()
                charges = calc.results["partial_charges" if who == "peer" else "charges"]
                results[name, dtype, who] = (
                    energy,
                    forces,
                    np.ravel(charges),
                    np.ravel(calc.results["dipole"]),
                )
    rows = []
    for name, *_ in cases:
        reference = results[name, "float64", "peer"][0]
        row = {"structure": name}
        for dtype in ("float64", "float32"):
            ours, peer = results[name, dtype, "ours"], results[name, dtype, "peer"]
            row[dtype] = {
                "energy_ours_vs_peer64_eV": abs(ours[0] - reference),
                "energy_peer_vs_peer64_eV": abs(peer[0] - reference),
                "forces_max_eV_per_A": float(np.abs(ours[1] - peer[1]).max()),
                "charges_max_e": float(np.abs(ours[2] - peer[2]).max()),
                "dipole_max_eA": float(np.abs(ours[3] - peer[3]).max()),
            }
        rows.append(row)
    OUT.mkdir(parents=True, exist_ok=True)
    write_atomically(OUT / "agreement.json", json.dumps({"commit": _git_commit(), "rows": rows}, indent=2))
    lines = [
        "# SO3LR: ours (converted weights) against so3krates-torch 0.2.1 `SO3LRCalculator`",
        "",
        f"Commit {_git_commit()}; produced by `benchmarks/so3lr_agreement.py`. Largest absolute deviation "
        "per structure. Energy: against the peer's float64 energy (the peer's own float32 deviation in "
        "brackets).",
        "",
        "| structure | float64 ΔE (eV) | ΔF (eV/Å) | Δq (e) | Δμ (e·Å) "
        "| float32 ΔE (eV) | ΔF (eV/Å) | Δq (e) | Δμ (e·Å) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        cells = [row["structure"]]
        for dtype in ("float64", "float32"):
            r = row[dtype]
            energy = f"{r['energy_ours_vs_peer64_eV']:.1e}"
            if dtype == "float32":
                energy += f" ({r['energy_peer_vs_peer64_eV']:.1e})"
            cells += [
                energy,
                f"{r['forces_max_eV_per_A']:.1e}",
                f"{r['charges_max_e']:.1e}",
                f"{r['dipole_max_eA']:.1e}",
            ]
        lines.append("| " + " | ".join(cells) + " |")
    write_atomically(OUT / "agreement.md", "\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
