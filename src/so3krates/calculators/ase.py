"""ASE calculator for trained SO3krates models (energy, forces, stress, atomic energies).

The neighbour list is built with a skin and reused while no atom has moved more than half the skin and the
cell, periodicity and elements are unchanged. Reuse is exact, not an approximation: every call passes the
model only the list's edges that are shorter than r_c (edges between r_c and r_c + skin would carry
φ(d) = 0 and φ'(d) = 0, add nothing, and cost a quarter of the work).
"""

from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import ClassVar

import numpy as np
import torch
from ase import Atoms
from ase.calculators.calculator import Calculator, all_changes

from so3krates import keys
from so3krates.data.graph import Graph
from so3krates.data.neighbors import neighbor_list, paired_edges
from so3krates.data.structure import unknown_elements
from so3krates.errors import So3kratesError
from so3krates.export.core import (
    ExportedModel,
    aoti_program_kind,
    compiled_program,
    graph_inputs,
    load_exported,
)
from so3krates.memory import keep_freed_memory
from so3krates.model.checkpoint import load_model
from so3krates.model.derivatives import ForceField
from so3krates.model.so3krates import So3krates, compile_model


class UnsupportedStructureError(So3kratesError, ValueError):
    """The structure is outside what the model can answer for (unknown element, atoms too close)."""


