"""Many networks trained at once (torch): ``torch.func.vmap`` over members of one step.

Mirrors ``dfa_jax.many`` name for name; ``dfa_train.fit_many`` drives it. Every array of
a member (params, feedback, optimizer state, batch order, optimizer hyper-parameters) is
stacked along a leading member axis M, and one member's step is vmapped over that axis,
so each step of M members is one set of batched kernels (the matmuls become ``bmm``).
An epoch is a Python loop over the batches, gathered on the device from the shared
training set; nothing leaves the device until the caller reads the results.

The math is the backend's own: ``train.step_rule(..., vmappable=True)``, the very functions
``train_step`` runs (``dfa_grads_and_loss`` with a ``Projection`` for DFA, ``torch.func.grad`` of
``loss`` for BP, ``rules.grads_and_loss`` for every other rule or a tuple of one per block, KP's B
from the state; the angles of ``with_alignment``). The optimizer update is ``make_optimizer``'s,
in the same order of operations, written with tensor hyper-parameters (per member) instead of
Python floats; KP's shared update is ``train._kp_update``.

``torch.func.vmap`` takes no random op with a Generator, so what a single run draws inside its
step (brsf's magnitudes |R|, projection noise z_l) is drawn outside the vmap, per member and per
step, from that member's own generator exactly as ``train_step`` draws it
(``rules.step_generator`` of its rule_seed and step, the same calls in the same order), and
passed in as the step rule's ``drawn`` (``train.Draws``: brsf's |R| become its feedback entries).
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Optional, Sequence, Tuple

import torch
import torch.func

from dfa_core import hardware, validation
from dfa_core.backend import RuleState
from dfa_core.hardware import Projection
from dfa_core.members import Hyper, check_epoch_many, check_structure, hyper_columns
from dfa_core.model import NetSpec
from dfa_core.rules import KP_DECAY
from dfa_core.spec import OptimizerSpec
from dfa_core.tree import tree_map
from dfa_torch import blocks, rules
from dfa_torch.arrays import torch_dtype
from dfa_torch.mlp import Params, forward
from dfa_torch.optim import AdamState, EmptyState, TraceState
from dfa_torch.train import Draws, StepRule, _kp_update, freeze, step_rule

Tensor = torch.Tensor


def stack_hyper(opts: Sequence[OptimizerSpec], dtype: str = "float32") -> Hyper:
    """The hyper-parameters of ``opts`` (one OptimizerSpec per member) as ``Hyper`` tensors (M,)."""
    device = torch.get_default_device()
    return Hyper(*(torch.as_tensor(column, device=device).to(torch_dtype(dtype)) for column in hyper_columns(opts)))


def _init(optimizer: str, params: Params) -> Any:
    """One member's state, as ``make_optimizer(...).init`` builds it."""
    if optimizer == "sgd":
        return EmptyState()
    if optimizer == "momentum":
        return TraceState(tree_map(torch.zeros_like, params))
    count = torch.zeros((), dtype=torch.int32, device=params[0][0].device)
    return AdamState(count, tree_map(torch.zeros_like, params), tree_map(torch.zeros_like, params))


def _update(optimizer: str, nesterov: bool, hyper: Hyper, grads, state, params):
    """One member's ``make_optimizer(...).update``, hyper-parameters as 0-d tensors: (updates, state).

    Weight decay is always applied (0 * p adds exactly nothing), as on JAX."""
    grads = tree_map(lambda g, p: g + hyper.weight_decay * p, grads, params)
    lr = hyper.learning_rate
    if optimizer == "sgd":
        return tree_map(lambda g: g * -lr, grads), state
    if optimizer == "momentum":
        m = hyper.momentum
        trace = tree_map(lambda g, t: g + t * m, grads, state.trace)
        direction = tree_map(lambda g, t: g + t * m, grads, trace) if nesterov else trace
        return tree_map(lambda d: d * -lr, direction), TraceState(trace)
    b1, b2, eps = hyper.b1, hyper.b2, hyper.eps
    mu = tree_map(lambda g, t: g * (1 - b1) + t * b1, grads, state.mu)
    nu = tree_map(lambda g, t: (g * g) * (1 - b2) + t * b2, grads, state.nu)
    count = state.count + 1
    bc1, bc2 = 1 - b1 ** count.to(b1.dtype), 1 - b2 ** count.to(b2.dtype)
    step = tree_map(lambda m_, v: (m_ / bc1) / (torch.sqrt(v / bc2) + eps) * -lr, mu, nu)
    return step, AdamState(count, mu, nu)


