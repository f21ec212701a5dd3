"""Files that carry a trained model without the training code: writing them, and reading them back.

Every ``pt2`` and ``aoti`` file holds one program of :mod:`so3krates.runtime.programs`, which computes for
one structure::

    (positions (n, 3) f64 Å, atomic_numbers (n,) i64, idx_i (e,) i64, idx_j (e,) i64,
     shifts (e, 3) f64, cell (3, 3) f64 Å [, slots_i, slots_j])
    → (energy () f64 eV, atomic_energies (n,) f64 eV, forces (n, 3) f64 eV/Å, virial (3, 3) f64 eV)

with ``vec_ij = R_j − R_i + shifts_ij @ cell`` over a full neighbour list (both directions of every pair)
within the cutoff; edges beyond the cutoff add exactly nothing, so a list built with a skin is fine. Forces
are −∂E/∂R; the virial is −∂E/∂ε for a symmetric strain ε of positions and cell (stress = −virial / V for a
periodic cell; for a molecule pass a zero cell and ignore it). The program was traced with one
:class:`~so3krates.runtime.plan.Plan`, recorded in the metadata: with ``pairs`` it expects the edges in pair
order (:func:`so3krates.data.neighbors.pair_order`), with ``slots`` two more inputs,
``build_slots(idx_i, n)`` and ``build_slots(idx_j, n)`` (:mod:`so3krates.ops.slots`).

Formats (``so3krates export --format``):

- ``pt2``: a ``torch.export`` program (``torch.export.load(FILE).module()``), forward and backward traced
  into one graph of ATen operations with symbolic numbers of atoms and edges.
- ``aoti``: the same program compiled ahead of time by AOTInductor into a native shared library inside a
  ``.pt2`` package (``torch._inductor.aoti_load_package(FILE)`` in Python, ``AOTIModelPackageLoader`` in
  C++ without Python). Compiling takes about a minute and needs a C++ compiler at export time only.
- ``lammps-mliap``: a pickled :class:`so3krates.export.mliap.So3kratesMLIAP` for LAMMPS' ``pair_style mliap
  unified FILE 1`` (see that module); it chooses its plan per call, like the ASE calculator.

Every file carries ``metadata.json``: cutoff, species, dtype, units, versions, receptive field and plan.
"""

from __future__ import annotations

import copy
import json
import os
import zipfile
from pathlib import Path
from typing import Any

import torch

from so3krates import __version__
from so3krates.checks import check_output_file
from so3krates.data.graph import Graph
from so3krates.errors import DataError
from so3krates.files import atomic_path
from so3krates.model.checkpoint import load_model
from so3krates.model.so3krates import So3krates
from so3krates.runtime.evaluator import EnergyFunction
from so3krates.runtime.force_field import run_on_threads
from so3krates.runtime.plan import Plan, Planner
from so3krates.runtime.programs import (
    INPUTS,
    OUTPUTS,
    SLOT_INPUTS,
    Program,
    compile_program,
    example_inputs,
    load_program,
    trace,
)
from so3krates.runtime.radial import SPLINE_INTERVALS

#: Version of the exported interface (inputs, outputs, metadata keys); bumped when any of them changes.
#: 2: the plan (layers, radial, pairs, slots) replaced the keys paired_edges, edge_slots and
#: radial_table_intervals; TorchScript files are no longer written or read.
EXPORT_SCHEMA_VERSION = 2
FORMATS = ("pt2", "aoti", "lammps-mliap")
METADATA_FILE = "metadata.json"
DTYPES = {"float64": torch.float64, "float32": torch.float32}


