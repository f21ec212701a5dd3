"""Programs: one plan's energy and derivatives traced into an ATen graph, or compiled to native code.

:class:`ProgramFunction` is what gets traced: one structure as plain tensors,

    (positions (n, 3) f64 Å, atomic_numbers (n,) i64, idx_i (e,) i64, idx_j (e,) i64, shifts (e, 3) f64,
     cell (3, 3) f64 Å [, slots_i (K, n) i64, slots_j (K', n) i64])
    → (energy () f64 eV, atomic_energies (n,) f64 eV, forces (n, 3) f64 eV/Å, virial (3, 3) f64 eV),

forward and backward in one graph with symbolic numbers of atoms and edges (:func:`trace`). AOTInductor
compiles such a graph to a native CPU library (:func:`compile_program`); ``compile="aoti"`` keeps those
programs in a cache on disk (:func:`cached_program`), so that only the first run with a model compiles.
``compile="inductor"`` is ``torch.compile`` of the energy function (:func:`compile_energy`).
:class:`Program` runs a loaded program on a graph, with the same outputs as an evaluator.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from so3krates import __version__, keys
from so3krates.data.graph import Graph
from so3krates.files import atomic_path
from so3krates.model.so3krates import So3krates
from so3krates.nn import spherical
from so3krates.ops import pair_messages
from so3krates.ops.slots import build_slots
from so3krates.runtime.derivatives import derivatives, stress_from_virial
from so3krates.runtime.evaluator import EnergyFunction
from so3krates.runtime.layout import EdgeLayout
from so3krates.runtime.plan import Plan, PlanError
from so3krates.runtime.radial import SPLINE_INTERVALS
from so3krates.runtime.rewrites import products_with_helper, small_products_as_loops

#: Names of a program's inputs and outputs, in order (the slots only for plans with slots).
INPUTS = ("positions", "atomic_numbers", "idx_i", "idx_j", "shifts", "cell")
SLOT_INPUTS = ("slots_i", "slots_j")
OUTPUTS = ("energy", "atomic_energies", "forces", "virial")


class ProgramFunction(nn.Module):
    """Energy, atomic energies, forces and virial of one structure given as plain tensors (module docstring).

    No Python objects and no data-dependent branches, so that ``make_fx`` traces it into one graph.
    """

    def __init__(self, energy: EnergyFunction) -> None:
        super().__init__()
        self.energy = energy
        self.pairs = energy.plan.pairs

    def forward(
        self,
        positions: Tensor,
        atomic_numbers: Tensor,
        idx_i: Tensor,
        idx_j: Tensor,
        shifts: Tensor,
        cell: Tensor,
        *slots: Tensor,
    ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        edges = EdgeLayout(idx_i, idx_j, self.pairs, *slots)
        positions = positions.detach().requires_grad_(True)  # the leaf; derivatives at the edge vectors
        # shifts @ cell as three broadcast products: a loop that inductor fuses with the differences, where
        # ATen's float64 product was a library call of its own (~3 µs per call at 3BPA, also for molecules).
        offsets = shifts[:, 0:1] * cell[0] + shifts[:, 1:2] * cell[1] + shifts[:, 2:3] * cell[2]
        vectors = positions.index_select(0, idx_j) - positions.index_select(0, idx_i) + offsets
        atomic_energies = self.energy(vectors, atomic_numbers, edges)
        energy = atomic_energies.sum()
        result = derivatives(energy, vectors, edges, positions.shape[0], compute_virial=True)
        return energy.detach(), atomic_energies.detach(), result.forces, result.virial[0]


def graph_inputs(graph: Graph, plan: Plan) -> tuple[Tensor, ...]:
    """A program's inputs for a one-structure graph (with slots: built here, a sort of the edges)."""
    inputs = (graph.positions, graph.atomic_numbers, graph.idx_i, graph.idx_j, graph.shifts, graph.cell[0])
    if plan.slots:
        inputs += (build_slots(graph.idx_i, graph.n_atoms), build_slots(graph.idx_j, graph.n_atoms))
    return inputs


#: Atoms of the tracing example: small (loops on one thread) and parallel (loops on every thread).
EXAMPLE_ATOMS = 5
PARALLEL_EXAMPLE_ATOMS = 37


