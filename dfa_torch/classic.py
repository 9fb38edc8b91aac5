"""The technical report's PyTorch API (section 3): ``DynamicModel`` and its DFA training loops.

Kept faithful to the report so its notebooks and scripts port over: an ``nn.Module``
with ``forward_pass_train`` and ``dfa_backward_pass`` in the report's features-major
layout and sign (``dfa_backward_pass`` returns -gradient; the loops do W += lr * dW),
and loops over a model that update its ``nn.Linear`` layers in place. Torch only, so
``dfa_jax`` has no twin of this module; the functional core (``dfa_torch.dfa_grads``
with reduction 'sum' and plain SGD) computes the same updates, which tests check.

Defects of the report fixed here:

* the averaged loops count training errors on the samples, before averaging, with an
  argmax over the class axis;
* the ``tol`` early stop compares consecutive epochs only from the second epoch on
  (the report compared the first epoch against an initial 0 and could stop at once);
* ``summary`` prints the layer index (the report printed a literal 'i'), traces shapes
  with zeros instead of drawing from the global RNG, and names the activations;
* shuffling and feedback draws come from a seeded ``torch.Generator``, not global state.
"""

from __future__ import annotations

import numbers
from typing import Any, Callable, Iterator, List, Optional, Sequence, Tuple, Union, cast

import numpy as np
import numpy.typing as npt
import torch
import torch.nn.functional as F
from torch import nn

from dfa_core import init as dfa_init
from dfa_core.spec import MLPSpec
from dfa_torch import nn as dfa_nn
from dfa_torch.arrays import torch_dtype

Tensor = torch.Tensor
Params = Tuple[Tuple[Tensor, Tensor], ...]
TensorLike = Union[Tensor, npt.ArrayLike]  # a tensor, or anything NumPy reads as an array
ErrorFunction = Callable[[Tensor, Tensor, int], Tuple[Tensor, int]]  # as ``mnist_error``
LoopResult = Union[
    Tuple[List[float], List[float]],  # (te, loss): per-epoch training error and loss
    Tuple[List[float], List[float], List[Tensor]],  # (te, loss, B) with return_feedback
]
# One grouping of a batch: (a, h, y_hat, y) of the K groups, y_hat and y None for 'sample'.
_Groups = Iterator[Tuple[List[Tensor], List[Tensor], Optional[Tensor], Optional[Tensor]]]

FEEDBACK_STD = dfa_init.DEFAULT_FEEDBACK_SCALE
"""The report draws every B_l from N(0, 1.9^2)."""


def _is_int(value: object) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _check_count(name: str, value: Any) -> None:
    if not _is_int(value):
        raise TypeError(f"{name} must be an int, got {type(value).__name__} {value!r}")
    if value < 1:
        raise ValueError(f"{name} must be >= 1, got {value}")


def _check_callable(what: str, fn: object) -> None:
    if not callable(fn):
        raise TypeError(f"{what} must be callable, got {type(fn).__name__} {fn!r}")


def _fn_name(fn: object) -> str:
    if isinstance(fn, nn.Module):
        return type(fn).__name__
    return getattr(fn, "__name__", type(fn).__name__)


