"""The model evaluated by one plan: an energy function built once, and graphs → energy, forces, virial.

:class:`EnergyFunction` is built once from a model and a :class:`~so3krates.runtime.plan.Plan`: the plan
picks, at construction, how the radial filters are made (network or spline) and which layer implementation
runs (modules or fused); pairs and slots arrive as data in the :class:`~so3krates.runtime.layout.EdgeLayout`.
Its forward has no branch on a speed flag. :class:`Evaluator` adds the derivatives
(:func:`so3krates.runtime.derivatives.derivatives`) for batched graphs.

Weights: by default the dense matrices of the fused layers and of the radial networks are assembled from the
parameters on every call (a few small operations, differentiable: training uses them). ``frozen=True``
assembles them, and the spline, once at construction — the caller promises that the weights do not change
afterwards (:class:`so3krates.runtime.force_field.ForceField` keeps its own frozen copy of the model).
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import NamedTuple

import torch
from torch import Tensor, nn

from so3krates import keys
from so3krates.data.graph import Graph
from so3krates.model.so3krates import So3krates
from so3krates.nn.transformer import EdgeFeatures, TransformerLayer
from so3krates.ops.pair_messages import RadialSpline, spline_table
from so3krates.ops.scatter import scatter_sum
from so3krates.ops.spline import Spline, evaluate_spline
from so3krates.runtime.block_programs import compile_messages
from so3krates.runtime.blocks import (
    KernelSpline,
    blocked_kernel_sum,
    blocked_sum,
    edge_blocks,
)
from so3krates.runtime.derivatives import graph_derivatives
from so3krates.runtime.fused import (
    LayerWeights,
    edge_filters,
    edge_messages,
    finish_updates,
    fused_layer,
    layer_weights,
    projections,
    spherical_hidden,
)
from so3krates.runtime.layout import EdgeLayout
from so3krates.runtime.plan import Plan, PlanError, Planner
from so3krates.runtime.radial import (
    RadialWeights,
    build_filter_spline,
    network_filters,
    radial_weights,
    spline_filters,
)


class Weights(NamedTuple):
    """What a plan reads from the parameters besides the modules, per layer (None where it reads nothing).

    radial: the radial networks (network plans).
    layers: the fused matrices (fused plans).
    """

    radial: tuple[RadialWeights | None, ...]
    layers: tuple[LayerWeights | None, ...]


def assemble(model: So3krates, plan: Plan) -> Weights:
    """The matrices ``plan`` reads, assembled from the model's parameters."""
    network, fused = plan.radial == "network", plan.layers == "fused"
    return Weights(
        tuple(radial_weights(layer) if network else None for layer in model.layers),
        tuple(layer_weights(layer, heads=plan.kernel) if fused else None for layer in model.layers),
    )


def _constant(weights: Weights) -> Weights:
    return weights


def _network_filters(model: So3krates, weights: Weights, distances: Tensor) -> Callable[[int], list[Tensor]]:
    """Layer k → its radial parts, evaluated when the layer runs (the radial basis once for all)."""
    rbf = model.radial_basis(distances)
    return lambda k: network_filters(weights.radial[k], rbf)


def _spline_filters(
    model: So3krates, spline: Spline, weights: Weights, distances: Tensor
) -> Callable[[int], list[Tensor]]:
    """Layer k → its radial parts, read for all layers at once (four row gathers per edge)."""
    parts = spline_filters(model, spline, distances)
    n_branches = len(parts) // len(model.layers)
    return lambda k: parts[k * n_branches : (k + 1) * n_branches]


