"""How one call is evaluated: the plan, the rules that make a plan legal, and the thresholds that choose it.

A :class:`Plan` names one of the ways to compute the same energy (:mod:`so3krates.runtime.evaluator`):

- ``layers``: ``"modules"`` evaluates each layer through the modules of :mod:`so3krates.nn`, one per
  equation; ``"fused"`` through a few large products (:mod:`so3krates.runtime.fused`). Fewer, larger
  kernels win on molecules, where dispatch dominates; on large graphs the fused layers' wider per-edge
  tensors cost more memory traffic than they save.
- ``radial``: the radial filters MLP_r(K(d)) of all layers from their ``"network"`` or read from a
  ``"spline"`` of it in d (:mod:`so3krates.ops.spline`).
- ``pairs``: the filters once per pair of atoms, for edges in pair order (:mod:`so3krates.runtime.layout`).
- ``slots``: sums over edges through edge slots instead of scatter-adds, so that a compiled program can run
  every kernel on all threads.
- ``blocks``: the sums over edges a block of edges at a time, recomputed in the backward pass
  (:mod:`so3krates.runtime.blocks`): memory grows with the atoms instead of edges × features, for large
  systems, at the price of a second evaluation of the messages.
- ``kernel``: each fused layer's messages and their sum in one hand-written CPU kernel, forward and
  backward, for edges in pair order (:mod:`so3krates.ops.pair_messages`): no (edges × features) tensors
  in between, which on large graphs is most of a compiled call's memory traffic. With ``blocks``, each
  block's messages run in the kernel and only its inputs are recomputed.

Every legal plan gives the reference model's numbers (to round-off; the spline to its interpolation error,
below float32 round-off) — the test matrix in ``tests/test_plans.py`` runs them all. :meth:`Plan.check`
refuses the others with a message, and :class:`Planner` is the only place that chooses between them; the
measurements behind its thresholds are in ``benchmarks/results/thresholds.md``.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import os
from dataclasses import dataclass

import torch

from so3krates.errors import So3kratesError
from so3krates.ops import pair_messages
from so3krates.runtime.blocks import BLOCK_EDGES, KERNEL_BLOCK_EDGES

LAYERS = ("modules", "fused")
RADIAL = ("network", "spline")
#: ``none``: eager PyTorch; ``inductor``: ``torch.compile`` of the energy function; ``aoti``: forward and
#: backward compiled ahead of time into one native CPU program (:mod:`so3krates.runtime.programs`).
COMPILE_MODES = ("none", "inductor", "aoti")


class PlanError(So3kratesError, ValueError):
    """A plan, or a way to run it, that cannot give the model's numbers."""


@dataclass(frozen=True)
class Plan:
    """One way to evaluate the model (see the module docstring)."""

    layers: str = "modules"
    radial: str = "network"
    pairs: bool = False
    slots: bool = False
    blocks: bool = False
    kernel: bool = False

    def __post_init__(self) -> None:
        if self.layers not in LAYERS:
            raise PlanError(f"plan: layers must be one of {', '.join(LAYERS)}, not {self.layers!r}")
        if self.radial not in RADIAL:
            raise PlanError(f"plan: radial must be one of {', '.join(RADIAL)}, not {self.radial!r}")

    def problems(self, frozen: bool, create_graph: bool = False) -> list[str]:
        """Why this plan cannot run on weights that are (not) ``frozen`` with(out) second derivatives."""
        problems = []
        if self.slots and self.layers != "fused":
            problems.append("slots need the fused layers (layers='fused')")
        if self.radial == "spline" and not frozen:
            problems.append("a radial spline is built once from the weights: it needs frozen weights")
        if self.slots and not frozen:
            problems.append("slots are differentiable once: they need frozen weights, not training")
        if create_graph and self.radial == "spline":
            problems.append("the spline's second derivatives jump at its nodes: use radial='network'")
        if create_graph and self.slots:
            problems.append("slots are differentiable once: second derivatives need slots=False")
        if self.blocks and self.layers != "fused":
            problems.append("blocks evaluate the fused layers' equations (layers='fused')")
        if self.blocks and self.slots:
            problems.append("blocks sum their edges by scatter-adds, not through slots")
        if self.blocks and not frozen:
            problems.append(
                "blocks recompute the messages with the weights as constants: they need frozen weights"
            )
        if create_graph and self.blocks:
            problems.append("blocks are differentiable once: second derivatives need blocks=False")
        if self.kernel and (self.layers != "fused" or not self.pairs):
            problems.append("the pair-message kernel runs the fused layers on edges in pair order")
        if self.kernel and not frozen:
            problems.append("the kernel is differentiable once: it needs frozen weights, not training")
        if create_graph and self.kernel:
            problems.append("the kernel is differentiable once: second derivatives need kernel=False")
        return problems

    def check(self, frozen: bool, create_graph: bool = False) -> None:
        """Raises :class:`PlanError`, naming every reason, when the plan is not legal here."""
        problems = self.problems(frozen, create_graph)
        if problems:
            raise PlanError(f"plan {self.describe()} cannot run: {'; '.join(problems)}")

    def describe(self) -> str:
        """E.g. ``fused layers, spline, pairs, slots``."""
        parts = [f"{self.layers} layers", "spline" if self.radial == "spline" else "network"]
        flags = [name for name in ("pairs", "slots", "blocks", "kernel") if getattr(self, name)]
        return ", ".join(parts + flags)

    def as_dict(self) -> dict[str, object]:
        return dataclasses.asdict(self)