class DynamicModel(nn.Module):
    """A fully connected network with one activation for every hidden layer (report 3.2).

    Layer l (0-based in ``self.layers``) is ``nn.Linear(layer_sizes[l], layer_sizes[l + 1])``;
    its weight has the functional core's W_{l+1} layout (n_{l+1}, n_l).
    """

    def __init__(
        self,
        layer_sizes: Sequence[int],
        act_function: Callable[[Tensor], Tensor],
        act_function_derivative: Callable[[Tensor], Tensor],
        output_function: Callable[[Tensor], Tensor] = torch.sigmoid,
    ) -> None:
        """Builds the layers.

        Args:
          layer_sizes: (n_0, n_1, ..., n_L): input, hidden and output widths, at least 2.
          act_function: hidden activation f, e.g. ``torch.tanh`` or ``torch.nn.Tanh()``.
          act_function_derivative: f' as a function of the pre-activation a,
            e.g. ``lambda a: 1 - torch.tanh(a) ** 2``.
          output_function: g, applied to the last layer's pre-activation.

        Raises:
          TypeError: a size that is not an int, a function that is not callable.
          ValueError: fewer than 2 sizes or a size <= 0.
        """
        super().__init__()
        if isinstance(layer_sizes, (str, bytes)) or not hasattr(layer_sizes, "__iter__"):
            raise TypeError(f"layer_sizes must be a sequence of ints such as [784, 200, 10], got {layer_sizes!r}")
        sizes = list(layer_sizes)
        if len(sizes) < 2:
            raise ValueError(f"layer_sizes needs at least 2 entries (input and output widths), got {sizes!r}")
        for i, n in enumerate(sizes):
            if not _is_int(n):
                raise TypeError(f"layer_sizes[{i}] must be an int, got {type(n).__name__} {n!r}")
            if n <= 0:
                raise ValueError(f"layer_sizes[{i}] must be positive, got {n}")
        _check_callable("act_function", act_function)
        _check_callable("act_function_derivative", act_function_derivative)
        _check_callable("output_function", output_function)
        self.layers = nn.ModuleList([nn.Linear(sizes[i], sizes[i + 1]) for i in range(len(sizes) - 1)])
        self.layer_sizes = [int(n) for n in sizes]
        self.act_function = act_function
        self.act_function_derivative = act_function_derivative
        self.output_function = output_function

    def forward_pass_train(self, x: Tensor) -> Tuple[List[Tensor], List[Tensor], Tensor]:
        """Forward pass keeping what DFA needs (report 3.2.2).

        Args:
          x: inputs, (batch, n_0).

        Returns:
          (a, h, y_hat): a = [a_1, ..., a_{L-1}] hidden pre-activations, a_l (batch, n_l);
          h = [h_0 = x, h_1, ..., h_{L-1}], h_l (batch, n_l); y_hat = g(a_L), (batch, n_L).
        """
        a, h = [], [x]
        for layer in self.layers[:-1]:
            a.append(layer(h[-1]))
            h.append(self.act_function(a[-1]))
        y_hat = self.output_function(self.layers[-1](h[-1]))
        return a, h, y_hat

    def forward(self, x: Tensor) -> Tensor:
        """y_hat = g(a_L), (batch, n_L), keeping no intermediate values."""
        h = x
        for layer in self.layers[:-1]:
            h = self.act_function(layer(h))
        return self.output_function(self.layers[-1](h))

    def dfa_backward_pass(
        self, e: Tensor, h: Sequence[Tensor], a: Sequence[Tensor], B: Sequence[Tensor]
    ) -> Tuple[List[Tensor], List[Tensor]]:
        """DFA updates in the report's features-major layout and sign (report 3.2.3).

        The returned dW_l, db_l are minus the DFA gradients summed over the K columns,
        so SGD is ``W_l += lr * dW_l`` and ``b_l += lr * db_l[:, 0]``.

        Args:
          e: output error y_hat - y, transposed: (n_L, K).
          h: [h_0^T, ..., h_{L-1}^T], h_l^T of shape (n_l, K).
          a: [a_1^T, ..., a_{L-1}^T], a_l^T of shape (n_l, K).
          B: [B_1, ..., B_{L-1}], B_l of shape (n_l, n_L).

        Returns:
          (dW, db): dW_l of shape (n_l, n_{l-1}) and db_l a column (n_l, 1), for l = 1..L.

        Raises:
          ValueError: list lengths that do not match the model's L - 1 hidden layers.
        """
        hidden = len(self.layers) - 1
        if len(B) != hidden or len(a) != hidden or len(h) != hidden + 1:
            raise ValueError(
                f"dfa_backward_pass: the model has {hidden} hidden layers, so expected {hidden} "
                f"feedback matrices B, {hidden} pre-activations a and {hidden + 1} activations h "
                f"(input included); got {len(B)}, {len(a)} and {len(h)}"
            )
        dW, db = [], []
        for i in range(hidden):
            da = torch.matmul(B[i], e) * self.act_function_derivative(a[i])
            dW.append(-torch.matmul(da, h[i].T))
            db.append(-torch.sum(da, dim=1, keepdim=True))
        dW.append(-torch.matmul(e, h[-1].T))
        db.append(-torch.sum(e, dim=1, keepdim=True))
        return dW, db

    def summary(self, input_shape: Sequence[int]) -> str:
        """Prints (and returns) a table of layers with their index, shapes and activation.

        Args:
          input_shape: shape of a dummy input, e.g. (1, 784); its last entry must be n_0.

        Raises:
          ValueError: ``input_shape`` does not end with n_0.
        """
        shape = tuple(int(n) for n in input_shape)
        if not shape or shape[-1] != self.layer_sizes[0]:
            raise ValueError(f"input_shape must end with the input width {self.layer_sizes[0]}, got {shape}")
        weight = cast(nn.Linear, self.layers[0]).weight  # ModuleList items type as plain Modules
        x = torch.zeros(shape, dtype=weight.dtype, device=weight.device)
        lines = [
            "=====MODEL SUMMARY=====",
            f"{'Layer':<10}{'Input Shape':<20}{'Output Shape':<20}{'Activation':<20}",
            "=" * 70,
        ]
        with torch.no_grad():
            for i, layer in enumerate(self.layers):
                in_shape = list(x.shape)
                x = layer(x)
                last = i == len(self.layers) - 1
                x = self.output_function(x) if last else self.act_function(x)
                act = _fn_name(self.output_function if last else self.act_function)
                lines.append(f"{i:<10}{str(in_shape):<20}{str(list(x.shape)):<20}{act:<20}")
        lines += [
            "=" * 70,
            f"input size : {self.layer_sizes[0]}",
            f"output size : {self.layer_sizes[-1]}",
            f"layers sizes: {self.layer_sizes}",
            "=====END SUMMARY=====",
        ]
        text = "\n".join(lines)
        print(text)
        return text