def init_opt_state_many(optimizer: str, nesterov: bool, params: Params, hyper: Hyper) -> Any:
    """Optimizer states of M members: ``make_optimizer(...).init`` with a member axis.

    Args:
      optimizer: 'sgd', 'momentum' or 'adam'.
      nesterov: Nesterov momentum ('momentum' only).
      params: ((W_l, b_l), ...) stacked, W_l (M, n_l, n_{l-1}), b_l (M, n_l).
      hyper: ``stack_hyper`` of the members.

    Returns:
      The ``dfa_torch.optim`` state with a leading member axis on every tensor (Adam's
      count is (M,)).
    """
    optimizer, nesterov = check_structure(optimizer, nesterov)
    del nesterov
    state = _init(optimizer, params)
    if optimizer == "adam":  # the count is per member, as jax.vmap gives it on JAX
        state = state._replace(
            count=torch.zeros(hyper.learning_rate.shape, dtype=torch.int32, device=params[0][0].device)
        )
    return state


def train_epoch_many(
    spec: NetSpec,
    optimizer: str = "sgd",
    nesterov: bool = False,
    method: Any = "dfa",
    mode: str = "sample",
    batch_size: int = 200,
    align_every: int = 0,
    projection: Optional[Projection] = None,
    kp_decay: float = KP_DECAY,
) -> Callable[..., Tuple[Any, Any, Tensor, Optional[Tensor]]]:
    """Builds epoch(params, feedback, opt_state, hyper, active, x, y, orders, step0) for M members.

    The torch twin of ``dfa_jax.many.train_epoch_many`` (cached per argument combination):
    member m runs ``train_step``'s update over the batches
    ``orders[m, i*batch_size:(i+1)*batch_size]`` of the shared ``x``/``y`` (the last
    batch holds the N % batch_size rest), each step one ``torch.func.vmap`` over the
    member axis. A member whose ``active`` is False computes but keeps its params and
    optimizer state (frozen).

    The returned function takes params ((W_l, b_l), ...) with W_l (M, n_l, n_{l-1}),
    b_l (M, n_l); feedback: what ``grads`` takes for ``method``, each entry with a leading
    member axis (dfa/drtp B_l (M, size of a_l, n_L); fa/frsf (M, *W_{l+1}.shape); (M, 0)
    where a block needs nothing; () when no rule needs any; 'bp' ignores DFA's B_l);
    opt_state from ``init_opt_state_many``, wrapped in a ``RuleState`` of (M,)-stacked fields
    (KP's B (M, *W_{l+1}.shape) or (M, 0), rule_seed (M,) int32, rule_step (M,) int32) when a
    rule is 'kp' or 'brsf' or the projection has noise, as ``init_rule_state`` builds it per
    member (rule_seed and rule_step are read on the host once per epoch); hyper ``Hyper``
    (M,); active (M,) bool; x (N, n_0) and y (N, n_L) of spec.dtype (checked once by the
    caller); orders (M, N) integers, one permutation of range(N) per member; step0 the global
    index of the epoch's first step. It returns (params, opt_state, losses (M, S) each batch's
    loss before its update, angles (M, S, 2, L) or None): S = ceil(N / batch_size); rows s
    with (step0 + s) % align_every == 0 hold the angles to BP (weights, deltas) in degrees
    measured before that step's update, other rows NaN; None when align_every == 0.
    The tensors passed in are not modified.

    Args:
      spec: the network.
      optimizer: 'sgd', 'momentum' or 'adam' (the numbers come from ``hyper``).
      nesterov: Nesterov momentum ('momentum' only).
      method: a rule in dfa_core.METHODS or a tuple of one per block (``train_step``'s).
      mode: DFA grouping, one of dfa_core.MODES ('sample' unless every rule is dfa/drtp).
      batch_size: samples per step, >= 1.
      align_every: measure the angles every ``align_every`` global steps (``train_step``'s
        with_alignment angles: the exact DFA direction for 'dfa' and 'bp', the update applied for
        every other rule and a projection, with the step's own draws); 0 never.
      projection: ``train_step``'s hardware effects on DFA's projections (method 'dfa'); the
        noise of each member is drawn outside the vmap from its own generator, as a single run
        draws it. Not with a plug-in ``device``: it is a host call per member, outside the vmap.

      kp_decay: KP's lambda in [0, 1) (``train_step``'s), for kp blocks.

    Raises:
      ValueError, TypeError: bad arguments, before anything runs.
    """
    checked = check_epoch_many(spec, optimizer, nesterov, method, mode, batch_size, align_every, projection, kp_decay)
    return _build_epoch(*checked)


