"""An independent NumPy closed form of block models (conv, pool, flatten, dense, composites) and their grads.

Float64 throughout, written from the math of ``dfa_core.model`` and sharing no code with the
backends: a convolution is a loop over its k x k kernel taps with explicit strided index
arithmetic, pools are reshapes into (size x size) windows, the grouping is an explicit matrix
G (``numpy_reference.grouping_matrix``), and BP is a hand-written backward pass (conv input
gradient, max-pool routing to each window's first maximum, avg-pool spreading 1/size^2).
Composite blocks (Sequential, Residual) run their layers one by one with f between the inner
parametrised layers and go back through them by the same hand-written steps (f' by hand, the
residual sum's gradient to both branches). Activations, output functions and per-sample losses
are those of ``numpy_reference``.

Shapes: B the batch, K the number of groups, (C, H, W) one image; a model's lists hold one
entry per block l = 1..L.
"""

from __future__ import annotations

import numpy as np

from dfa_core.model import AvgPool2d, Dense, Flatten, MaxPool2d, TransformerBlock, composite_plan
from parity_tests.numpy_reference import df, f, g, grouping_matrix, output_delta, per_sample_loss


def _f64(tree):
    if isinstance(tree, (tuple, list)):
        return [_f64(t) for t in tree]
    return np.asarray(tree, dtype=np.float64)


# -- layers, forward ------------------------------------------------------------------------------


def _taps(u_pad_BxCxHpxWp, k, stride, out_hw):
    """Yields (p, q, patch_BxCxH'xW') with patch[.., y, x] = u_pad[.., y*stride + p, x*stride + q]."""
    ho, wo = out_hw
    for p in range(k):
        for q in range(k):
            rows = p + stride * np.arange(ho)
            cols = q + stride * np.arange(wo)
            yield p, q, u_pad_BxCxHpxWp[:, :, rows[:, None], cols[None, :]]


def _conv_out_hw(layer, h, w):
    k, s, p = layer.kernel_size, layer.stride, layer.pad
    return (h + 2 * p - k) // s + 1, (w + 2 * p - k) // s + 1


def _pad(u_BxCxHxW, pad):
    return np.pad(u_BxCxHxW, ((0, 0), (0, 0), (pad, pad), (pad, pad)))


def conv2d(layer, w_OxIxkxk, b_O, u_BxIxHxW):
    """a[b, o, y, x] = b[o] + sum_{i,p,q} W[o, i, p, q] * u_pad[b, i, y*s + p, x*s + q]."""
    out_hw = _conv_out_hw(layer, *u_BxIxHxW.shape[2:])
    a = np.zeros((u_BxIxHxW.shape[0], w_OxIxkxk.shape[0], *out_hw))
    for p, q, patch in _taps(_pad(u_BxIxHxW, layer.pad), layer.kernel_size, layer.stride, out_hw):
        a += np.einsum("bihw,oi->bohw", patch, w_OxIxkxk[:, :, p, q])
    return a + b_O[None, :, None, None]


def _windows(h_BxCxHxW, size):
    """(B, C, H', size, W', size) view of the floor-cropped input, window (y, x) at [:, :, y, :, x, :]."""
    bsz, c, h, w = h_BxCxHxW.shape
    ho, wo = h // size, w // size
    return h_BxCxHxW[:, :, : ho * size, : wo * size].reshape(bsz, c, ho, size, wo, size)


def apply_layer(layer, h):
    """One parameter-free layer (pool or flatten) on a batch."""
    if isinstance(layer, Flatten):
        return h.reshape(h.shape[0], -1)
    if isinstance(layer, MaxPool2d):
        return _windows(h, layer.size).max(axis=(3, 5))
    if isinstance(layer, AvgPool2d):
        return _windows(h, layer.size).mean(axis=(3, 5))
    raise TypeError(f"not a parameter-free layer: {layer!r}")


def apply_block(layer, w, b, u):
    """a_l = g_l(theta_l, u_l): Dense on (B, I), Conv2d on (B, I, H, W)."""
    if isinstance(layer, Dense):
        return u @ w.T + b
    return conv2d(layer, w, b, u)


def _is_param(layer):
    return not isinstance(layer, (Flatten, MaxPool2d, AvgPool2d))