# ---------------------------------------------------------------------------------------
# Between a DynamicModel and the functional ((W, b), ...) parameters.


def _check_model(model: object) -> None:
    if not isinstance(model, DynamicModel):
        raise TypeError(f"model must be a dfa_torch.classic.DynamicModel, got {type(model).__name__}")


def params_from_model(model: DynamicModel) -> Params:
    """The model's parameters as the functional core's tuple (detached copies).

    Returns:
      ((W_1, b_1), ..., (W_L, b_L)), W_l of shape (n_l, n_{l-1}), b_l of shape (n_l,).
    """
    _check_model(model)
    layers = cast(Sequence[nn.Linear], model.layers)  # ModuleList items type as plain Modules
    return tuple((layer.weight.detach().clone(), layer.bias.detach().clone()) for layer in layers)


def load_params(model: DynamicModel, params: Sequence[Sequence[TensorLike]]) -> DynamicModel:
    """Copies functional parameters into the model's layers, in place; returns the model.

    Args:
      model: the model to overwrite.
      params: ((W_l, b_l), ...) NumPy arrays or tensors, W_l of shape (n_l, n_{l-1}),
        b_l of shape (n_l,); cast to the model's dtype.

    Raises:
      ValueError: wrong number of layers or a wrong shape.
    """
    _check_model(model)
    if not isinstance(params, (tuple, list)) or len(params) != len(model.layers):
        got = len(params) if isinstance(params, (tuple, list)) else type(params).__name__
        raise ValueError(f"params: expected {len(model.layers)} (W, b) pairs, got {got}")
    with torch.no_grad():
        for l, (module, pair) in enumerate(zip(model.layers, params), start=1):
            layer = cast(nn.Linear, module)  # ModuleList items type as plain Modules
            if not isinstance(pair, (tuple, list)) or len(pair) != 2:
                raise ValueError(f"params[{l - 1}]: expected a (W_{l}, b_{l}) pair, got {type(pair).__name__}")
            for name, dst, src in ((f"W_{l}", layer.weight, pair[0]), (f"b_{l}", layer.bias, pair[1])):
                src = torch.as_tensor(np.asarray(src) if not isinstance(src, Tensor) else src)
                if tuple(src.shape) != tuple(dst.shape):
                    raise ValueError(f"params: {name} must have shape {tuple(dst.shape)}, got {tuple(src.shape)}")
                dst.copy_(src.to(dtype=dst.dtype, device=dst.device))
    return model


