"""ASE calculator for trained SO3krates models (energy, forces, stress, atomic energies).

The calculator turns ASE atoms into graphs and hands them to a force field: a
:class:`~so3krates.runtime.force_field.ForceField` of a checkpoint or model (which chooses how each call
is evaluated and may compile), or an exported file (:func:`so3krates.export.load_exported`). It knows
nothing of how either evaluates.

The neighbour list is built with a skin and reused while no atom has moved more than half the skin and the
cell, periodicity and elements are unchanged. Reuse is exact, not an approximation: every call passes the
model only the list's edges that are shorter than r_c (edges between r_c and r_c + skin would carry
φ(d) = 0 and φ'(d) = 0, add nothing, and cost a quarter of the work). The list is in pair order (edge
k + n/2 is edge k reversed), which lets the force field evaluate the filters once per pair.
"""

from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from ase import Atoms
from ase.calculators.calculator import Calculator, all_changes

from so3krates import keys
from so3krates.committee import (
    ENERGY_UNCERTAINTY,
    FORCES_UNCERTAINTY,
    Committee,
    load_committee,
    member_paths,
)
from so3krates.data.graph import Graph
from so3krates.data.neighbors import neighbor_list, pair_order
from so3krates.data.structure import unknown_elements
from so3krates.errors import So3kratesError
from so3krates.memory import keep_freed_memory
from so3krates.model.checkpoint import load_model
from so3krates.model.so3krates import So3krates
from so3krates.runtime.force_field import ForceField
from so3krates.runtime.plan import Planner

DTYPES = {"float64": torch.float64, "float32": torch.float32}


class UnsupportedStructureError(So3kratesError, ValueError):
    """The structure is outside what the model can answer for (unknown element, atoms too close)."""


