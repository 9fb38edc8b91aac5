"""An independent NumPy closed form of the DFA/BP math, in float64, written for the parity tests.

It shares no code with the backends: activations are differentiated by hand, the
grouping matrix G is built explicitly with one row per class present, the feedback
is projected layer by layer, and BP is the hand-written backward recursion.
"""

from __future__ import annotations

import numpy as np

SLOPE = 0.01  # leaky_relu negative slope


def f(name, a):
    if name == "tanh":
        return np.tanh(a)
    if name == "relu":
        return np.maximum(a, 0.0)
    if name == "leaky_relu":
        return np.where(a > 0, a, SLOPE * a)
    if name == "sigmoid":
        return 1.0 / (1.0 + np.exp(-a))
    if name == "identity":
        return a.copy()
    raise KeyError(name)


def df(name, a):
    if name == "tanh":
        return 1.0 / np.cosh(a) ** 2
    if name == "relu":
        return (a > 0).astype(np.float64)
    if name == "leaky_relu":
        return np.where(a > 0, 1.0, SLOPE)
    if name == "sigmoid":
        s = 1.0 / (1.0 + np.exp(-a))
        return s * (1.0 - s)
    if name == "identity":
        return np.ones_like(a)
    raise KeyError(name)


def g(name, z):
    if name == "sigmoid":
        return 1.0 / (1.0 + np.exp(-z))
    if name == "softmax":
        ez = np.exp(z - z.max(axis=1, keepdims=True))
        return ez / ez.sum(axis=1, keepdims=True)
    if name == "identity":
        return z.copy()
    raise KeyError(name)


def per_sample_loss(name, z, y):
    if name == "sigmoid":  # binary cross-entropy summed over units, -[y log p + (1-y) log(1-p)]
        return np.sum(np.logaddexp(0.0, z) - y * z, axis=1)
    if name == "softmax":
        m = z.max(axis=1, keepdims=True)
        log_p = z - m - np.log(np.exp(z - m).sum(axis=1, keepdims=True))
        return -np.sum(y * log_p, axis=1)
    if name == "identity":
        return 0.5 * np.sum((z - y) ** 2, axis=1)
    raise KeyError(name)


def _f64(tree):
    if isinstance(tree, (tuple, list)):
        return [_f64(t) for t in tree]
    return np.asarray(tree, dtype=np.float64)


def forward_with_activations(spec, params, x):
    """Returns (a list a_1..a_L, h list h_0..h_{L-1}, y_hat)."""
    params, h = _f64(params), [np.asarray(x, np.float64)]
    a = []
    for l, (w, b) in enumerate(params):
        a.append(h[-1] @ w.T + b)
        if l < len(params) - 1:
            h.append(f(spec.activation, a[-1]))
    return a, h, g(spec.output, a[-1])


def loss(spec, params, x, y):
    a, _, _ = forward_with_activations(spec, params, x)
    per = per_sample_loss(spec.output, a[-1], np.asarray(y, np.float64))
    return per.sum() if spec.reduction == "sum" else per.mean()


def grouping_matrix(mode, y):
    """G with one row per group: identity, a row of 1/B, or one row per class present."""
    y = np.asarray(y, np.float64)
    batch = y.shape[0]
    if mode == "sample":
        return np.eye(batch)
    if mode == "batch_mean":
        return np.full((1, batch), 1.0 / batch)
    labels = np.argmax(y, axis=1)
    rows = []
    for c in sorted(set(labels.tolist())):
        members = labels == c
        rows.append(members / members.sum())
    return np.array(rows)


def group(spec, params, x, y, mode):
    """(hidden a' list, h' list, e') with a and h averaged separately."""
    a, h, y_hat = forward_with_activations(spec, params, x)
    G = grouping_matrix(mode, y)
    return [G @ t for t in a[:-1]], [G @ t for t in h], G @ y_hat - G @ np.asarray(y, np.float64), G.shape[0]


def feedback_projection(feedback, e):
    return [e @ np.asarray(B, np.float64).T for B in feedback]


def dfa_grads(spec, params, feedback, x, y, mode):
    a_g, h_g, e_g, K = group(spec, params, x, y, mode)
    scale = 1.0 / K if spec.reduction == "mean" else 1.0
    grads = []
    for l, proj in enumerate(feedback_projection(feedback, e_g)):
        delta = proj * df(spec.activation, a_g[l])
        grads.append((scale * delta.T @ h_g[l], scale * delta.sum(axis=0)))
    grads.append((scale * e_g.T @ h_g[-1], scale * e_g.sum(axis=0)))
    return grads


def output_delta(spec, y_hat, y):
    """dLoss/da_L per sample, exact for any y (softmax: y_hat * sum(y) - y)."""
    if spec.output == "softmax":
        return y_hat * y.sum(axis=1, keepdims=True) - y
    return y_hat - y


def bp_deltas(spec, params, x, y):
    """dLoss/da_l for l = 1..L, each (batch, n_l), with the spec's reduction."""
    params = _f64(params)
    a, h, y_hat = forward_with_activations(spec, params, x)
    y = np.asarray(y, np.float64)
    delta = output_delta(spec, y_hat, y)
    if spec.reduction == "mean":
        delta = delta / y.shape[0]
    deltas = [delta]
    for l in range(len(params) - 2, -1, -1):
        delta = (delta @ params[l + 1][0]) * df(spec.activation, a[l])
        deltas.insert(0, delta)
    return deltas, h


def bp_grads(spec, params, x, y):
    deltas, h = bp_deltas(spec, params, x, y)
    return [(d.T @ hl, d.sum(axis=0)) for d, hl in zip(deltas, h)]


class Optimizer:
    """sgd / momentum / adam (with optional weight decay) in closed form, stepping a list of float64 arrays."""

    def __init__(self, opt):
        self.opt, self.count, self.m, self.v = opt, 0, None, None

    def step(self, flat_params, flat_grads):
        o = self.opt
        if self.m is None:
            self.m = [np.zeros_like(p) for p in flat_params]
            self.v = [np.zeros_like(p) for p in flat_params]
        self.count += 1
        out = []
        for i, (p, gr) in enumerate(zip(flat_params, flat_grads)):
            gr = gr + o.weight_decay * p  # L2 coupled to the gradient (0: none)
            if o.name == "sgd":
                d = gr
            elif o.name == "momentum":
                self.m[i] = gr + o.momentum * self.m[i]
                d = gr + o.momentum * self.m[i] if o.nesterov else self.m[i]
            else:
                self.m[i] = o.b1 * self.m[i] + (1 - o.b1) * gr
                self.v[i] = o.b2 * self.v[i] + (1 - o.b2) * gr * gr
                m_hat = self.m[i] / (1 - o.b1**self.count)
                v_hat = self.v[i] / (1 - o.b2**self.count)
                d = m_hat / (np.sqrt(v_hat) + o.eps)
            out.append(p - o.learning_rate * d)
        return out


def flatten(pairs):
    return [t for pair in pairs for t in pair]


def unflatten(flat):
    return [(flat[i], flat[i + 1]) for i in range(0, len(flat), 2)]