def model_from_params(
    params: Sequence[Sequence[TensorLike]],
    act_function: Callable[[Tensor], Tensor],
    act_function_derivative: Callable[[Tensor], Tensor],
    output_function: Callable[[Tensor], Tensor] = torch.sigmoid,
) -> DynamicModel:
    """A DynamicModel holding ``params`` ((W_l, b_l), ...), in the dtype of W_1.

    Raises:
      ValueError, TypeError: as ``DynamicModel`` and ``load_params``.
    """
    if not isinstance(params, (tuple, list)) or not params:
        raise ValueError(f"params must be a non-empty sequence of (W, b) pairs, got {type(params).__name__}")
    w_first = torch.as_tensor(np.asarray(params[0][0]) if not isinstance(params[0][0], Tensor) else params[0][0])
    if w_first.ndim != 2:
        raise ValueError(f"params: W_1 must be 2-D (n_1, n_0), got shape {tuple(w_first.shape)}")
    sizes = [int(w_first.shape[1])] + [int(w.shape[0]) if hasattr(w, "shape") else len(w) for w, _ in params]
    model = DynamicModel(sizes, act_function, act_function_derivative, output_function)
    model.to(w_first.dtype)
    return load_params(model, params)


def _activation_pair(name: str) -> Tuple[Callable[[Tensor], Tensor], Callable[[Tensor], Tensor]]:
    act = dfa_nn.activation(name)
    return act.fn, lambda a: act.derivative(a, act.fn(a))


def model_from_spec(
    spec: MLPSpec, params: Optional[Sequence[Sequence[TensorLike]]] = None, seed: int = 0
) -> DynamicModel:
    """A DynamicModel for ``spec``: its activation and derivative, output function and dtype.

    Args:
      spec: the network; ``spec.activation`` and ``spec.output`` pick f, f' and g.
      params: parameters to load; default ``dfa_core.init_params(spec, seed)``, so a seed
        gives the same network here and in the functional core.
      seed: seed of the default parameters.
    """
    if not isinstance(spec, MLPSpec):
        raise TypeError(f"spec must be a dfa_core.MLPSpec, got {type(spec).__name__}")
    f, df = _activation_pair(spec.activation)
    model = DynamicModel(spec.layer_sizes, f, df, dfa_nn.output_function(spec.output))
    model.to(torch_dtype(spec.dtype))
    return load_params(model, dfa_init.init_params(spec, seed) if params is None else params)


# ---------------------------------------------------------------------------------------
# The report's training loops (section 3.3).


def mnist_error(y_hat: Tensor, batch_y: Tensor, train_error: int) -> Tuple[Tensor, int]:
    """The report's ``MNIST_error``: the output error and the running misclassification count.

    Args:
      y_hat: predictions, (batch, n_L).
      batch_y: one-hot targets, (batch, n_L).
      train_error: misclassified samples counted so far.

    Returns:
      (y_hat - batch_y of shape (batch, n_L), train_error + the batch's misclassified count),
      a sample being misclassified when the argmax over the class axis differs.
    """
    error = y_hat - batch_y
    if y_hat.shape[1] == 1:  # one output unit (XOR): classes are y > 0.5
        wrong = (y_hat[:, 0] > 0.5) != (batch_y[:, 0] > 0.5)
    else:
        wrong = torch.argmax(y_hat, dim=1) != torch.argmax(batch_y, dim=1)
    return error, train_error + int(wrong.sum().item())


def _check_loop_args(
    model: DynamicModel,
    x: TensorLike,
    y: TensorLike,
    n_epochs: int,
    lr: float,
    batch_size: int,
    tol: Optional[float],
    error_function: ErrorFunction,
    matrix_transfo: Optional[Callable[[Tensor], Tensor]],
    seed: int,
) -> Tuple[Tensor, Tensor]:
    _check_model(model)
    weight = model.layers[0].weight
    _check_count("n_epochs", n_epochs)
    if isinstance(lr, bool) or not isinstance(lr, numbers.Real) or not np.isfinite(lr) or lr <= 0:
        raise ValueError(f"lr must be a finite number > 0, got {lr!r}")
    _check_count("batch_size", batch_size)
    if tol is not None and (isinstance(tol, bool) or not isinstance(tol, numbers.Real) or tol < 0):
        raise ValueError(f"tol must be None or a number >= 0, got {tol!r}")
    _check_callable("error_function", error_function)
    if matrix_transfo is not None:
        _check_callable("matrix_transfo", matrix_transfo)
    if not _is_int(seed) or seed < 0:
        raise TypeError(f"seed must be a non-negative int, got {seed!r}")
    x = torch.as_tensor(x if isinstance(x, Tensor) else np.asarray(x), dtype=weight.dtype, device=weight.device)
    y = torch.as_tensor(y if isinstance(y, Tensor) else np.asarray(y), dtype=weight.dtype, device=weight.device)
    n_in, n_out = model.layer_sizes[0], model.layer_sizes[-1]
    if x.ndim != 2 or x.shape[1] != n_in or x.shape[0] < 1:
        raise ValueError(f"x must have shape (N, {n_in}) with N >= 1, got {tuple(x.shape)}")
    if tuple(y.shape) != (x.shape[0], n_out):
        raise ValueError(f"y must have shape (N, n_L) = ({x.shape[0]}, {n_out}) to match x, got {tuple(y.shape)}")
    if not (torch.isfinite(x).all() and torch.isfinite(y).all()):
        raise ValueError("x and y must be finite (no nan or inf)")
    return x, y


