"""The published SO3LR weights, converted from the ``so3krates-torch`` package into a :class:`So3lr` model.

The ``so3krates-torch`` wheel on PyPI ships the pretrained SO3LR model (``so3krates_torch/pretrained/so3lr/
so3lr.model``, a pickled module of that package, float32, 529,852 parameters). :func:`convert_so3krates_torch`
maps its parameters one by one, by name, onto ours; every source parameter must be used exactly once and
every hyper-parameter must match our ``so3lr`` preset, or the conversion stops with the name that did not fit.
:func:`so3lr` converts once and keeps the result as an ordinary so3krates checkpoint in the cache directory
(``$SO3KRATES_CACHE_DIR`` or ``~/.cache/so3krates``, ``pretrained/``), keyed by the source file's hash.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from so3krates.errors import So3kratesError
from so3krates.model.checkpoint import load_checkpoint, model_from_checkpoint, save_checkpoint
from so3krates.model.config import ModelConfig, preset
from so3krates.model.so3lr import So3lr
from so3krates.nn.embedding import N_ELEMENTS

SOURCE_PACKAGE = "so3krates-torch"
SOURCE_FILE = ("so3krates_torch.pretrained.so3lr", "so3lr.model")
#: Elements the published model has demonstrably been trained on: those whose per-element energy scale
#: moved from its initial value 1 (H, C, N, O, F, P, S, Cl; ``tests/test_so3lr_pretrained.py`` checks this
#: against the file). Checkpoint commands refuse other elements; the calculator's ``species=`` overrides.
SO3LR_SPECIES = [1, 6, 7, 8, 9, 15, 16, 17]
#: Source buffers that are fixed functions of the hyper-parameters (checked through those), not weights.
DERIVED = (
    "radial_basis_fn.gamma",  # checked against ours in _hyperparameters
    "radial_basis_fn.b",
    "radial_basis_fn.k",
    "radial_basis_fn.k_rev",
    "degree_repeats",
    "cg_rep",
    "segment_ids",
    "segment_sum_matrix",
)


class PretrainedError(So3kratesError):
    """The pretrained weights are not available or do not convert."""


def source_path() -> Path:
    """The SO3LR weights file inside the installed ``so3krates-torch`` package."""
    import importlib.resources
    import importlib.util

    if importlib.util.find_spec("so3krates_torch") is None:
        raise PretrainedError(
            "SO3LR's weights come with the so3krates-torch package, which is not installed: "
            'pip install "so3krates[so3lr]" (or pip install so3krates-torch==0.2.1 after torch)'
        )
    package, name = SOURCE_FILE
    path = Path(str(importlib.resources.files(package) / name))
    if not path.is_file():
        raise PretrainedError(f"{path}: not found in the installed so3krates-torch; reinstall it")
    return path


def so3lr(
    device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32, long_range_cutoff: float = 12.0
) -> So3lr:
    """The pretrained SO3LR model, for inference (eval mode, parameters frozen).

    Args:
        device, dtype: where and in which precision the network runs (published: float32).
        long_range_cutoff: Å, r_lr of electrostatics and dispersion (the published default, 12 Å).

    Use it with the ASE calculator: ``So3kratesCalculator(so3lr(), total_charge=0, total_spin=0)``; the
    model's ``species`` attribute (:data:`SO3LR_SPECIES`) makes the calculator refuse other elements unless
    it is given ``species=[...]``.
    """
    path = source_path()
    digest = hashlib.sha256(path.read_bytes()).hexdigest()[:16]
    from so3krates.runtime.programs import cache_directory

    cached = cache_directory() / "pretrained" / f"so3lr-{digest}.pt"
    if cached.is_file():
        model = model_from_checkpoint(load_checkpoint(cached), str(cached))
    else:
        model = convert_so3krates_torch(_load_source(path))
        save_checkpoint(
            cached, model, SO3LR_SPECIES, source=f"{SOURCE_PACKAGE}: {path.name}, sha256 {digest}"
        )
    if long_range_cutoff != model.config.long_range_cutoff:
        config = ModelConfig.model_validate(
            {**model.config.model_dump(), "long_range_cutoff": long_range_cutoff}
        )
        resized = So3lr(config)
        resized.load_state_dict(model.state_dict())
        model = resized
    model = model.to(device=device, dtype=dtype).eval().requires_grad_(False)
    model.species = list(SO3LR_SPECIES)  # read by the calculator: other elements are refused by default
    return model


def _load_source(path: Path) -> torch.nn.Module:
    # The file is a pickled module of so3krates-torch (not a state dict), so loading it runs that package's
    # code: weights_only=False is unavoidable here, and the file comes from the installed package itself.
    import so3krates_torch  # noqa: F401  (registers the classes the pickle refers to)

    return torch.load(path, map_location="cpu", weights_only=False)


def _hyperparameters(source: torch.nn.Module) -> dict[str, Any]:
    """Our config fields from the source model's attributes (refusing what we do not implement)."""
    expected = {
        "message_normalization": "avg_num_neighbors",
        "initialize_ev_to_zeros": True,
        "radial_basis_fn": "bernstein",
        "cutoff_fn_name": "phys",
        "qk_non_linearity": "identity",
        "layer_normalization_1": True,
        "layer_normalization_2": True,
        "residual_mlp_1": True,
        "residual_mlp_2": False,
        "use_charge_embed": True,
        "use_spin_embed": True,
        "zbl_repulsion_bool": True,
        "electrostatic_energy_bool": True,
        "dispersion_energy_bool": True,
        "final_mlp_layers": 2,
        "num_elements": 118,
    }
    for name, value in expected.items():
        actual = getattr(source, name, None)
        if actual != value:
            raise PretrainedError(f"source model: {name} = {actual!r}, the converter knows only {value!r}")
    gamma = float(source.radial_embedding.radial_basis_fn.gamma)
    from so3krates.nn.radial import BERNSTEIN_GAMMA

    if abs(gamma - BERNSTEIN_GAMMA) > 1e-6:
        raise PretrainedError(f"source model: Bernstein γ = {gamma}, ours is fixed at {BERNSTEIN_GAMMA}")
    return {
        "n_features": int(source.num_features),
        "n_heads": int(source.num_heads),
        "degrees": tuple(int(l) for l in source.degrees),
        "n_layers": int(source.num_layers),
        "cutoff": float(source.r_max),
        "n_rbf": int(source.num_radial_basis_fn),
        "n_readout_features": int(source.energy_regression_dim),
        "avg_num_neighbors": float(source.avg_num_neighbors),
        "electrostatics_width": float(source.electrostatic_energy_scale),
        "dispersion_scale": float(source.dispersion_energy_scale),
    }


