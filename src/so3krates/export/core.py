"""The trained model as a function of plain tensors, and the files that carry it without the training code.

Every exported format computes the same thing for one structure::

    (positions (n, 3) f64 Å, atomic_numbers (n,) i64, idx_i (e,) i64, idx_j (e,) i64,
     shifts (e, 3) f64, cell (3, 3) f64 Å)
    → (energy () f64 eV, atomic_energies (n,) f64 eV, forces (n, 3) f64 eV/Å, virial (3, 3) f64 eV)

with ``vec_ij = R_j − R_i + shifts_ij @ cell`` over a full neighbour list (both directions of every pair)
within the cutoff; edges beyond the cutoff add exactly nothing, so a list built with a skin is fine. Forces
are −∂E/∂R; the virial is −∂E/∂ε for a symmetric strain ε of positions and cell (stress = −virial / V for a
periodic cell; for a molecule pass a zero cell and ignore it).

Formats (``so3krates export --format``):

- ``torchscript``: ``torch.jit.load(FILE)``, also from C++ (libtorch). The network is traced as a function of
  the edge vectors and the derivatives are taken by a scripted wrapper. PyTorch has deprecated TorchScript
  in favour of ``torch.export``; it stays here for C++ consumers that still load it.
- ``pt2``: a ``torch.export`` program (``torch.export.load(FILE).module()``), forward and backward traced
  into one graph of ATen operations with symbolic numbers of atoms and edges.
- ``aoti``: the same program compiled ahead of time by AOTInductor into a native shared library inside a
  ``.pt2`` package (``torch._inductor.aoti_load_package(FILE)``), loadable from Python or C++ without
  Python. Compiling takes about a minute and needs a C++ compiler at export time, not at run time.
- ``lammps-mliap``: a pickled :class:`so3krates.export.mliap.So3kratesMLIAP` for LAMMPS' ``pair_style mliap
  unified FILE 1`` (see that module).

Every file carries ``metadata.json`` (cutoff, species, dtype, units, versions, receptive field).
"""

from __future__ import annotations

import contextlib
import json
import os
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from so3krates import __version__
from so3krates.errors import DataError
from so3krates.files import atomic_path
from so3krates.model.checkpoint import load_model
from so3krates.model.so3krates import So3krates
from so3krates.nn.slots import edge_slots, gather_rows

#: Version of the exported interface (inputs, outputs, metadata keys); bumped when any of them changes.
EXPORT_SCHEMA_VERSION = 1
FORMATS = ("torchscript", "pt2", "aoti", "lammps-mliap")
METADATA_FILE = "metadata.json"


class EnergyFunction(nn.Module):
    """E_i as a function of edge vectors; the part of the model that gets traced."""

    def __init__(self, model: So3krates, paired: bool = False) -> None:
        super().__init__()
        self.model = model
        self.paired = paired

    def forward(self, vectors: Tensor, atomic_numbers: Tensor, idx_i: Tensor, idx_j: Tensor) -> Tensor:
        return self.model.atomic_energies(vectors, atomic_numbers, idx_i, idx_j, paired=self.paired)


