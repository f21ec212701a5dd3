"""Rewrites of a traced program's graph before it is compiled (:func:`so3krates.runtime.programs.trace`).

Both concern the matrix products whose second factor is static (a layer's weights, a constant matrix):
large ones go through the kernel's ``so3krates::products``, which splits them with its helper thread
(:func:`products_with_helper`); small ones become broadcast products and sums that inductor fuses into its
generated loops (:func:`small_products_as_loops`).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch

#: Matrix products of a program with the kernel whose second factor has at least this many entries go
#: through ``so3krates::products``, which splits them with the kernel's helper thread where the call allows
#: it (``Planner.kernel_helper_min_edges``). Call by call (ab_calls.py), the five products with 132 × 660
#: and 660 × 132 weights: 3BPA 0.890×, aspirin 0.874×; adding the six of 135 × 135: 0.983×, 0.989×.
PRODUCTS_MIN_WEIGHTS = 135 * 135


def _static_products(graph_module: torch.fx.GraphModule) -> Iterator[tuple[torch.fx.Node, Any, Any, int]]:
    """The ``mm`` / ``addmm`` nodes (without scales) of a traced program whose second factor has a static
    shape: (node, first factor, second factor, entries of the second)."""
    aten = torch.ops.aten
    for node in list(graph_module.graph.nodes):
        if node.op != "call_function" or node.target not in (aten.mm.default, aten.addmm.default):
            continue
        if any(node.kwargs.get(scale, 1) != 1 for scale in ("beta", "alpha")):
            continue
        a, b = node.args[-2:]
        shape = b.meta["val"].shape
        if all(isinstance(size, int) for size in shape):
            yield node, a, b, shape[0] * shape[1]


def products_with_helper(graph_module: torch.fx.GraphModule) -> int:
    """Replaces ``mm`` / ``addmm`` with a static second factor of at least ``PRODUCTS_MIN_WEIGHTS`` entries
    by ``so3krates::products`` (plus the bias) in a traced program; returns how many.

    Small molecules run torch on one thread (``Planner.single_thread_edges``), and the matrix products of
    their atoms' features with the layers' weights are then, after the kernel, most of a call. Their
    columns split well between two threads; AOTInductor calls ATen's product on torch's threads, so the
    program calls ours instead, which hands half of the columns to the kernel's helper thread.
    """
    aten = torch.ops.aten
    replaced = 0
    for node, a, b, entries in _static_products(graph_module):
        if entries < PRODUCTS_MIN_WEIGHTS:
            continue
        with graph_module.graph.inserting_before(node):
            new = graph_module.graph.call_function(torch.ops.so3krates.products.default, (a, b))
            if node.target is aten.addmm.default:
                new = graph_module.graph.call_function(aten.add.Tensor, (new, node.args[0]))
        node.replace_all_uses_with(new)
        graph_module.graph.erase_node(node)
        replaced += 1
    graph_module.graph.lint()
    graph_module.recompile()
    return replaced


#: Matrix products of a traced program whose second factor is static with at most this many entries (the
#: paper model: the spherical harmonics' (19, 15) coefficients, the degree sums' (15, 3), the first layer of
#: the spherical filter MLP's (3, 66), the readout's (66, 1), and their transposes in the backward pass)
#: become broadcast products and sums (``small_products_as_loops``). ATen's product costs a few µs per call
#: whatever its size (a dispatched call and checks, `resolve_conj` of both factors, the library's own
#: set-up); as a reduction over a few terms, inductor fuses it into the generated loop that makes or uses its
#: factors. Call by call (ab_calls.py, against e243e2b): ethanol 0.947×, aspirin 0.941×, alanine dipeptide
#: 0.971×, 3BPA 0.983×.
SMALL_PRODUCT_MAX_WEIGHTS = 300


def small_products_as_loops(graph_module: torch.fx.GraphModule) -> int:
    """Replaces ``mm`` / ``addmm`` whose second factor has a static shape of at most
    ``SMALL_PRODUCT_MAX_WEIGHTS`` entries by ``(a[:, :, None] * b[None]).sum(1)`` (plus the bias) in a traced
    program, which inductor compiles as a reduction inside its generated loops; returns how many. The sums
    run in another order than the library's (float round-off)."""
    aten = torch.ops.aten
    graph = graph_module.graph
    replaced = 0
    for node, a, b, entries in _static_products(graph_module):
        if entries > SMALL_PRODUCT_MAX_WEIGHTS:
            continue
        with graph.inserting_before(node):
            left = graph.call_function(aten.unsqueeze.default, (a, 2))
            right = graph.call_function(aten.unsqueeze.default, (b, 0))
            product = graph.call_function(aten.mul.Tensor, (left, right))
            new = graph.call_function(aten.sum.dim_IntList, (product, [1]))
            if node.target is aten.addmm.default:
                new = graph.call_function(aten.add.Tensor, (new, node.args[0]))
        node.replace_all_uses_with(new)
        graph.erase_node(node)
        replaced += 1
    graph.lint()
    graph_module.recompile()
    return replaced
