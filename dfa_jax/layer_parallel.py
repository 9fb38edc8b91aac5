"""Layer-parallel DFA (JAX): contiguous groups of blocks on different devices, all updated at once.

Once the output error e is known, every DFA block's update is local: delta_l = (e B_l^T) * f'(a_l)
needs nothing from the blocks above. So the blocks 1..L are cut into stages
(``dfa_core.parallel.stage_plan``), stage s lives on device s with its blocks' params, its B_l
and its optimizer state, and a step runs:

1. forward: the global batch is cut into ``microbatches`` micro-batches; each flows stage to
   stage (``jax.device_put`` to the next stage's device of u, the next block's input after its
   pools and flatten). JAX dispatches asynchronously, so stage 0 starts micro-batch m + 1 while
   stage 1 runs m (a pipeline with no backward pass); every forward is dispatched before any
   update, so a device's in-order queue never waits on e between two forwards;
2. error: the last stage forms e (micro-batch x n_L) and it is sent to every stage;
3. updates: each stage forms its own blocks' DFA gradients from what it kept, sums them over
   the micro-batches, and applies its optimizer to its own leaves.

The result equals the one-device ``train_step(spec, opt, 'dfa', mode)`` on the whole global batch
(float64 to rounding). 'sample' mode sums the micro-batches' gradients ('mean' divides by the
global batch). 'batch_mean' and 'class_mean' are exact too: each stage sums its u_l and a_l per
group over the micro-batches (the last stage also y_hat and y), then the grouped e' is sent once
and each stage makes one grouped update. Method 'dfa' only: every other rule carries a signal
down from block l + 1 to block l (a backward chain), which is what this layout removes.

The torch twin is ``dfa_torch.layer_parallel`` (one process per stage, send/recv and broadcast).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, List, NamedTuple, Sequence, Tuple, Union

import jax
import jax.numpy as jnp

from dfa_core import validation
from dfa_core.model import ModelSpec, NetSpec
from dfa_core.parallel import check_layer_method, map_state, stage_plan
from dfa_core.rules import as_model
from dfa_core.spec import OptimizerSpec
from dfa_jax import blocks, nn
from dfa_jax.arrays import as_input, precision_scope
from dfa_jax.optim import apply_updates, make_optimizer

Array = jax.Array
Params = Tuple[Tuple[Array, ...], ...]
Feedback = Tuple[Array, ...]


class Stage(NamedTuple):
    """One stage's part of the training state, every array on the stage's device."""

    params: Params  # its blocks' params, in block order
    feedback: Feedback  # B_l (a_size_l, n_L) of its hidden blocks (block L has none)
    opt_state: Any  # the optimizer state of ``params`` (the one-device state's part for these leaves)


# -- one stage's programs (pure; jitted per stage and placed by their inputs' device) -----------------


def _stage_forward(model: ModelSpec, idx: Tuple[int, ...], params: Params, h: Array) -> Tuple[Array, Tuple[Any, ...]]:
    """The stage's input through its blocks -> (what goes to the next stage, or a_L; per block (u, a, h)).

    The input is x on stage 0 and u of the stage's first block elsewhere: a stage applies the next
    stage's first prefix (pools, flatten) before sending, so a pool shrinks what crosses the
    boundary. The last stage returns the logits a_L; h is None for block L.
    """
    f = nn.activation(model.activation).fn
    acts = blocks._block_activations(model)
    chain = model.blocks
    kept = []
    out = h
    for i, l in enumerate(idx):
        u = out if i == 0 and l > 0 else blocks._apply_prefix(chain[l].prefix, out)
        a = blocks._apply_block(chain[l], params[i], u, f)
        out = a if l == len(chain) - 1 else acts[l].fn(a)
        kept.append((u, a, None if l == len(chain) - 1 else out))
    if idx[-1] < len(chain) - 1:
        out = blocks._apply_prefix(chain[idx[-1] + 1].prefix, out)
    return out, tuple(kept)


def _stage_grads(
    model: ModelSpec,
    idx: Tuple[int, ...],
    params: Params,
    feedback: Feedback,
    kept: Tuple[Any, ...],
    e: Array,
    grouped: bool,
) -> Tuple[Tuple[Array, ...], ...]:
    """The stage's blocks' DFA gradients from the error e (K, n_L) and what the stage kept.

    ``kept`` per block: (u_l, h_l) in 'sample' mode (h = f(a) determines f', as in
    ``dfa_jax.blocks.dfa_signals``), the grouped (u'_l, a'_l) otherwise; (u_L,) for block L.
    """
    f = nn.activation(model.activation).fn
    acts = blocks._block_activations(model)
    chain = model.blocks
    grads = []
    for i, l in enumerate(idx):
        if l == len(chain) - 1:
            grads.append(blocks._block_vjp(chain[l], params[i], kept[i][0], e, f))
            continue
        u, a_l = kept[i]
        p = (e @ feedback[i].T).reshape(e.shape[0], *chain[l].a_shape)
        fa = acts[l].fn(a_l) if grouped else a_l
        delta = acts[l].backward(p, a_l, fa)
        grads.append(blocks._block_vjp(chain[l], params[i], u, delta, f))
    return tuple(grads)


def _add(acc: Any, new: Any) -> Any:
    return new if acc is None else jax.tree_util.tree_map(jnp.add, acc, new)


def _group_sum(members_BxK: Array, t: Array) -> Array:
    """sum over the samples of each group: members^T t, (K, *t.shape[1:])."""
    return jnp.tensordot(members_BxK.T, t, axes=1)


def _divide_rows(t: Array, count_K: Array) -> Array:
    """t (K, ...) / max(count_K, 1) row by row (an absent class's zero row stays zero)."""
    return t / jnp.maximum(count_K, 1).reshape(-1, *([1] * (t.ndim - 1)))


@functools.lru_cache(maxsize=None)
def _programs(model: ModelSpec, idx: Tuple[int, ...], mode: str, opt: OptimizerSpec, batch: int) -> Any:
    """The jitted programs of one stage (blocks ``idx``) for a global batch of ``batch`` samples."""
    last = idx[-1] == model.num_layers - 1
    tx = make_optimizer(opt, model.dtype)
    mean = model.reduction == "mean"

    def loss_sum(z, y):
        return jnp.sum(nn.per_sample_loss(model.output, z, y))

    def forward(params, h, y):  # 'sample': keep (u, h) per hidden block, u_L; the last stage forms e
        out, kept = _stage_forward(model, idx, params, h)
        kept = tuple((u, h_l) if h_l is not None else (u,) for u, _, h_l in kept)
        if not last:
            return out, kept
        e = nn.output_function(model.output)(out) - y
        return (e / batch if mean else e), loss_sum(out, y), kept

    def forward_grouped(params, h, members, y, sums):  # the averaged modes: group sums of u, a (y_hat, y)
        out, kept = _stage_forward(model, idx, params, h)
        new: List[Any] = [
            tuple(_group_sum(members, t) for t in ((u,) if h_l is None else (u, a))) for u, a, h_l in kept
        ]
        new.append(jnp.sum(members, axis=0))
        if last:
            new.extend((_group_sum(members, nn.output_function(model.output)(out)), _group_sum(members, y)))
            new.append(loss_sum(out, y))
        return out, _add(sums, tuple(new))

    def grads(params, feedback, kept, e, acc):
        return _add(acc, _stage_grads(model, idx, params, feedback, kept, e, grouped=False))

    def grouped_kept(sums):
        count = sums[len(idx)]
        return tuple(tuple(_divide_rows(t, count) for t in block) for block in sums[: len(idx)])

    def grouped_error(sums):  # the last stage: e' = G y_hat - G y, / K for 'mean'
        count = sums[len(idx)]
        y_hat, y = (_divide_rows(t, count) for t in sums[len(idx) + 1 : len(idx) + 3])
        k = jnp.sum(count > 0).astype(y.dtype)
        e = y_hat - y
        return (e / k if mean else e), sums[-1]

    def grouped_grads(params, feedback, sums, e):
        return _stage_grads(model, idx, params, feedback, grouped_kept(sums), e, grouped=True)

    def apply(params, opt_state, grads):
        updates, opt_state = tx.update(grads, opt_state, params)
        return apply_updates(params, updates), opt_state

    return {
        "forward": jax.jit(forward),
        "forward_grouped": jax.jit(forward_grouped),
        "grads": jax.jit(grads),
        "grouped_error": jax.jit(grouped_error),
        "grouped_grads": jax.jit(grouped_grads),
        "apply": jax.jit(apply),
    }


# -- the optimizer state, cut per stage -----------------------------------------------------------------


# -- the engine ---------------------------------------------------------------------------------------


def _devices(devices: Union[None, int, Sequence[Any]]) -> Tuple[Any, ...]:
    available = jax.devices()
    if devices is None:
        return tuple(available)
    if isinstance(devices, int) and not isinstance(devices, bool):
        n = validation.check_int("devices", devices, 1)
        if n > len(available):
            raise ValueError(
                f"devices={n} asked for, but only {len(available)} JAX device(s) exist here "
                "(simulate CPU devices with XLA_FLAGS=--xla_force_host_platform_device_count=N before JAX starts)"
            )
        return tuple(available[:n])
    if isinstance(devices, (str, bytes)) or not isinstance(devices, Sequence) or not devices:
        raise TypeError(f"devices must be None, an int or a non-empty sequence of jax devices, got {devices!r}")
    if not all(isinstance(d, jax.Device) for d in devices):
        raise TypeError(f"devices must hold jax.Device objects (jax.devices()), got {devices!r}")
    if len(set(devices)) != len(devices):
        raise ValueError(f"devices must be distinct, got {devices!r}")
    return tuple(devices)


@dataclasses.dataclass(frozen=True)
class LayerParallel:
    """Layer-parallel DFA training of ``spec`` over ``size`` devices (build with ``layer_parallel``)."""

    spec: NetSpec  # the network, as given (an MLPSpec runs as the ModelSpec of its Dense layers)
    opt: OptimizerSpec  # the optimizer, applied per stage to the stage's leaves
    devices: Tuple[Any, ...]  # stage s runs on devices[s]
    microbatches: int  # micro-batches per global batch (the pipeline's depth)
    mode: str  # 'sample', 'batch_mean' or 'class_mean'
    plan: Tuple[Tuple[int, ...], ...]  # stage_plan(L, size): the blocks (0-based) of each stage

    @property
    def size(self) -> int:
        """Stages (devices)."""
        return len(self.plan)

    @property
    def rank(self) -> int:
        """0: one process drives every device (torch: this process's stage)."""
        return 0

    def _model(self) -> ModelSpec:
        return as_model(self.spec)

    def place(self, params: Any, feedback: Any, opt_state: Any) -> Tuple[Stage, ...]:
        """Cuts the one-device state into stages, each on its device.

        Args:
          params: per block (W_l, b_l) or a composite's leaves, NumPy or JAX arrays of spec.dtype.
          feedback: (B_1, ..., B_{L-1}), B_l (a_size_l, n_L).
          opt_state: ``make_optimizer(opt, spec.dtype).init(params)``.

        Returns:
          One ``Stage`` per device: its blocks' params, B_l and optimizer state.

        Raises:
          ValueError, TypeError: params, feedback or opt_state not shaped for spec and opt.
        """
        spec = self.spec
        validation.check_params(spec, params)
        validation.check_feedback(spec, feedback)
        with precision_scope(spec.dtype):
            params = tuple(tuple(as_input(t, spec.dtype) for t in block) for block in params)
            feedback = tuple(as_input(b, spec.dtype) for b in feedback)
            expected: Any = jax.tree_util.tree_structure(
                jax.eval_shape(make_optimizer(self.opt, spec.dtype).init, params)
            )
            if jax.tree_util.tree_structure(opt_state) != expected:
                raise ValueError(
                    f"opt_state must be make_optimizer(opt, spec.dtype).init(params) for opt={self.opt}: "
                    f"expected the structure {expected}, got {jax.tree_util.tree_structure(opt_state)}"
                )
            stages = []
            for idx, device in zip(self.plan, self.devices):
                lo, hi = idx[0], idx[-1] + 1

                def put(tree: Any, device: Any = device) -> Any:
                    return jax.device_put(tree, device)

                state = map_state([opt_state], [params], lambda ns: put(ns[0][lo:hi]), lambda ls: put(ls[0]))
                stages.append(Stage(put(params[lo:hi]), put(feedback[lo : min(hi, spec.num_hidden)]), state))
            return tuple(stages)

    def gather(self, staged: Tuple[Stage, ...]) -> Tuple[Params, Any]:
        """The full params and optimizer state, as the one-device step keeps them, on devices[0]."""
        self._check_staged(staged)
        with precision_scope(self.spec.dtype):
            params = tuple(block for stage in staged for block in stage.params)
            state = map_state(
                [s.opt_state for s in staged],
                [s.params for s in staged],
                lambda ns: tuple(block for n in ns for block in n),
                lambda ls: ls[0],
            )
            return jax.device_put((params, state), self.devices[0])

    def step(self, staged: Tuple[Stage, ...], x: Any, y: Any) -> Tuple[Tuple[Stage, ...], Array]:
        """One training step on the global batch x, y; returns the new stages and the batch's loss.

        Args:
          staged: ``place``'s (or the previous step's) stages.
          x: the global batch's inputs, (batch, n_0) or (batch, *input_shape); batch divisible by
            ``microbatches``.
          y: its targets, (batch, n_L); one-hot rows for 'class_mean'.

        Returns:
          (the stages after the update, the loss of the batch before it (), on the last device).

        Raises:
          ValueError: a batch of the wrong shape, or one the micro-batches do not divide.
        """
        self._check_staged(staged)
        batch = validation.check_batch(self.spec, x, y)
        if batch % self.microbatches:
            raise ValueError(
                f"the batch of {batch} samples is not divisible by microbatches={self.microbatches}: "
                "every micro-batch must have the same number of samples"
            )
        model = self._model()
        with precision_scope(model.dtype):
            x, y = as_input(x, model.dtype), as_input(y, model.dtype)
            progs = [_programs(model, idx, self.mode, self.opt, batch) for idx in self.plan]
            size = batch // self.microbatches
            parts = [slice(m * size, (m + 1) * size) for m in range(self.microbatches)]
            if self.mode == "sample":
                grads, loss = self._sample(staged, progs, x, y, parts)
            else:
                grads, loss = self._grouped(staged, progs, x, y, parts)
            new = []
            for stage, prog, g in zip(staged, progs, grads):
                params, opt_state = prog["apply"](stage.params, stage.opt_state, g)
                new.append(Stage(params, stage.feedback, opt_state))
            return tuple(new), loss

    def _sample(self, staged, progs, x, y, parts):
        last, devices = self.size - 1, self.devices
        y_last = jax.device_put(y, devices[last])
        kept: List[List[Any]] = [[] for _ in staged]
        errors: List[Array] = []
        loss: Any = None
        for part in parts:  # forward, micro-batch after micro-batch: async dispatch pipelines the stages
            h = x[part]
            for s, (stage, prog) in enumerate(zip(staged, progs)):
                h = jax.device_put(h, devices[s])
                if s < last:
                    h, k = prog["forward"](stage.params, h, None)
                else:
                    e, part_loss, k = prog["forward"](stage.params, h, y_last[part])
                    errors.append(e)
                    loss = part_loss if loss is None else loss + part_loss
                kept[s].append(k)
        grads: List[Any] = [None] * self.size
        for m, e in enumerate(errors):  # e to every stage; each stage's updates are local
            for s, (stage, prog) in enumerate(zip(staged, progs)):
                e_s = jax.device_put(e, devices[s])
                grads[s] = prog["grads"](stage.params, stage.feedback, kept[s][m], e_s, grads[s])
                kept[s][m] = None  # this micro-batch's activations are spent
        return grads, self._reduce_loss(loss, x.shape[0])

    def _grouped(self, staged, progs, x, y, parts):
        devices = self.devices
        if self.mode == "batch_mean":
            members = jnp.ones((x.shape[0], 1), x.dtype)
        else:
            members = jax.nn.one_hot(jnp.argmax(y, axis=1), y.shape[1], dtype=y.dtype)
        sums: List[Any] = [None] * self.size
        for part in parts:
            h = x[part]
            for s, (stage, prog) in enumerate(zip(staged, progs)):
                h = jax.device_put(h, devices[s])
                y_s = jax.device_put(y[part], devices[s]) if s == self.size - 1 else None
                m_s = jax.device_put(members[part], devices[s])
                h, sums[s] = prog["forward_grouped"](stage.params, h, m_s, y_s, sums[s])
        e, loss = progs[-1]["grouped_error"](sums[-1])
        grads = [
            prog["grouped_grads"](stage.params, stage.feedback, sums[s], jax.device_put(e, devices[s]))
            for s, (stage, prog) in enumerate(zip(staged, progs))
        ]
        return grads, self._reduce_loss(loss, x.shape[0])

    def _reduce_loss(self, loss_sum: Array, batch: int) -> Array:
        return loss_sum / batch if self.spec.reduction == "mean" else loss_sum

    def _check_staged(self, staged: Any) -> None:
        if not isinstance(staged, tuple) or len(staged) != self.size or not all(isinstance(s, Stage) for s in staged):
            raise TypeError(
                f"staged must be the {self.size} Stage(s) that place() returns, got {type(staged).__name__}"
            )


def layer_parallel(
    spec: NetSpec,
    opt: OptimizerSpec,
    devices: Union[None, int, Sequence[Any]] = None,
    microbatches: int = 1,
    mode: str = "sample",
    method: str = "dfa",
) -> LayerParallel:
    """Layer-parallel DFA: the blocks cut into contiguous stages, stage s on device s.

    Args:
      spec: the network (an MLPSpec or a ModelSpec of any blocks).
      opt: the optimizer (sgd, momentum or adam), applied per stage to that stage's leaves.
      devices: an int N (the first N of ``jax.devices()``), a sequence of jax devices, or None
        (every device); one stage per device, so no more devices than blocks.
      microbatches: micro-batches per global batch; they flow through the stages as a pipeline.
      mode: 'sample', 'batch_mean' or 'class_mean' (both exact, by group sums over the micro-batches).
      method: 'dfa' (the only rule without a backward chain).

    Returns:
      A ``LayerParallel``: ``place``, ``step``, ``gather``, ``plan``, ``size``.

    Raises:
      ValueError, TypeError: a bad spec, optimizer, mode or micro-batch count, a method other than
        'dfa', more devices than exist, or more stages than blocks.
    """
    check_layer_method(method)
    validation.check_train_step(spec, opt, method, mode)
    microbatches = validation.check_int("microbatches", microbatches, 1)
    chosen = _devices(devices)
    plan = stage_plan(as_model(spec).num_layers, len(chosen))
    return LayerParallel(spec, opt, chosen, microbatches, mode, plan)


__all__ = ["LayerParallel", "Stage", "layer_parallel"]
