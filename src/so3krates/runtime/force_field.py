"""The force field: a model and the way it runs, graphs → energy, atomic energies, forces, stress, virial.

Every consumer of a model goes through :class:`ForceField`: training and evaluation (batched graphs,
weights that change), the ASE calculator, MD and LAMMPS (one structure at a time, frozen weights, possibly
compiled). For each call it asks its :class:`~so3krates.runtime.plan.Planner` for a plan and a thread
count, and runs the evaluator of that plan, built at its first use: an
:class:`~so3krates.runtime.evaluator.Evaluator` (eager, or ``torch.compile``) or a compiled AOTInductor
:class:`~so3krates.runtime.programs.Program`.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any, TypeVar

import torch
from torch import Tensor, nn

from so3krates.data.graph import Graph
from so3krates.model.so3krates import So3krates
from so3krates.model.so3lr import So3lr
from so3krates.ops import pair_messages
from so3krates.runtime.evaluator import EnergyFunction, Evaluator
from so3krates.runtime.long_range import LongRangeEvaluator
from so3krates.runtime.plan import Plan, PlanError, Planner, check_compile_mode

T = TypeVar("T")


class ForceField(nn.Module):
    """Wraps an energy model (``Graph → (n_atoms,)`` atomic energies, eV) into a force field.

    Args:
        model: the energy model; it must expose ``cutoff`` (Å), used to build neighbour lists.
        compile: ``"none"`` (eager), ``"inductor"`` (``torch.compile``, dynamic shapes) or ``"aoti"``
            (native CPU programs compiled ahead of time and cached on disk; needs ``frozen``).
        frozen: for inference only (calculator, MD, export): the force field keeps its own frozen copy of
            the model in its current dtype and device, and assembles what the evaluators read from the
            weights once. This allows the radial spline, slots and compiled programs. Without it, the model
            is used as it is, and weights that change between calls (training) are always current.
        planner: the thresholds that choose a plan for each call (default ``Planner()``).
    """

    def __init__(
        self,
        model: So3krates,
        compile: str = "none",
        frozen: bool = False,
        planner: Planner | None = None,
    ) -> None:
        super().__init__()
        device = next(model.parameters()).device
        check_compile_mode(compile, frozen, device)
        if isinstance(model, So3lr) and compile != "none":
            raise PlanError(f"SO3LR models run eagerly for now (compile='none'), not compile={compile!r}")
        if frozen:
            model = copy.deepcopy(model).eval().requires_grad_(False)
        self.model = model
        self.device, self.dtype = device, model.dtype  # read on every call
        self.cutoff = float(model.cutoff)
        #: Å, cutoff of the long-range edges the model needs in its graphs; None for local models.
        self.long_range_cutoff = getattr(model, "long_range_cutoff", None)
        self.compile = compile
        self.frozen = frozen
        self.planner = planner or Planner()
        # Plan → evaluator, built at first use. A plain dict: the evaluators share self.model, whose
        # parameters are registered once.
        self._evaluators: dict[Plan, Callable[..., dict[str, Tensor]]] = {}
        # Plan → its aoti program with threaded loops (Planner.parallel_loops), for large graphs.
        self._parallel_programs: dict[Plan, Callable[..., dict[str, Tensor]]] = {}

    def _apply(self, fn, recurse=True):
        # .to(), .float(): evaluators of a frozen force field hold matrices of the old dtype and device.
        self._evaluators, self._parallel_programs = {}, {}
        module = super()._apply(fn, recurse)
        self.device, self.dtype = next(self.model.parameters()).device, self.model.dtype
        return module

    def plan(self, graph: Graph, create_graph: bool = False, threads: int | None = None) -> Plan:
        """The plan of a call on ``graph`` (on ``threads`` threads; default: what the planner gives)."""
        if threads is None:
            threads = self.threads(graph)
        return self.planner.plan(
            graph.n_edges,
            dtype=self.dtype,
            frozen=self.frozen,
            create_graph=create_graph,
            pairs=graph.pairs,
            threads=threads,
            compile=self.compile,
            device=self.device,
        )

    def threads(self, graph: Graph) -> int:
        """The number of threads a call on ``graph`` runs on."""
        return self.planner.threads(graph.n_edges, torch.get_num_threads(), self.device, self.frozen)

    def energy_function(self, plan: Plan) -> nn.Module:
        """The energy function of ``plan``, (vectors, atomic numbers, edges) → E_i (ML-IAP calls it)."""
        if self.compile == "aoti" or isinstance(self.model, So3lr):
            raise PlanError(
                "a force field of aoti programs or of an SO3LR model has no separate energy function"
            )
        return self.evaluator(plan).energy

    def evaluator(self, plan: Plan, n_edges: int = 0) -> Callable[..., dict[str, Tensor]]:
        """The evaluator of ``plan`` in this force field's compile mode, built at its first use; ``n_edges``
        (the graph's) chooses between the ``aoti`` programs with slots (``Planner.parallel_loops``)."""
        parallel = (
            self.compile == "aoti"
            and not isinstance(self.model, So3lr)
            and self.planner.parallel_loops(plan, n_edges)
        )
        evaluators = self._parallel_programs if parallel else self._evaluators
        evaluator = evaluators.get(plan)
        if evaluator is None:
            block_edges = self.planner.edges_per_block(plan)
            if isinstance(self.model, So3lr):
                energy_function = EnergyFunction(
                    self.model, plan, self.frozen, block_edges, block_workers=self.planner.block_workers
                )
                evaluator = LongRangeEvaluator(energy_function, plan)
            elif plan.blocks:  # a Python loop over blocks; with compile, each block's messages compiled
                compile_blocks = self.compile != "none"
                energy_function = EnergyFunction(
                    self.model, plan, self.frozen, block_edges, compile_blocks, self.planner.block_workers
                )
                evaluator = Evaluator(energy_function, plan)
            elif self.compile == "aoti":
                from so3krates.runtime.programs import cached_program

                evaluator = cached_program(self.model, plan, parallel_loops=parallel)
            else:
                energy: nn.Module = EnergyFunction(self.model, plan, self.frozen, block_edges)
                if self.compile == "inductor":
                    from so3krates.runtime.programs import compile_energy

                    energy = compile_energy(energy)
                evaluator = Evaluator(energy, plan)
            evaluators[plan] = evaluator
        return evaluator

    def forward(
        self,
        graph: Graph,
        compute_forces: bool = True,
        compute_stress: bool = False,
        create_graph: bool = False,
    ) -> dict[str, Tensor]:
        """Evaluates the model and the derivatives asked for.

        Args:
            graph: a batch of structures (compiled programs: one structure).
            compute_forces: also return forces.
            compute_stress: also return stress and virial (zero stress for structures without a cell).
            create_graph: keep the graph of the derivatives, as training on forces and Hessians need;
                leave it off for inference, where it only costs memory.

        Returns:
            A dict with ``energy`` (n_graphs,) eV and ``atomic_energies`` (n_atoms,) eV, plus ``forces``
            (n_atoms, 3) eV/Å, and ``stress`` (n_graphs, 3, 3) eV/Å³ and ``virial`` (n_graphs, 3, 3) eV when
            asked for.
        """
        threads = self.threads(graph)
        plan = self.plan(graph, create_graph, threads)
        evaluator = self.evaluator(plan, graph.n_edges)
        kernel = self.planner.kernel_threads(plan, graph.n_edges, threads, torch.get_num_threads())
        args = (graph, compute_forces, compute_stress, create_graph)
        return run_on_threads(threads, evaluator, *args, kernel=kernel)


def run_on_threads(threads: int, function: Callable[..., T], *args: Any, kernel: int = 1) -> T:
    """``function(*args)`` with torch on ``threads`` threads, restored afterwards, and the pair-message
    kernel's whole-graph calls on up to ``kernel`` threads
    (:func:`~so3krates.ops.pair_messages.kernel_threads`)."""
    available = torch.get_num_threads()
    with pair_messages.kernel_threads(kernel):
        if threads == available:
            return function(*args)
        torch.set_num_threads(threads)
        try:
            return function(*args)
        finally:
            torch.set_num_threads(available)