@functools.cache
def _plan(
    layers: str, radial: str, pairs: bool, slots: bool, blocks: bool = False, kernel: bool = False
) -> Plan:
    """The one instance of each plan (``Planner.plan`` runs on every call; making a Plan takes µs)."""
    return Plan(layers, radial, pairs, slots, blocks, kernel)


def every_plan() -> list[Plan]:
    """All combinations of the six choices, legal or not (64)."""
    flags = (False, True)
    return [
        Plan(layers, radial, pairs, slots, blocks, kernel)
        for layers, radial, pairs, slots, blocks, kernel in itertools.product(
            LAYERS, RADIAL, flags, flags, flags, flags
        )
    ]


def legal_plans(frozen: bool, create_graph: bool = False) -> list[Plan]:
    """The plans that can run on (not) ``frozen`` weights with(out) second derivatives."""
    return [plan for plan in every_plan() if not plan.problems(frozen, create_graph)]


def check_compile_mode(compile: str, frozen: bool, device: torch.device | str) -> None:
    """Refuses a compile mode that cannot run here."""
    if compile not in COMPILE_MODES:
        raise PlanError(f"compile must be one of {', '.join(COMPILE_MODES)}, not {compile!r}")
    if compile == "aoti" and torch.device(device).type != "cpu":
        raise PlanError("compile='aoti' builds a CPU program; use compile='inductor' on other devices")
    if compile == "aoti" and not frozen:
        raise PlanError("compile='aoti' compiles the weights into the program: it needs frozen weights")


#: Edges above which frozen CPU calls in pair order use the pair-message kernel (Planner.kernel_min_edges).
#: Paper model, float32, the calculator's threads, with / without (benchmarks/results/pair_kernel/): the
#: first kernel ``aoti`` 0.90× at 72 edges, 0.97× at 446, 1.27× at 1,550, 1.35× at 54,172 (eager 1.02×,
#: 1.33×, 1.63×, 1.76×); pair by pair (pairs_dec5/, three runs) 0.91–0.93× at 72, 1.03–1.07× at 446,
#: 1.32–1.38× at 5,744, 1.63–1.67× at 54,172. With its vector sums (December 5, threshold_dec5/, 7 rounds,
#: 2 threads) ``aoti`` 0.97× at 72 edges (ethanol; 1.02× in another run of its program alone), 1.33× at 446,
#: 1.71× at 5,744, eager 1.10×, 1.65×, 3.01×; aspirin (292 edges, its program alone, in turn) 1.18×. With
#: the weights' copies made only where needed (threshold_dec5_ethanol/, 9 rounds): ethanol ``aoti`` 0.99×
#: (its program alone 1.03×), eager 1.09×: even or better from ethanol's 72 edges on.
KERNEL_MIN_EDGES = 50

#: Edges beyond which ``aoti`` programs with slots thread their generated loops (``Planner``): 99 water atoms
#: have ~5,400 edges, the DeePMD box of 192 ~10,000, 399 water ~21,000.
PARALLEL_LOOPS_MIN_EDGES = 16_000
#: Edges from which a call that runs torch on one thread of several gives the pair-message kernel and the
#: large matrix products of its program a helper thread (Planner.kernel_helper_min_edges). ab_calls.py
#: against one thread (aoti, float32, 11 rounds; benchmarks/results/pair_kernel/helper_dec5/ and
#: helper_products_dec5/): the kernel alone on the helper: aspirin (292 edges) 0.91×, alanine dipeptide
#: (340) 0.89×, 3BPA (446) 0.87×; the products as well: 0.82×, 0.79×, 0.76×. Ethanol (72 edges) was
#: bimodal from process to process (0.92–0.96× in five runs, 1.25–1.31× in two). With a caller that runs a
#: late helper's part itself: 0.886–0.916× in seven of eight runs, 1.137× in one (median 0.909×, mean
#: 0.931×; helper_ethanol_dec5/), so the helper starts where the kernel does (KERNEL_MIN_EDGES).
KERNEL_HELPER_MIN_EDGES = KERNEL_MIN_EDGES