def _composite_trace(block, leaves, u, activation):
    """Runs a composite on u: (zs, hs) with hs[i] the input of inner layer i, zs[i] its raw output
    (before f); returns (zs, hs, a)."""
    plan = composite_plan(block.layer, block.u_shape)
    hs, zs, i = [], [], 0
    h = u
    for j, layer in enumerate(plan.layers):
        hs.append(h)
        if _is_param(layer):
            z = apply_block(layer, leaves[i], leaves[i + 1], h)
            i += 2
        else:
            z = apply_layer(layer, h)
        zs.append(z)
        h = f(activation, z) if _is_param(layer) and j < len(plan.layers) - 1 else z
    if plan.residual:
        h = h + (u if plan.shortcut is None else apply_block(plan.shortcut, leaves[i], leaves[i + 1], u))
    return zs, hs, h


def _layer_norm(x, gamma, beta, eps):
    mu = x.mean(axis=-1, keepdims=True)
    var = ((x - mu) ** 2).mean(axis=-1, keepdims=True)
    return (x - mu) / np.sqrt(var + eps) * gamma + beta


def transformer_forward(layer, leaves, x_BxTxD, activation):
    """The pre-norm block written head by head with einsum: attention weights by an explicit
    max-shifted exp; no gradients here (the backends' transformer grads are compared with each other)."""
    g1, be1, w_qkv, b_qkv, w_o, b_o, g2, be2, w_1, b_1, w_2, b_2 = leaves
    d = x_BxTxD.shape[2]
    dh = d // layer.heads
    n1 = _layer_norm(x_BxTxD, g1, be1, layer.LN_EPS)
    q = np.einsum("btd,ed->bte", n1, w_qkv[:d]) + b_qkv[:d]
    k = np.einsum("btd,ed->bte", n1, w_qkv[d : 2 * d]) + b_qkv[d : 2 * d]
    v = np.einsum("btd,ed->bte", n1, w_qkv[2 * d :]) + b_qkv[2 * d :]
    heads = []
    for h in range(layer.heads):
        cols = slice(h * dh, (h + 1) * dh)
        s = np.einsum("bte,bse->bts", q[..., cols], k[..., cols]) / np.sqrt(dh)
        p = np.exp(s - s.max(axis=-1, keepdims=True))
        p = p / p.sum(axis=-1, keepdims=True)
        heads.append(np.einsum("bts,bse->bte", p, v[..., cols]))
    x1 = x_BxTxD + np.einsum("bte,de->btd", np.concatenate(heads, axis=-1), w_o) + b_o
    hidden = f(activation, np.einsum("btd,md->btm", _layer_norm(x1, g2, be2, layer.LN_EPS), w_1) + b_1)
    return x1 + np.einsum("btm,dm->btd", hidden, w_2) + b_2


def block_forward(block, leaves, u, activation):
    """a_l = g_l(theta_l, u_l) for any block; ``activation`` is the spec's f (inside composites)."""
    if isinstance(block.layer, TransformerBlock):
        return transformer_forward(block.layer, leaves, u, activation)
    if block.plan is None:
        return apply_block(block.layer, leaves[0], leaves[1], u)
    return _composite_trace(block, leaves, u, activation)[2]


def block_activation(spec, block):
    """f_l: a composite's out_activation, else the spec's f."""
    return block.out_activation(spec.activation)


def _prefix_trace(block, h):
    """[h, after prefix layer 1, ..., u_l]: every intermediate the backward pass needs."""
    trace = [h]
    for layer in block.prefix:
        trace.append(apply_layer(layer, trace[-1]))
    return trace


def forward(spec, params, x):
    """Returns (us, as_, hs, y_hat): u_l and a_l per block, h_0 = x .. h_{L-1}, y_hat (B, n_L)."""
    params = _f64(params)
    hs = [np.asarray(x, np.float64)]
    us, as_ = [], []
    for l, (block, leaves) in enumerate(zip(spec.blocks, params)):
        us.append(_prefix_trace(block, hs[-1])[-1])
        as_.append(block_forward(block, leaves, us[-1], spec.activation))
        if l < spec.num_layers - 1:
            hs.append(f(block_activation(spec, block), as_[-1]))
    return us, as_, hs, g(spec.output, as_[-1])


def loss(spec, params, x, y):
    """The spec's loss from the logits a_L, summed or averaged over the batch."""
    _, as_, _, _ = forward(spec, params, x)
    per = per_sample_loss(spec.output, as_[-1], np.asarray(y, np.float64))
    return per.sum() if spec.reduction == "sum" else per.mean()


# -- layers, backward -----------------------------------------------------------------------------