def _feedback(model, feedback, generator, matrix_transfo, std=None) -> List[Tensor]:
    """The report's B (drawn from N(0, std^2), std 1.9 by default, with ``generator``) or the user's, transformed."""
    std = FEEDBACK_STD if std is None else std
    weight = model.layers[0].weight
    n_out = model.layer_sizes[-1]
    shapes = [(n, n_out) for n in model.layer_sizes[1:-1]]
    if feedback is None:
        mats = [
            torch.empty(shape, dtype=weight.dtype).normal_(mean=0.0, std=std, generator=generator) for shape in shapes
        ]
    else:
        if not isinstance(feedback, (tuple, list)) or len(feedback) != len(shapes):
            got = len(feedback) if isinstance(feedback, (tuple, list)) else type(feedback).__name__
            raise ValueError(f"feedback: expected {len(shapes)} matrices with shapes {shapes}, got {got}")
        mats = [torch.as_tensor(b if isinstance(b, Tensor) else np.asarray(b), dtype=weight.dtype) for b in feedback]
    out = []
    for l, (b, shape) in enumerate(zip(mats, shapes), start=1):
        if matrix_transfo is not None:
            b = matrix_transfo(b)
        if not isinstance(b, Tensor) or tuple(b.shape) != shape:
            got_shape = tuple(b.shape) if isinstance(b, Tensor) else type(b).__name__
            raise ValueError(f"feedback: B_{l} must be a tensor of shape {shape} (n_{l}, n_L), got {got_shape}")
        out.append(b.to(dtype=weight.dtype, device=weight.device))
    return out


def _apply_dfa_update(model, dW, db, lr) -> None:
    with torch.no_grad():
        for layer, dw, dbias in zip(model.layers, dW, db):
            layer.weight += lr * dw
            layer.bias += lr * dbias[:, 0]


def _finish_epoch(te, losses, train_error, epoch_loss, n, tol, verbose) -> bool:
    """Records an epoch; True when the change in training error is within ``tol``."""
    te.append(train_error / n)
    losses.append(epoch_loss)
    if tol is None or len(te) < 2:  # from the second epoch on: there is no epoch 0 to compare with
        return False
    change = abs(te[-1] - te[-2])
    if change <= tol:
        if verbose:
            print(f"Hitting tolerance of {tol} with {change}")
        return True
    return False


def _run_dfa_loop(
    grouping,
    model,
    x,
    y,
    n_epochs,
    lr,
    batch_size,
    tol,
    error_function,
    matrix_transfo,
    *,
    seed,
    feedback,
    return_feedback,
    verbose,
    feedback_std=None,
):
    x, y = _check_loop_args(model, x, y, n_epochs, lr, batch_size, tol, error_function, matrix_transfo, seed)
    generator = torch.Generator().manual_seed(seed)
    B = _feedback(model, feedback, generator, matrix_transfo, feedback_std)
    n = x.shape[0]
    te: List[float] = []
    losses: List[float] = []
    for _ in range(n_epochs):
        perm = torch.randperm(n, generator=generator).to(x.device)
        train_error, epoch_loss = 0, 0.0
        for start in range(0, n, batch_size):
            idx = perm[start : start + batch_size]
            batch_x, batch_y = x[idx], y[idx]
            with torch.no_grad():
                a, h, y_hat = model.forward_pass_train(batch_x)
                error, train_error = error_function(y_hat, batch_y, train_error)
                epoch_loss += F.binary_cross_entropy(y_hat, batch_y).item()
                for a_g, h_g, y_hat_g, y_g in grouping(a, h, y_hat, batch_y):
                    if y_hat_g is not None:  # averaged: recompute the error from the averages
                        error = y_hat_g - y_g
                    dW, db = model.dfa_backward_pass(error.T, [t.T for t in h_g], [t.T for t in a_g], B)
                    _apply_dfa_update(model, dW, db, lr)
        if _finish_epoch(te, losses, train_error, epoch_loss, n, tol, verbose):
            break
    return (te, losses, B) if return_feedback else (te, losses)