def module_layer(
    layer: TransformerLayer,
    weights: LayerWeights | None,
    radial: list[Tensor],
    h: Tensor,
    x: Tensor,
    features: EdgeFeatures,
    edges: EdgeLayout,
) -> tuple[Tensor, Tensor]:
    """One layer through its modules, with the radial parts of the filters given (one per branch)."""
    filters = radial
    if layer.euclidean_attention is not None:
        invariants = layer.contraction(edges.difference(x))
        # The spherical part MLP_s(s_ij) − b_s (b_s sits in the radial part, so3krates.runtime.radial).
        filters = [
            r + torch.mm(nn.functional.silu(net.spherical_in(invariants)), net.spherical_out.weight.T)
            for r, net in zip(radial, layer.filter_nets, strict=True)
        ]
    return layer.update(h, x, [edges.both(w) for w in filters], features)


def _fused_layer(
    layer: TransformerLayer,
    weights: LayerWeights | None,
    radial: list[Tensor],
    h: Tensor,
    x: Tensor,
    features: EdgeFeatures,
    edges: EdgeLayout,
    kernel: bool = False,
) -> tuple[Tensor, Tensor]:
    return fused_layer(layer, weights, radial, h, x, features.cutoff, features.sph, edges, kernel)


def _layer_splines(model: So3krates, spline: Spline) -> list[Spline]:
    """The spline of all layers' radial parts cut into one spline per layer (its columns)."""
    columns = spline.coefficients[0].shape[1] // len(model.layers)
    return [
        Spline(
            tuple(c[:, k * columns : (k + 1) * columns].contiguous() for c in spline.coefficients),
            spline.spacing,
            spline.end,
        )
        for k in range(len(model.layers))
    ]


def _kernel_splines(model: So3krates, spline: Spline) -> list[tuple[Tensor, float]]:
    """Per layer, (table, spacing) of its radial spline as the pair-message kernel reads it."""
    return [(spline_table(s.coefficients), s.spacing) for s in _layer_splines(model, spline)]


def _kernel_spline_filters(
    splines: list[tuple[Tensor, float]], weights: Weights, distances: Tensor
) -> Callable[[int], RadialSpline]:
    """Layer k → its radial spline at the pair distances: the kernel reads the radial parts itself."""
    return lambda k: RadialSpline(distances, *splines[k])


def _block_network_filters(model: So3krates, weights: Weights, k: int, distances: Tensor) -> list[Tensor]:
    return network_filters(weights.radial[k], model.radial_basis(distances))


def _block_spline_filters(
    model: So3krates, splines: list[Spline], weights: Weights, k: int, distances: Tensor
) -> list[Tensor]:
    return list(evaluate_spline(splines[k], distances).split(model.config.n_features, dim=1))


def _initial_euclidean_rows(model: So3krates, layout: EdgeLayout, vectors: Tensor) -> Tensor:
    """φ(d_ij) Y_ij of a block's edges (Eq. 11 before the sum)."""
    features = model.edge_features(vectors, layout.idx_i, layout.idx_j, with_rbf=False)
    return features.cutoff[:, None] * features.sph


def _edge_geometry(model: So3krates, edges: EdgeLayout, vectors: Tensor) -> Tensor:
    """[d | φ(d) | Y] of every edge, (n_edges, 2 + n_sph): the per-edge inputs of the kernel's blocks,
    computed once for all layers (18 floats per edge in the paper model; autograd through it once too),
    instead of from the vectors in every layer's blocks, forward and again backward."""
    features = model.edge_features(vectors, edges.idx_i, edges.idx_j, with_rbf=False)
    return torch.cat([features.distances[:, None], features.cutoff[:, None], features.sph], dim=1)


def _initial_geometry_rows(layout: EdgeLayout, geometry: Tensor) -> Tensor:
    """φ(d_ij) Y_ij of a block's edges (Eq. 11 before the sum) from their rows of :func:`_edge_geometry`."""
    return geometry[:, 1:2] * geometry[:, 2:]


def _block_geometry(
    model: So3krates, layout: EdgeLayout, vectors: Tensor, x_i: Tensor | None, x_j: Tensor | None
) -> tuple[EdgeFeatures, Tensor | None]:
    """A block's edge features and x_j − x_i on its first rows (None without Euclidean variables)."""
    features = model.edge_features(vectors, layout.idx_i, layout.idx_j, with_rbf=False)
    return features, None if x_i is None else x_j - x_i