def example_inputs(
    model: So3krates, species: list[int], plan: Plan, n_atoms: int = EXAMPLE_ATOMS
) -> tuple[Tensor, ...]:
    """A small cluster of the model's elements with all pairs as edges, for tracing.

    ``n_atoms`` atoms (5 or 37: 20 or 1,332 edges): the numbers differ from each other, from 0 and 1 and
    from the model's widths, so a symbolic trace keeps the number of atoms and the number of edges as free
    sizes; slots get max(7, n_atoms − 1) rows, a width that no other size of the trace shares. inductor
    decides from the example's sizes which generated loops run on several threads: from 5 atoms it keeps
    most of them on one thread, as if every graph were that small; from 37 it threads most of them
    (:data:`so3krates.runtime.plan.Planner.parallel_loops_min_edges` chooses).
    """
    generator = torch.Generator().manual_seed(0)
    n = n_atoms
    spacing = 0.35 * model.cutoff
    positions = torch.rand((n, 3), generator=generator, dtype=torch.float64) * spacing
    positions[:, 0] += torch.arange(n, dtype=torch.float64) * 0.2 * spacing
    numbers = torch.tensor([species[k % len(species)] for k in range(n)], dtype=torch.long)
    pairs = [(i, j) for i in range(n) for j in range(n) if i != j]
    if plan.pairs:
        forward = [(i, j) for i, j in pairs if i < j]
        pairs = forward + [(j, i) for i, j in forward]
    idx_i = torch.tensor([p[0] for p in pairs], dtype=torch.long)
    idx_j = torch.tensor([p[1] for p in pairs], dtype=torch.long)
    inputs = (positions, numbers, idx_i, idx_j, torch.zeros((len(pairs), 3), dtype=torch.float64))
    inputs += (torch.zeros((3, 3), dtype=torch.float64),)
    if plan.slots:
        inputs += (build_slots(idx_i, n, min_width=7), build_slots(idx_j, n, min_width=7))
    return inputs


def trace(
    energy: EnergyFunction, inputs: tuple[Tensor, ...], one_thread_loops: bool = False
) -> torch.export.ExportedProgram:
    """Forward and backward of ``energy`` (frozen weights) as one ``torch.export`` program.

    ``one_thread_loops``: the program is for AOTInductor with its generated loops on one thread
    (:func:`compile_program` of a plan without slots); then the spherical harmonics (and the degree
    expansions) are traced component by component (:func:`so3krates.nn.spherical.component_wise`) and
    small matrix products become loops
    (:func:`so3krates.runtime.rewrites.small_products_as_loops`), both of which inductor fuses into its
    loops. Neither is for a program that runs eagerly (``pt2``: more dispatched calls; broadcast products
    in memory) nor for threaded loops (inductor threads the short sums over a product's few terms, one
    parallel region per row).
    """
    from torch.export import Dim
    from torch.fx.experimental.proxy_tensor import make_fx

    if energy.plan.blocks:
        raise PlanError(
            f"plan {energy.plan.describe()}: edge blocks are a Python loop that runs eagerly; a program "
            "evaluates the whole graph (blocks=False)"
        )
    pairs, slots = energy.plan.pairs, energy.plan.slots
    harmonics = spherical.component_wise() if one_thread_loops else contextlib.nullcontext()
    with harmonics:
        graph_module = make_fx(ProgramFunction(energy), tracing_mode="symbolic", _allow_non_fake_inputs=True)(
            *inputs
        )
    if energy.plan.kernel:
        products_with_helper(graph_module)
    if one_thread_loops:
        small_products_as_loops(graph_module)
    n_atoms = Dim("n_atoms", min=0, max=2**31 - 1)
    n_edges = Dim("n_edges", min=0, max=2**31 - 1)
    if pairs:  # an even number of edges: both directions of every pair
        n_edges = 2 * Dim("n_pairs", min=0, max=2**30 - 1)
    dynamic: tuple = ({0: n_atoms}, {0: n_atoms}, {0: n_edges}, {0: n_edges}, {0: n_edges}, None)
    if slots:  # (K, n_atoms) tables, K the most edges of one atom (0 without edges)
        dynamic += ({0: Dim("slots_i", min=0, max=2**31 - 1), 1: n_atoms},)
        dynamic += ({0: Dim("slots_j", min=0, max=2**31 - 1), 1: n_atoms},)
    # Size-oblivious tracing: no guard that a size is not 0 or 1 (pair programs got "n_pairs >= 2").
    oblivious = pairs or slots
    with warnings.catch_warnings(), torch.fx.experimental._config.patch(backed_size_oblivious=oblivious):
        warnings.simplefilter("ignore", FutureWarning)
        return torch.export.export(graph_module, inputs, dynamic_shapes=dynamic, strict=False)


@contextlib.contextmanager
def scatter_adds_in_aten(threaded: bool = True) -> Iterator[None]:
    """Compiles scatter-adds (``index_add``, ``index_put`` with accumulation) as ATen's operators, not as
    generated loops: threaded generated loops add with atomic additions, in an order that changes from call
    to call (and ATen's CPU operator adds in edge order, the same numbers on every call). inductor does
    this in torch's deterministic mode, switched on for the compilation only. Programs whose loops run on
    one thread (``threaded`` False) keep the generated loops: they add in order, and faster (3BPA: 1.04×
    with ATen's).
    """
    if not threaded:
        yield
        return
    enabled = torch.are_deterministic_algorithms_enabled()
    warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(enabled, warn_only=warn_only)


