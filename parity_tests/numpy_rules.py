"""An independent NumPy closed form of every learning rule, for MLPs and for conv/pool/dense block models.

Float64, hand-written, no autodiff, sharing no code with the backends. The MLP form writes each
rule's matrix products out (delta_l = (delta_{l+1} M) * f'(a_l) with M = W_{l+1}, B, s sign(W),
|R| sign(W)); the block form reuses ``numpy_blocks``'s forward pass and its hand-written layer
backward steps (conv input gradient by scattered kernel taps, pool routing). Rules follow
``dfa_core.backend.Backend.grads``: the output block takes delta_L = e' = G y_hat - G y (/ K for
'mean'); a hidden block's delta comes from its rule; its gradients are delta_l^T h'_{l-1} (Dense)
or the conv weight gradient at u'_l. brsf takes this batch's magnitudes explicitly (its feedback
entry), as frsf does.
"""

from __future__ import annotations

import math

import numpy as np

from parity_tests import numpy_blocks as nb
from parity_tests.numpy_reference import df, f, g, grouping_matrix

DIRECT = ("dfa", "drtp")


def _f64(tree):
    if isinstance(tree, (tuple, list)):
        return [_f64(t) for t in tree]
    return np.asarray(tree, dtype=np.float64)


def expand(method, num_layers):
    """One rule per block: a name repeated, or the sequence as given."""
    return (method,) * num_layers if isinstance(method, str) else tuple(method)


def usf_scale(w_shape):
    """sqrt(2 / (fan_in + fan_out)), fans as torch counts them: (out, in[, k, k])."""
    receptive = math.prod(w_shape[2:])
    return math.sqrt(2.0 / (w_shape[1] * receptive + w_shape[0] * receptive))


def stand_in(rule, w, entry):
    """The matrix hidden block l's rule puts in W_{l+1}'s place when it carries delta back."""
    if rule == "bp":
        return w
    if rule in ("fa", "kp"):
        return np.asarray(entry, np.float64)
    if rule == "usf":
        return usf_scale(w.shape) * np.sign(w)
    if rule in ("frsf", "brsf"):  # brsf: this batch's |R| given explicitly
        return np.abs(np.asarray(entry, np.float64)) * np.sign(w)
    raise ValueError(rule)


def _signals(spec_reduction, y_hat, y, G):
    """(e', y') grouped, both divided by K for reduction 'mean'."""
    K = G.shape[0]
    e, t = G @ y_hat - G @ y, G @ y
    if spec_reduction == "mean":
        e, t = e / K, t / K
    return e, t


def mlp_grads(spec, params, feedback, x, y, method, mode="sample", with_deltas=False):
    """[(gW_l, gb_l)] of an MLPSpec under ``method`` (a rule or one per layer); with ``with_deltas``
    also [delta_1, ..., delta_{L-1}, e'] (zeros for a shallow layer)."""
    params, y = _f64(params), np.asarray(y, np.float64)
    rules = expand(method, spec.num_layers)
    h, a = [np.asarray(x, np.float64)], []
    for l, (w, b) in enumerate(params):
        a.append(h[-1] @ w.T + b)
        if l < spec.num_layers - 1:
            h.append(f(spec.activation, a[-1]))
    G = grouping_matrix(mode, y)
    e, t = _signals(spec.reduction, g(spec.output, a[-1]), y, G)
    grads = [None] * spec.num_layers
    grads[-1] = (e.T @ (G @ h[-1]), e.sum(axis=0))
    delta = e
    deltas = [None] * (spec.num_layers - 1) + [e]
    for l in range(spec.num_layers - 2, -1, -1):
        rule = rules[l]
        if rule == "shallow":
            grads[l] = (np.zeros_like(params[l][0]), np.zeros_like(params[l][1]))
            deltas[l] = np.zeros((e.shape[0], params[l][0].shape[0]))
            continue
        if rule in DIRECT:
            p = (e if rule == "dfa" else t) @ np.asarray(feedback[l], np.float64).T
        else:
            p = delta @ stand_in(rule, params[l + 1][0], feedback[l] if feedback else None)
        delta = p * df(spec.activation, G @ a[l])
        deltas[l] = delta
        grads[l] = (delta.T @ (G @ h[l]), delta.sum(axis=0))
    return (grads, deltas) if with_deltas else grads


def block_grads(spec, params, feedback, x, y, method, mode="sample"):
    """Per block the gradients of (W, b) of a ModelSpec of Dense/Conv2d blocks under ``method``."""
    params, y = _f64(params), np.asarray(y, np.float64)
    rules = expand(method, spec.num_layers)
    us, as_, hs, y_hat = nb.forward(spec, params, x)
    G = grouping_matrix(mode, y)
    e, t = _signals(spec.reduction, y_hat, y, G)
    blocks = spec.blocks
    grads = [None] * spec.num_layers
    grads[-1] = tuple(nb.block_grads(blocks[-1].layer, params[-1][0], e, nb._grouped(G, us[-1])))
    delta = e
    for l in range(spec.num_layers - 2, -1, -1):
        rule, block = rules[l], blocks[l]
        if rule == "shallow":
            grads[l] = tuple(np.zeros_like(leaf) for leaf in params[l])
            continue
        if rule in DIRECT:
            source = e if rule == "dfa" else t
            p = (source @ np.asarray(feedback[l], np.float64).T).reshape(source.shape[0], *block.a_shape)
        else:
            above = blocks[l + 1]
            m = stand_in(rule, params[l + 1][0], feedback[l] if feedback else None)
            trace = nb._prefix_trace(above, hs[l + 1])  # h_l through block l+1's prefix
            grad_u = nb.layer_input_grad(above.layer, m, delta, above.u_shape)
            p = nb.prefix_input_grad(above, trace, grad_u)
        delta = p * df(nb.block_activation(spec, block), nb._grouped(G, as_[l]))
        grads[l] = tuple(nb.block_grads(block.layer, params[l][0], delta, nb._grouped(G, us[l])))
    return grads


def grads(spec, params, feedback, x, y, method, mode="sample"):
    """``mlp_grads`` for an MLPSpec, ``block_grads`` for a ModelSpec."""
    if hasattr(spec, "layer_sizes"):
        return mlp_grads(spec, params, feedback, x, y, method, mode)
    return block_grads(spec, params, feedback, x, y, method, mode)
