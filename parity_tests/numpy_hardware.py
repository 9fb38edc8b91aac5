"""An independent NumPy closed form of DFA under hardware effects (dfa_core.hardware), for the parity tests.

Float64, written from the equations in ``dfa_core.hardware``'s docstring and sharing no code with
the backends: the 'kbit:N' quantiser picks the nearest of its 2m + 1 levels by an explicit search
(not by rounding), ternary and sign are written as case analyses, every projection is a separate
product (or the device's answer), and the grouping is ``numpy_reference``'s explicit matrix G with
one row per class present. Noise comes in as the backends take it (one (K_backend, size_l) array per
hidden block, K_backend = n_L rows in 'class_mean'); the rows of the classes present are picked here.
"""

from __future__ import annotations

import numpy as np

from parity_tests import numpy_blocks as nb
from parity_tests.numpy_reference import df, group, grouping_matrix


def quantize(projection, e):
    """q = Q(e) for projection.quantize in None, 'sign', 'ternary', 'kbit:N'; e (K, n_L)."""
    e = np.asarray(e, np.float64)
    how = projection.quantize
    if how is None:
        return e.copy()
    if how == "sign":
        return np.select([e > 0, e < 0], [1.0, -1.0], 0.0)
    if how == "ternary":
        t = projection.threshold
        return np.select([e > t, e < -t], [1.0, -1.0], 0.0)
    bits = int(how.split(":")[1])
    m = 2 ** (bits - 1) - 1
    s = np.abs(e).max()
    if s == 0:
        return np.zeros_like(e)
    levels = s * np.arange(-m, m + 1) / m  # the 2m + 1 values q can take
    nearest = np.argmin(np.abs(e[..., None] - levels), axis=-1)
    return levels[nearest]


def present_classes(mode, y):
    """Indices of the backend rows that are real groups: all rows, or the classes present ('class_mean')."""
    G = grouping_matrix(mode, y)
    if mode != "class_mean":
        return np.arange(G.shape[0])
    return np.array(sorted(set(np.argmax(np.asarray(y), axis=1).tolist())))


def projections(projection, feedback, e_raw, K, reduction, noise_rows):
    """p_l = (H_l(Q(e'))) [/ K]: quantise, project (or the device), add noise, scale; e_raw (K, n_L)."""
    q = quantize(projection, e_raw)
    if projection.device is None:
        p = [q @ np.asarray(B, np.float64).T for B in feedback]
    else:
        p = [np.asarray(t, np.float64).reshape(q.shape[0], -1) for t in projection.device(q)]
    if projection.noise == "additive":
        peak = np.abs(q).max()
        p = [p_l + peak * (projection.mu + projection.sigma * z) for p_l, z in zip(p, noise_rows)]
    elif projection.noise == "multiplicative":
        p = [p_l * (1.0 + projection.mu + projection.sigma * z) for p_l, z in zip(p, noise_rows)]
    scale = 1.0 / K if reduction == "mean" else 1.0
    return [scale * p_l for p_l in p]


def _noise_rows(noise, rows):
    if noise is None:
        return None
    return [np.asarray(z, np.float64).reshape(np.shape(z)[0], -1)[rows] for z in noise]


def mlp_dfa_grads(spec, params, feedback, x, y, mode, projection, noise=None):
    """DFA grads of an MLP: delta_l = p_l * f'(a'_l); the output layer keeps the exact e'."""
    a_g, h_g, e_g, K = group(spec, params, x, y, mode)
    scale = 1.0 / K if spec.reduction == "mean" else 1.0
    p = projections(projection, feedback, e_g, K, spec.reduction, _noise_rows(noise, present_classes(mode, y)))
    grads = []
    for l, p_l in enumerate(p):
        delta = p_l * df(spec.activation, a_g[l])
        grads.append((delta.T @ h_g[l], delta.sum(axis=0)))
    grads.append((scale * e_g.T @ h_g[-1], scale * e_g.sum(axis=0)))
    return grads


def block_dfa_grads(spec, params, feedback, x, y, mode, projection, noise=None):
    """DFA grads of a ModelSpec: delta_l = reshape(p_l, (K, *a_shape_l)) * f'(a'_l); VJP of block l at u'_l."""
    params = [[np.asarray(t, np.float64) for t in block] for block in params]
    us, as_, _, y_hat = nb.forward(spec, params, x)
    y = np.asarray(y, np.float64)
    G = grouping_matrix(mode, y)
    K = G.shape[0]
    e = G @ y_hat - G @ y
    scale = 1.0 / K if spec.reduction == "mean" else 1.0
    p = projections(projection, feedback, e, K, spec.reduction, _noise_rows(noise, present_classes(mode, y)))
    grads = []
    for l, (block, leaves) in enumerate(zip(spec.blocks, params)):
        u_g = (G @ us[l].reshape(us[l].shape[0], -1)).reshape(K, *us[l].shape[1:])
        if l < spec.num_layers - 1:
            a_g = (G @ as_[l].reshape(as_[l].shape[0], -1)).reshape(K, *as_[l].shape[1:])
            delta = p[l].reshape(K, *block.a_shape) * df(nb.block_activation(spec, block), a_g)
            block_g, _ = nb.block_backward(block, leaves, u_g, delta, spec.activation)
            grads.append(tuple(block_g))
        else:
            block_g, _ = nb.block_backward(block, leaves, u_g, e, spec.activation)
            grads.append(tuple(scale * t for t in block_g))
    return grads