def compile_program(
    program: torch.export.ExportedProgram,
    path: str | os.PathLike,
    plan: Plan,
    metadata: dict[str, str] | None = None,
    inductor_configs: dict[str, Any] | None = None,
    parallel_loops: bool = False,
) -> None:
    """Compiles ``program`` with AOTInductor into a ``.pt2`` package at ``path`` (atomically, ~1 min).

    Generated kernels run on one thread unless the plan has slots: with scatter-adds, threaded kernels
    need atomic additions, which are slower, and with torch 2.13 they corrupted memory in this model's
    backward pass. With slots, how many of them inductor threads depends on the example's sizes (see
    :func:`example_inputs`); ``parallel_loops`` (plans with slots): the program of the larger example,
    whose scatter-adds are ATen's. Matrix products use all threads either way. ``inductor_configs``
    replace our settings (for profiling, ``benchmarks/profile_kernels.py``).
    """
    from torch._inductor import aoti_compile_and_package

    scatters = scatter_adds_in_aten(parallel_loops)
    with atomic_path(path, suffix=".tmp.pt2") as tmp, bias_additions_apart(), scatters:
        tmp.unlink()  # the packager writes the archive itself
        aoti_compile_and_package(
            program,
            package_path=str(tmp),
            inductor_configs={
                "aot_inductor.metadata": dict(metadata or {}),
                "cpp.threads": -1 if plan.slots else 1,
                **(inductor_configs or {}),
            },
        )


def load_program(path: str | os.PathLike, fmt: str, plan: Plan) -> Any:
    """The callable of a ``pt2`` (``torch.export``) or ``aoti`` (AOTInductor) file traced with ``plan``."""
    if plan.kernel:
        pair_messages.require()  # the program calls the kernel's operator by name
    if fmt == "pt2":
        return torch.export.load(path).module()
    from torch._inductor import aoti_load_package

    return aoti_load_package(str(path))


class Program:
    """A loaded program of one plan: graphs of one structure → the outputs of an evaluator.

    Args:
        function: the loaded program (:func:`load_program`).
        plan: the plan it was traced with.
        dtype: its network's dtype.
        kind: ``"pt2"`` or ``"aoti"``.
    """

    def __init__(self, function: Any, plan: Plan, dtype: torch.dtype, kind: str) -> None:
        self.function = function
        self.plan = plan
        self.dtype = dtype
        self.kind = kind
        self._run = _flat_runner(function) or function
        # An aoti program holds its own backward pass: it runs below autograd, so that the custom operators
        # it calls skip their autograd kernels (the pair-message kernel's is registered from Python: three
        # calls into the interpreter per evaluation, 30-40 us of ethanol's 0.41 ms and 3BPA's 0.87 ms).
        below = getattr(torch._C, "_AutoDispatchBelowAutograd", None)
        self._guard = below if kind == "aoti" and below is not None else contextlib.nullcontext

    def __call__(
        self,
        graph: Graph,
        compute_forces: bool = True,
        compute_stress: bool = False,
        create_graph: bool = False,
    ) -> dict[str, Tensor]:
        if create_graph:
            raise PlanError("a program gives first derivatives only: second derivatives need eager mode")
        if graph.n_graphs != 1:
            raise PlanError(f"a program evaluates one structure at a time, not a batch of {graph.n_graphs}")
        if self.plan.pairs and not graph.pairs:
            raise PlanError(f"plan {self.plan.describe()} needs the edges in pair order (Graph.pairs)")
        with self._guard():
            energy, atomic_energies, forces, virial = self._run(*graph_inputs(graph, self.plan))
        out = {keys.ENERGY: energy.reshape(1), keys.ATOMIC_ENERGIES: atomic_energies, keys.FORCES: forces}
        if compute_stress:
            out[keys.VIRIAL] = virial.unsqueeze(0)
            out[keys.STRESS] = stress_from_virial(out[keys.VIRIAL], graph.cell)
        return out


def cache_directory() -> Path:
    """Where compiled programs are kept between runs: ``$SO3KRATES_CACHE_DIR`` or ``~/.cache/so3krates``."""
    return Path(os.environ.get("SO3KRATES_CACHE_DIR") or Path.home() / ".cache" / "so3krates")


