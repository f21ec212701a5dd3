"""Exported models: same numbers as the checkpoint in every format, dtype and plan, and no training code.

The programs that ``So3kratesCalculator(compile="aoti")`` compiles are traced with the plans the planner
picks for it (by size and threads); their pt2 traces are the same ATen graphs that AOTInductor compiles,
and each is checked here against the reference path. The compiled programs themselves are checked in the
slow tests at the end.
"""

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

from helpers import ethanol, make_force_field, make_model, reference_outputs, rss_mb, triclinic_cell
from so3krates import So3kratesCalculator, atoms_to_graph, preset
from so3krates.cli.main import main
from so3krates.errors import DataError, So3kratesError
from so3krates.export import export_model, load_exported, read_metadata
from so3krates.export.formats import METADATA_FILE
from so3krates.model.checkpoint import save_checkpoint
from so3krates.ops import pair_messages
from so3krates.runtime import Plan, PlanError, Planner
from so3krates.runtime.programs import graph_inputs

SPECIES = [1, 6, 8]
#: exported vs checkpoint, same dtype: the same operations, so differences are round-off only.
TOLERANCE = {"float64": 1e-10, "float32": 1e-5}
DTYPES = {"float64": torch.float64, "float32": torch.float32}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("export") / "best.pt"
    save_checkpoint(path, make_force_field(preset("tiny"), torch.float64).model, SPECIES)
    return path


@pytest.fixture(scope="module")
def exported(checkpoint, tmp_path_factory):
    """A float64 pt2 export of the default plan, shared by the tests below (tracing takes a few seconds)."""
    path = tmp_path_factory.mktemp("exports") / "model.pt2"
    export_model(checkpoint, path, fmt="pt2")
    return path


def structures() -> dict[str, Atoms]:
    single = Atoms("O", positions=[[0.0, 0.0, 0.0]])  # no edges at all
    diatomic = Atoms("CO", positions=[[0.0, 0.0, 0.0], [1.2, 0.1, 0.0]])  # one pair
    return {"ethanol": ethanol(), "periodic": triclinic_cell(), "single atom": single, "diatomic": diatomic}


def _compare(exported_path, checkpoint, dtype: str, **calculator_options) -> None:
    tolerance = TOLERANCE[dtype]
    for name, atoms in structures().items():
        reference = atoms.copy()
        reference.calc = So3kratesCalculator(checkpoint, dtype=dtype)
        atoms.calc = So3kratesCalculator(exported_path, **calculator_options)
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


def test_pt2_gives_the_checkpoints_numbers(checkpoint, exported):
    metadata = read_metadata(exported)
    assert metadata["format"] == "pt2" and metadata["dtype"] == "float64" and metadata["species"] == SPECIES
    assert metadata["plan"] == {
        "layers": "modules",
        "radial": "network",
        "pairs": False,
        "slots": False,
        "blocks": False,
        "kernel": False,
    }
    assert metadata["spline_intervals"] is None and metadata["cutoff"] == 4.0
    _compare(exported, checkpoint, "float64")
    # A plain neighbour list works as well as one in pair order (which the calculator builds).
    atoms = triclinic_cell()
    plain = load_exported(exported)(atoms_to_graph(atoms, 4.0), compute_stress=True)
    expected = reference_outputs(make_model(preset("tiny"), torch.float64).requires_grad_(False), [atoms])
    np.testing.assert_allclose(plain["forces"].numpy(), expected["forces"], atol=1e-10)
    np.testing.assert_allclose(plain["stress"].numpy(), expected["stress"], atol=1e-10)


def calculator_plans(dtype: torch.dtype) -> list[Plan]:
    """The plans of the programs So3kratesCalculator(compile="aoti") compiles, for every size and threads:
    large graphs run in edge blocks (eager, no program), or with blocks turned off in the modules' program."""
    plans = {
        planner.plan(n_edges, dtype, frozen=True, pairs=True, threads=threads, compile="aoti")
        for planner in (Planner(), Planner(blocks_min_edges=0))
        for n_edges in (0, 72, 10**6, 10**9)
        for threads in (1, 2)
    }
    assert Planner().plan(10**9, dtype, frozen=True, pairs=True, compile="aoti").blocks
    return sorted((plan for plan in plans if not plan.blocks), key=lambda plan: plan.describe())