def convert_so3krates_torch(source: torch.nn.Module) -> So3lr:
    """Our :class:`So3lr` with the weights of a so3krates-torch ``SO3LR`` module (float32 copy of them).

    Raises :class:`PretrainedError` naming the first hyper-parameter or weight that does not fit.
    """
    config = preset("so3lr", **_hyperparameters(source))
    model = So3lr(config)
    weights = {name: tensor.detach().float() for name, tensor in source.state_dict().items()}
    used: set[str] = set()

    def take(name: str) -> Tensor:
        if name not in weights:
            raise PretrainedError(f"source model: no weight {name!r}")
        used.add(name)
        return weights[name]

    def by_element(name: str, offset: int, transpose: bool = False) -> Tensor:
        """A per-element table of the source (row Z − offset) as ours (row Z, 0..118)."""
        table = take(name)
        table = table.t() if transpose else table
        ours = torch.zeros(N_ELEMENTS, *table.shape[1:])
        rows = min(table.shape[0], N_ELEMENTS - offset)
        ours[offset : offset + rows] = table[:rows]
        return ours

    state: dict[str, Tensor] = {
        "embedding.table.weight": by_element("inv_feature_embedding.embedding.weight", 1, transpose=True),
        "readout.mlp.0.weight": take("atomic_energy_output_block.layers.0.weight"),
        "readout.mlp.0.bias": take("atomic_energy_output_block.layers.0.bias"),
        "readout.mlp.2.weight": take("atomic_energy_output_block.final_layer.weight"),
        "readout.mlp.2.bias": take("atomic_energy_output_block.final_layer.bias"),
        "readout.energy_scale": by_element("atomic_energy_output_block.energy_scales.weight", 1, True)[:, 0],
        "readout.energy_shift": by_element("atomic_energy_output_block.energy_shifts", 1),
    }
    for ours, theirs in (("charge_embedding", "charge_embedding"), ("spin_embedding", "spin_embedding")):
        state[f"{ours}.query.weight"] = by_element(f"{theirs}.Wq.weight", 1, transpose=True)
        state[f"{ours}.key"] = take(f"{theirs}.Wk")
        state[f"{ours}.value"] = take(f"{theirs}.Wv")
        state[f"{ours}.mlp.1.weight"] = take(f"{theirs}.mlp.1.weight")
        state[f"{ours}.mlp.3.weight"] = take(f"{theirs}.mlp.3.weight")
    linear_pairs = {
        "radial.0": "mlp_rbf.0",
        "radial.2": "mlp_rbf.mlp_rbf_layer_1.0",
        "spherical.0": "mlp_ev.0",
        "spherical.2": "mlp_ev.mlp_ev_layer_1.0",
    }
    for k in range(config.n_layers):
        src, dst = f"euclidean_transformers.{k}", f"layers.{k}"
        for ours_filter, theirs_filter in (
            ("invariant_filter", "filter_net_inv"),
            ("euclidean_filter", "filter_net_ev"),
        ):
            for ours, theirs in linear_pairs.items():
                for kind in ("weight", "bias"):
                    state[f"{dst}.{ours_filter}.{ours}.{kind}"] = take(
                        f"{src}.{theirs_filter}.{theirs}.{kind}"
                    )
                    # The attention block holds the same filter modules again (shared, same tensors).
                    used.add(f"{src}.euclidean_attention_block.{theirs_filter}.{theirs}.{kind}")
        attention = f"{src}.euclidean_attention_block"
        for ours, theirs in (("query", "W_q"), ("key", "W_k"), ("value", "W_v")):
            state[f"{dst}.invariant_attention.{ours}.weight"] = take(f"{attention}.{theirs}_inv")
        for ours, theirs in (("query", "W_q"), ("key", "W_k")):
            state[f"{dst}.euclidean_attention.{ours}.weight"] = take(f"{attention}.{theirs}_ev")
        for kind in ("weight", "bias"):
            state[f"{dst}.exchange.linear.{kind}"] = take(f"{src}.interaction_block.linear_layer.{kind}")
            state[f"{dst}.norm_attention.{kind}"] = take(f"{src}.layer_norm_inv_1.{kind}")
            state[f"{dst}.norm_exchange.{kind}"] = take(f"{src}.layer_norm_inv_2.{kind}")
            state[f"{dst}.mlp_before_exchange.mlp.1.{kind}"] = take(f"{src}.mlp_1.1.{kind}")
            state[f"{dst}.mlp_before_exchange.mlp.3.{kind}"] = take(f"{src}.mlp_1.3.{kind}")
    state["zbl.a"] = torch.cat([take(f"zbl_repulsion.a{k}_raw") for k in range(1, 5)])
    state["zbl.c"] = torch.cat([take(f"zbl_repulsion.c{k}_raw") for k in range(1, 5)])
    state["zbl.p"] = take("zbl_repulsion.p_raw").reshape(())
    state["zbl.inverse_length"] = take("zbl_repulsion.d_raw").reshape(())
    # The charge and Hirshfeld heads index their element tables by Z directly (100 rows).
    state["partial_charges.element.weight"] = by_element(
        "partial_charges_output_block.atomic_embedding.weight", 0
    )
    for k in (0, 2):
        for kind in ("weight", "bias"):
            state[f"partial_charges.mlp.{k}.{kind}"] = take(
                f"partial_charges_output_block.transform_inv_features.{k}.{kind}"
            )
            state[f"hirshfeld_ratios.mlp.{k}.{kind}"] = take(
                f"hirshfeld_output_block.transform_features.{k}.{kind}"
            )
    state["hirshfeld_ratios.shift.weight"] = by_element("hirshfeld_output_block.v_shift_embedding.weight", 0)
    state["hirshfeld_ratios.query.weight"] = by_element("hirshfeld_output_block.q_embedding.weight", 0)

    unused = [name for name in weights if name not in used and not name.endswith(DERIVED)]
    if unused:
        raise PretrainedError(f"source model: weights the converter does not map: {', '.join(unused[:5])}")
    ours = model.state_dict()
    for name, tensor in state.items():
        if name not in ours or ours[name].shape != tensor.shape:
            shape = tuple(ours[name].shape) if name in ours else "missing"
            raise PretrainedError(f"conversion: {name} has shape {tuple(tensor.shape)}, ours {shape}")
    missing = sorted(set(ours) - set(state))
    if missing:
        raise PretrainedError(f"conversion: no source for {', '.join(missing[:5])}")
    # float64 for the readout's scale and shift (our buffers are float64), float32 for the rest.
    model.load_state_dict(state)
    return model.eval()