def cached_program(model: So3krates, plan: Plan, parallel_loops: bool = False) -> Program:
    """The AOTInductor program of ``model`` (frozen weights) and ``plan``: from the cache, or compiled now.

    ``parallel_loops`` (plans with slots): traced from the larger example, so that the generated loops run
    on every thread, with the scatter-adds as ATen's (:func:`scatter_adds_in_aten`): faster for large
    graphs, slower for small ones (``Planner.parallel_loops_min_edges``).

    The cache key covers everything the program depends on: weights, model config, dtype, plan, spline
    intervals, the example, the torch and so3krates versions and the source of the code it is made of.
    """
    parallel_loops = parallel_loops and plan.slots
    n_atoms = PARALLEL_EXAMPLE_ATOMS if parallel_loops else EXAMPLE_ATOMS
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    identity = [
        model.config.model_dump(mode="json"),
        str(model.dtype),
        plan.as_dict(),
        SPLINE_INTERVALS,
        n_atoms,
        torch.__version__,
        __version__,
        source_digest(),
    ]
    digest.update(json.dumps(identity, sort_keys=True).encode())
    path = cache_directory() / "aoti" / f"{digest.hexdigest()[:24]}.pt2"
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        energy = EnergyFunction(model, plan, frozen=True)
        species = sorted({1, 6, 7, 8})  # any elements: the trace is symbolic in the atomic numbers
        program = trace(
            energy, example_inputs(model, species, plan, n_atoms), one_thread_loops=not plan.slots
        )
        metadata = {"plan": json.dumps(plan.as_dict())}
        compile_program(program, path, plan, metadata, parallel_loops=parallel_loops)
    return Program(load_program(path, "aoti", plan), plan, model.dtype, "aoti")


def source_digest() -> str:
    """Digest of the code a program is made of (model, layers, kernels, execution layer): a changed line
    gives a new program even where the package version stays the same (a development install)."""
    package = Path(__file__).resolve().parents[1]
    digest = hashlib.sha256()
    for folder in ("nn", "model", "ops", "runtime"):
        for path in sorted(package.joinpath(folder).glob("*.py")):
            digest.update(path.read_bytes())
    for path in sorted(package.joinpath("ops", "csrc").glob("*.[ch]*")):  # the kernels programs call
        digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


def compile_energy(energy: EnergyFunction) -> nn.Module:
    """``torch.compile`` of an energy function with dynamic shapes (a new number of edges does not
    recompile). inductor's generated CPU kernels run on one thread, as in :func:`compile_program`."""
    import torch._inductor.config as inductor_config

    inductor_config.cpp.threads = 1
    return torch.compile(energy, dynamic=True)


@contextlib.contextmanager
def bias_additions_apart() -> Iterator[None]:
    """While compiling: inductor leaves ``mm(a, b) + c`` as a product and an addition on CPU too.

    On CPU, inductor's post-grad passes turn every ``mm + add`` back into ``addmm``, whose CPU kernel first
    copies the addend into its output, one extra pass over every (n_edges, F) filter tensor; GPUs get the
    addition fused into the next elementwise kernel instead. The execution layer writes its per-edge bias
    additions as ``mm + add`` (:mod:`so3krates.runtime.radial`) so that CPU programs can do the same.
    inductor's check is replaced for the duration of the compilation only; with a torch that lacks it,
    nothing changes.
    """
    try:
        from torch._inductor.fx_passes import post_grad
    except ImportError:  # pragma: no cover - a torch without inductor
        yield
        return
    original = getattr(post_grad, "should_prefer_unfused_addmm", None)
    if original is None:  # pragma: no cover - another torch version
        yield
        return
    import torch._inductor.config as inductor_config

    post_grad.should_prefer_unfused_addmm = lambda match: True
    try:
        # inductor's graph cache does not know of the replaced check: compile afresh.
        with inductor_config.patch(fx_graph_cache=False):
            yield
    finally:
        post_grad.should_prefer_unfused_addmm = original


def _flat_runner(function: Any) -> Any:
    """For an AOTInductor program: its runner called with the flat list of inputs, or None.

    ``AOTICompiledModel.__call__`` parses the program's input and output tree specifications (JSON) and
    flattens and rebuilds the inputs and outputs on every call: 35 µs of the 600 µs of an ethanol call. Our
    programs take a flat tuple of tensors and return a flat tuple of four, so the runner can be called
    directly; anything else (another torch, another output structure) keeps the documented call.
    """
    loader = getattr(function, "loader", None)
    if loader is None or not hasattr(loader, "boxed_run") or not hasattr(loader, "get_call_spec"):
        return None
    try:
        from torch.utils import _pytree as pytree

        in_spec, out_spec = (pytree.treespec_loads(spec) for spec in loader.get_call_spec())
        flat_inputs = in_spec.num_children == 2 and in_spec.child(1).num_leaves == 0  # (args, {})
        flat_outputs = out_spec.type is tuple and out_spec.num_leaves == out_spec.num_children == 4
    except Exception:  # pragma: no cover - a torch whose specifications read differently
        return None
    if not (flat_inputs and flat_outputs):
        return None
    return lambda *inputs: tuple(loader.boxed_run(list(inputs)))