def conv2d_weight_grads(layer, delta_KxOxH2xW2, u_KxIxHxW):
    """gW[o, i, p, q] = sum_{k, y, x} delta[k, o, y, x] * u_pad[k, i, y*s + p, x*s + q]; gb[o] = sum delta."""
    out_hw = delta_KxOxH2xW2.shape[2:]
    k = layer.kernel_size
    gw = np.zeros((delta_KxOxH2xW2.shape[1], u_KxIxHxW.shape[1], k, k))
    for p, q, patch in _taps(_pad(u_KxIxHxW, layer.pad), k, layer.stride, out_hw):
        gw[:, :, p, q] = np.einsum("kohw,kihw->oi", delta_KxOxH2xW2, patch)
    return gw, delta_KxOxH2xW2.sum(axis=(0, 2, 3))


def conv2d_input_grad(layer, w_OxIxkxk, delta_BxOxH2xW2, in_hw):
    """dL/du: each tap scatters W[o, i, p, q] * delta[b, o, y, x] back to u_pad[b, i, y*s + p, x*s + q]."""
    pad, s = layer.pad, layer.stride
    ho, wo = delta_BxOxH2xW2.shape[2:]
    g_pad = np.zeros((delta_BxOxH2xW2.shape[0], w_OxIxkxk.shape[1], in_hw[0] + 2 * pad, in_hw[1] + 2 * pad))
    for p in range(layer.kernel_size):
        for q in range(layer.kernel_size):
            rows = p + s * np.arange(ho)
            cols = q + s * np.arange(wo)
            # (rows, cols) are distinct within one tap, so += on the fancy index does not drop terms.
            g_pad[:, :, rows[:, None], cols[None, :]] += np.einsum(
                "bohw,oi->bihw", delta_BxOxH2xW2, w_OxIxkxk[:, :, p, q]
            )
    return g_pad[:, :, pad : pad + in_hw[0], pad : pad + in_hw[1]]


def block_grads(layer, w, delta, u):
    """(gW, gb): the VJP of g_l w.r.t. (W, b) at input u, applied to delta (any leading batch)."""
    if isinstance(layer, Dense):
        return delta.T @ u, delta.sum(axis=0)
    return conv2d_weight_grads(layer, delta, u)


def _pool_input_grad(layer, h_in, grad_out):
    """Max: all of a window's gradient to its first maximum (row-major); avg: 1/size^2 to each cell."""
    size = layer.size
    bsz, c, ho, wo = grad_out.shape
    win = _windows(h_in, size).transpose(0, 1, 2, 4, 3, 5).reshape(bsz, c, ho, wo, size * size)
    if isinstance(layer, MaxPool2d):
        share = np.zeros_like(win)
        first = np.argmax(win, axis=-1)  # np.argmax returns the first maximum, as torch does
        np.put_along_axis(share, first[..., None], 1.0, axis=-1)
    else:
        share = np.full(win.shape, 1.0 / size**2)
    spread = (share * grad_out[..., None]).reshape(bsz, c, ho, wo, size, size).transpose(0, 1, 2, 4, 3, 5)
    g_in = np.zeros_like(h_in)  # the cropped rows/columns (floor) get no gradient
    g_in[:, :, : ho * size, : wo * size] = spread.reshape(bsz, c, ho * size, wo * size)
    return g_in


def prefix_input_grad(block, trace, grad_u):
    """dL/dh_{l-1} from dL/du_l, back through the prefix layers in reverse."""
    grad = grad_u
    for layer, h_in in zip(reversed(block.prefix), reversed(trace[:-1])):
        if isinstance(layer, Flatten):
            grad = grad.reshape(h_in.shape)
        else:
            grad = _pool_input_grad(layer, h_in, grad)
    return grad


def layer_input_grad(layer, w, delta, in_shape):
    """dL/du of one Dense/Conv2d layer from dL/da; in_shape is u's per-sample shape."""
    if isinstance(layer, Dense):
        return delta @ w
    return conv2d_input_grad(layer, w, delta, in_shape[1:])


def block_input_grad(block, w, delta):
    """dL/du_l from dL/da_l (a Dense/Conv2d block)."""
    return layer_input_grad(block.layer, w, delta, block.u_shape)