#: Peak memory per edge of energy + forces of the whole graph at once (paper preset, float32, pairs; the
#: process's peak over edges, interpreter included): eager modules 4.07 GB at 163k edges (3,000 water);
#: the ``aoti`` modules' program 6.9 GB at 544k edges (10,000 water; 4.9 GB in December), its fused program
#: 6.4 GB there (11.7 KB/edge). benchmarks/results/thresholds.md.
WHOLE_GRAPH_BYTES_PER_EDGE = {"none": 23_000, "inductor": 23_000, "aoti": 13_000}
#: The same for the fused ``aoti`` program with the pair-message kernel, since it makes the filters itself:
#: 1.80 GB at 544k edges (9,999 water atoms), 3.95 GB at 1.66 M (30,000), and since the rows it keeps for
#: small graphs are allocated only there, 10.0 GB at 5.65 M (99,999): 1.8 KB/edge
#: (benchmarks/results/scaling/filters_dec5; 7.2 KB/edge with the filters as tensors). Eager and
#: ``inductor`` calls with the kernel keep the table above (not measured).
WHOLE_GRAPH_BYTES_PER_EDGE_KERNEL = {"aoti": 1_800}
#: The share of memory a whole graph may take before edge blocks: a third where its table above is a
#: measurement at a few hundred thousand edges extrapolated (room for the estimate to be 3× off); half for
#: the kernel's ``aoti`` program, whose entry was measured at the sizes where it decides (9.25 GB at 5.65 M
#: edges, 99,999 water atoms, with the threaded-loops program; 1.64 KB per edge), and which there takes the
#: time per atom of 1,000 atoms (1.04×) where edge blocks take 1.2× (benchmarks/results/scaling/blocks_dec5).
MEMORY_FRACTION = 1.0 / 3.0
KERNEL_MEMORY_FRACTION = 0.5
#: The same on a CUDA GPU (peak of torch's allocator): eager 9.5 GB and ``inductor`` 2.45 GB at 544k edges
#: (10,000 water, NVIDIA H200, torch 2.11; benchmarks/results/gpu/gpu_check.json). The generated Triton
#: kernels keep far fewer per-edge tensors than the CPU's ``inductor`` programs.
WHOLE_GRAPH_BYTES_PER_EDGE_CUDA = {"none": 19_000, "inductor": 5_000}


@functools.cache
def physical_memory() -> int:
    """Bytes of physical memory of this machine (16 GiB where the system does not say)."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):  # pragma: no cover - systems without these names
        return 16 * 2**30


def device_memory(device: torch.device | str = "cpu") -> int:
    """Bytes of memory that a call on ``device`` can use: the GPU's own memory for ``cuda`` devices, else
    this machine's physical memory."""
    device = torch.device(device)
    if device.type == "cuda":
        return _cuda_memory(device.index if device.index is not None else torch.cuda.current_device())
    return physical_memory()


@functools.cache
def _cuda_memory(index: int) -> int:
    return torch.cuda.get_device_properties(index).total_memory