def _per_sample(a: List[Tensor], h: List[Tensor], y_hat: Tensor, batch_y: Tensor) -> _Groups:
    yield a, h, None, None


def _batch_mean(a: List[Tensor], h: List[Tensor], y_hat: Tensor, batch_y: Tensor) -> _Groups:
    mean = lambda t: torch.mean(t, dim=0).unsqueeze(0)
    yield [mean(t) for t in a], [mean(t) for t in h], mean(y_hat), mean(batch_y)


def _class_mean(a: List[Tensor], h: List[Tensor], y_hat: Tensor, batch_y: Tensor) -> _Groups:
    classes = batch_y.shape[1]
    class_indices: List[List[int]] = [[] for _ in range(classes)]
    for item, label in enumerate(torch.argmax(batch_y, dim=1).tolist()):
        class_indices[label].append(item)
    for indices in class_indices:
        if not indices:
            continue
        mean = lambda t: torch.mean(t[indices], dim=0).unsqueeze(0)
        yield [mean(t) for t in a], [mean(t) for t in h], mean(y_hat), mean(batch_y)


_LOOP_DOC = """
    Args:
      model: the DynamicModel to train, updated in place (its output must lie in [0, 1]:
        the loss recorded is binary cross-entropy, as in the report).
      x: inputs, (N, n_0), NumPy or tensor; cast to the model's dtype.
      y: targets, (N, n_L){one_hot}.
      n_epochs: number of passes over the data, >= 1.
      lr: learning rate, > 0; the update is W += lr * dW with dW from ``dfa_backward_pass``.
      batch_size: samples per batch, >= 1; the last batch of an epoch may be smaller.
      tol: stop when the training error changes by at most ``tol`` between two consecutive
        epochs (checked from the second epoch on); None never stops early.
      error_function: ``(y_hat, batch_y, train_error) -> (error, train_error)`` as ``mnist_error``;
        it counts misclassified samples{counted}.
      matrix_transfo: optional function applied to each feedback matrix B_l (n_l, n_L).
      seed: seeds the ``torch.Generator`` that draws the feedback matrices (when not given),
        in layer order, then one permutation of the N samples per epoch.
      feedback: optional [B_1, ..., B_{{L-1}}], B_l of shape (n_l, n_L), instead of a draw.
      return_feedback: also return the feedback matrices used.
      verbose: print when the tolerance is hit.

    Returns:
      (te, loss): per epoch, the fraction of samples misclassified (counted on each batch
      before its update) and the sum over batches of the mean binary cross-entropy;
      (te, loss, B) with ``return_feedback``.

    Raises:
      ValueError, TypeError: a bad model, data shape, hyper-parameter or feedback, before training.
"""


def train_dfa(
    model: DynamicModel,
    x: TensorLike,
    y: TensorLike,
    n_epochs: int = 10,
    lr: float = 1e-4,
    batch_size: int = 200,
    tol: Optional[float] = None,
    error_function: ErrorFunction = mnist_error,
    matrix_transfo: Optional[Callable[[Tensor], Tensor]] = None,
    *,
    seed: int = 0,
    feedback: Optional[Sequence[TensorLike]] = None,
    return_feedback: bool = False,
    verbose: bool = False,
) -> LoopResult:
    """The report's basic DFA loop (3.3.1): one DFA update per sample, summed over the batch."""
    return _run_dfa_loop(
        _per_sample,
        model,
        x,
        y,
        n_epochs,
        lr,
        batch_size,
        tol,
        error_function,
        matrix_transfo,
        seed=seed,
        feedback=feedback,
        return_feedback=return_feedback,
        verbose=verbose,
    )