def _draw_many(spec: NetSpec, draws: Draws, mode: str, seeds, steps, rows: int, like: Tensor) -> Tuple[Tensor, ...]:
    """Member m's step draws from ``rules.step_generator`` of (seeds[m], steps[m]), stacked: (M, ...) each.

    The calls are ``train_step``'s, in its order: ``rules.brsf_magnitudes`` per brsf block, top
    block first (the rules' loop), or ``blocks._standard_normal`` of the projection's shapes for a
    batch of ``rows`` samples.
    """
    per_member = []
    for seed, step in zip(seeds, steps):
        gen = rules.step_generator(RuleState(None, (), seed, step), like.device)
        drawn = [rules.brsf_magnitudes(gen, tuple(spec.param_shapes[l + 1][0]), like.dtype) for l in draws.brsf_blocks]
        if draws.noisy:
            drawn.extend(blocks._standard_normal(gen, hardware.projection_shapes(spec, rows, mode), like))
        per_member.append(drawn)
    return tuple(torch.stack(column) for column in zip(*per_member))


def _member_step(spec, optimizer, nesterov, rule: StepRule, kp_decay: float):
    """One member's step(params, feedback, opt_state, hyper, x, y, drawn) -> (params, opt_state, loss)."""

    def step(params, feedback, opt_state, hyper, xb, yb, drawn):
        grads, batch_loss = rule.grads_and_loss(params, feedback, opt_state, xb, yb, drawn)
        inner = opt_state.inner if rule.stateful else opt_state
        updates, inner = _update(optimizer, nesterov, hyper, grads, inner, params)
        updates = freeze(updates, rule.frozen)
        new_params, new_state = tree_map(torch.add, params, updates), inner
        if rule.stateful:  # KP's shared update of W_{l+1} and B_l; the draws' step advances
            new_params, kp = _kp_update(params, updates, new_params, opt_state.kp_feedback, rule.kp_blocks, kp_decay)
            new_state = RuleState(inner, kp, opt_state.rule_seed, opt_state.rule_step + 1)
        return new_params, new_state, batch_loss

    return step


def _keep_active(active: Tensor, new, old):
    """new where a member is active, else old, leaf by leaf over a member axis."""

    def keep(n, o):
        return torch.where(active.view((-1,) + (1,) * (n.dim() - 1)), n, o)

    if isinstance(new, tuple) and hasattr(new, "_fields"):
        return type(new)(*(_keep_active(active, n, o) for n, o in zip(new, old)))
    return tree_map(keep, new, old)