def export_metadata(model: So3krates, species: list[int], fmt: str, plan: Plan | None) -> dict[str, Any]:
    """What a user of an exported file needs to know without the training code."""
    return {
        "export_schema_version": EXPORT_SCHEMA_VERSION,
        "format": fmt,
        "so3krates_version": __version__,
        "torch_version": torch.__version__,
        "cutoff": float(model.cutoff),
        "n_layers": int(model.config.n_layers),
        # A message-passing model: E_i depends on atoms up to n_layers × cutoff away (ghost atoms in LAMMPS).
        "receptive_field": float(model.config.n_layers * model.cutoff),
        "species": sorted(int(z) for z in species),
        "dtype": str(model.dtype).removeprefix("torch."),
        "units": {"length": "Å", "energy": "eV", "forces": "eV/Å", "virial": "eV"},
        "inputs": list(INPUTS) + (list(SLOT_INPUTS) if plan is not None and plan.slots else []),
        "outputs": list(OUTPUTS),
        "model_config": model.config.model_dump(mode="json"),
        # None for lammps-mliap, which chooses a plan per call.
        "plan": plan.as_dict() if plan is not None else None,
        "spline_intervals": SPLINE_INTERVALS if plan is not None and plan.radial == "spline" else None,
    }


def export_model(
    model: str | os.PathLike | So3krates,
    out: str | os.PathLike,
    fmt: str = "pt2",
    dtype: str = "float64",
    plan: Plan | None = None,
    species: list[int] | None = None,
    inductor_configs: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Writes ``model`` (a checkpoint path or a model) to ``out`` in format ``fmt``; returns the metadata.

    Args:
        model: checkpoint (``RUN/best.pt``) or a ``So3krates`` instance (not modified).
        out: destination file; written atomically.
        fmt: one of ``FORMATS``.
        dtype: ``"float64"`` or ``"float32"`` network; inputs and outputs are float64 either way.
        plan: pt2 and aoti: how the program evaluates the model (default: the modules, the radial networks,
            any edge order: a program for any neighbour list and any size). ``lammps-mliap`` takes none.
        species: atomic numbers the model may be used for; default: those of the checkpoint (all elements
            for a model instance).
        inductor_configs: aoti only: AOTInductor settings that replace ours, for profiling and experiments
            (``benchmarks/profile_kernels.py``), e.g. ``{"cpp.enable_kernel_profile": True}``.
    """
    if fmt not in FORMATS:
        raise DataError(f"unknown export format {fmt!r}; choose one of {', '.join(FORMATS)}")
    if inductor_configs and fmt != "aoti":
        raise DataError(f"inductor settings apply to aoti exports only, not {fmt}")
    if dtype not in DTYPES:
        raise DataError(f"unknown dtype {dtype!r}; choose float64 or float32")
    out = Path(out)
    if fmt in ("pt2", "aoti") and out.suffix != ".pt2":
        raise DataError(f"{out}: a {fmt} export must end in .pt2 (torch.export and AOTInductor insist on it)")
    if fmt == "lammps-mliap" and plan is not None:
        raise DataError("a lammps-mliap model chooses its plan per call, as the ASE calculator does: no plan")
    if fmt != "lammps-mliap":
        plan = plan or Planner().complete(DTYPES[dtype])
        plan.check(frozen=True)
    check_output_file(out)
    if isinstance(model, So3krates):
        model = copy.deepcopy(model)
        trained_species = None
    else:
        source = model
        model, checkpoint_metadata = load_model(model)
        trained_species = checkpoint_metadata.get("species")
        unknown = sorted(set(species or []) - set(trained_species or range(1, 119)))
        if unknown:
            raise DataError(
                f"species {unknown} are not among the elements {source} was trained on "
                f"({sorted(trained_species)}): the model cannot describe them"
            )
    if model.config.so3lr:
        raise DataError(
            "SO3LR models (total charge and spin inputs, long-range terms) cannot be exported yet; run them "
            "through the ASE calculator (so3krates md, explore, spectrum, or So3kratesCalculator)"
        )
    # A bare model instance knows no training elements: allow all unless told otherwise.
    species = sorted(species or trained_species or range(1, 119))
    model = model.to(dtype=DTYPES[dtype]).eval().requires_grad_(False)
    metadata = export_metadata(model, species, fmt, plan)
    if fmt == "lammps-mliap":
        from so3krates.export.mliap import So3kratesMLIAP

        So3kratesMLIAP(model, species, metadata=metadata).save(out)
        return metadata
    energy = EnergyFunction(model, plan, frozen=True)
    program = trace(
        energy, example_inputs(model, species, plan), one_thread_loops=fmt == "aoti" and not plan.slots
    )
    if fmt == "pt2":
        with atomic_path(out, suffix=".tmp.pt2") as tmp:
            torch.export.save(program, tmp, extra_files={METADATA_FILE: json.dumps(metadata)})
    else:
        compile_program(program, out, plan, {METADATA_FILE: json.dumps(metadata)}, inductor_configs)
    return metadata


def read_metadata(path: str | os.PathLike) -> dict[str, Any]:
    """The ``metadata.json`` of a ``pt2`` or ``aoti`` file."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: exported model not found")
    try:
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
            for name in names:
                if name.endswith(f"/{METADATA_FILE}") or name == METADATA_FILE:
                    return json.loads(archive.read(name))
            for name in names:  # an AOTInductor package keeps it in the compiled model's metadata
                if name.endswith("_metadata.json"):
                    candidate = json.loads(archive.read(name))
                    if METADATA_FILE in candidate:
                        return json.loads(candidate[METADATA_FILE])
    except (zipfile.BadZipFile, json.JSONDecodeError, KeyError) as error:
        raise DataError(f"{path}: not a so3krates export ({error})") from None
    raise DataError(f"{path}: not a so3krates export (no {METADATA_FILE})")