def train_dfa_batch_averaged(
    model: DynamicModel,
    x: TensorLike,
    y: TensorLike,
    n_epochs: int = 10,
    lr: float = 1e-4,
    batch_size: int = 200,
    tol: Optional[float] = None,
    error_function: ErrorFunction = mnist_error,
    matrix_transfo: Optional[Callable[[Tensor], Tensor]] = None,
    *,
    seed: int = 0,
    feedback: Optional[Sequence[TensorLike]] = None,
    return_feedback: bool = False,
    verbose: bool = False,
) -> LoopResult:
    """The report's batch-averaged loop (3.3.2): a, h, y_hat and y are averaged over the
    batch and one DFA update is made from the averages (f' is taken at the mean a)."""
    return _run_dfa_loop(
        _batch_mean,
        model,
        x,
        y,
        n_epochs,
        lr,
        batch_size,
        tol,
        error_function,
        matrix_transfo,
        seed=seed,
        feedback=feedback,
        return_feedback=return_feedback,
        verbose=verbose,
    )


def train_dfa_class_averaged(
    model: DynamicModel,
    x: TensorLike,
    y: TensorLike,
    n_epochs: int = 10,
    lr: float = 1e-4,
    batch_size: int = 200,
    tol: Optional[float] = None,
    error_function: ErrorFunction = mnist_error,
    matrix_transfo: Optional[Callable[[Tensor], Tensor]] = None,
    *,
    seed: int = 0,
    feedback: Optional[Sequence[TensorLike]] = None,
    return_feedback: bool = False,
    verbose: bool = False,
) -> LoopResult:
    """The report's per-class averaged loop (3.3.3): for each class present in the batch
    (argmax of y), a, h, y_hat and y are averaged over its samples and one DFA update is
    made from the averages; the updates of all classes use the same forward pass."""
    return _run_dfa_loop(
        _class_mean,
        model,
        x,
        y,
        n_epochs,
        lr,
        batch_size,
        tol,
        error_function,
        matrix_transfo,
        seed=seed,
        feedback=feedback,
        return_feedback=return_feedback,
        verbose=verbose,
    )


# `or ""`: under python -OO docstrings are None, and `None += str` would fail the import.
train_dfa.__doc__ = (train_dfa.__doc__ or "") + _LOOP_DOC.format(one_hot="", counted="")
train_dfa_batch_averaged.__doc__ = (train_dfa_batch_averaged.__doc__ or "") + _LOOP_DOC.format(
    one_hot="", counted=" on the samples, before averaging (argmax over the class axis)"
)
train_dfa_class_averaged.__doc__ = (train_dfa_class_averaged.__doc__ or "") + _LOOP_DOC.format(
    one_hot="; one-hot rows: samples are grouped by argmax",
    counted=" on the samples, before averaging (argmax over the class axis)",
)


# The report author's public code names its loops differently and uses other defaults (lr 1e-3,
# tol 0.1; its averaged loops draw B with torch.randn, std 1, where its basic loop uses std 1.9).
# These aliases keep its names, signatures and defaults so a script written for it runs unchanged;
# batches and B come from a seeded generator (seed 0) rather than torch's global one.


def train_basic(
    model: DynamicModel,
    x: TensorLike,
    y: TensorLike,
    n_epochs: int = 10,
    lr: float = 1e-3,
    batch_size: int = 200,
    tol: Optional[float] = 1e-1,
    error_function: ErrorFunction = mnist_error,
) -> LoopResult:
    """The author's ``train_basic``: ``train_dfa`` with its defaults (lr 1e-3, tol 0.1, B ~ N(0, 1.9^2)).

    Returns (te, loss) as ``train_dfa``.
    """
    return train_dfa(model, x, y, n_epochs, lr, batch_size, tol, error_function)


def train_averaged(
    model: DynamicModel,
    x: TensorLike,
    y: TensorLike,
    n_epochs: int = 10,
    lr: float = 1e-3,
    batch_size: int = 200,
    tol: Optional[float] = 1e-1,
) -> LoopResult:
    """The author's ``train_averaged``: ``train_dfa_batch_averaged`` with its defaults (lr 1e-3,
    tol 0.1) and its feedback draw, B ~ N(0, 1) (``torch.randn``). Returns (te, loss)."""
    return _run_dfa_loop(
        _batch_mean,
        model,
        x,
        y,
        n_epochs,
        lr,
        batch_size,
        tol,
        mnist_error,
        None,
        seed=0,
        feedback=None,
        return_feedback=False,
        verbose=False,
        feedback_std=1.0,
    )