class So3kratesCalculator(Calculator):
    """ASE calculator of a SO3krates checkpoint, model, exported file or force field.

    Args:
        model: a checkpoint (``RUN/best.pt``), a ``So3krates`` instance (copied: the caller's model stays
            trainable), an exported ``.pt2`` file (``so3krates export``), or a ready force field
            (``ForceField`` or ``load_exported(...)``). A committee: a list of checkpoints or models, a
            directory of ``member_*/best.pt`` (``so3krates learn``), or a ``Committee``; the results are the
            members' mean, plus ``energy_uncertainty`` (eV, the members' standard deviation) and
            ``forces_uncertainty`` (eV/Å per atom, the length of the per-component standard deviation), see
            :mod:`so3krates.committee`.
        device: torch device, e.g. ``"cpu"`` or ``"cuda"`` (checkpoints and models).
        dtype: ``"float64"`` (default, for MD and finite differences) or ``"float32"`` (checkpoints and
            models; an exported file has its own).
        skin: Å — neighbour-list skin; the list is rebuilt when an atom moved more than skin / 2.
        min_distance: Å — refuse structures with two atoms closer than this (an extrapolated number there
            would be meaningless); 0 turns the check off.
        species: atomic numbers the model may be asked about; default: those it was trained on.
        compile: ``False``/``"none"``: eager PyTorch. ``True``/``"inductor"``: ``torch.compile`` with
            dynamic shapes; the first call compiles for about a minute. ``"aoti"``: forward and backward
            compiled ahead of time into native CPU programs (:mod:`so3krates.runtime.programs`), kept in
            ``~/.cache/so3krates`` (or ``$SO3KRATES_CACHE_DIR``) so that only the first run with a model
            compiles (about a minute per program). Worth it for long MD runs.
        planner: the thresholds that choose how each call is evaluated (``so3krates.runtime.Planner``;
            e.g. ``Planner(pairs=False)`` evaluates the filters once per edge, for comparisons).
        total_charge, total_spin: for models that take them (SO3LR): the total charge (e) and total spin S
            (ħ; 0 singlet, ½ doublet) of every structure. Default: ``atoms.info["charge"]`` and
            ``atoms.info["total_spin"]``, else 0; ``spin`` is accepted for ``total_spin``. SO3LR models also
            return ``charges`` (partial charges, e),
            ``dipole`` (e·Å) and ``hirshfeld_ratios`` in ``results``.
    """

    implemented_properties: ClassVar[list[str]] = [
        "energy",
        "free_energy",
        "forces",
        "stress",
        "energies",
        "charges",
        "dipole",
        "energy_uncertainty",
        "forces_uncertainty",
    ]

    def __init__(
        self,
        model: str | os.PathLike | So3krates | Any,
        device: str = "cpu",
        dtype: str = "float64",
        skin: float = 0.5,
        min_distance: float = 0.1,
        species: list[int] | None = None,
        compile: bool | str = False,
        planner: Planner | None = None,
        total_charge: float | None = None,
        total_spin: float | None = None,
        spin: float | None = None,
        **kwargs,
    ) -> None:
        if spin is not None:
            if total_spin is not None and float(total_spin) != float(spin):
                raise So3kratesError(
                    f"spin = {spin} and total_spin = {total_spin} disagree; give one of them"
                )
            total_spin = spin
        super().__init__(**kwargs)
        if dtype not in DTYPES:
            raise So3kratesError(f"dtype must be float64 or float32, not {dtype!r}")
        mode = (
            {False: "none", True: "inductor"}.get(compile, compile) if isinstance(compile, bool) else compile
        )
        trained_species = None
        if isinstance(model, (list, tuple)) and len(model) == 1:
            model = model[0]
        directory_members = member_paths(model) if isinstance(model, (str, os.PathLike)) else None
        if isinstance(model, (list, tuple)) and all(isinstance(m, So3krates) for m in model):
            members = [
                ForceField(copy.deepcopy(m).to(device=device, dtype=DTYPES[dtype]), mode, True, planner)
                for m in model
            ]
            self.force_field = Committee(members, getattr(model[0], "species", None))
            trained_species = self.force_field.species
        elif isinstance(model, (list, tuple)) or directory_members is not None:
            paths = directory_members or [Path(p) for p in model]
            self.force_field, metadata = load_committee(paths, device, DTYPES[dtype], mode, planner)
            trained_species = metadata.get("species")
        elif isinstance(model, So3krates):
            network = copy.deepcopy(model).to(device=device, dtype=DTYPES[dtype])
            self.force_field = ForceField(network, mode, frozen=True, planner=planner)
            trained_species = getattr(model, "species", None)  # pretrained models carry theirs
        elif isinstance(model, (str, os.PathLike)) and Path(model).suffix == ".pt2":
            from so3krates.export import load_exported

            if mode != "none":
                raise So3kratesError(
                    f"{model}: an exported program is already compiled (compile={compile!r})"
                )
            self.force_field = load_exported(model, planner)
            trained_species = self.force_field.species
            device = "cpu"
        elif isinstance(model, (str, os.PathLike)):
            network, metadata = load_model(Path(model), device=device, dtype=DTYPES[dtype])
            self.force_field = ForceField(network, mode, frozen=True, planner=planner)
            trained_species = metadata.get("species")
        else:  # a ForceField or an exported model, used as it is
            self.force_field = model
            trained_species = getattr(model, "species", None)
            if isinstance(model, ForceField):
                device = str(next(model.model.parameters()).device)
        keep_freed_memory()  # once per process (so3krates.memory)
        self.species = set(species if species is not None else (trained_species or range(1, 119)))
        self.device = torch.device(device)
        self.cutoff = float(self.force_field.cutoff)
        self.long_range_cutoff = getattr(self.force_field, "long_range_cutoff", None)
        self.total_charge, self.total_spin = total_charge, total_spin
        config = getattr(getattr(self.force_field, "model", None), "config", None)
        self._charge_and_spin_inputs = bool(getattr(config, "so3lr", False))
        if not self._charge_and_spin_inputs and any(v not in (None, 0) for v in (total_charge, total_spin)):
            raise So3kratesError(
                "this model takes no total charge or spin (only SO3LR models do); leave total_charge and "
                "total_spin unset"
            )
        self.skin = float(skin)
        self.min_distance = float(min_distance)
        self.n_neighbor_list_builds = 0
        self._reference: tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray] | None = None
        self._edges: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None
        self._edge_arrays: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None  # _edges on the host
        self._pairs = False  # the list is in pair order
        self._species_checked: np.ndarray | None = None  # atomic numbers that passed the species check
        self._closest_at_build = 0.0  # Å, shortest edge when the neighbour list was built
        self._displacement = 0.0  # Å, largest displacement of an atom since then

    def _check_species(self, atoms: Atoms) -> None:
        if self._species_checked is not None and np.array_equal(self._species_checked, atoms.numbers):
            return  # the same atoms as at the last call (every MD step): checked then
        reason = unknown_elements(atoms.numbers, self.species)
        if reason:
            raise UnsupportedStructureError(reason)
        self._species_checked = atoms.numbers.copy()

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
        edges = neighbor_list(
            positions, cell, pbc, max(self.cutoff, self.long_range_cutoff or 0.0) + self.skin
        )
        ordered = pair_order(edges)  # None only for a list that is not symmetric
        self._pairs = ordered is not None
        edges = ordered if ordered is not None else edges
        vectors = positions[edges.idx_j] - positions[edges.idx_i] + edges.shifts @ cell
        self._closest_at_build = float(np.min(np.linalg.norm(vectors, axis=1), initial=np.inf))
        self._displacement = 0.0
        self._edge_arrays = (edges.idx_i, edges.idx_j, edges.shifts.astype(np.float64))
        self._edges = tuple(torch.from_numpy(array).to(self.device) for array in self._edge_arrays)
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
        long_range = {}  # the inputs of SO3LR models: long-range edges, total charge and spin
        if (self.skin > 0 or self.long_range_cutoff is not None) and idx_i.shape[0] > 0:
            # The lengths in NumPy, on the host copy of the list: for a small molecule this runs in every
            # MD step, where each torch operation costs microseconds (the earlier torch version took ~60 µs
            # for ethanol, a tenth of the model's call). A pair's two directions have the same length:
            # with pairs, the first half decides for both.
            list_i, list_j, list_shifts = self._edge_arrays
            n = len(list_i) // 2 if self._pairs else len(list_i)
            vectors = atoms.positions[list_j[:n]] - atoms.positions[list_i[:n]]
            if pbc.any():
                vectors += list_shifts[:n] @ np.asarray(atoms.cell.array)
            squared = np.einsum("ij,ij->i", vectors, vectors)
            if self.long_range_cutoff is not None:
                if not self._pairs:
                    raise So3kratesError("long-range terms need a symmetric neighbour list (pair order)")
                # Every pair once: the first half of the pair-ordered list.
                lr = torch.from_numpy(np.flatnonzero(squared < self.long_range_cutoff**2)).to(self.device)
                long_range = {"lr_idx_i": idx_i[lr], "lr_idx_j": idx_j[lr], "lr_shifts": shifts[lr]}
            inside = squared < self.cutoff**2
            if not inside.all():  # else every edge of the list is inside r_c: nothing to drop
                keep = np.flatnonzero(inside)
                if self._pairs:
                    keep = np.concatenate([keep, keep + n])
                keep = torch.from_numpy(keep).to(self.device)
                idx_i, idx_j, shifts = idx_i[keep], idx_j[keep], shifts[keep]
        elif self.long_range_cutoff is not None:  # no edges at all
            long_range = {"lr_idx_i": idx_i, "lr_idx_j": idx_j, "lr_shifts": shifts}
        if self._charge_and_spin_inputs:
            charge = self.total_charge if self.total_charge is not None else atoms.info.get("charge", 0.0)
            spin = self.total_spin if self.total_spin is not None else atoms.info.get("total_spin", 0.0)
            long_range["total_charge"] = torch.tensor(
                [float(charge)], dtype=torch.float64, device=self.device
            )
            long_range["total_spin"] = torch.tensor([float(spin)], dtype=torch.float64, device=self.device)
        return Graph(
            positions=positions,
            atomic_numbers=torch.as_tensor(atoms.numbers, dtype=torch.long, device=self.device),
            idx_i=idx_i,
            idx_j=idx_j,
            shifts=shifts,
            cell=cell.unsqueeze(0),
            pbc=torch.as_tensor(pbc, device=self.device).unsqueeze(0),
            batch=torch.zeros(len(atoms), dtype=torch.long, device=self.device),
            pairs=self._pairs,
            **long_range,
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
            and all(previous.info.get(key) == atoms.info.get(key) for key in ("charge", "total_spin"))
        ):
            return [] if np.array_equal(previous.positions, atoms.positions) else ["positions"]
        changes = super().check_state(atoms, tol)
        if previous is not None and any(
            previous.info.get(key) != atoms.info.get(key) for key in ("charge", "total_spin")
        ):
            changes.append("info")  # the total charge or spin of the structure (SO3LR models)
        return changes

    def calculate(self, atoms=None, properties=("energy",), system_changes=all_changes) -> None:
        super().calculate(atoms, properties, system_changes)
        atoms = self.atoms
        self._check_species(atoms)
        graph = self.graph(atoms)
        self._check_distances(graph)
        compute_stress = "stress" in properties and bool(atoms.pbc.any())
        out = self.force_field(graph, compute_forces=True, compute_stress=compute_stress)
        energy = float(out[keys.ENERGY].detach()[0])
        self.results = {
            "energy": energy,
            "free_energy": energy,
            "forces": out[keys.FORCES].detach().cpu().double().numpy(),
            "energies": out[keys.ATOMIC_ENERGIES].detach().cpu().double().numpy(),
        }
        for name, value in (
            ("charges", out.get("charges")),
            ("dipole", None if out.get("dipole") is None else out["dipole"][0]),
            ("hirshfeld_ratios", out.get("hirshfeld_ratios")),
        ):
            if value is not None:
                self.results[name] = value.detach().cpu().double().numpy()
        if FORCES_UNCERTAINTY in out:
            self.results[ENERGY_UNCERTAINTY] = float(out[ENERGY_UNCERTAINTY][0])
            self.results[FORCES_UNCERTAINTY] = out[FORCES_UNCERTAINTY].cpu().double().numpy()
        if compute_stress:
            stress = out[keys.STRESS].detach().cpu().double().numpy()[0]
            self.results["stress"] = stress.flat[[0, 4, 8, 5, 2, 1]]  # Voigt: xx yy zz yz xz xy