class ExportedModel:
    """A ``pt2`` or ``aoti`` file loaded for evaluation: one-structure graphs → energy, forces, virial.

    Called like a :class:`~so3krates.runtime.force_field.ForceField` (``So3kratesCalculator`` takes either),
    with the program's fixed plan; small graphs run on one thread as the planner says.

    Attributes:
        metadata: the file's ``metadata.json``.
        plan: the plan the program was traced with.
        program: the :class:`~so3krates.runtime.programs.Program`; ``program.function(*inputs)`` is the raw
            call with the inputs of the module docstring.
        cutoff: Å. species: the atomic numbers it was exported for.
    """

    def __init__(self, path: str | os.PathLike, planner: Planner | None = None) -> None:
        path = Path(path)
        metadata = read_metadata(path)
        version = metadata.get("export_schema_version", 0)
        if version > EXPORT_SCHEMA_VERSION:
            raise DataError(f"{path}: exported with a newer so3krates ({metadata.get('so3krates_version')})")
        if version < EXPORT_SCHEMA_VERSION:
            raise DataError(
                f"{path}: exported by so3krates {metadata.get('so3krates_version')} (export schema "
                f"{version}), which this version no longer reads; export the checkpoint again"
            )
        fmt = metadata.get("format")
        if fmt not in ("pt2", "aoti"):
            raise DataError(f"{path}: format {fmt!r} is not loaded by load_exported")
        self.metadata = metadata
        self.plan = Plan(**metadata["plan"])
        self.cutoff = float(metadata["cutoff"])
        self.species = list(metadata["species"])
        self.program = Program(load_program(path, fmt, self.plan), self.plan, DTYPES[metadata["dtype"]], fmt)
        self.planner = planner or Planner()

    @property
    def format(self) -> str:
        return self.metadata["format"]

    def __call__(
        self,
        graph: Graph,
        compute_forces: bool = True,
        compute_stress: bool = False,
        create_graph: bool = False,
    ) -> dict[str, torch.Tensor]:
        available = torch.get_num_threads()
        threads = self.planner.threads(graph.n_edges, available, "cpu", frozen=True)
        kernel = self.planner.kernel_threads(self.plan, graph.n_edges, threads, available)
        args = (graph, compute_forces, compute_stress, create_graph)
        return run_on_threads(threads, self.program, *args, kernel=kernel)


def load_exported(path: str | os.PathLike, planner: Planner | None = None) -> ExportedModel:
    """Loads a ``pt2`` or ``aoti`` file written by :func:`export_model`."""
    return ExportedModel(path, planner)