@functools.lru_cache(maxsize=None)
def _build_epoch(spec, optimizer, nesterov, method, mode, batch_size, align_every, projection, kp_decay):
    rule = step_rule(spec, method, mode, projection, vmappable=True)
    draws = rule.draws
    vstep = torch.func.vmap(_member_step(spec, optimizer, nesterov, rule, kp_decay))
    vangles = torch.func.vmap(lambda p, f, s, x, y, d: torch.stack(tuple(rule.angles(p, f, s, x, y, d))))

    @torch.no_grad()
    def epoch(params, feedback, opt_state, hyper, active, x, y, orders, step0=0):
        hardware.check_noise_state(projection, opt_state)
        orders = torch.as_tensor(orders, device=x.device).long()
        active = torch.as_tensor(active, device=x.device).bool()
        p, s, losses, angles = params, opt_state, [], []
        if draws.needed:  # the members' seeds and steps, read once per epoch
            seeds, steps0 = opt_state.rule_seed.tolist(), opt_state.rule_step.tolist()
        for i, start in enumerate(range(0, orders.shape[1], batch_size)):
            idx_MxB = orders[:, start : start + batch_size]
            xb, yb = x[idx_MxB], y[idx_MxB]  # (M, B, n_0), (M, B, n_L)
            drawn: Tuple[Tensor, ...] = ()
            if draws.needed:
                drawn = _draw_many(spec, draws, mode, seeds, [t + i for t in steps0], idx_MxB.shape[1], x)
            if align_every:  # measured on the params before this step's update, with its draws
                if (step0 + i) % align_every == 0:
                    angles.append(vangles(p, feedback, s, xb, yb, drawn))
                else:
                    angles.append(
                        torch.full((orders.shape[0], 2, spec.num_layers), float("nan"), dtype=x.dtype, device=x.device)
                    )
            p, s, batch_loss = vstep(p, feedback, s, hyper, xb, yb, drawn)
            losses.append(batch_loss)
        # A stopped member keeps the params and state it stopped with.
        p, s = _keep_active(active, p, params), _keep_active(active, s, opt_state)
        return p, s, torch.stack(losses, dim=1), torch.stack(angles, dim=1) if align_every else None

    return epoch


def _labels(spec: NetSpec, params: Params, x: Tensor) -> Tensor:
    y_hat = forward(spec, params, x)
    if spec.n_out == 1:
        return (y_hat[:, 0] > 0.5).to(torch.int32)
    return torch.argmax(y_hat, dim=1).to(torch.int32)


def predict_labels_many(spec: NetSpec, batch_size: int = 10000) -> Callable[[Params, Tensor], Tensor]:
    """Builds predict(params, x) -> (M, N) int32 labels of M members.

    The torch twin of ``dfa_jax.many.predict_labels_many``: argmax of the output, or
    y_hat > 0.5 with one output unit (``dfa_train.labels_of``); rows go through the M
    networks (``torch.func.vmap`` over the member axis) ``batch_size`` at a time. params
    are stacked ((W_l (M, n_l, n_{l-1}), b_l (M, n_l)), ...), x (N, n_0) is shared.

    Raises:
      ValueError, TypeError: a bad spec or batch_size.
    """
    validation.check_spec(spec)
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be an int >= 1, got {batch_size!r}")
    return _build_predict(spec, batch_size)


@functools.lru_cache(maxsize=None)
def _build_predict(spec, batch_size):
    labels_M = torch.func.vmap(lambda p, xc: _labels(spec, p, xc), in_dims=(0, None))

    @torch.no_grad()
    def predict(params, x):
        return torch.cat([labels_M(params, x[i : i + batch_size]) for i in range(0, x.shape[0], batch_size)], dim=1)

    return predict


def memory_free() -> Optional[Tuple[int, str]]:
    """(free bytes, device name) of torch's default device when it is a CUDA GPU, else None.

    On the CPU the caller reads the host's free memory instead.
    """
    device = torch.get_default_device()
    if device.type != "cuda":
        return None
    free, _total = torch.cuda.mem_get_info(device)
    return int(free), str(device)


__all__ = [
    "Hyper",
    "init_opt_state_many",
    "memory_free",
    "predict_labels_many",
    "stack_hyper",
    "train_epoch_many",
]
