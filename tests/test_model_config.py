"""Model config validation, presets, and the assembled model's structure."""

from __future__ import annotations

import pytest
import torch
from pydantic import ValidationError

from so3krates import ModelConfig, So3krates, preset
from so3krates.model.config import PRESETS
from so3krates.model.so3krates import count_parameters


def test_paper_preset_matches_the_paper():
    config = preset("paper")
    assert (config.n_features, config.n_heads, config.degrees, config.n_layers) == (132, 4, (1, 2, 3), 3)
    assert (config.cutoff, config.cutoff_fn, config.radial_basis, config.n_rbf) == (
        5.0,
        "cosine",
        "physnet",
        32,
    )
    assert config.n_sph == 15 and config.n_degrees == 3


def test_paper_parameter_count():
    """Frank et al. report ≈ 311 k parameters; ours has 312,877 (README explains the difference)."""
    counts = count_parameters(So3krates(preset("paper")))
    assert counts["total"] == 312_877
    assert counts["embedding"] == 119 * 132
    # Per layer: two filter nets, H per-head (d×d) q/k/v, D per-degree q/k, and the (F+D)² exchange.
    assert counts["layers.0.invariant_attention"] == 3 * 4 * 33 * 33
    assert counts["layers.0.euclidean_attention"] == 2 * 3 * 44 * 44
    assert counts["layers.0.exchange"] == 135 * 135 + 135


def test_layers_do_not_share_weights():
    model = So3krates(preset("tiny"))
    first, second = model.layers[0], model.layers[1]
    assert (
        first.invariant_attention.query.weight.data_ptr()
        != second.invariant_attention.query.weight.data_ptr()
    )


def test_unknown_keys_are_rejected():
    with pytest.raises(ValidationError, match="Extra inputs are not permitted"):
        ModelConfig(n_featurez=12)


@pytest.mark.parametrize(
    "fields, message",
    [
        ({"n_features": 130}, "divisible by n_heads"),
        ({"n_features": 128, "n_heads": 4}, "divisible by the number of degrees"),
        ({"degrees": (2, 1)}, "strictly increasing"),
        ({"degrees": (0, 1, 2)}, "1..8"),
        ({"radial_basis": "chebyshev"}, "radial_basis"),
        ({"avg_num_neighbors": 0.0}, "greater than 0"),
    ],
)
def test_inconsistent_values_are_rejected(fields, message):
    with pytest.raises(ValidationError, match=message):
        ModelConfig(**fields)


def test_config_round_trips_through_json():
    config = preset("tiny", ev_init="neighbors", degrees=(1, 2))
    assert ModelConfig.model_validate_json(config.model_dump_json()) == config


def test_every_preset_builds_and_runs():
    from helpers import ethanol
    from so3krates import ForceField, atoms_to_graph

    for name in PRESETS:
        force_field = ForceField(So3krates(preset(name)))
        out = force_field(atoms_to_graph(ethanol(), force_field.cutoff))
        assert torch.isfinite(out["forces"]).all()


def test_neighbor_initialisation_uses_the_average_neighbour_count():
    """Eq. (11): x_i = (1/N̄) Σ_j φ(d_ij) Y_ij — doubling N̄ halves x_i."""
    from helpers import ethanol
    from so3krates import atoms_to_graph

    graph = atoms_to_graph(ethanol(), 4.0)
    values = []
    for n_bar in (3.0, 6.0):
        model = So3krates(preset("tiny", ev_init="neighbors", avg_num_neighbors=n_bar))
        values.append(
            model.initial_euclidean(
                model.edge_features(graph.edge_vectors(), graph.idx_i, graph.idx_j), graph.n_atoms
            )
        )
    torch.testing.assert_close(values[0], 2 * values[1])
    assert values[0].abs().max() > 0


def test_invariant_only_model_has_no_euclidean_branch():
    """degrees = () is the ablation of the paper's stability experiment: no Euclidean variables."""
    from helpers import ethanol
    from so3krates import ForceField, atoms_to_graph

    full, invariant = So3krates(preset("tiny")), So3krates(preset("tiny", degrees=()))
    assert all(
        layer.euclidean_attention is None and layer.euclidean_filter is None for layer in invariant.layers
    )
    assert invariant.layers[0].invariant_filter.spherical is None
    assert count_parameters(invariant)["total"] < count_parameters(full)["total"]
    graph = atoms_to_graph(ethanol(), 4.0)
    assert invariant.initial_euclidean(
        invariant.edge_features(graph.edge_vectors(), graph.idx_i, graph.idx_j), graph.n_atoms
    ).shape == (9, 0)
    assert torch.isfinite(ForceField(invariant)(graph)["forces"]).all()