def MNIST_train_class_averaged(  # noqa: N802
    model: DynamicModel,
    x: TensorLike,
    y: TensorLike,
    n_epochs: int = 10,
    lr: float = 1e-3,
    batch_size: int = 200,
    tol: Optional[float] = 1e-1,
    classes: int = 10,
) -> LoopResult:
    """The author's ``MNIST_train_class_averaged``: ``train_dfa_class_averaged`` with its defaults
    (lr 1e-3, tol 0.1) and its feedback draw, B ~ N(0, 1). ``classes`` must equal the model's
    number of outputs (the author loops over that many classes; classes absent from a batch are
    skipped in both). Returns (te, loss)."""
    n_out = model.layer_sizes[-1] if isinstance(model, DynamicModel) else None
    if not _is_int(classes) or classes != n_out:
        raise ValueError(f"classes must equal the model's number of outputs ({n_out}), got {classes!r}")
    return _run_dfa_loop(
        _class_mean,
        model,
        x,
        y,
        n_epochs,
        lr,
        batch_size,
        tol,
        mnist_error,
        None,
        seed=0,
        feedback=None,
        return_feedback=False,
        verbose=False,
        feedback_std=1.0,
    )


def train_backprop(
    model: DynamicModel,
    x: TensorLike,
    y: TensorLike,
    n_epochs: int = 10,
    lr: float = 1e-4,
    batch_size: int = 200,
    tol: Optional[float] = None,
    error_function: ErrorFunction = mnist_error,
    *,
    seed: int = 0,
    verbose: bool = False,
) -> Tuple[List[float], List[float]]:
    """Backprop twin of ``train_dfa`` for comparison, with the same batches and bookkeeping.

    The update is plain SGD on the binary cross-entropy summed over the batch and the
    outputs, W -= lr * dLoss/dW, so its output-layer error is the same y_hat - y as DFA's
    (with a sigmoid output) and the same ``lr`` means the same step size.

    Args:
      model, x, y, n_epochs, lr, batch_size, tol, error_function, verbose: as ``train_dfa``.
      seed: seeds the ``torch.Generator`` that draws one permutation of the samples per
        epoch (the same batches as ``train_dfa`` with ``feedback`` given).

    Returns:
      (te, loss) as ``train_dfa``.

    Raises:
      ValueError, TypeError: as ``train_dfa``.
    """
    x_t, y_t = _check_loop_args(model, x, y, n_epochs, lr, batch_size, tol, error_function, None, seed)
    generator = torch.Generator().manual_seed(seed)
    n = x_t.shape[0]
    te: List[float] = []
    losses: List[float] = []
    params: List[Tensor] = list(model.parameters())
    for _ in range(n_epochs):
        perm = torch.randperm(n, generator=generator).to(x_t.device)
        train_error, epoch_loss = 0, 0.0
        for start in range(0, n, batch_size):
            idx = perm[start : start + batch_size]
            batch_x, batch_y = x_t[idx], y_t[idx]
            y_hat = model(batch_x)
            with torch.no_grad():
                _, train_error = error_function(y_hat, batch_y, train_error)
                epoch_loss += F.binary_cross_entropy(y_hat, batch_y).item()
            grads = torch.autograd.grad(F.binary_cross_entropy(y_hat, batch_y, reduction="sum"), params)
            with torch.no_grad():
                for p, g in zip(params, grads):
                    p -= lr * g
        if _finish_epoch(te, losses, train_error, epoch_loss, n, tol, verbose):
            break
    return te, losses


__all__ = [
    "DynamicModel",
    "FEEDBACK_STD",
    "MNIST_train_class_averaged",
    "load_params",
    "mnist_error",
    "model_from_params",
    "model_from_spec",
    "params_from_model",
    "train_averaged",
    "train_backprop",
    "train_basic",
    "train_dfa",
    "train_dfa_batch_averaged",
    "train_dfa_class_averaged",
]