@dataclass(frozen=True)
class Planner:
    """Chooses the plan of each call from the situation; every threshold of the execution layer is here.

    Args:
        fused_max_edges: fused layers up to this many edges in eager and ``inductor`` mode.
        aoti_fused_max_edges: fused layers up to this many edges in ``aoti`` programs (beyond, the modules'
            program for its smaller memory). ``None`` (default): as long as the whole graph fits the
            memory budget of ``blocks_memory_fraction`` (:meth:`memory_threshold`), that is wherever the
            whole graph runs unless edge blocks are turned off.
        single_thread_edges: frozen CPU calls of up to this many edges run on one thread even when torch
            has more: a second thread costs more in synchronisation than it gains. 0 turns this off.
        spline: radial filters from the spline: ``None`` (default) for frozen float32 weights on the fused
            layers, where its error is below float32 round-off; ``True`` wherever legal; ``False`` never.
        pairs: use pair order when the edges come in it (it is a property of the neighbour list).
        blocks_min_edges: inference calls (frozen weights, first derivatives) of more edges than this run
            in edge blocks, so that memory grows with atoms, not edges × features; 0 turns blocks off.
            ``None`` (default): where the whole graph would need more than ``blocks_memory_fraction`` of
            the memory of the call's device (:meth:`blocks_threshold`: the machine's physical memory on a
            CPU, the GPU's own memory on a GPU). The block loop is Python; with a
            compile mode each block's messages run compiled (``compile_messages``), otherwise eagerly.
            Blocks cost time (the messages are evaluated twice), so they are used only where memory asks
            for them.
        blocks_memory_fraction: see ``blocks_min_edges``; ``None`` (default): ``KERNEL_MEMORY_FRACTION``
            (half) for the kernel's ``aoti`` whole graph on a CPU, ``MEMORY_FRACTION`` (a third) otherwise.
        block_edges: edges per block; ``None`` (default): ``KERNEL_BLOCK_EDGES`` (32,768) where the
            pair-message kernel evaluates the blocks, else ``BLOCK_EDGES`` (8,192); see
            :meth:`edges_per_block`.
        block_workers: threads that evaluate edge blocks at once (``runtime.blocks.in_workers``), each on
            one intra-op thread. ``None`` (default): torch's thread count at the call on a CPU, one on a GPU.
        kernel_min_edges: frozen CPU calls in pair order with more edges than this run each layer's
            messages in the pair-message kernel (:mod:`so3krates.ops.pair_messages`, built on first use;
            not used where it cannot be built), the whole graph at once or in edge blocks. ``None`` turns
            it off.
        parallel_loops_min_edges: ``aoti`` programs with slots for graphs of more edges than this are
            traced from a 37-atom example instead of a 5-atom one (``programs.example_inputs``): inductor
            then runs most generated loops on every thread, not one. Faster in large graphs, slower in
            small ones, where each threaded loop wakes the other threads (2 threads, in turn, after / before:
            99 water 1.08×, 192 water (DeePMD box) 1.03×, 399 water 0.94×, 999 water 0.92×;
            ``benchmarks/results/execution_layer/example_dec5``). ``None``: never.
        kernel_helper_min_edges: where a call of at least this many edges runs torch on one thread of
            several (``single_thread_edges``), the pair-message kernel and the large matrix products of
            its ``aoti`` program (``rewrites.products_with_helper``) still split their work with a helper
            thread of the kernel's own, which waits for work actively only while evaluations follow each
            other (:func:`so3krates.ops.pair_messages.kernel_threads`; 3BPA through the calculator, in
            turn: 0.77× the time). ``None``: all on torch's one thread.
    """

    fused_max_edges: int = 2000
    aoti_fused_max_edges: int | None = None
    single_thread_edges: int = 1000
    spline: bool | None = None
    pairs: bool = True
    blocks_min_edges: int | None = None
    blocks_memory_fraction: float | None = None
    block_edges: int | None = None
    block_workers: int | None = None
    kernel_min_edges: int | None = KERNEL_MIN_EDGES
    parallel_loops_min_edges: int | None = PARALLEL_LOOPS_MIN_EDGES
    kernel_helper_min_edges: int | None = KERNEL_HELPER_MIN_EDGES

    def kernel_threads(self, plan: Plan, n_edges: int, threads: int, available: int) -> int:
        """Threads the pair-message kernel may use in a call of ``plan`` on ``n_edges`` edges that runs
        torch on ``threads`` of ``available`` threads: two where torch runs on one of several
        (``kernel_helper_min_edges``), else one (then torch's)."""
        limit = self.kernel_helper_min_edges
        helped = plan.kernel and limit is not None and n_edges >= limit and threads == 1 < available
        return min(available, 2) if helped else 1

    def parallel_loops(self, plan: Plan, n_edges: int) -> bool:
        """Whether an ``aoti`` program of ``plan`` for ``n_edges`` edges threads its generated loops."""
        limit = self.parallel_loops_min_edges
        return plan.slots and limit is not None and n_edges > limit

    def edges_per_block(self, plan: Plan) -> int:
        """Edges per block for ``plan``'s edge blocks (``block_edges``, or its default for the plan)."""
        if self.block_edges is not None:
            return self.block_edges
        return KERNEL_BLOCK_EDGES if plan.kernel else BLOCK_EDGES

    def blocks_threshold(
        self, compile: str = "none", device: torch.device | str = "cpu", kernel: bool = False
    ) -> int:
        """Edges beyond which inference runs in blocks (0: never), for a compile mode and a device
        (``kernel``: for a whole graph that would run with the pair-message kernel)."""
        if self.blocks_min_edges is not None:
            return self.blocks_min_edges
        return self.memory_threshold(compile, device, kernel)

    def memory_threshold(
        self, compile: str = "none", device: torch.device | str = "cpu", kernel: bool = False
    ) -> int:
        """Edges up to which the whole graph needs at most ``blocks_memory_fraction`` of the memory."""
        on_gpu = torch.device(device).type == "cuda"
        table = WHOLE_GRAPH_BYTES_PER_EDGE_CUDA if on_gpu else WHOLE_GRAPH_BYTES_PER_EDGE
        per_edge = table.get(compile, table["none"])
        fraction = MEMORY_FRACTION
        if kernel and not on_gpu and compile in WHOLE_GRAPH_BYTES_PER_EDGE_KERNEL:
            per_edge, fraction = WHOLE_GRAPH_BYTES_PER_EDGE_KERNEL[compile], KERNEL_MEMORY_FRACTION
        if self.blocks_memory_fraction is not None:
            fraction = self.blocks_memory_fraction
        return int(fraction * device_memory(device) / per_edge)

    def _takes_kernel(self, n_edges: int, once: bool, pairs: bool, device: torch.device | str) -> bool:
        """Whether a call of ``n_edges`` edges runs its messages in the pair-message kernel."""
        return (
            once
            and pairs
            and self.kernel_min_edges is not None
            and n_edges > self.kernel_min_edges
            and torch.device(device).type == "cpu"
            and pair_messages.available()
        )

    def threads(self, n_edges: int, available: int, device: torch.device | str, frozen: bool) -> int:
        """The number of threads a call of ``n_edges`` edges should run on (``device``: e.g. ``"cpu"``)."""
        on_cpu = (device if isinstance(device, str) else device.type).startswith("cpu")
        small = frozen and on_cpu and n_edges <= self.single_thread_edges
        return 1 if small and available > 1 else available

    def plan(
        self,
        n_edges: int,
        dtype: torch.dtype,
        frozen: bool,
        create_graph: bool = False,
        pairs: bool = False,
        threads: int = 1,
        compile: str = "none",
        device: torch.device | str = "cpu",
    ) -> Plan:
        """The plan for one call.

        Args:
            n_edges: edges of the graph.
            dtype: the network's dtype.
            frozen: the weights stay as they are (inference): spline and slots are possible.
            create_graph: second derivatives are needed (training on forces, Hessians).
            pairs: the edges are in pair order.
            threads: threads the call runs on (see :meth:`threads`).
            compile: the compile mode (``COMPILE_MODES``).
            device: where the call runs (its memory decides about edge blocks).
        """
        once = frozen and not create_graph
        pairs = pairs and self.pairs
        kernel = self._takes_kernel(n_edges, once, pairs, device)
        memory_limit = self.memory_threshold(compile, device, kernel)  # once: plan() runs on every call
        blocks_from = self.blocks_min_edges if self.blocks_min_edges is not None else memory_limit
        if once and 0 < blocks_from < n_edges:
            # Eager blocks: the radial network by default, as fast there (the products are not what limits
            # them) and without the spline's tables. Compiled blocks: the spline for float32, as for the
            # whole graph; it saves ~18 % of a call (999 water, 1 thread, benchmarks/results/thresholds.md).
            compiled_float32 = compile != "none" and dtype == torch.float32
            spline = self.spline if self.spline is not None else compiled_float32
            return _plan("fused", "spline" if spline else "network", pairs, False, True, kernel)
        fused_max = self.aoti_fused_max_edges if compile == "aoti" else self.fused_max_edges
        if fused_max is None:
            fused_max = memory_limit
        # The kernel's layers need neither per-edge tensors nor their memory: fused at any size.
        layers = "fused" if kernel or n_edges <= fused_max else "modules"
        spline = self.spline if self.spline is not None else (dtype == torch.float32 and layers == "fused")
        # Slots pay off only where the kernels are threaded, which only an aoti program does for us.
        slots = compile == "aoti" and layers == "fused" and threads > 1
        radial = "spline" if spline and once else "network"
        return _plan(layers, radial, pairs, slots and once, False, kernel)

    def complete(
        self,
        dtype: torch.dtype,
        layers: str = "modules",
        radial: str | None = None,
        pairs: bool = False,
        slots: bool = False,
    ) -> Plan:
        """A plan for a file that will serve graphs of any size (``so3krates export``): ``radial`` None
        takes the spline where :meth:`plan` would (float32, fused layers, ``spline`` not False)."""
        if radial is None:
            default = self.spline if self.spline is not None else dtype == torch.float32 and layers == "fused"
            radial = "spline" if default else "network"
        return Plan(layers, radial, pairs, slots)