def _layer_rows(
    model: So3krates,
    layer: TransformerLayer,
    weights: LayerWeights,
    radial: Callable[[Tensor], list[Tensor]],
    layout: EdgeLayout,
    vectors: Tensor,
    queries: Tensor,
    keys_values: Tensor,
    x_i: Tensor | None = None,
    x_j: Tensor | None = None,
) -> Tensor:
    """The messages of one layer on a block's edges, geometry and filters recomputed from the vectors."""
    features, differences = _block_geometry(model, layout, vectors, x_i, x_j)
    return edge_messages(
        layer,
        weights,
        radial(layout.first(features.distances)),
        differences,
        queries,
        keys_values,
        features.cutoff,
        features.sph,
        None if layout.pairs else layout.both,
    )


def _kernel_rows(
    model: So3krates,
    layer: TransformerLayer,
    weights: LayerWeights,
    radial: Callable[[Tensor], list[Tensor]] | None,
    layout: EdgeLayout,
    geometry: Tensor,
    x_i: Tensor | None = None,
    x_j: Tensor | None = None,
) -> tuple[Tensor | None, Tensor, Tensor, Tensor | None, Tensor | None]:
    """The pair-message kernel's inputs on a block's edges, from their rows of :func:`_edge_geometry` and x
    (``runtime.blocks.KernelRows``): filters per pair, cutoff and sph; or with ``radial`` None, where the
    kernel makes the filters from the layer's spline, the pair distances and spherical hidden rows instead."""
    differences = None if x_i is None else x_j - x_i
    distances, cutoff = layout.first(geometry[:, 0]), geometry[:, 1]
    sph = geometry[:, 2:] if weights.spherical_in is not None else geometry.new_zeros((geometry.shape[0], 0))
    if radial is None:
        hidden = spherical_hidden(layer, weights, differences)
        return None, cutoff, sph, distances, hidden
    return edge_filters(layer, weights, radial(distances), differences), cutoff, sph, None, None