def strained_geometry(positions: Tensor, cell: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(positions, strain) as the leaves that forces and virial differentiate by, and the strained
    (positions, cell) built from them: the virial is −∂E/∂ε at ε = 0 with R → R(1 + ε_sym)."""
    positions = positions.detach().requires_grad_(True)
    strain = torch.zeros_like(cell).requires_grad_(True)
    symmetric = 0.5 * (strain + strain.transpose(0, 1))
    return positions, strain, positions + torch.mm(positions, symmetric), cell + torch.mm(cell, symmetric)


class SlottedForceField(nn.Module):
    """TensorForceField with two more inputs, ``edge_slots(idx_i)`` and ``edge_slots(idx_j)``, (n_atoms, K).

    Every sum over edges, and every gradient of a gather, then reads the tables instead of scattering
    (:mod:`so3krates.nn.slots`), so that AOTInductor's kernels can run on all threads without atomic
    additions. Fused path only; traced by ``make_fx``, never scripted.
    """

    def __init__(self, model: So3krates, paired: bool = False) -> None:
        super().__init__()
        self.model = model
        self.paired = paired

    def forward(
        self,
        positions: Tensor,
        atomic_numbers: Tensor,
        idx_i: Tensor,
        idx_j: Tensor,
        shifts: Tensor,
        cell: Tensor,
        slots_i: Tensor,
        slots_j: Tensor,
    ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        positions, strain, strained_positions, strained_cell = strained_geometry(positions, cell)
        vectors = (
            gather_rows(strained_positions, idx_j, slots_j)
            - gather_rows(strained_positions, idx_i, slots_i)
            + torch.mm(shifts, strained_cell)
        )
        atomic_energies = self.model.atomic_energies(
            vectors, atomic_numbers, idx_i, idx_j, paired=self.paired, slots=(slots_i, slots_j)
        )
        energy = atomic_energies.sum()
        position_gradient, strain_gradient = torch.autograd.grad([energy], [positions, strain])
        return energy.detach(), atomic_energies.detach(), -position_gradient, -strain_gradient


class TensorForceField(nn.Module):
    """Energy, atomic energies, forces and virial of one structure given as plain tensors (module docstring).

    Written to be compiled by TorchScript as well as traced by ``make_fx``: no Python objects, no
    data-dependent branches.
    """

    def __init__(self, energy: nn.Module) -> None:
        super().__init__()
        self.energy = energy

    def forward(
        self,
        positions: Tensor,
        atomic_numbers: Tensor,
        idx_i: Tensor,
        idx_j: Tensor,
        shifts: Tensor,
        cell: Tensor,
    ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        positions, strain, strained_positions, strained_cell = strained_geometry(positions, cell)
        vectors = strained_positions[idx_j] - strained_positions[idx_i] + torch.mm(shifts, strained_cell)
        atomic_energies = self.energy(vectors, atomic_numbers, idx_i, idx_j)
        energy = atomic_energies.sum()
        gradients = torch.autograd.grad([energy], [positions, strain], allow_unused=True)
        position_gradient = gradients[0]
        strain_gradient = gradients[1]
        # A structure without edges: the energy does not depend on the geometry.
        if position_gradient is None:
            position_gradient = torch.zeros_like(positions)
        if strain_gradient is None:
            strain_gradient = torch.zeros_like(cell)
        return energy.detach(), atomic_energies.detach(), -position_gradient, -strain_gradient


def graph_inputs(graph, slots: bool = False) -> tuple[Tensor, ...]:
    """The exported programs' inputs for a one-structure :class:`so3krates.data.graph.Graph`.

    ``slots``: with the two edge tables of a program exported with ``slotted=True`` (built here: a sort of
    the edges, ~4 ms for 54k edges).
    """
    inputs = (graph.positions, graph.atomic_numbers, graph.idx_i, graph.idx_j, graph.shifts, graph.cell[0])
    if slots:
        n_atoms = graph.positions.shape[0]
        inputs += (edge_slots(graph.idx_i, n_atoms), edge_slots(graph.idx_j, n_atoms))
    return inputs


def export_metadata(model: So3krates, species: list[int], fmt: str, dtype: torch.dtype) -> dict[str, Any]:
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
        "dtype": str(dtype).removeprefix("torch."),
        "units": {"length": "Å", "energy": "eV", "forces": "eV/Å", "virial": "eV"},
        "inputs": ["positions", "atomic_numbers", "idx_i", "idx_j", "shifts", "cell"],
        "outputs": ["energy", "atomic_energies", "forces", "virial"],
        "model_config": model.config.model_dump(mode="json"),
        # Intervals of the radial-filter spline (So3krates.tabulate), or None for the exact network. The
        # ML-IAP model evaluates eagerly and uses it for local graphs of up to FUSED_MAX_EDGES edges.
        "radial_table_intervals": (
            model.TABLE_INTERVALS
            if (model.fused or model.tabulate or fmt == "lammps-mliap") and model._radial_table() is not None
            else None
        ),
    }


def example_inputs(model: So3krates, species: list[int], paired: bool = False) -> tuple[Tensor, ...]:
    """A small cluster of the model's elements with all pairs as edges, for tracing.

    Five atoms and twenty edges: the numbers differ from each other and from 0 and 1, so a symbolic trace
    keeps the number of atoms and the number of edges as two free sizes. ``paired``: in the order of
    :func:`so3krates.data.neighbors.paired_edges`.
    """
    generator = torch.Generator().manual_seed(0)
    n = 5
    spacing = 0.35 * model.cutoff
    positions = torch.rand((n, 3), generator=generator, dtype=torch.float64) * spacing
    positions[:, 0] += torch.arange(n, dtype=torch.float64) * 0.2 * spacing
    numbers = torch.tensor([species[k % len(species)] for k in range(n)], dtype=torch.long)
    pairs = [(i, j) for i in range(n) for j in range(n) if i != j]
    if paired:
        forward = [(i, j) for i, j in pairs if i < j]
        pairs = forward + [(j, i) for i, j in forward]
    idx_i = torch.tensor([p[0] for p in pairs], dtype=torch.long)
    idx_j = torch.tensor([p[1] for p in pairs], dtype=torch.long)
    shifts = torch.zeros((len(pairs), 3), dtype=torch.float64)
    cell = torch.zeros((3, 3), dtype=torch.float64)
    return positions, numbers, idx_i, idx_j, shifts, cell


def _prepared_model(
    model: So3krates, dtype: torch.dtype, fused: bool, tabulate: bool | None = None
) -> So3krates:
    model = model.to(dtype=dtype).eval().requires_grad_(False)
    # The exported graph is fixed: choose the evaluation path once (So3krates.fused documents the trade-off).
    model.fused = fused
    model.tabulate = tabulate
    # Build the fused weights and the radial-filter table now, so that a trace sees them as constants.
    with torch.no_grad():
        model._fused_cache.get(model.layers)
        model._radial_table()
    return model


def _export_torchscript(model: So3krates, inputs: tuple[Tensor, ...], path: Path, metadata: dict) -> None:
    import warnings

    positions, numbers, idx_i, idx_j, shifts, cell = inputs
    vectors = positions[idx_j] - positions[idx_i] + shifts @ cell
    with warnings.catch_warnings():
        # TorchScript's deprecation notice, and its warning about Python numbers in the fused path: those
        # are sizes of weight matrices, fixed for the exported model, not sizes of the input.
        warnings.simplefilter("ignore")
        traced = torch.jit.trace(EnergyFunction(model), (vectors, numbers, idx_i, idx_j), check_trace=False)
        scripted = torch.jit.script(TensorForceField(traced))
    with atomic_path(path) as tmp:
        scripted.save(str(tmp), _extra_files={METADATA_FILE: json.dumps(metadata)})


def _exported_program(
    model: So3krates, inputs: tuple[Tensor, ...], paired: bool = False, slotted: bool = False
) -> torch.export.ExportedProgram:
    """Forward and backward of TensorForceField as one ATen graph with symbolic sizes → torch.export.

    ``torch.export`` cannot trace ``torch.autograd.grad`` itself (torch 2.13); ``make_fx`` can, and its
    graph, which no longer contains autograd calls, exports. The model's weights enter the graph as
    constants (``_allow_non_fake_inputs``): the program is then self-contained.
    """
    import warnings

    from torch.export import Dim
    from torch.fx.experimental.proxy_tensor import make_fx

    force_field = (
        SlottedForceField(model, paired) if slotted else TensorForceField(EnergyFunction(model, paired))
    )
    graph_module = make_fx(force_field, tracing_mode="symbolic", _allow_non_fake_inputs=True)(*inputs)
    n_atoms = Dim("n_atoms", min=0, max=2**31 - 1)
    n_edges = Dim("n_edges", min=0, max=2**31 - 1)
    if paired:  # an even number of edges: both directions of every pair
        n_edges = 2 * Dim("n_pairs", min=0, max=2**30 - 1)
    dynamic: tuple = ({0: n_atoms}, {0: n_atoms}, {0: n_edges}, {0: n_edges}, {0: n_edges}, None)
    if slotted:  # (K, n_atoms) tables, K the most edges of one atom
        dynamic += ({0: Dim("slots_i", min=1, max=2**31 - 1), 1: n_atoms},)
        dynamic += ({0: Dim("slots_j", min=1, max=2**31 - 1), 1: n_atoms},)
    # Size-oblivious tracing: no guard that a size is not 0 or 1 (paired programs got "n_pairs >= 2").
    with warnings.catch_warnings(), torch.fx.experimental._config.patch(backed_size_oblivious=paired):
        warnings.simplefilter("ignore", FutureWarning)
        return torch.export.export(graph_module, inputs, dynamic_shapes=dynamic, strict=False)


def export_model(
    model: str | os.PathLike | So3krates,
    out: str | os.PathLike,
    fmt: str = "torchscript",
    dtype: str = "float64",
    fused: bool = False,
    species: list[int] | None = None,
    tabulate: bool | None = None,
    paired: bool = False,
    inductor_configs: dict[str, Any] | None = None,
    slotted: bool = False,
) -> dict[str, Any]:
    """Writes ``model`` (a checkpoint path or a model) to ``out`` in format ``fmt``; returns the metadata.

    Args:
        model: checkpoint (``RUN/best.pt``) or a ``So3krates`` instance (not modified).
        out: destination file; written atomically.
        fmt: one of ``FORMATS``.
        dtype: ``"float64"`` or ``"float32"`` network; inputs and outputs are float64 either way.
        fused: evaluate the layers through the fused path (faster for molecules of up to a few hundred
            edges) instead of the per-equation modules (faster for large systems).
        species: atomic numbers the model may be used for; default: those of the checkpoint (all elements
            for a model instance).
        tabulate: radial filters from a spline (see ``So3krates.tabulate``; then always the fused path);
            ``None``: for float32 networks only.
        paired: pt2 and aoti only: the program expects the edges in the order of
            :func:`so3krates.data.neighbors.paired_edges` (edge k + n/2 is edge k reversed) and evaluates
            the filters once per pair (``So3krates.atomic_energies``). Recorded in the metadata as
            ``paired_edges``; ``So3kratesCalculator(compile="aoti")`` uses it.
        inductor_configs: aoti only: AOTInductor settings that replace ours, for profiling and experiments
            (``benchmarks/profile_kernels.py``), e.g. ``{"cpp.enable_kernel_profile": True}``.
        slotted: pt2 and aoti, fused path only: the program takes two more inputs, ``edge_slots(idx_i,
            n_atoms)`` and ``edge_slots(idx_j, n_atoms)`` (:mod:`so3krates.nn.slots`), and sums over edges
            without scatter-adds; an aoti program then runs its generated kernels on all threads
            (:class:`SlottedForceField`). Recorded in the metadata as ``edge_slots``.
    """
    import copy

    if fmt not in FORMATS:
        raise DataError(f"unknown export format {fmt!r}; choose one of {', '.join(FORMATS)}")
    if inductor_configs and fmt != "aoti":
        raise DataError(f"inductor settings apply to aoti exports only, not {fmt}")
    if paired and fmt not in ("pt2", "aoti"):
        raise DataError(f"paired edges need a pt2 or aoti export (symbolic numbers of edges), not {fmt}")
    if slotted and (fmt not in ("pt2", "aoti") or not (fused or tabulate)):
        raise DataError(f"edge slots need a pt2 or aoti export of the fused path, not {fmt}, fused={fused}")
    torch_dtype = {"float64": torch.float64, "float32": torch.float32}.get(dtype)
    if torch_dtype is None:
        raise DataError(f"unknown dtype {dtype!r}; choose float64 or float32")
    if isinstance(model, So3krates):
        model = copy.deepcopy(model)
        trained_species = None
    else:
        model, checkpoint_metadata = load_model(model)
        trained_species = checkpoint_metadata.get("species")
    # A bare model instance knows no training elements: allow all unless told otherwise.
    species = sorted(species or trained_species or range(1, 119))
    model = _prepared_model(model, torch_dtype, fused, tabulate)
    metadata = export_metadata(model, species, fmt, torch_dtype)
    metadata["paired_edges"] = bool(paired)
    metadata["edge_slots"] = bool(slotted)
    if slotted:
        metadata["inputs"] = [*metadata["inputs"], "slots_i", "slots_j"]
    out = Path(out)
    if fmt in ("pt2", "aoti") and out.suffix != ".pt2":
        raise DataError(f"{out}: a {fmt} export must end in .pt2 (torch.export and AOTInductor insist on it)")
    if fmt == "lammps-mliap":
        from so3krates.export.mliap import So3kratesMLIAP

        So3kratesMLIAP(model, species, metadata=metadata).save(out)
        return metadata
    inputs = example_inputs(model, species, paired)
    if fmt == "torchscript":
        _export_torchscript(model, inputs, out, metadata)
        return metadata
    if slotted:
        # Seven rows, not four (each atom's edges): a padded width that no other size of the trace shares.
        n_atoms = inputs[0].shape[0]
        inputs = (
            *inputs,
            edge_slots(inputs[2], n_atoms, min_width=7),
            edge_slots(inputs[3], n_atoms, min_width=7),
        )
    program = _exported_program(model, inputs, paired, slotted)
    if fmt == "pt2":
        with atomic_path(out, suffix=".tmp.pt2") as tmp:
            torch.export.save(program, tmp, extra_files={METADATA_FILE: json.dumps(metadata)})
        return metadata
    from torch._inductor import aoti_compile_and_package

    with atomic_path(out, suffix=".tmp.pt2") as tmp, _bias_additions_apart():
        tmp.unlink()  # the packager writes the archive itself
        aoti_compile_and_package(
            program,
            package_path=str(tmp),
            inductor_configs={
                "aot_inductor.metadata": {METADATA_FILE: json.dumps(metadata)},
                # As in compile_model: inductor's multi-threaded CPU kernels corrupted memory in this
                # model's backward pass with torch 2.13; matrix products keep all threads. A slotted
                # program has no scatter-adds, and its kernels run on all threads.
                "cpp.threads": -1 if slotted else 1,
                **(inductor_configs or {}),
            },
        )
    return metadata


@contextlib.contextmanager
def _bias_additions_apart() -> Iterator[None]:
    """While compiling: inductor leaves ``mm(a, b) + c`` as a product and an addition on CPU too.

    On CPU, inductor's post-grad passes turn every ``mm + add`` back into ``addmm``, whose CPU kernel first
    copies the addend into its output, one extra pass over every (n_edges, F) filter tensor; GPUs get the
    addition fused into the next elementwise kernel instead. The model writes its per-edge bias additions
    as ``mm + add`` (``So3krates.radial_filters``, ``FilterNet.from_radial``) so that CPU programs can do
    the same. Paper model, float32, per-equation program, 999 water molecules, 1 thread: 639 against 698 ms.
    Inductor's check is replaced for the duration of the compilation only; with a torch that lacks it,
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
        # Inductor's graph cache does not know of the replaced check: compile afresh.
        with inductor_config.patch(fx_graph_cache=False):
            yield
    finally:
        post_grad.should_prefer_unfused_addmm = original


def cache_directory() -> Path:
    """Where compiled programs are kept between runs: ``$SO3KRATES_CACHE_DIR`` or ``~/.cache/so3krates``."""
    return Path(os.environ.get("SO3KRATES_CACHE_DIR") or Path.home() / ".cache" / "so3krates")


#: Edges up to which ``So3kratesCalculator(compile="aoti")`` runs the fused program; beyond, the
#: per-equation one. Paper model, float32, AOTInductor, paired edges (filters once per pair, MLP_s
#: included), 2 threads, both programs timed in turn in one process: 99 water (6.3k edges) 57 ms fused
#: and tabulated vs 76 ms per-equation; DeePMD water (10k edges) 100 vs 126; 399 water (26k) 250 vs 318;
#: 999 water (54k) 536 vs 665; 3000 water (163k edges, separate processes) 1.52 and 1.59 s vs 1.85 and
#: 1.70 s, at a peak memory of 2.8 against 2.2-2.3 GB. Beyond the largest size measured the per-equation
#: program is kept for its smaller memory. (Before the spherical filters were paired too, the crossover was
#: near 8,000 edges: DeePMD water 181 vs 163 ms.)
AOTI_FUSED_MAX_EDGES = 200_000


def aoti_program_kind(n_edges: int, threaded: bool) -> tuple[bool, bool]:
    """(fused, slotted): the program ``So3kratesCalculator(compile="aoti")`` runs for a graph of ``n_edges``.

    Fused up to ``AOTI_FUSED_MAX_EDGES``, per-equation beyond. A fused call on several threads takes the
    slotted program (edge slots, every kernel threaded: 99 / DeePMD / 399 / 999 water 38.8 → 33.2,
    69.9 → 61.0, 197.7 → 162.8, 420 → 352 ms, programs in turn in one process); on one thread, and for a
    graph without edges (no sum to take), the plain one.
    """
    fused = n_edges <= AOTI_FUSED_MAX_EDGES
    return fused, fused and threaded and n_edges > 0


def compiled_program(
    model: So3krates,
    dtype: torch.dtype,
    species: list[int],
    fused: bool = False,
    paired: bool = False,
    slotted: bool = False,
) -> ExportedModel:
    """The model compiled ahead of time by AOTInductor, from the on-disk cache or compiled now (~1 min).

    The cache key covers everything the program depends on: weights, model config, dtype, evaluation path
    (``fused``, ``model.tabulate``), and the torch, so3krates and export-schema versions. Used by
    ``So3kratesCalculator(compile="aoti")``.
    """
    import hashlib

    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    identity = [
        model.config.model_dump(mode="json"),
        str(dtype),
        torch.__version__,
        __version__,
        _source_digest(),
    ]
    identity += [fused, model.tabulate, model.TABLE_INTERVALS] + ([True] if paired else [])
    identity += ["slotted"] if slotted else []
    digest.update(json.dumps([identity, EXPORT_SCHEMA_VERSION, sorted(species)], sort_keys=True).encode())
    path = cache_directory() / "aoti" / f"{digest.hexdigest()[:24]}.pt2"
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        export_model(
            model,
            path,
            fmt="aoti",
            dtype=str(dtype).removeprefix("torch."),
            species=species,
            fused=fused,
            tabulate=model.tabulate,
            paired=paired,
            slotted=slotted,
        )
    return load_exported(path)


def _source_digest() -> str:
    """Digest of the code a compiled program is made of (model, layers, export): a changed line of it
    gives a new program even where the package version stays the same (a development install)."""
    import hashlib

    package = Path(__file__).resolve().parents[1]
    digest = hashlib.sha256()
    for path in sorted([*package.joinpath("nn").glob("*.py"), *package.joinpath("model").glob("*.py")]):
        digest.update(path.read_bytes())
    digest.update(Path(__file__).read_bytes())
    return digest.hexdigest()[:16]


class ExportedModel:
    """An exported file loaded for evaluation: ``exported(positions, numbers, idx_i, idx_j, shifts, cell)``
    (and two edge tables for a ``slotted`` export: ``exported(*graph_inputs(graph, slots=True))``).

    Attributes:
        metadata: the file's ``metadata.json``.
        format: ``"torchscript"``, ``"pt2"`` or ``"aoti"``.
    """

    def __init__(self, function, metadata: dict[str, Any]) -> None:
        self._function = function
        self.metadata = metadata
        self.format = metadata["format"]
        self.cutoff = float(metadata["cutoff"])

    def __call__(
        self,
        positions: Tensor,
        atomic_numbers: Tensor,
        idx_i: Tensor,
        idx_j: Tensor,
        shifts: Tensor,
        cell: Tensor,
        *slots: Tensor,
    ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """``slots``: for a program exported with ``slotted=True``, the two tables (see export_model)."""
        return self._function(positions, atomic_numbers, idx_i, idx_j, shifts, cell, *slots)


def read_metadata(path: str | os.PathLike) -> dict[str, Any]:
    """The ``metadata.json`` of an exported file (any format but ``lammps-mliap``)."""
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


def load_exported(path: str | os.PathLike) -> ExportedModel:
    """Loads a ``torchscript``, ``pt2`` or ``aoti`` file written by :func:`export_model`."""
    path = Path(path)
    metadata = read_metadata(path)
    fmt = metadata.get("format")
    if metadata.get("export_schema_version", 0) > EXPORT_SCHEMA_VERSION:
        raise DataError(f"{path}: exported with a newer so3krates ({metadata.get('so3krates_version')})")
    if fmt == "torchscript":
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)  # see the module docstring
            function = torch.jit.load(str(path), map_location="cpu")
    elif fmt == "pt2":
        function = torch.export.load(path).module()
    elif fmt == "aoti":
        from torch._inductor import aoti_load_package

        function = aoti_load_package(str(path))
    else:
        raise DataError(f"{path}: format {fmt!r} is not loaded by load_exported")
    return ExportedModel(function, metadata)