@pytest.mark.parametrize("dtype", sorted(DTYPES))
def test_the_programs_the_calculator_compiles_give_the_reference_numbers(dtype, tmp_path):
    """Traced with each plan the calculator picks: fused (spline in float32) with and without slots, and
    the modules beyond the memory budget with blocks turned off; against the reference path, one structure
    at a time."""
    plans = calculator_plans(DTYPES[dtype])
    # With the pair-message kernel (where it builds) large graphs take the fused layers with the kernel
    # instead of the modules.
    kernel = pair_messages.available()
    assert len(plans) == (4 if kernel else 3) and {plan.slots for plan in plans} == {False, True}
    assert {plan.kernel for plan in plans} == ({False, True} if kernel else {False})
    model = make_model(preset("tiny"), DTYPES[dtype])
    tolerance = TOLERANCE[dtype] if dtype == "float64" else 2e-5
    for plan in plans:
        path = tmp_path / f"{plan.layers}-{plan.slots}.pt2"
        metadata = export_model(model, path, fmt="pt2", dtype=dtype, plan=plan)
        assert metadata["plan"] == plan.as_dict()
        assert metadata["inputs"][6:] == (["slots_i", "slots_j"] if plan.slots else [])
        exported = load_exported(path)
        for name, atoms in structures().items():
            expected = reference_outputs(model.requires_grad_(False), [atoms])
            out = exported(atoms_to_graph(atoms, model.cutoff, pairs=True), compute_stress=True)
            scale = max(1.0, np.abs(expected["forces"]).max())
            message = f"{plan.describe()}, {name}"
            assert float(out["energy"][0]) == pytest.approx(expected["energy"][0], abs=tolerance * scale), (
                message
            )
            np.testing.assert_allclose(out["forces"].numpy(), expected["forces"], atol=tolerance * scale)
            np.testing.assert_allclose(out["stress"].numpy(), expected["stress"], atol=10 * tolerance * scale)


def test_a_program_with_pairs_refuses_a_plain_list_and_batches(checkpoint, tmp_path):
    path = tmp_path / "pairs.pt2"
    export_model(checkpoint, path, fmt="pt2", plan=Plan("modules", "network", pairs=True))
    exported = load_exported(path)
    with pytest.raises(PlanError, match="needs the edges in pair order"):
        exported(atoms_to_graph(ethanol(), 4.0))
    graph = atoms_to_graph(ethanol(), 4.0, pairs=True)
    with pytest.raises(PlanError, match="first derivatives only"):
        exported(graph, create_graph=True)
    from so3krates import collate

    with pytest.raises(PlanError, match="one structure at a time, not a batch of 2"):
        exported(collate([graph, graph]))


NO_TRAINING_CODE = """
import json, sys
import numpy as np, torch
sys.modules["so3krates"] = None  # any import of the package now fails
path, inputs = sys.argv[1:3]
data = np.load(inputs)
args = [torch.from_numpy(data[k]) for k in ("positions", "numbers", "idx_i", "idx_j", "shifts", "cell")]
energy, energies, forces, virial = torch.export.load(path).module()(*args)
print(json.dumps({"energy": float(energy), "forces": forces.tolist()}))
"""