class EnergyFunction(nn.Module):
    """Atomic energies of the model as ``plan`` evaluates them: (vectors, atomic numbers, edges) → E_i.

    Args:
        model: the energy model (not copied: with ``frozen`` the caller keeps its weights fixed).
        plan: how to evaluate it; refused with a :class:`~so3krates.runtime.plan.PlanError` when it cannot
            run on these weights.
        frozen: assemble the weights and the spline once, now (inference); otherwise on every call.
        block_edges: edges per block for plans with blocks (:mod:`so3krates.runtime.blocks`); ``None``:
            the planner's default for the plan (:meth:`Planner.edges_per_block`).
        compile_blocks: with blocks, each block's messages and their gradients run as programs compiled by
            ``torch.compile`` (:func:`~so3krates.runtime.block_programs.compile_messages`); the block loop
            stays Python.
        block_workers: threads that evaluate blocks at once (:func:`~so3krates.runtime.blocks.in_workers`);
            default: torch's thread count at the call on a CPU, one on a GPU.
    """

    def __init__(
        self,
        model: So3krates,
        plan: Plan,
        frozen: bool = False,
        block_edges: int | None = None,
        compile_blocks: bool = False,
        block_workers: int | None = None,
    ) -> None:
        super().__init__()
        plan.check(frozen=frozen)
        if frozen and any(p.requires_grad for p in model.parameters()):
            raise PlanError(
                "frozen=True needs a model whose parameters need no gradient (requires_grad_(False))"
            )
        self.model = model
        self.plan = plan
        self.frozen = frozen
        # The choices of the plan, made once: where the weights come from, how the radial parts are
        # made, which layer implementation runs.
        if frozen:
            with torch.no_grad():
                self.weights = partial(_constant, assemble(model, plan))
        else:
            self.weights = partial(assemble, model, plan)
        spline = build_filter_spline(model) if plan.radial == "spline" else None
        # With the kernel, it reads each layer's radial parts from the spline itself (ops.pair_messages).
        self.kernel_splines = _kernel_splines(model, spline) if spline is not None and plan.kernel else None
        if self.kernel_splines is not None:
            self.radial = partial(_kernel_spline_filters, self.kernel_splines)
        elif spline is not None:
            self.radial = partial(_spline_filters, model, spline)
        else:
            self.radial = partial(_network_filters, model)
        self.layer: Callable[..., tuple[Tensor, Tensor]] = (
            module_layer if plan.layers == "modules" else partial(_fused_layer, kernel=plan.kernel)
        )
        if block_edges is None:
            block_edges = Planner().edges_per_block(plan)
        self.block_edges = block_edges
        self.block_workers = block_workers
        self.compile_blocks = compile_blocks and plan.blocks
        self._features_of_plan = self._blocked_features if plan.blocks else self._whole_features
        if plan.blocks:
            # Blocks evaluate the radial parts of one layer at a time, on the block's edges.
            self.block_radial = (
                None
                if self.kernel_splines is not None
                else partial(_block_spline_filters, model, _layer_splines(model, spline))
                if spline is not None
                else partial(_block_network_filters, model)
            )
            # The kernel's blocks read the edge geometry computed once per call (_edge_geometry).
            initial = partial(_initial_euclidean_rows, model)
            self.initial_rows = _initial_geometry_rows if plan.kernel else initial
            self.layer_rows = _kernel_rows if plan.kernel else _layer_rows
            if self.compile_blocks:
                self.initial_rows = compile_messages(self.initial_rows)
                self.layer_rows = compile_messages(self.layer_rows)

    def forward(self, vectors: Tensor, atomic_numbers: Tensor, edges: EdgeLayout) -> Tensor:
        """Args:
            vectors: (n_edges, 3) float, Å — ``R_j − R_i`` (plus image offset) of each edge.
            atomic_numbers: (n_atoms,) int64.
            edges: the layout of the edges (pairs and slots as the plan expects them).

        Returns:
            (n_atoms,) float64, eV — atomic energies E_i.
        """
        return self.model.readout(self.features(vectors, atomic_numbers, edges), atomic_numbers)

    def features(
        self, vectors: Tensor, atomic_numbers: Tensor, edges: EdgeLayout, h: Tensor | None = None
    ) -> Tensor:
        """The invariant features h after the last layer, (n_atoms, F); ``h``: those at input (default: the
        element embedding; SO3LR adds its charge and spin embeddings)."""
        return self._features_of_plan(vectors, atomic_numbers, edges, h)

    def _whole_features(
        self, vectors: Tensor, atomic_numbers: Tensor, edges: EdgeLayout, h: Tensor | None = None
    ) -> Tensor:
        """``features`` with every per-edge tensor of the graph at once."""
        model = self.model
        weights = self.weights()
        features = model.edge_features(vectors, edges.idx_i, edges.idx_j, with_rbf=False)
        radial = self.radial(weights, edges.first(features.distances))  # layer k → its radial parts
        n_atoms = atomic_numbers.shape[0]
        if h is None:
            h = model.embedding(atomic_numbers)
        x = model.initial_euclidean(features, n_atoms, edges.sum_i)
        for k, layer in enumerate(model.layers):
            h, x = self.layer(layer, weights.layers[k], radial(k), h, x, features, edges)
        return h

    def _blocked_features(
        self, vectors: Tensor, atomic_numbers: Tensor, edges: EdgeLayout, h: Tensor | None = None
    ) -> Tensor:
        """``features`` with the sums over edges evaluated in blocks (:mod:`so3krates.runtime.blocks`):
        per layer, only per-atom tensors and the edge vectors (with the kernel: the edge geometry) are kept
        for the backward pass."""
        model = self.model
        weights = self.weights()
        blocks = edge_blocks(edges, self.block_edges)
        workers = 1 if vectors.device.type != "cpu" else self.block_workers or torch.get_num_threads()
        n_atoms, n_sph, dtype = atomic_numbers.shape[0], model.contraction.n_sph, model.dtype
        if h is None:
            h = model.embedding(atomic_numbers)
        # The per-edge inputs of the blocks: the vectors, or with the kernel their geometry.
        edge_inputs = _edge_geometry(model, edges, vectors) if self.plan.kernel else vectors
        if model.config.ev_init == "zeros":
            x = h.new_zeros((n_atoms, n_sph))
        else:
            x = (
                blocked_sum(self.initial_rows, blocks, n_atoms, n_sph, dtype, edge_inputs, workers=workers)
                / model.config.avg_num_neighbors
            )
        for k, layer in enumerate(model.layers):
            layer_weights = weights.layers[k]
            queries, keys_values = projections(layer, layer_weights, h)
            radial = partial(self.block_radial, weights, k) if self.block_radial is not None else None
            rows = partial(self.layer_rows, model, layer, layer_weights, radial)
            euclidean = layer_weights.spherical_in is not None
            if self.plan.kernel:
                updates = blocked_kernel_sum(
                    rows,
                    blocks,
                    layer_weights.heads,
                    edge_inputs,
                    queries,
                    keys_values,
                    x if euclidean else None,
                    workers,
                    None
                    if self.kernel_splines is None
                    else KernelSpline(*self.kernel_splines[k], layer_weights.spherical_stack),
                )
            else:
                # Contiguous copies: both are column slices of one product, and every block gathers rows from
                # them twice (forward and recomputation); a gather from a strided view is ~3× slower here.
                inputs = [(queries.contiguous(), "i"), (keys_values.contiguous(), "j")]
                if euclidean:
                    inputs += [(x, "i1"), (x, "j1")]
                width = h.shape[1] + (n_sph if euclidean else 0)
                updates = blocked_sum(rows, blocks, n_atoms, width, dtype, vectors, inputs, workers)
            h, x = finish_updates(layer, h, x, updates)
        return h


