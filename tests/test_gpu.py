"""On a CUDA GPU, every plan and the calculator give the CPU's numbers (skipped where torch sees no GPU).

CI and this project's machine have no GPU; these run where one is (`pytest tests/test_gpu.py`), and
`benchmarks/gpu_check.py` runs the whole plan matrix, compiled programs and timings there.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from helpers import PLANS, VARIANTS, ethanol, make_model, reference_outputs, triclinic_cell
from so3krates import So3kratesCalculator, atoms_to_graph, collate
from so3krates.runtime import EnergyFunction, Evaluator

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="torch sees no CUDA GPU")

TOLERANCE = {torch.float64: 1e-9, torch.float32: 5e-5}  # relative to the force scale


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("plan", PLANS, ids=lambda plan: plan.describe())
def test_every_plan_on_the_gpu_gives_the_cpu_reference(plan, dtype):
    check_plan_on(plan, dtype, "cuda")


def check_plan_on(plan, dtype: torch.dtype, device: str) -> None:
    model = make_model(VARIANTS["tiny"], dtype).requires_grad_(False)
    structures = [ethanol(0), triclinic_cell()]
    expected = reference_outputs(model, structures)  # on the CPU
    evaluator = Evaluator(EnergyFunction(model.to(device), plan, frozen=True, block_edges=16), plan)
    graph = collate([atoms_to_graph(a, model.cutoff, pairs=plan.pairs) for a in structures]).to(device)
    out = {k: v.detach().double().cpu().numpy() for k, v in evaluator(graph, compute_stress=True).items()}
    scale = max(np.abs(expected["forces"]).max(), 1.0)
    np.testing.assert_allclose(out["forces"], expected["forces"], atol=TOLERANCE[dtype] * scale)
    np.testing.assert_allclose(out["energy"], expected["energy"], rtol=TOLERANCE[dtype])


@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_the_calculator_on_the_gpu_matches_the_cpu(dtype):
    """float32 molecules take the spline: its tables must be built on the model's device."""
    model = make_model(VARIANTS["tiny"], torch.float64)
    atoms = ethanol(1)
    results = {}
    for device in ("cpu", "cuda"):
        atoms.calc = So3kratesCalculator(model, device=device, dtype=dtype)
        results[device] = (atoms.get_potential_energy(), atoms.get_forces())
    tolerance = TOLERANCE[getattr(torch, dtype)]
    assert results["cuda"][0] == pytest.approx(results["cpu"][0], rel=tolerance)
    np.testing.assert_allclose(results["cuda"][1], results["cpu"][1], atol=tolerance * 10)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
def test_so3lr_on_the_gpu_matches_the_cpu(dtype):
    """The long-range terms (electrostatics, dispersion, ZBL) and charge/spin embeddings on a GPU."""
    from so3krates import ForceField
    from test_so3lr import make_so3lr

    structures = [ethanol(2), triclinic_cell(1)]
    results = {}
    for device in ("cpu", "cuda"):
        force_field = ForceField(make_so3lr(dtype).to(device))
        graphs = [
            atoms_to_graph(
                a, force_field.cutoff, long_range_cutoff=force_field.long_range_cutoff, total_charge=q
            )
            for a, q in zip(structures, (1.0, 0.0), strict=True)
        ]
        out = force_field(collate(graphs).to(device), compute_stress=True)
        results[device] = {k: out[k].detach().double().cpu().numpy() for k in ("energy", "forces", "stress")}
    scale = max(np.abs(results["cpu"]["forces"]).max(), 1.0)
    for key in ("energy", "forces", "stress"):
        np.testing.assert_allclose(results["cuda"][key], results["cpu"][key], atol=TOLERANCE[dtype] * scale)