def test_an_export_runs_with_torch_alone(checkpoint, exported, tmp_path):
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
        [sys.executable, "-c", NO_TRAINING_CODE, str(exported), str(inputs)],
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
    out = tmp_path / "model.pt2"
    command = ["export", "--model", str(checkpoint), "--format", "pt2", "--out", str(out)]
    assert main([*command, "--dtype", "float32", "--layers", "fused", "--pairs", "--slots"]) == 0
    printed = capsys.readouterr().out
    assert "receptive field" in printed and "plan: fused layers, spline, pairs, slots" in printed
    metadata = load_exported(out).metadata
    assert metadata["plan"] == {
        "layers": "fused",
        "radial": "spline",
        "pairs": True,
        "slots": True,
        "blocks": False,
        "kernel": False,
    }
    assert metadata["spline_intervals"] == 2048 and metadata["dtype"] == "float32"
    # Refused before anything is written: a wrong suffix, an illegal plan, plan options for ML-IAP.
    bad = tmp_path / "model.bin"
    assert main(["export", "--model", str(checkpoint), "--format", "pt2", "--out", str(bad)]) == 2
    assert "must end in .pt2" in capsys.readouterr().err and not bad.exists()
    illegal = tmp_path / "illegal.pt2"
    assert (
        main(["export", "--model", str(checkpoint), "--format", "pt2", "--out", str(illegal), "--slots"]) == 2
    )
    assert "slots need the fused layers" in capsys.readouterr().err and not illegal.exists()
    mliap = [
        "export",
        "--model",
        str(checkpoint),
        "--format",
        "lammps-mliap",
        "--out",
        str(tmp_path / "m.pkl"),
    ]
    assert main([*mliap, "--pairs"]) == 2
    assert "chooses its plan per call" in capsys.readouterr().err
    assert main([*mliap, "--species", "1", "6", "7"]) == 2  # nitrogen was never in the training data
    assert "species [7] are not among the elements" in capsys.readouterr().err
    missing = tmp_path / "nothing.pt"
    assert main(["export", "--model", str(missing), "--format", "pt2", "--out", str(tmp_path / "m.pt2")]) == 2
    assert "checkpoint not found" in capsys.readouterr().err
    # An existing file is not replaced without --overwrite.
    before = out.read_bytes()
    assert main(["export", "--model", str(checkpoint), "--format", "pt2", "--out", str(out)]) == 2
    assert "exists; pass --overwrite" in capsys.readouterr().err and out.read_bytes() == before
    assert (
        main(["export", "--model", str(checkpoint), "--format", "pt2", "--out", str(out), "--overwrite"]) == 0
    )
    assert load_exported(out).metadata["plan"]["layers"] == "modules"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.pt2"]  # no temporary files left
    with pytest.raises(DataError, match="inductor settings apply to aoti exports only"):
        export_model(checkpoint, tmp_path / "x.pt2", fmt="pt2", inductor_configs={"cpp.threads": 1})


def test_files_that_are_not_exports_or_too_old_are_refused(exported, tmp_path):
    plain = tmp_path / "notes.txt"
    plain.write_text("not a model")
    with pytest.raises(DataError, match="not a so3krates export"):
        load_exported(plain)
    archive = tmp_path / "other.pt2"
    with zipfile.ZipFile(archive, "w") as handle:
        handle.writestr("archive/data.pkl", b"")
    with pytest.raises(DataError, match=r"no metadata\.json"):
        load_exported(archive)
    old = tmp_path / "old.pt2"  # written by 0.1 (export schema 1), e.g. a TorchScript file
    with zipfile.ZipFile(old, "w") as handle:
        payload = {"export_schema_version": 1, "format": "torchscript", "so3krates_version": "0.1.0"}
        handle.writestr(f"archive/extra/{METADATA_FILE}", json.dumps(payload))
    with pytest.raises(
        DataError, match=r"exported by so3krates 0\.1\.0 \(export schema 1\).*export the checkpoint"
    ):
        load_exported(old)
    with pytest.raises(So3kratesError, match="already compiled"):
        So3kratesCalculator(exported, compile="aoti")