class So3kratesCalculator(Calculator):
    """ASE calculator of a SO3krates checkpoint or model.

    Args:
        model: path to a checkpoint (``RUN/best.pt``) or a ``So3krates`` instance.
        device: torch device, e.g. ``"cpu"`` or ``"cuda"``.
        dtype: ``"float64"`` (default, for MD and finite differences) or ``"float32"``.
        skin: Å — neighbour-list skin; the list is rebuilt when an atom moved more than skin / 2.
        min_distance: Å — refuse structures with two atoms closer than this (an extrapolated number there
            would be meaningless); 0 turns the check off.
        species: atomic numbers the model may be asked about; default: those it was trained on.
        compile: ``False`` (or ``"none"``): eager PyTorch. ``True`` (or ``"inductor"``): ``torch.compile``
            with dynamic shapes; the first call compiles for about a minute, afterwards an ethanol step is
            ~1.5× faster on a CPU. ``"aoti"``: forward and backward compiled ahead of time into one native
            program by AOTInductor (so3krates.export), kept in ``~/.cache/so3krates`` (or
            ``$SO3KRATES_CACHE_DIR``) so that only the first run with a model compiles (about a minute);
            ~3× faster per ethanol step than eager on one CPU thread. CPU only. Worth it for long MD runs.
            A float32 program reads the radial filters from their spline (``So3krates.tabulate``); graphs of
            up to ``AOTI_FUSED_MAX_EDGES`` edges use the fused program, larger ones the per-equation one,
            each compiled at its first use; a fused call on several threads takes the program with edge
            slots (``so3krates.nn.slots``: no scatter-adds, every kernel threaded).
        single_thread_edges: on a CPU, graphs of up to this many edges are evaluated on one thread even
            when torch has more: for small molecules a second thread costs more in synchronisation than it
            gains (paper model, AOTInductor, 2-core VM: ethanol 1.13 vs 1.49 ms, 3BPA 3.7 vs 4.4 ms; equal
            at ~1700 edges; 6.3k edges 84 vs 102 ms in favour of two). 0 turns this off.
        pair_edges: order the neighbour list by pairs (``so3krates.data.neighbors.paired_edges``) so that
            the filters (radial and spherical; both symmetric), most of the model's arithmetic, are
            evaluated once per pair of atoms instead of once per edge; same numbers to round-off.
            ``False``: the plain list (for comparisons).

    A model passed as an instance is copied: the calculator freezes its parameters (forces need gradients
    only with respect to positions) and must not change the caller's model.
    """

    implemented_properties: ClassVar[list[str]] = ["energy", "free_energy", "forces", "stress", "energies"]

    def __init__(
        self,
        model: str | os.PathLike | So3krates,
        device: str = "cpu",
        dtype: str = "float64",
        skin: float = 0.5,
        min_distance: float = 0.1,
        species: list[int] | None = None,
        compile: bool | str = False,
        single_thread_edges: int = 1000,
        pair_edges: bool = True,
        **kwargs,
    ) -> None:
        super().__init__(**kwargs)
        self.single_thread_edges = int(single_thread_edges)
        self.pair_edges = bool(pair_edges)
        torch_dtype = getattr(torch, dtype)
        mode = (
            {False: "none", True: "inductor"}.get(compile, compile) if isinstance(compile, bool) else compile
        )
        if mode not in ("none", "inductor", "aoti"):
            raise ValueError(f"compile must be False, True, 'none', 'inductor' or 'aoti', not {compile!r}")
        if mode == "aoti" and torch.device(device).type != "cpu":
            raise So3kratesError(
                "compile='aoti' builds a CPU program; use compile='inductor' on other devices"
            )
        if isinstance(model, So3krates):
            self.model = (
                copy.deepcopy(model).to(device=device, dtype=torch_dtype).eval().requires_grad_(False)
            )
            trained_species = None
        else:
            self.model, metadata = load_model(Path(model), device=device, dtype=torch_dtype)
            trained_species = metadata.get("species")
        self.force_field = ForceField(compile_model(self.model) if mode == "inductor" else self.model)
        self._setup(float(self.model.cutoff), species, trained_species, device, skin, min_distance)
        self.exported = None
        self._aoti: dict[tuple[bool, bool, bool], ExportedModel] | None = {} if mode == "aoti" else None

    def _setup(
        self,
        cutoff: float,
        species: list[int] | None,
        trained_species: list[int] | None,
        device: str,
        skin: float,
        min_distance: float,
    ) -> None:
        keep_freed_memory()  # once per process (so3krates.memory)
        self.species = set(species if species is not None else (trained_species or range(1, 119)))
        self.device = torch.device(device)
        self.cutoff = cutoff
        self.skin = float(skin)
        self.min_distance = float(min_distance)
        self.n_neighbor_list_builds = 0
        self._reference: tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray] | None = None
        self._edges: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None
        self._paired = False  # the list is ordered by paired_edges
        self._closest_at_build = 0.0  # Å, shortest edge when the neighbour list was built
        self._displacement = 0.0  # Å, largest displacement of an atom since then

    def _check_species(self, atoms: Atoms) -> None:
        reason = unknown_elements(atoms.numbers, self.species)
        if reason:
            raise UnsupportedStructureError(reason)

    def _edges_for(self, atoms: Atoms) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        positions, cell = atoms.positions, np.asarray(atoms.cell.array)
        pbc, numbers = np.asarray(atoms.pbc), atoms.numbers
        if self._reference is not None:
            ref_positions, ref_cell, ref_pbc, ref_numbers = self._reference
            if (
                len(ref_positions) == len(positions)
                and np.array_equal(ref_numbers, numbers)
                and np.array_equal(ref_pbc, pbc)
                and np.array_equal(ref_cell, cell)
            ):
                displacement = np.max(np.linalg.norm(positions - ref_positions, axis=1), initial=0.0)
                if displacement < 0.5 * self.skin:
                    self._displacement = float(displacement)
                    return self._edges
        edges = neighbor_list(positions, cell, pbc, self.cutoff + self.skin)
        paired = paired_edges(edges) if self.pair_edges else None
        self._paired = paired is not None
        edges = paired if paired is not None else edges
        vectors = positions[edges.idx_j] - positions[edges.idx_i] + edges.shifts @ cell
        self._closest_at_build = float(np.min(np.linalg.norm(vectors, axis=1), initial=np.inf))
        self._displacement = 0.0
        self._edges = (
            torch.from_numpy(edges.idx_i).to(self.device),
            torch.from_numpy(edges.idx_j).to(self.device),
            torch.as_tensor(edges.shifts, dtype=torch.float64, device=self.device),
        )
        self._reference = (positions.copy(), cell.copy(), pbc.copy(), numbers.copy())
        self.n_neighbor_list_builds += 1
        return self._edges

    @property
    def n_edges_in_list(self) -> int:
        """Edges in the current neighbour list (r_c + skin); 0 before the first call."""
        return 0 if self._edges is None else int(self._edges[0].shape[0])

    def graph(self, atoms: Atoms) -> Graph:
        """The model input for ``atoms`` (float64 geometry): the edges shorter than r_c.

        The neighbour list (r_c + skin) is reused while it is valid; its edges longer than r_c are dropped
        here on every call. They would add exactly nothing, and with a 0.5 Å skin at r_c = 5 Å they are a
        quarter of the list ((5.5 / 5)³ ≈ 1.33 times the edges within r_c), so they would cost a quarter of
        the per-edge work, which is most of the time for large structures.
        """
        idx_i, idx_j, shifts = self._edges_for(atoms)
        pbc = np.asarray(atoms.pbc)
        cell = torch.as_tensor(
            np.asarray(atoms.cell.array) if pbc.any() else np.zeros((3, 3)),
            dtype=torch.float64,
            device=self.device,
        )
        positions = torch.as_tensor(atoms.positions, dtype=torch.float64, device=self.device)
        if self.skin > 0 and idx_i.shape[0] > 0:
            vectors = positions[idx_j] - positions[idx_i] + shifts @ cell
            inside = (vectors * vectors).sum(dim=1) < self.cutoff**2
            if self._paired:  # keep or drop both directions of a pair together, by the first's length
                half = inside.shape[0] // 2
                inside = torch.cat([inside[:half], inside[:half]])
            idx_i, idx_j, shifts = idx_i[inside], idx_j[inside], shifts[inside]
        return Graph(
            positions=positions,
            atomic_numbers=torch.as_tensor(atoms.numbers, dtype=torch.long, device=self.device),
            idx_i=idx_i,
            idx_j=idx_j,
            shifts=shifts,
            cell=cell.unsqueeze(0),
            pbc=torch.as_tensor(pbc, device=self.device).unsqueeze(0),
            batch=torch.zeros(len(atoms), dtype=torch.long, device=self.device),
            paired=self._paired,
        )

    def _check_distances(self, graph: Graph) -> None:
        if self.min_distance <= 0 or graph.n_edges == 0:
            return
        # No pair came closer than the closest pair at the last neighbour-list build minus twice the largest
        # displacement since: in MD the exact check below is then skipped, which keeps it off the hot path.
        if self._closest_at_build - 2.0 * self._displacement >= self.min_distance:
            return
        distances = graph.edge_vectors().norm(dim=-1)
        closest = int(torch.argmin(distances))
        if float(distances[closest]) < self.min_distance:
            i, j = int(graph.idx_i[closest]), int(graph.idx_j[closest])
            raise UnsupportedStructureError(
                f"atoms {i} and {j} are {float(distances[closest]):.3f} Å apart, closer than min_distance = "
                f"{self.min_distance} Å"
            )

    def check_state(self, atoms: Atoms, tol: float = 1e-15) -> list[str]:
        # ASE compares six arrays with np.allclose, ~0.2 ms per property request and several requests per MD
        # step. Exact equality of everything answers "no change"; exact equality of everything but the
        # positions answers "positions" (an MD step; at worst a change below ASE's tolerance is recomputed).
        # Anything else is left to ASE's comparison.
        previous = self.atoms
        if (
            previous is not None
            and len(previous) == len(atoms)
            and np.array_equal(previous.numbers, atoms.numbers)
            and np.array_equal(previous.cell.array, atoms.cell.array)
            and np.array_equal(previous.pbc, atoms.pbc)
            and np.array_equal(previous.get_initial_magnetic_moments(), atoms.get_initial_magnetic_moments())
            and np.array_equal(previous.get_initial_charges(), atoms.get_initial_charges())
        ):
            return [] if np.array_equal(previous.positions, atoms.positions) else ["positions"]
        return super().check_state(atoms, tol)

    def calculate(self, atoms=None, properties=("energy",), system_changes=all_changes) -> None:
        super().calculate(atoms, properties, system_changes)
        atoms = self.atoms
        self._check_species(atoms)
        graph = self.graph(atoms)
        self._check_distances(graph)
        compute_stress = "stress" in properties and bool(atoms.pbc.any())
        threads = torch.get_num_threads()
        single = self.device.type == "cpu" and threads > 1 and graph.n_edges <= self.single_thread_edges
        if single:
            torch.set_num_threads(1)
        try:
            energy, energies, forces, stress = self._evaluate(
                graph, compute_stress, threaded=threads > 1 and not single
            )
        finally:
            if single:
                torch.set_num_threads(threads)
        self.results = {"energy": energy, "free_energy": energy, "forces": forces, "energies": energies}
        if compute_stress:
            self.results["stress"] = stress.flat[[0, 4, 8, 5, 2, 1]]  # Voigt: xx yy zz yz xz xy

    def _evaluate(
        self, graph: Graph, compute_stress: bool, threaded: bool = False
    ) -> tuple[float, np.ndarray, np.ndarray, np.ndarray | None]:
        """(energy eV, atomic energies eV, forces eV/Å, stress 3×3 eV/Å³ or None) of a one-structure graph."""
        if self._aoti is not None:
            # Programs compiled at their first use (which one: aoti_program_kind; tabulated radial
            # filters in float32). All read the neighbour list in paired order (filters once per pair).
            fused, slotted = aoti_program_kind(graph.n_edges, threaded)
            kind = (fused, graph.paired, slotted)
            if kind not in self._aoti:
                dtype = self.model.embedding.table.weight.dtype
                self._aoti[kind] = compiled_program(
                    self.model, dtype, sorted(self.species), fused=kind[0], paired=kind[1], slotted=kind[2]
                )
            self.exported = self._aoti[kind]
        if self.exported is not None:
            return self._evaluate_exported(graph, compute_stress)
        out = self.force_field(graph, compute_forces=True, compute_stress=compute_stress)
        energy = float(out[keys.ENERGY].detach()[0])
        energies = out[keys.ATOMIC_ENERGIES].detach().cpu().double().numpy()
        forces = out[keys.FORCES].detach().cpu().double().numpy()
        stress = out[keys.STRESS].detach().cpu().double().numpy()[0] if compute_stress else None
        return energy, energies, forces, stress

    def _evaluate_exported(
        self, graph: Graph, compute_stress: bool
    ) -> tuple[float, np.ndarray, np.ndarray, np.ndarray | None]:
        if self.exported.metadata.get("paired_edges") and not graph.paired:
            raise So3kratesError(
                "this export expects paired edges (pair_edges=True and a symmetric neighbour list)"
            )
        inputs = graph_inputs(graph, slots=bool(self.exported.metadata.get("edge_slots")))
        energy, energies, forces, virial = self.exported(*inputs)
        stress = None
        if compute_stress:
            volume = abs(float(torch.linalg.det(graph.cell[0])))
            stress = -virial.detach().double().numpy() / volume
        return (
            float(energy),
            energies.detach().double().numpy(),
            forces.detach().double().numpy(),
            stress,
        )


class ExportedCalculator(So3kratesCalculator):
    """ASE calculator of a file written by ``so3krates export`` (``torchscript``, ``pt2`` or ``aoti``).

    Same neighbour-list reuse and the same checks (elements, closest distance) as So3kratesCalculator; the
    numbers come from the exported program alone, which is how an export is checked against its checkpoint.

    Args:
        path: the exported file.
        skin, min_distance, species, single_thread_edges, pair_edges: as for So3kratesCalculator; species
            default to the file's metadata.
    """

    def __init__(
        self,
        path: str | os.PathLike,
        skin: float = 0.5,
        min_distance: float = 0.1,
        species: list[int] | None = None,
        single_thread_edges: int = 1000,
        pair_edges: bool = True,
        **kwargs,
    ) -> None:
        Calculator.__init__(self, **kwargs)
        self._aoti = None
        self.single_thread_edges = int(single_thread_edges)
        self.pair_edges = bool(pair_edges)
        self.exported = load_exported(path)
        self.metadata = self.exported.metadata
        self._setup(self.exported.cutoff, species, self.metadata.get("species"), "cpu", skin, min_distance)
