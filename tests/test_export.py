"""Exported models: same numbers as the checkpoint in every format and dtype, and no training code needed."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import zipfile

import numpy as np
import pytest
import torch
from ase import Atoms

from helpers import ethanol, make_force_field, rss_mb, triclinic_cell
from so3krates import So3kratesCalculator, atoms_to_graph, preset
from so3krates.calculators.ase import ExportedCalculator
from so3krates.cli.main import main
from so3krates.errors import DataError, So3kratesError
from so3krates.export import export_model, load_exported, read_metadata
from so3krates.export.core import graph_inputs
from so3krates.model.checkpoint import save_checkpoint

SPECIES = [1, 6, 8]
#: exported vs checkpoint, same dtype: the same operations, so differences are round-off only.
TOLERANCE = {"float64": 1e-10, "float32": 1e-5}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("export") / "best.pt"
    save_checkpoint(path, make_force_field(preset("tiny"), torch.float64).model, SPECIES)
    return path


@pytest.fixture(scope="module")
def exports(checkpoint, tmp_path_factory):
    """float64 exports shared by the tests below (tracing a pt2 program takes ~15 s)."""
    folder = tmp_path_factory.mktemp("exports")
    paths = {"torchscript": folder / "model.ts", "pt2": folder / "model.pt2"}
    for fmt, path in paths.items():
        export_model(checkpoint, path, fmt=fmt)
    return paths


def structures() -> dict[str, Atoms]:
    single = Atoms("O", positions=[[0.0, 0.0, 0.0]])  # no edges at all
    return {"ethanol": ethanol(), "periodic": triclinic_cell(), "single atom": single}


def _compare(exported_path, checkpoint, dtype: str) -> None:
    tolerance = TOLERANCE[dtype]
    for name, atoms in structures().items():
        reference = atoms.copy()
        reference.calc = So3kratesCalculator(checkpoint, dtype=dtype)
        atoms.calc = ExportedCalculator(exported_path)
        scale = max(1.0, np.abs(reference.get_forces()).max())
        assert atoms.get_potential_energy() == pytest.approx(
            reference.get_potential_energy(), rel=tolerance, abs=tolerance
        ), name
        np.testing.assert_allclose(atoms.get_forces(), reference.get_forces(), atol=tolerance * scale)
        np.testing.assert_allclose(
            atoms.get_potential_energies(), reference.get_potential_energies(), atol=tolerance * 10
        )
        if atoms.pbc.any():
            np.testing.assert_allclose(atoms.get_stress(), reference.get_stress(), atol=tolerance)


@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_torchscript_gives_the_checkpoints_numbers(checkpoint, tmp_path, dtype):
    path = tmp_path / "model.ts"
    metadata = export_model(checkpoint, path, fmt="torchscript", dtype=dtype)
    assert read_metadata(path) == metadata
    assert metadata["dtype"] == dtype and metadata["species"] == SPECIES and metadata["cutoff"] == 4.0
    _compare(path, checkpoint, dtype)


def test_pt2_gives_the_checkpoints_numbers(checkpoint, exports):
    assert read_metadata(exports["pt2"])["format"] == "pt2"
    _compare(exports["pt2"], checkpoint, "float64")


def test_pt2_with_paired_edges_gives_the_numbers_of_the_plain_list(checkpoint, tmp_path):
    """A program that evaluates the radial filters once per pair (what compile="aoti" builds)."""
    path = tmp_path / "paired.pt2"
    assert export_model(checkpoint, path, fmt="pt2", paired=True)["paired_edges"] is True
    diatomic = Atoms("CO", positions=[[0.0, 0.0, 0.0], [1.2, 0.1, 0.0]])  # one pair
    for name, atoms in {**structures(), "diatomic": diatomic}.items():  # a single atom: no pairs
        reference = atoms.copy()
        reference.calc = So3kratesCalculator(checkpoint, pair_edges=False)
        atoms.calc = ExportedCalculator(path)
        energy = reference.get_potential_energy()
        assert atoms.get_potential_energy() == pytest.approx(energy, abs=1e-10), name
        np.testing.assert_allclose(atoms.get_forces(), reference.get_forces(), atol=1e-10)
        if atoms.pbc.any():
            np.testing.assert_allclose(atoms.get_stress(), reference.get_stress(), atol=1e-10)
    plain = ethanol()
    plain.calc = ExportedCalculator(path, pair_edges=False)
    with pytest.raises(So3kratesError, match="expects paired edges"):
        plain.get_forces()
    with pytest.raises(DataError, match="paired edges need a pt2 or aoti export"):
        export_model(checkpoint, tmp_path / "paired.ts", fmt="torchscript", paired=True)
    with pytest.raises(DataError, match="inductor settings apply to aoti exports only"):
        export_model(checkpoint, tmp_path / "x.pt2", fmt="pt2", inductor_configs={"cpp.threads": 1})


@pytest.mark.slow
def test_pt2_in_float32_with_the_fused_layers_gives_the_checkpoints_numbers(checkpoint, tmp_path):
    path = tmp_path / "model.pt2"
    export_model(checkpoint, path, fmt="pt2", dtype="float32", fused=True)
    _compare(path, checkpoint, "float32")


@pytest.mark.slow
def test_aoti_gives_the_checkpoints_numbers_on_two_threads(checkpoint, tmp_path):
    """AOTInductor compiles for about a minute; its kernels must also be safe on two threads.

    Compiled with kernel profiling on (``inductor_configs``, as benchmarks/profile_kernels.py does): the
    profiler must then see inductor's generated kernels by name.
    """
    path = tmp_path / "model.pt2"
    export_model(
        checkpoint, path, fmt="aoti", dtype="float64", inductor_configs={"cpp.enable_kernel_profile": True}
    )
    assert read_metadata(path)["format"] == "aoti"
    program = load_exported(path)
    with torch.profiler.profile() as profiler:
        program(*graph_inputs(atoms_to_graph(ethanol(), program.cutoff)))
    assert any("cpp_fused" in event.key for event in profiler.key_averages())
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        _compare(path, checkpoint, "float64")
        big = triclinic_cell().repeat((2, 2, 2))
        big.calc = ExportedCalculator(path)
        reference = big.copy()
        reference.calc = So3kratesCalculator(checkpoint)
        np.testing.assert_allclose(big.get_forces(), reference.get_forces(), atol=1e-10)
    finally:
        torch.set_num_threads(threads)


NO_TRAINING_CODE = """
import json, sys
import numpy as np, torch
sys.modules["so3krates"] = None  # any import of the package now fails
fmt, path, inputs = sys.argv[1:4]
data = np.load(inputs)
args = [torch.from_numpy(data[k]) for k in ("positions", "numbers", "idx_i", "idx_j", "shifts", "cell")]
function = torch.jit.load(path) if fmt == "torchscript" else torch.export.load(path).module()
energy, energies, forces, virial = function(*args)
print(json.dumps({"energy": float(energy), "forces": forces.tolist()}))
"""


@pytest.mark.parametrize("fmt", ["torchscript", "pt2"])
def test_an_export_runs_with_torch_alone(checkpoint, exports, tmp_path, fmt):
    path = exports[fmt]
    atoms = triclinic_cell()
    graph = atoms_to_graph(atoms, 4.0)
    inputs = tmp_path / "inputs.npz"
    np.savez(
        inputs,
        positions=graph.positions.numpy(),
        numbers=graph.atomic_numbers.numpy(),
        idx_i=graph.idx_i.numpy(),
        idx_j=graph.idx_j.numpy(),
        shifts=graph.shifts.numpy(),
        cell=graph.cell[0].numpy(),
    )
    result = subprocess.run(
        [sys.executable, "-c", NO_TRAINING_CODE, fmt, str(path), str(inputs)],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout.strip().splitlines()[-1])
    atoms.calc = So3kratesCalculator(checkpoint)
    assert out["energy"] == pytest.approx(atoms.get_potential_energy(), rel=1e-12)
    np.testing.assert_allclose(np.array(out["forces"]), atoms.get_forces(), atol=1e-10)


def test_export_command_and_its_errors(checkpoint, tmp_path, capsys):
    out = tmp_path / "model.ts"
    assert main(["export", "--model", str(checkpoint), "--format", "torchscript", "--out", str(out)]) == 0
    assert out.is_file() and "receptive field" in capsys.readouterr().out
    assert load_exported(out).metadata["format"] == "torchscript"
    assert load_exported(out).metadata["radial_table_intervals"] is None  # float64: the exact network
    fast = tmp_path / "fast.ts"
    command = ["export", "--model", str(checkpoint), "--format", "torchscript", "--out", str(fast)]
    assert main([*command, "--dtype", "float32", "--fused"]) == 0
    assert "radial filters tabulated (2048 intervals)" in capsys.readouterr().out
    assert main([*command, "--dtype", "float32", "--fused", "--radial-table", "off"]) == 0
    assert load_exported(fast).metadata["radial_table_intervals"] is None
    fast.unlink()
    # pt2 and aoti files must end in .pt2; nothing is written otherwise.
    bad = tmp_path / "model.bin"
    assert main(["export", "--model", str(checkpoint), "--format", "pt2", "--out", str(bad)]) == 2
    assert "must end in .pt2" in capsys.readouterr().err and not bad.exists()
    paired = ["export", "--model", str(checkpoint), "--format", "torchscript", "--paired-edges"]
    assert main([*paired, "--out", str(bad)]) == 2
    assert "paired edges need a pt2 or aoti export" in capsys.readouterr().err and not bad.exists()
    missing = tmp_path / "nothing.pt"
    assert main(["export", "--model", str(missing), "--format", "torchscript", "--out", str(out)]) == 2
    assert "checkpoint not found" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.ts"]  # no temporary files left


def test_files_that_are_not_exports_are_refused(tmp_path):
    plain = tmp_path / "notes.txt"
    plain.write_text("not a model")
    with pytest.raises(DataError, match="not a so3krates export"):
        load_exported(plain)
    archive = tmp_path / "other.pt2"
    with zipfile.ZipFile(archive, "w") as handle:
        handle.writestr("archive/data.pkl", b"")
    with pytest.raises(DataError, match=r"no metadata\.json"):
        load_exported(archive)


@pytest.mark.skipif(not os.path.exists("/proc/self/statm"), reason="needs Linux /proc to read memory use")
@pytest.mark.parametrize("fmt", ["torchscript", "pt2"])
def test_exported_model_memory_stays_constant_when_sizes_change(exports, fmt):
    """Long MD with an exported model: 1000 calls over three sizes, no growth (and no recompilation)."""
    calculator = ExportedCalculator(exports[fmt], skin=0.2)
    rng = np.random.default_rng(0)
    structures = [ethanol(), ethanol()[:6], triclinic_cell()]

    def run(n_calls: int) -> None:
        for k in range(n_calls):
            atoms = structures[(k // 50) % 3]
            atoms.positions += rng.normal(0.0, 0.01, atoms.positions.shape)
            atoms.calc = calculator
            atoms.get_forces()

    run(300)
    before = rss_mb()
    run(1000)
    growth = rss_mb() - before
    assert growth < 8.0, f"resident memory grew by {growth:.1f} MB over 1000 calls"


@pytest.mark.slow
def test_calculator_compiled_ahead_of_time_gives_the_same_numbers_and_is_cached(
    checkpoint, tmp_path, monkeypatch
):
    """So3kratesCalculator(compile="aoti"): eager numbers; a second calculator reuses the compiled program."""
    import time

    monkeypatch.setenv("SO3KRATES_CACHE_DIR", str(tmp_path))
    # Ethanol (72 edges) takes the fused program, the triclinic cell the per-equation one.
    monkeypatch.setattr("so3krates.export.core.AOTI_FUSED_MAX_EDGES", 100)
    compiled = So3kratesCalculator(checkpoint, compile="aoti")
    assert not list((tmp_path / "aoti").glob("*.pt2"))  # compiled at the first call, for its size class
    for atoms in (ethanol(), triclinic_cell()):
        reference = atoms.copy()
        reference.calc = So3kratesCalculator(checkpoint)
        atoms.calc = compiled
        np.testing.assert_allclose(atoms.get_forces(), reference.get_forces(), atol=1e-10)
        assert atoms.get_potential_energy() == pytest.approx(reference.get_potential_energy(), rel=1e-12)
        if atoms.pbc.any():
            np.testing.assert_allclose(atoms.get_stress(), reference.get_stress(), atol=1e-10)
    assert len(list((tmp_path / "aoti").glob("*.pt2"))) == 2
    assert set(compiled._aoti) == {(True, True, False), (False, True, False)}  # (fused, paired, slotted)
    start = time.perf_counter()
    again = ethanol()
    again.calc = So3kratesCalculator(checkpoint, compile="aoti")
    again.get_forces()
    assert time.perf_counter() - start < 15.0, "the cached program was compiled again"
    assert len(list((tmp_path / "aoti").glob("*.pt2"))) == 2


@pytest.mark.slow
def test_calculator_on_several_threads_takes_the_slotted_program(checkpoint, tmp_path, monkeypatch):
    """Its kernels run on all threads (no scatter-adds): eager numbers, the same on every call."""
    monkeypatch.setenv("SO3KRATES_CACHE_DIR", str(tmp_path))
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        compiled = So3kratesCalculator(checkpoint, compile="aoti", single_thread_edges=0)
        box = triclinic_cell().repeat((2, 2, 2))
        for atoms in (ethanol(), box):
            reference = atoms.copy()
            reference.calc = So3kratesCalculator(checkpoint)
            atoms.calc = compiled
            forces = atoms.get_forces()
            np.testing.assert_allclose(forces, reference.get_forces(), atol=1e-10)
            assert atoms.get_potential_energy() == pytest.approx(reference.get_potential_energy(), rel=1e-12)
            if atoms.pbc.any():
                np.testing.assert_allclose(atoms.get_stress(), reference.get_stress(), atol=1e-10)
        assert set(compiled._aoti) == {(True, True, True)}
        assert compiled.exported.metadata["edge_slots"] is True
        # Threaded kernels once corrupted memory in this model's backward pass (export_model): many calls,
        # each giving the same numbers (no atomic additions, so the same order of summation every time).
        for step in range(40):
            box.positions[step % len(box)] += 0.001
            first = compiled.get_property("forces", box).copy()
            compiled.reset()
            np.testing.assert_array_equal(compiled.get_property("forces", box), first)
        single = box.copy()
        single.calc = So3kratesCalculator(checkpoint, compile="aoti", single_thread_edges=10**9)
        np.testing.assert_allclose(single.get_forces(), box.get_forces(), atol=1e-10)
        assert set(single.calc._aoti) == {(True, True, False)}  # one thread: the plain program
    finally:
        torch.set_num_threads(threads)


def test_compile_modes_are_checked():
    from so3krates.md.config import MDConfig

    model = make_force_field(preset("tiny"), torch.float64).model
    with pytest.raises(ValueError, match="compile must be"):
        So3kratesCalculator(model, compile="fast")
    with pytest.raises(So3kratesError, match="CPU program"):
        So3kratesCalculator(model, compile="aoti", device="meta")
    assert MDConfig(model="m.pt", structure="s.xyz", compile=True).compile == "inductor"
    assert MDConfig(model="m.pt", structure="s.xyz", compile=False).compile == "none"


def test_compiled_bias_additions_stay_apart_from_products():
    """Inside _bias_additions_apart inductor keeps mm + add (fusable), not addmm (copies the addend)."""
    from torch._inductor.utils import run_and_get_code

    from so3krates.export.core import _bias_additions_apart

    def filters(a, b, c):
        return torch.nn.functional.silu(torch.mm(a, b) + c)

    inputs = (torch.randn(4096, 132), torch.randn(132, 132), torch.randn(132))
    torch._dynamo.reset()
    with _bias_additions_apart():
        result, (apart,) = run_and_get_code(torch.compile(filters), *inputs)
    torch._dynamo.reset()
    _, (default,) = run_and_get_code(torch.compile(filters), *inputs)
    torch._dynamo.reset()
    torch.testing.assert_close(result, filters(*inputs))
    assert "addmm" in default  # what the context prevents
    assert "addmm" not in apart
