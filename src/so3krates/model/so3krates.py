"""The SO3krates model: Graph → per-atom energies (Frank et al., Nat. Commun. 15, 6539, 2024).

Data path: atomic numbers → embedding h (Eq. 10); edge geometry → radial basis, cutoff and spherical
harmonics, once per call; Euclidean variables x (zeros or Eq. 11); T transformer layers update (h, x)
(Eqs. 15–25); readout h → E_i with per-element scale and shift. Forces and stress are derivatives of the
energy and live in :mod:`so3krates.model.derivatives`.
"""

from __future__ import annotations

import copy
import math

import torch
from torch import Tensor, nn

from so3krates.data.graph import Graph
from so3krates.model.config import ModelConfig
from so3krates.nn.cutoff import CUTOFF_FUNCTIONS
from so3krates.nn.embedding import AtomEmbedding
from so3krates.nn.fused import FusedWeightCache, FusedWeights, fused_layer, fused_weights
from so3krates.nn.radial import RADIAL_BASES
from so3krates.nn.radial_table import RadialTable, build_radial_table, evaluate_radial_table
from so3krates.nn.readout import EnergyReadout
from so3krates.nn.slots import sum_rows
from so3krates.nn.spherical import DegreeContraction, SphericalHarmonics
from so3krates.nn.transformer import EdgeFeatures, TransformerLayer, first_of_pairs