def block_backward(block, leaves, u, delta, activation):
    """(grads of the block's flat params, dL/du) from dL/da = delta, at input u (any leading batch)."""
    if block.plan is None:
        return tuple(block_grads(block.layer, leaves[0], delta, u)), layer_input_grad(
            block.layer, leaves[0], delta, block.u_shape
        )
    plan = block.plan
    zs, hs, _ = _composite_trace(block, leaves, u, activation)
    param_at = [j for j, layer in enumerate(plan.layers) if _is_param(layer)]
    grads = [None] * len(leaves)
    grad_u = np.zeros_like(u)
    if plan.residual:
        if plan.shortcut is None:
            grad_u = grad_u + delta
        else:
            n = len(leaves)
            grads[n - 2], grads[n - 1] = block_grads(plan.shortcut, leaves[n - 2], delta, u)
            grad_u = grad_u + layer_input_grad(plan.shortcut, leaves[n - 2], delta, plan.shapes[0])
    grad = delta  # dL/d(output of inner layer j), walking back
    for j in reversed(range(len(plan.layers))):
        layer = plan.layers[j]
        if _is_param(layer):
            if j < len(plan.layers) - 1:
                grad = grad * df(activation, zs[j])
            i = 2 * param_at.index(j)
            grads[i], grads[i + 1] = block_grads(layer, leaves[i], grad, hs[j])
            grad = layer_input_grad(layer, leaves[i], grad, plan.shapes[j])
        elif isinstance(layer, Flatten):
            grad = grad.reshape(hs[j].shape)
        else:
            grad = _pool_input_grad(layer, hs[j], grad)
    return tuple(grads), grad_u + grad


# -- the learning rules ---------------------------------------------------------------------------


def bp_grads(spec, params, x, y):
    """Exact dLoss/dtheta_l per block, by the hand-written backward pass, [(gW_l, gb_l), ...]."""
    params = _f64(params)
    _, as_, hs, y_hat = forward(spec, params, x)
    y = np.asarray(y, np.float64)
    delta = output_delta(spec, y_hat, y)
    if spec.reduction == "mean":
        delta = delta / y.shape[0]
    grads = []
    for l in range(spec.num_layers - 1, -1, -1):
        block, leaves = spec.blocks[l], params[l]
        trace = _prefix_trace(block, hs[l])
        block_g, grad_u = block_backward(block, leaves, trace[-1], delta, spec.activation)
        grads.insert(0, block_g)
        if l > 0:
            grad_h = prefix_input_grad(block, trace, grad_u)
            delta = grad_h * df(block_activation(spec, spec.blocks[l - 1]), as_[l - 1])
    return grads


def _grouped(G_KxB, t):
    """G @ t over the batch axis, keeping t's per-sample shape."""
    return (G_KxB @ t.reshape(t.shape[0], -1)).reshape(G_KxB.shape[0], *t.shape[1:])


def dfa_grads(spec, params, feedback, x, y, mode):
    """DFA grads per block: delta_l = reshape(e' B_l^T, (K, *a_shape)) * f'(a'_l); output delta_L = e'."""
    params, feedback = _f64(params), _f64(feedback)
    us, as_, _, y_hat = forward(spec, params, x)
    y = np.asarray(y, np.float64)
    G = grouping_matrix(mode, y)
    K = G.shape[0]
    e = G @ y_hat - G @ y
    scale = 1.0 / K if spec.reduction == "mean" else 1.0
    grads = []
    for l, (block, leaves) in enumerate(zip(spec.blocks, params)):
        if l < spec.num_layers - 1:
            proj = (e @ feedback[l].T).reshape(K, *block.a_shape)
            delta = proj * df(block_activation(spec, block), _grouped(G, as_[l]))
        else:
            delta = e
        block_g, _ = block_backward(block, leaves, _grouped(G, us[l]), delta, spec.activation)
        grads.append(tuple(scale * t for t in block_g))
    return grads


def draw_params(spec, seed=0):
    """Params of spec.param_shapes, uniform(+-1/sqrt(fan_in)) per inner layer like torch's default
    (LayerNorm-style 'ones'/'zeros' leaves perturbed around their value so they matter), in spec.dtype."""
    rng = np.random.default_rng(seed)
    out = []  # W_1, b_1, W_2, ... drawn in order
    for block in spec.blocks:
        leaves = []
        for shape, how in zip(block.param_shapes, block.param_inits):
            if isinstance(how, str):
                leaf = (1.0 if how == "ones" else 0.0) + rng.uniform(-0.2, 0.2, size=shape)
            else:
                leaf = rng.uniform(-how, how, size=shape)
            leaves.append(leaf.astype(spec.dtype))
        out.append(tuple(leaves))
    return tuple(out)


def draw_feedback(spec, seed=1):
    """Feedback matrices of spec.feedback_shapes, standard normal scaled by 1/sqrt(n_L), in spec.dtype."""
    rng = np.random.default_rng(seed)
    return tuple((rng.normal(size=shape) / np.sqrt(shape[1])).astype(spec.dtype) for shape in spec.feedback_shapes)