class Evaluator(nn.Module):
    """Batched graphs → energy, atomic energies, forces, virial and stress, through one energy function.

    Args:
        energy: an :class:`EnergyFunction`, or the same compiled by ``torch.compile``.
        plan: its plan (what the graph's layout must provide).
    """

    def __init__(self, energy: nn.Module, plan: Plan) -> None:
        super().__init__()
        self.energy = energy
        self.plan = plan

    def forward(
        self,
        graph: Graph,
        compute_forces: bool = True,
        compute_stress: bool = False,
        create_graph: bool = False,
    ) -> dict[str, Tensor]:
        """The outputs of ``ForceField.forward`` (see there) for one plan."""
        if self.plan.pairs and not graph.pairs:
            raise PlanError(f"plan {self.plan.describe()} needs the edges in pair order (Graph.pairs)")
        edges = EdgeLayout.build(graph.idx_i, graph.idx_j, graph.n_atoms, self.plan.pairs, self.plan.slots)
        derive = compute_forces or compute_stress
        if derive and not graph.positions.requires_grad:
            # The positions are the autograd leaf, the derivatives are taken at the edge vectors computed
            # from them (a leaf as a module's input trips the hooks of profilers such as FlopCounterMode).
            graph = graph.replace(positions=graph.positions.detach().requires_grad_(True))
        vectors = graph.edge_vectors()
        atomic_energies = self.energy(vectors, graph.atomic_numbers, edges)
        energy = scatter_sum(atomic_energies, graph.batch, graph.n_graphs)
        out = {keys.ENERGY: energy, keys.ATOMIC_ENERGIES: atomic_energies}
        if not derive:
            return out
        out.update(
            graph_derivatives(energy, vectors, edges, graph, compute_forces, compute_stress, create_graph)
        )
        return out