class So3krates(nn.Module):
    """SO3krates energy model. ``model(graph)`` returns atomic energies, (n_atoms,) float, eV.

    Args:
        config: validated hyper-parameters (see :func:`so3krates.model.config.preset`).

    Attributes:
        fused: ``True``: evaluate the layers through :mod:`so3krates.nn.fused`; ``False``: through the
            per-equation modules; ``None`` (default): fused for graphs of up to ``FUSED_MAX_EDGES`` edges.
            Both give the same numbers. The fused path saves dispatch on small molecules; on large graphs
            its wider per-edge tensors cost more memory traffic than they save (measured on 2 cores:
            alanine dipeptide, 340 edges, 10.5 vs 12.4 ms; a 999-atom water box, 54k edges, 1.0–1.4 s vs
            0.8 s).
        tabulate: read the radial filters MLP_r(K(d)) of all layers from a cubic spline in d
            (:mod:`so3krates.nn.radial_table`) instead of evaluating the network per edge. Only for frozen
            weights (no parameter needs a gradient, or gradients are off). ``None`` (default): on along the
            fused path of float32 networks with frozen weights, where the spline's error is below float32
            round-off; off for float64, which stays exact to round-off (finite differences, Hessians).
            ``True``: on either path. Large graphs are bound by the memory traffic of per-edge tensors,
            not by the filters' arithmetic: there the eager spline is slower (999-atom water box, 1 thread,
            per-equation path: 1.99 s against 1.67 s exact).
    """

    FUSED_MAX_EDGES = 2000
    #: Intervals of the radial-filter spline over [0, r_c].
    TABLE_INTERVALS = 2048

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.cutoff = config.cutoff
        f = config.n_features
        self.embedding = AtomEmbedding(f)
        self.radial_basis = RADIAL_BASES[config.radial_basis](config.n_rbf, config.cutoff)
        self.cutoff_fn = CUTOFF_FUNCTIONS[config.cutoff_fn](config.cutoff)
        self.spherical_harmonics = SphericalHarmonics(config.degrees)
        self.contraction = DegreeContraction(config.degrees)
        if config.message_normalization == "sqrt_head_dim":  # Eqs. (21–22)
            invariant_norm = math.sqrt(f / config.n_heads)
            euclidean_norm = math.sqrt(f / max(config.n_degrees, 1))
        else:
            invariant_norm = euclidean_norm = config.avg_num_neighbors
        self.layers = nn.ModuleList(
            TransformerLayer(
                n_features=f,
                n_heads=config.n_heads,
                n_rbf=config.n_rbf,
                contraction=self.contraction,
                invariant_norm=invariant_norm,
                euclidean_norm=euclidean_norm,
                use_qk_activation=config.use_qk_activation,
                use_layer_norm=config.use_layer_norm,
                use_residual_mlp=config.use_residual_mlp,
            )
            for _ in range(config.n_layers)
        )
        self.readout = EnergyReadout(f, config.n_readout_features)
        self.fused: bool | None = None
        self.tabulate: bool | None = None
        self._fused_cache = FusedWeightCache()

    def _apply(self, fn, recurse=True):
        # .to(), .float(), .cuda() may replace parameter tensors: the cache must see the new ones.
        self._fused_cache = FusedWeightCache()
        return super()._apply(fn, recurse)

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        self._fused_cache = FusedWeightCache()  # assign=True replaces the parameter objects
        return super().load_state_dict(state_dict, strict=strict, assign=assign)

    def edge_features(
        self, vectors: Tensor, idx_i: Tensor, idx_j: Tensor, with_rbf: bool = True
    ) -> EdgeFeatures:
        """Radial basis, cutoff and spherical harmonics of every edge, shared by all layers.

        Args:
            vectors: (n_edges, 3) float, Å — ``R_j − R_i`` (plus the image offset) of each edge.
            idx_i, idx_j: (n_edges,) int64 — centre and neighbour atom of each edge.
            with_rbf: compute the radial basis (not needed when the radial filters are tabulated).
        """
        squared = (vectors * vectors).sum(-1)
        nonzero = squared > 0
        # Double-where: sqrt and division only see safe values, so d = 0 (coincident atoms) has r̂ = 0 and
        # finite gradients instead of NaN.
        safe = torch.sqrt(torch.where(nonzero, squared, torch.ones_like(squared)))
        distances = torch.where(nonzero, safe, torch.zeros_like(safe))
        unit = torch.where(nonzero[:, None], vectors / safe[:, None], torch.zeros_like(vectors))
        # Geometry is computed in the graph's dtype and only then cast to the network's: with float64
        # positions, a float32 network avoids the cancellation in R_j − R_i + shift @ cell.
        dtype = self.embedding.table.weight.dtype
        distances, unit = distances.to(dtype), unit.to(dtype)
        return EdgeFeatures(
            rbf=self.radial_basis(distances) if with_rbf else None,
            cutoff=self.cutoff_fn(distances),
            sph=self.spherical_harmonics(unit),
            idx_i=idx_i,
            idx_j=idx_j,
            distances=distances,
        )

    def initial_euclidean(self, edges: EdgeFeatures, n_atoms: int, slots_i: Tensor | None = None) -> Tensor:
        """x_i at input: zeros, or x_i = (1/N̄) Σ_j φ(d_ij) Y_ij (Eq. 11). Returns (n_atoms, n_sph)."""
        if self.config.ev_init == "zeros":
            return edges.sph.new_zeros((n_atoms, self.contraction.n_sph))
        weighted = edges.cutoff[:, None] * edges.sph
        return sum_rows(weighted, edges.idx_i, n_atoms, slots_i) / self.config.avg_num_neighbors

    def forward(self, graph: Graph) -> Tensor:
        """graph: a batch of structures (any float dtype; float64 recommended) → (n_atoms,) float64, eV.

        Returns the atomic energies E_i; they are float64 whatever the network's dtype (see EnergyReadout).
        """
        return self.atomic_energies(
            graph.edge_vectors(), graph.atomic_numbers, graph.idx_i, graph.idx_j, paired=graph.paired
        )

    def atomic_energies(
        self,
        vectors: Tensor,
        atomic_numbers: Tensor,
        idx_i: Tensor,
        idx_j: Tensor,
        paired: bool = False,
        slots: tuple[Tensor, Tensor] | None = None,
    ) -> Tensor:
        """The model as a function of edge vectors: what exported models and LAMMPS' ML-IAP call.

        Args:
            vectors: (n_edges, 3) float, Å — ``R_j − R_i`` (plus image offset) of each edge.
            atomic_numbers: (n_atoms,) int64.
            idx_i, idx_j: (n_edges,) int64 — centre and neighbour atom of each edge.
            paired: the edges come in the order of :func:`so3krates.data.neighbors.paired_edges`: edge
                k + n_edges / 2 is edge k reversed. The filters w_ij = MLP_r(K(d_ij)) + MLP_s(s_ij),
                most of the model's arithmetic, are symmetric in the pair (d_ij = d_ji and
                s_ij = c(x_j − x_i) = s_ji), so they are then evaluated for the first half only. Not
                checked here.
            slots: ``edge_slots(idx_i, n_atoms), edge_slots(idx_j, n_atoms)`` (:mod:`so3krates.nn.slots`):
                the fused path then sums over edges without scatter-adds, so that a compiled program can
                run its kernels on all threads. Differentiable once; fused path only.

        Returns:
            (n_atoms,) float64, eV — atomic energies E_i.
        """
        fused = self.fused if self.fused is not None else idx_i.shape[0] <= self.FUSED_MAX_EDGES
        if slots is not None and not fused:
            raise ValueError("edge slots are for the fused path: set model.fused = True")
        table = self._radial_table() if fused or self.tabulate else None
        edges = self.edge_features(vectors, idx_i, idx_j, with_rbf=table is None and not paired)
        n_atoms = atomic_numbers.shape[0]
        h = self.embedding(atomic_numbers)
        x = self.initial_euclidean(edges, n_atoms, slots[0] if slots is not None else None)
        n_layers = len(self.layers)
        n_branches = 2 if self.config.n_degrees else 1
        radial_per_layer: list[list[Tensor] | None] = [None] * n_layers
        if paired or table is not None:
            distances = edges.distances
            if paired:
                distances = first_of_pairs(distances)
            if table is not None:
                # MLP_r of every layer and branch, read from the spline: four row gathers per edge.
                radial = evaluate_radial_table(table, distances).split(self.config.n_features, dim=1)
            else:
                radial = self.radial_filters(self._fused_cache.get(self.layers), distances, split=True)
            # Paired: the first half's filters only. The layers add MLP_s, which is symmetric too
            # (s_ij = c(x_j − x_i) = s_ji), on the first half and repeat the sum for the second.
            radial_per_layer = [list(radial[k * n_branches : (k + 1) * n_branches]) for k in range(n_layers)]
        if not fused:
            for layer, layer_radial in zip(self.layers, radial_per_layer, strict=True):
                h, x = layer(h, x, edges, layer_radial, paired=paired)
            return self.readout(h, atomic_numbers)
        weights = self._fused_cache.get(self.layers)
        hidden_per_layer: list[Tensor | None] = [None] * n_layers
        if radial_per_layer[0] is None:
            # The first radial-filter layer of every layer and branch in one product: K_ij is shared.
            hidden = torch.nn.functional.silu(
                torch.addmm(weights.radial_in[1], edges.rbf, weights.radial_in[0])
            )
            hidden_per_layer = list(hidden.split(hidden.shape[1] // n_layers, dim=1))
        for k, layer in enumerate(self.layers):
            h, x = fused_layer(
                layer,
                weights.layers[k],
                radial_per_layer[k] if radial_per_layer[k] is not None else hidden_per_layer[k],
                h,
                x,
                edges.cutoff,
                edges.sph,
                edges.idx_i,
                edges.idx_j,
                radial_filters=radial_per_layer[k] is not None,
                paired=paired,
                slots=slots,
            )
        return self.readout(h, atomic_numbers)

    def _radial_table(self) -> RadialTable | None:
        """The spline of the radial filters when this call uses it (see ``tabulate``), else None."""
        dtype = self.embedding.table.weight.dtype
        if self.tabulate is False or (self.tabulate is None and dtype != torch.float32):
            return None
        if not self._fused_cache.is_frozen(self.layers):
            if self.tabulate:
                raise ValueError(
                    "tabulated radial filters need frozen weights: call requires_grad_(False) on the model "
                    "or evaluate under torch.no_grad()"
                )
            return None
        self._fused_cache.get(self.layers)  # empties the extras when the weights changed
        table = self._fused_cache.extras.get("radial_table")
        if table is None:
            table = self._fused_cache.extras["radial_table"] = self.build_radial_table(dtype)
        return table

    def radial_filters(
        self, weights: FusedWeights, distances: Tensor, split: bool = False
    ) -> Tensor | list[Tensor]:
        """MLP_r(K(d)) of every layer and branch, (n, T·B·F), second-layer biases of MLP_r and MLP_s included.

        What the radial-filter table holds, and what paired edges evaluate on half of the edges. ``split``:
        a list of T·B contiguous (n, F) tensors instead, layer by layer, invariant branch first.
        """
        # Products and bias additions apart, not addmm: a compiler fuses an addition into the next kernel,
        # while addmm first copies the bias into its output (an extra pass over an (n, T·B·F) tensor).
        hidden = torch.nn.functional.silu(
            torch.mm(self.radial_basis(distances), weights.radial_in[0]) + weights.radial_in[1]
        )
        outputs = [out for layer in weights.layers for out in layer.radial_out]
        chunks = hidden.split(self.config.n_features, dim=1)
        filters = [torch.mm(c, w) + b for c, (w, b) in zip(chunks, outputs, strict=True)]
        return filters if split else torch.cat(filters, 1)

    def build_radial_table(self, dtype: torch.dtype, n_intervals: int | None = None) -> RadialTable:
        """The spline of MLP_r(K(d)) for every layer and branch on [0, r_c], sampled in float64."""
        exact = copy.deepcopy(self).to(torch.float64).requires_grad_(False)
        with torch.no_grad():
            weights = fused_weights(exact.layers)
        return build_radial_table(
            lambda distances: exact.radial_filters(weights, distances),
            self.cutoff,
            n_intervals or self.TABLE_INTERVALS,
            dtype=dtype,
        )


def compile_model(model: So3krates) -> nn.Module:
    """``torch.compile`` of the model with dynamic shapes (a new number of edges does not recompile).

    Inductor's generated CPU kernels are set to run on one thread: with torch 2.13 their multi-threaded
    version corrupted memory ("double free") in this model's backward pass on 2 threads. Matrix products
    still use all of torch's threads.
    """
    import torch._inductor.config as inductor_config

    inductor_config.cpp.threads = 1
    # Fill the fused-weight cache of a frozen model now: filling it on the first compiled call changes a
    # guarded value and costs a second compilation.
    with torch.no_grad():
        model._fused_cache.get(model.layers)
        model._radial_table()
    return torch.compile(model, dynamic=True)


def count_parameters(model: nn.Module) -> dict[str, int]:
    """Trainable parameters per top-level submodule, plus ``"total"``."""
    counts: dict[str, int] = {}
    for name, parameter in model.named_parameters():
        if parameter.requires_grad:
            top = name.split(".")[0] if not name.startswith("layers.") else ".".join(name.split(".")[:3])
            counts[top] = counts.get(top, 0) + parameter.numel()
    counts["total"] = sum(counts.values())
    return counts
