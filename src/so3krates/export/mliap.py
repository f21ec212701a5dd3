"""SO3krates in LAMMPS through ML-IAP's "unified" Python interface: ``pair_style mliap unified FILE 1``.

This is the route for LAMMPS builds with the ML-IAP package and its Python coupling (``-D PKG_ML-IAP=on
-D PKG_PYTHON=on -D MLIAP_ENABLE_PYTHON=on``, plus Kokkos for GPUs), where LAMMPS runs the MPI domain
decomposition and calls :meth:`So3kratesMLIAP.compute_forces` on every rank with that rank's atoms.

Ghost atoms. SO3krates passes messages over T layers, so the energy of a local atom depends on atoms up to
T × r_c away, and on the neighbourhoods of atoms up to (T − 1) × r_c away. We chose a wide ghost shell over
exchanging features between layers: LAMMPS is asked for ghost atoms out to T × r_c (``comm_modify cutoff``)
and for the neighbour lists of ghost atoms too (``ghostneigh_flag = 1``); the model then sees a complete
T-hop neighbourhood of every local atom, sums the atomic energies of the local atoms only, and returns
∂E/∂r_ij for every pair, local and ghost. LAMMPS adds those to both atoms of the pair and sends the ghosts'
forces back to their owners. This needs nothing beyond stock LAMMPS (feature exchange needs a patched
pair style) and is exact; the price is recomputing the ghost shell on every rank, which is small when each
rank's domain is large compared with T × r_c (for the paper's T = 3, r_c = 5 Å: a 15 Å shell).

LAMMPS input::

    units metal
    atom_style atomic
    pair_style mliap unified model.mliap.pkl 1
    pair_coeff * * H C N O            # element of each atom type, in the model's element list
    comm_modify cutoff 17.0           # ≥ T × r_c + neighbour skin (metadata "receptive_field")

The file is a pickle: ``so3krates`` must be importable by the Python that LAMMPS embeds. Use the ``.pkl``
extension: LAMMPS reads ``.pt`` files with ``torch.load``, which refuses pickled classes since torch 2.6.
"""

from __future__ import annotations

import os
import pickle
from pathlib import Path
from typing import Any

import numpy as np
import torch
from ase.data import chemical_symbols

from so3krates.errors import DataError
from so3krates.files import atomic_path
from so3krates.memory import keep_freed_memory
from so3krates.model.so3krates import So3krates
from so3krates.runtime.derivatives import derivatives
from so3krates.runtime.force_field import ForceField
from so3krates.runtime.layout import EdgeLayout


class So3kratesMLIAP:
    """A LAMMPS ML-IAP unified model of a SO3krates network.

    LAMMPS uses the attributes ``element_types``, ``rcutfac`` (half the pair cutoff), ``ndescriptors``,
    ``nparams`` and ``interface`` and calls ``compute_forces(data)``; the class does not inherit from
    ``lammps.mliap``'s abstract base so that exporting does not need LAMMPS installed.

    Args:
        model: the network, in the dtype and on the device it should run with (copied and frozen).
        species: atomic numbers LAMMPS may assign to atom types.
        metadata: stored with the model (export metadata).

    Attributes:
        force_field: the frozen :class:`~so3krates.runtime.force_field.ForceField`, eager: it chooses the
            plan of every call from its size, as the ASE calculator does (LAMMPS' neighbour lists are not
            in pair order).
    """

    def __init__(self, model: So3krates, species: list[int], metadata: dict[str, Any] | None = None) -> None:
        self.force_field = ForceField(model, frozen=True)
        self.species = sorted(int(z) for z in species)
        self.element_types = [chemical_symbols[z] for z in self.species]
        self.ndescriptors = 1  # LAMMPS requires both to be set; the unified path does not use them
        self.nparams = 1
        self.rcutfac = 0.5 * float(model.cutoff)  # LAMMPS' pair cutoff is 2 × rcutfac
        self.interface = None
        self.metadata = metadata or {}

    @property
    def model(self) -> So3krates:
        return self.force_field.model

    # LAMMPS calls these for the descriptor/model split, which a unified model does not have.
    def compute_descriptors(self, data) -> None:
        pass

    def compute_gradients(self, data) -> None:
        pass

    def compute_forces(self, data) -> None:
        """Energy of the local atoms and ∂E/∂r_ij for every pair of ``data`` (LAMMPS' MLIAPDataPy)."""
        keep_freed_memory()  # once per process, as the calculators do (so3krates.memory)
        n_local, n_total = int(data.nlistatoms), int(data.ntotal)
        pair_i = np.asarray(data.pair_i, dtype=np.int64)
        pair_j = np.asarray(data.pair_j, dtype=np.int64)
        self._check_ghost_neighbors(pair_i, pair_j, n_local, n_total)
        force_field = self.force_field
        device = next(force_field.model.parameters()).device
        numbers = torch.as_tensor(np.asarray(self.species)[np.asarray(data.elems)[:n_total]], device=device)
        vectors = torch.tensor(np.asarray(data.rij), dtype=torch.float64, device=device).requires_grad_(True)
        iatoms = data.iatoms
        local = np.asarray(iatoms)[:n_local] if iatoms is not None else np.arange(n_local)
        local = torch.as_tensor(local.astype(np.int64), device=device)
        edges = EdgeLayout(torch.as_tensor(pair_i, device=device), torch.as_tensor(pair_j, device=device))
        plan = force_field.planner.plan(len(pair_i), force_field.model.dtype, frozen=True)
        atomic = force_field.energy_function(plan)(vectors, numbers, edges)
        local_energies = atomic[local]
        energy = local_energies.sum()
        gradient = derivatives(energy, vectors, edges, n_total, compute_forces=False).edge_gradients
        data.eatoms = local_energies.detach().double().cpu().numpy()
        data.energy = float(energy.detach())
        data.update_pair_forces(np.ascontiguousarray(gradient.double().cpu().numpy()))

    def _check_ghost_neighbors(
        self, pair_i: np.ndarray, pair_j: np.ndarray, n_local: int, n_total: int
    ) -> None:
        if self.model.config.n_layers < 2 or n_total == n_local or pair_j.size == 0:
            return
        if (pair_j >= n_local).any() and not (pair_i >= n_local).any():
            raise RuntimeError(
                "so3krates ML-IAP: ghost atoms have no neighbour lists; a message-passing model needs "
                "`pair_style mliap unified FILE 1` (ghost neighbours on) and `comm_modify cutoff` ≥ "
                f"{self.model.config.n_layers * self.model.cutoff:g} Å plus the neighbour skin"
            )

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["interface"] = None  # LAMMPS' live interface object is not part of the model
        return state

    def save(self, path: str | os.PathLike) -> None:
        """Pickles the model to ``path`` (atomically); refuses ``.pt``/``.pth`` (see the module docstring)."""
        path = Path(path)
        if path.suffix in (".pt", ".pth"):
            raise DataError(
                f"{path}: LAMMPS reads .pt/.pth files with torch.load, which refuses this pickle; "
                "use a .pkl name, e.g. model.mliap.pkl"
            )
        with atomic_path(path) as tmp, open(tmp, "wb") as handle:
            pickle.dump(self, handle)


def load_mliap(path: str | os.PathLike) -> So3kratesMLIAP:
    """Reads a file written with ``--format lammps-mliap`` (as LAMMPS does: an ordinary pickle)."""
    with open(path, "rb") as handle:
        unified = pickle.load(handle)  # a file the user exported; LAMMPS loads it the same way
    if not isinstance(unified, So3kratesMLIAP):
        raise DataError(f"{path}: not a so3krates ML-IAP model")
    return unified