@pytest.mark.skipif(not os.path.exists("/proc/self/statm"), reason="needs Linux /proc to read memory use")
def test_exported_model_memory_stays_constant_when_sizes_change(exported):
    """Long MD with an exported model: 1000 calls over three sizes, no growth (and no recompilation)."""
    calculator = So3kratesCalculator(exported, skin=0.2)
    rng = np.random.default_rng(0)
    sizes = [ethanol(), ethanol()[:6], triclinic_cell()]

    def run(n_calls: int) -> None:
        for k in range(n_calls):
            atoms = sizes[(k // 50) % 3]
            atoms.positions += rng.normal(0.0, 0.01, atoms.positions.shape)
            atoms.calc = calculator
            atoms.get_forces()

    run(300)
    before = rss_mb()
    run(1000)
    growth = rss_mb() - before
    assert growth < 8.0, f"resident memory grew by {growth:.1f} MB over 1000 calls"


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
    exported = load_exported(path)
    assert exported.format == "aoti"
    with torch.profiler.profile() as profiler:
        exported.program.function(*graph_inputs(atoms_to_graph(ethanol(), exported.cutoff), exported.plan))
    assert any("cpp_fused" in event.key for event in profiler.key_averages())
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        _compare(path, checkpoint, "float64")
        big = triclinic_cell().repeat((2, 2, 2))
        big.calc = So3kratesCalculator(path)
        reference = big.copy()
        reference.calc = So3kratesCalculator(checkpoint)
        np.testing.assert_allclose(big.get_forces(), reference.get_forces(), atol=1e-10)
    finally:
        torch.set_num_threads(threads)


@pytest.mark.slow
def test_calculator_compiled_ahead_of_time_gives_the_same_numbers_and_is_cached(
    checkpoint, tmp_path, monkeypatch
):
    """So3kratesCalculator(compile="aoti"): eager numbers; a second calculator reuses the compiled program."""
    import time

    monkeypatch.setenv("SO3KRATES_CACHE_DIR", str(tmp_path))
    # Ethanol (72 edges) takes the fused program, the triclinic cell the modules' (the pair-message kernel,
    # which would take it too, has its own test: test_calculator_programs_with_the_pair_kernel_...).
    planner = Planner(aoti_fused_max_edges=100, kernel_min_edges=None)
    compiled = So3kratesCalculator(checkpoint, compile="aoti", planner=planner)
    assert not list((tmp_path / "aoti").glob("*.pt2"))  # compiled at the first call, for its plan
    for atoms in (ethanol(), triclinic_cell()):
        reference = atoms.copy()
        reference.calc = So3kratesCalculator(checkpoint)
        atoms.calc = compiled
        np.testing.assert_allclose(atoms.get_forces(), reference.get_forces(), atol=1e-10)
        assert atoms.get_potential_energy() == pytest.approx(reference.get_potential_energy(), rel=1e-12)
        if atoms.pbc.any():
            np.testing.assert_allclose(atoms.get_stress(), reference.get_stress(), atol=1e-10)
    assert len(list((tmp_path / "aoti").glob("*.pt2"))) == 2
    assert set(compiled.force_field._evaluators) == {
        Plan("fused", "network", pairs=True),
        Plan("modules", "network", pairs=True),
    }
    for program in compiled.force_field._evaluators.values():  # called through the flat runner
        assert program._run is not program.function
    start = time.perf_counter()
    again = ethanol()
    again.calc = So3kratesCalculator(checkpoint, compile="aoti", planner=planner)  # the same plan
    again.get_forces()
    assert time.perf_counter() - start < 15.0, "the cached program was compiled again"
    assert len(list((tmp_path / "aoti").glob("*.pt2"))) == 2


def _agrees_with_eager(compiled, checkpoint, dtype: str, structures) -> float:
    """Energy, forces and stress of ``compiled`` against the eager calculator without the pair-message
    kernel, on each structure; returns the force scale of the last one."""
    tolerance = TOLERANCE[dtype]
    for atoms in structures:
        reference = atoms.copy()
        reference.calc = So3kratesCalculator(checkpoint, dtype=dtype, planner=Planner(kernel_min_edges=None))
        atoms.calc = compiled
        forces = atoms.get_forces()
        scale = max(1.0, np.abs(forces).max())
        np.testing.assert_allclose(forces, reference.get_forces(), atol=tolerance * scale)
        energy = reference.get_potential_energy()
        assert atoms.get_potential_energy() == pytest.approx(energy, rel=tolerance, abs=tolerance)
        if atoms.pbc.any():
            np.testing.assert_allclose(atoms.get_stress(), reference.get_stress(), atol=tolerance)
    return scale


@pytest.mark.slow
@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_calculator_on_several_threads_takes_the_program_with_slots(checkpoint, tmp_path, monkeypatch, dtype):
    """Its kernels run on all threads (no scatter-adds): eager numbers, the same on every call. In float32
    this is the program of fast multi-threaded MD: fused layers, spline, pairs, slots."""
    monkeypatch.setenv("SO3KRATES_CACHE_DIR", str(tmp_path))
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    tolerance = TOLERANCE[dtype]
    try:
        compiled = So3kratesCalculator(
            checkpoint,
            dtype=dtype,
            compile="aoti",
            planner=Planner(single_thread_edges=0, kernel_min_edges=None),  # the kernel: the next test
        )
        box = triclinic_cell().repeat((2, 2, 2))
        scale = _agrees_with_eager(compiled, checkpoint, dtype, (ethanol(), box))
        spline = "spline" if dtype == "float32" else "network"
        assert set(compiled.force_field._evaluators) == {Plan("fused", spline, pairs=True, slots=True)}
        # Threaded kernels once corrupted memory in this model's backward pass: many calls, each giving
        # the same numbers (no atomic additions, so the same order of summation every time).
        for step in range(40):
            box.positions[step % len(box)] += 0.001
            first = compiled.get_property("forces", box).copy()
            compiled.reset()
            np.testing.assert_array_equal(compiled.get_property("forces", box), first)
        single = box.copy()
        single.calc = So3kratesCalculator(
            checkpoint,
            dtype=dtype,
            compile="aoti",
            planner=Planner(single_thread_edges=10**9, kernel_min_edges=None),
        )
        np.testing.assert_allclose(single.get_forces(), box.get_forces(), atol=tolerance * scale)
        assert set(single.calc.force_field._evaluators) == {Plan("fused", spline, pairs=True)}  # one thread
    finally:
        torch.set_num_threads(threads)


@pytest.mark.slow
@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_calculator_programs_with_the_pair_kernel_give_the_same_numbers(
    checkpoint, tmp_path, monkeypatch, dtype
):
    """The kernel called from an aoti program (threaded, with slots for the other sums): the numbers of the
    eager path without it, the same on every call (each sum is written by one thread, in a fixed order)."""
    if not pair_messages.available():
        pytest.skip(f"the pair-message kernel cannot be built here: {pair_messages.unavailable_reason()}")
    monkeypatch.setenv("SO3KRATES_CACHE_DIR", str(tmp_path))
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        planner = Planner(single_thread_edges=0, kernel_min_edges=0)
        compiled = So3kratesCalculator(checkpoint, dtype=dtype, compile="aoti", planner=planner)
        box = triclinic_cell().repeat((2, 2, 2))
        _agrees_with_eager(compiled, checkpoint, dtype, (ethanol(), box))
        spline = "spline" if dtype == "float32" else "network"
        assert set(compiled.force_field._evaluators) == {
            Plan("fused", spline, pairs=True, slots=True, kernel=True)
        }
        first = box.get_forces().copy()
        for _ in range(5):
            compiled.reset()
            np.testing.assert_array_equal(compiled.get_property("forces", box), first)
    finally:
        torch.set_num_threads(threads)


@pytest.mark.slow
@pytest.mark.parametrize("kernel", [False, True], ids=["messages", "kernel"])
def test_large_graphs_take_the_program_with_threaded_loops(checkpoint, tmp_path, monkeypatch, kernel):
    """Graphs of more than ``Planner.parallel_loops_min_edges`` edges run the program traced from the
    larger example, whose generated loops run on every thread and whose scatter-adds are ATen's: eager
    numbers, bit for bit the same on every call (no atomic additions), the smaller graph on the program of
    the small example."""
    if kernel and not pair_messages.available():
        pytest.skip(f"the pair-message kernel cannot be built here: {pair_messages.unavailable_reason()}")
    monkeypatch.setenv("SO3KRATES_CACHE_DIR", str(tmp_path))
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        box = triclinic_cell().repeat((2, 2, 2))
        cutoff = So3kratesCalculator(checkpoint).force_field.cutoff
        n_edges = atoms_to_graph(box, cutoff, pairs=True).n_edges
        planner = Planner(
            single_thread_edges=0,
            kernel_min_edges=0 if kernel else None,
            parallel_loops_min_edges=n_edges - 1,
        )
        compiled = So3kratesCalculator(checkpoint, dtype="float32", compile="aoti", planner=planner)
        _agrees_with_eager(compiled, checkpoint, "float32", (ethanol(), box))
        plan = Plan("fused", "spline", pairs=True, slots=True, kernel=kernel)
        assert set(compiled.force_field._parallel_programs) == {plan}  # the box
        assert set(compiled.force_field._evaluators) == {plan}  # ethanol: fewer edges
        first = box.get_forces().copy()
        for step in range(10):
            compiled.reset()
            np.testing.assert_array_equal(compiled.get_property("forces", box), first, err_msg=f"call {step}")
        programs = list((tmp_path / "aoti").glob("*.pt2"))
        assert len(programs) == 2  # one per example
        for path in programs:  # threaded atomic additions would add in another order on every call
            assert _threaded_atomic_kernels(path) == [], path.name
    finally:
        torch.set_num_threads(threads)


def _threaded_atomic_kernels(package) -> list[str]:
    """The generated kernels of an AOTInductor package that add atomically inside a threaded loop."""
    with zipfile.ZipFile(package) as archive:
        sources = [archive.read(n).decode() for n in archive.namelist() if n.endswith(".kernel.cpp")]
    assert sources, f"{package}: no generated kernels in the package"
    kernels = [k for source in sources for k in source.split('extern "C"')[1:]]
    return [k.split("(")[0].split()[-1] for k in kernels if "#pragma omp" in k and "atomic_add" in k]


def test_the_planner_threads_the_loops_of_large_slot_programs_only():
    planner = Planner()
    slots, plain = Plan("fused", "spline", pairs=True, slots=True), Plan("fused", "spline", pairs=True)
    limit = planner.parallel_loops_min_edges
    assert limit == 16_000
    assert planner.parallel_loops(slots, limit + 1) and not planner.parallel_loops(slots, limit)
    assert not planner.parallel_loops(plain, 10**7)  # loops on one thread: no slots
    assert not Planner(parallel_loops_min_edges=None).parallel_loops(slots, 10**7)


@pytest.mark.slow
@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_compiled_calculator_gives_the_same_forces(dtype):
    """torch.compile (dynamic shapes): same forces, and new structure sizes do not recompile. In float32
    the plan the calculator takes is fused layers, spline, pairs."""
    model = make_force_field(preset("tiny"), torch.float64).model
    plain = So3kratesCalculator(model, dtype=dtype)
    # One plan for every size here: without the pair-message kernel, which ethanol's 72 edges would take
    # and its smaller pieces not (the kernel in programs: test_calculator_programs_with_the_pair_kernel...).
    compiled = So3kratesCalculator(model, dtype=dtype, compile=True, planner=Planner(kernel_min_edges=None))
    tolerance = 1e-10 if dtype == "float64" else 1e-4
    threads = torch.get_num_threads()
    torch.set_num_threads(2)  # inductor's threaded CPU kernels crashed here before (double free)
    try:
        for atoms in (ethanol(0), ethanol(1)[:6], ethanol(2)):
            expected = plain.get_forces(atoms.copy())
            np.testing.assert_allclose(compiled.get_forces(atoms.copy()), expected, atol=tolerance)
        # Further sizes (atoms and edges) reuse the compiled graphs: no recompilation in long runs.
        graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
        for atoms in (ethanol(3)[:4], ethanol(4)[:7], ethanol(5)[:8], ethanol(6)[:5]):
            expected = plain.get_forces(atoms.copy())
            np.testing.assert_allclose(compiled.get_forces(atoms.copy()), expected, atol=tolerance)
        assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == graphs
        spline = "spline" if dtype == "float32" else "network"
        assert set(compiled.force_field._evaluators) == {Plan("fused", spline, pairs=True)}
    finally:
        torch.set_num_threads(threads)


def test_compile_modes_are_checked():
    from so3krates.md.config import MDConfig

    model = make_force_field(preset("tiny"), torch.float64).model
    with pytest.raises(PlanError, match="compile must be one of"):
        So3kratesCalculator(model, compile="fast")
    with pytest.raises(PlanError, match="CPU program"):
        So3kratesCalculator(model, compile="aoti", device="meta")
    assert MDConfig(model="m.pt", structure="s.xyz", compile=True).compile == "inductor"
    assert MDConfig(model="m.pt", structure="s.xyz", compile=False).compile == "none"


def test_compiled_bias_additions_stay_apart_from_products():
    """Inside bias_additions_apart inductor keeps mm + add (fusable), not addmm (copies the addend)."""
    from torch._inductor.utils import run_and_get_code

    from so3krates.runtime.programs import bias_additions_apart

    def filters(a, b, c):
        return torch.nn.functional.silu(torch.mm(a, b) + c)

    inputs = (torch.randn(4096, 132), torch.randn(132, 132), torch.randn(132))
    torch._dynamo.reset()
    with bias_additions_apart():
        result, (apart,) = run_and_get_code(torch.compile(filters), *inputs)
    torch._dynamo.reset()
    _, (default,) = run_and_get_code(torch.compile(filters), *inputs)
    torch._dynamo.reset()
    torch.testing.assert_close(result, filters(*inputs))
    assert "addmm" in default  # what the context prevents
    assert "addmm" not in apart
