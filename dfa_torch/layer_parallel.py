"""Layer-parallel DFA (torch): contiguous groups of blocks on different processes, all updated at once.

Once the output error e is known, every DFA block's update is local: delta_l = (e B_l^T) * f'(a_l)
needs nothing from the blocks above. So the blocks 1..L are cut into stages
(``dfa_core.parallel.stage_plan``), one per ``torch.distributed`` rank; rank s keeps only its
blocks' params, its B_l and their optimizer state, and a step runs:

1. forward: the global batch is cut into ``microbatches`` micro-batches; each flows rank to
   rank (``dist.isend`` / ``dist.recv`` of u, the next block's input after its pools and
   flatten; shapes known from the spec). Sends do not wait, so rank 0 starts micro-batch m + 1
   while rank 1 runs m (a pipeline with no backward pass); every forward runs before any update;
2. error: the last rank forms e (micro-batch x n_L) and broadcasts it;
3. updates: each rank forms its own blocks' DFA gradients from what it kept, sums them over the
   micro-batches, and applies its optimizer to its own leaves.

The result equals the one-device ``train_step(spec, opt, 'dfa', mode)`` on the whole global batch
(float64 to rounding). 'sample' mode sums the micro-batches' gradients ('mean' divides by the
global batch). 'batch_mean' and 'class_mean' are exact too: each rank sums its u_l and a_l per
group over the micro-batches (the last rank also y_hat and y), then the grouped e' is broadcast
once and each rank makes one grouped update. Method 'dfa' only: every other rule carries a signal
down from block l + 1 to block l (a backward chain), which is what this layout removes.

Every rank passes the same global batch to ``step`` (rank 0 reads x; the last rank, and every rank
in 'class_mean', read y). The JAX twin is ``dfa_jax.layer_parallel`` (one process, many devices).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, List, NamedTuple, Optional, Sequence, Tuple, Union

import torch
import torch.distributed as dist
import torch.nn.functional as F

from dfa_core import validation
from dfa_core.model import ModelSpec, NetSpec
from dfa_core.parallel import check_layer_method, map_state, stage_plan
from dfa_core.rules import as_model
from dfa_core.spec import OptimizerSpec
from dfa_torch import blocks, nn
from dfa_torch.arrays import as_input, torch_dtype
from dfa_torch.optim import apply_updates, make_optimizer

Tensor = torch.Tensor
Params = Tuple[Tuple[Tensor, ...], ...]
Feedback = Tuple[Tensor, ...]


class Stage(NamedTuple):
    """One stage's part of the training state, on this rank's device."""

    params: Params  # its blocks' params, in block order
    feedback: Feedback  # B_l (a_size_l, n_L) of its hidden blocks (block L has none)
    opt_state: Any  # the optimizer state of ``params`` (the one-device state's part for these leaves)


# -- one stage's computations (no autograd graph) ---------------------------------------------------------


def _stage_forward(model: ModelSpec, idx: Tuple[int, ...], params: Params, h: Tensor) -> Tuple[Tensor, Tuple[Any, ...]]:
    """The stage's input through its blocks -> (what goes to the next stage, or a_L; per block (u, a, h)).

    The input is x on stage 0 and u of the stage's first block elsewhere: a stage applies the next
    stage's first prefix (pools, flatten) before sending, so a pool shrinks what crosses the
    boundary. The last stage returns the logits a_L; h is None for block L.
    """
    f = nn.activation(model.activation).fn
    acts = blocks._block_activations(model)
    chain = blocks._blocks(model)
    kept = []
    out = h
    for i, l in enumerate(idx):
        u = out if i == 0 and l > 0 else blocks._apply_prefix_forward_only(chain[l].prefix, out)
        a = blocks._apply_block(chain[l], params[i], u, f)
        out = a if l == len(chain) - 1 else acts[l].fn(a)
        kept.append((u, a, None if l == len(chain) - 1 else out))
    if idx[-1] < len(chain) - 1:
        out = blocks._apply_prefix_forward_only(chain[idx[-1] + 1].prefix, out)
    return out, tuple(kept)


def _stage_grads(
    model: ModelSpec,
    idx: Tuple[int, ...],
    params: Params,
    feedback: Feedback,
    kept: Tuple[Any, ...],
    e: Tensor,
    grouped: bool,
) -> Tuple[Tuple[Tensor, ...], ...]:
    """The stage's blocks' DFA gradients from the error e (K, n_L) and what the stage kept.

    ``kept`` per block: (u_l, h_l) in 'sample' mode (h = f(a) determines f', as in
    ``dfa_torch.blocks.dfa_signals``), the grouped (u'_l, a'_l) otherwise; (u_L,) for block L.
    """
    f = nn.activation(model.activation).fn
    acts = blocks._block_activations(model)
    chain = blocks._blocks(model)
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
    if acc is None:
        return new
    if isinstance(new, (tuple, list)):
        return tuple(_add(a, n) for a, n in zip(acc, new))
    return acc + new


def _group_sum(members_BxK: Tensor, t: Tensor) -> Tensor:
    """sum over the samples of each group: members^T t, (K, *t.shape[1:])."""
    return torch.tensordot(members_BxK.T, t, dims=1)


def _divide_rows(t: Tensor, count_K: Tensor) -> Tensor:
    """t (K, ...) / max(count_K, 1) row by row (an absent class's zero row stays zero)."""
    return t / torch.clamp_min(count_K, 1).reshape(-1, *([1] * (t.dim() - 1)))


def _loss_sum(model: ModelSpec, z: Tensor, y: Tensor) -> Tensor:
    return torch.sum(nn.per_sample_loss(model.output, z, y))


def _grouped_forward(
    model: ModelSpec, idx: Tuple[int, ...], params: Params, h: Tensor, members: Tensor, y: Optional[Tensor], sums: Any
) -> Tuple[Tensor, Tuple[Any, ...]]:
    """The averaged modes' forward: group sums of u_l and a_l (u_L), the group sizes, and on the last
    stage those of y_hat and y and the loss, added to ``sums`` (None for the first micro-batch)."""
    out, kept = _stage_forward(model, idx, params, h)
    new: List[Any] = [tuple(_group_sum(members, t) for t in ((u,) if h_l is None else (u, a))) for u, a, h_l in kept]
    new.append(torch.sum(members, dim=0))
    if y is not None:
        new.extend((_group_sum(members, nn.output_function(model.output)(out)), _group_sum(members, y)))
        new.append(_loss_sum(model, out, y))
    return out, _add(sums, tuple(new))


def _grouped_kept(idx: Tuple[int, ...], sums: Tuple[Any, ...]) -> Tuple[Any, ...]:
    count = sums[len(idx)]
    return tuple(tuple(_divide_rows(t, count) for t in block) for block in sums[: len(idx)])


def _grouped_error(model: ModelSpec, idx: Tuple[int, ...], sums: Tuple[Any, ...]) -> Tuple[Tensor, Tensor]:
    """The last stage's e' = G y_hat - G y (/ K for 'mean') and the loss sum, from the group sums."""
    count = sums[len(idx)]
    y_hat, y = (_divide_rows(t, count) for t in sums[len(idx) + 1 : len(idx) + 3])
    e = y_hat - y
    if model.reduction == "mean":
        e = e / torch.sum(count > 0).to(y.dtype)
    return e, sums[-1]


# -- the optimizer state, cut per stage -----------------------------------------------------------------


def _layout(tree: Any) -> Any:
    """A tree's structure and leaf shapes, to compare two optimizer states."""
    if isinstance(tree, (tuple, list)):
        return (type(tree).__name__, tuple(_layout(t) for t in tree))
    return tuple(getattr(tree, "shape", ()))


# -- the engine ---------------------------------------------------------------------------------------


def _world(devices: Union[None, int, Sequence[Any]]) -> int:
    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError(
            "layer parallel on torch runs one stage per process: start the processes with torchrun and "
            "call torch.distributed.init_process_group first (gloo on CPU, nccl on CUDA)"
        )
    world = dist.get_world_size()
    if devices is None:
        return world
    if isinstance(devices, bool) or not isinstance(devices, int):
        raise TypeError(
            f"devices on torch is the number of processes (the torch.distributed world size), got {devices!r}"
        )
    if devices != world:
        raise ValueError(
            f"devices={devices}, but the process group has {world} process(es): torch's layer parallel "
            "runs one stage per process (launch torchrun --nproc-per-node N)"
        )
    return world


def _device() -> torch.device:
    """This rank's device: its CUDA device under NCCL, the CPU under gloo."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


@dataclasses.dataclass(frozen=True)
class LayerParallel:
    """Layer-parallel DFA training of ``spec`` over ``size`` processes (build with ``layer_parallel``)."""

    spec: NetSpec  # the network, as given (an MLPSpec runs as the ModelSpec of its Dense layers)
    opt: OptimizerSpec  # the optimizer, applied per stage to the stage's leaves
    device: torch.device  # where this rank's tensors live
    microbatches: int  # micro-batches per global batch (the pipeline's depth)
    mode: str  # 'sample', 'batch_mean' or 'class_mean'
    plan: Tuple[Tuple[int, ...], ...]  # stage_plan(L, size): the blocks (0-based) of each stage
    rank: int  # this process's stage

    @property
    def size(self) -> int:
        """Stages (processes)."""
        return len(self.plan)

    def _model(self) -> ModelSpec:
        return as_model(self.spec)

    def place(self, params: Any, feedback: Any, opt_state: Any) -> Tuple[Optional[Stage], ...]:
        """Keeps this rank's stage of the one-device state (every rank passes the whole state).

        Args:
          params: per block (W_l, b_l) or a composite's leaves, NumPy arrays or tensors of spec.dtype.
          feedback: (B_1, ..., B_{L-1}), B_l (a_size_l, n_L).
          opt_state: ``make_optimizer(opt, spec.dtype).init(params)``.

        Returns:
          ``size`` entries: this rank's ``Stage`` at index ``rank``, None for the stages other ranks hold.

        Raises:
          ValueError, TypeError: params, feedback or opt_state not shaped for spec and opt.
        """
        spec = self.spec
        validation.check_params(spec, params)
        validation.check_feedback(spec, feedback)
        params = tuple(tuple(as_input(t, spec.dtype, self.device) for t in block) for block in params)
        feedback = tuple(as_input(b, spec.dtype, self.device) for b in feedback)
        expected = _layout(make_optimizer(self.opt, spec.dtype).init(params))
        if _layout(opt_state) != expected:
            raise ValueError(
                f"opt_state must be make_optimizer(opt, spec.dtype).init(params) for opt={self.opt}: "
                f"expected the layout {expected}, got {_layout(opt_state)}"
            )
        idx = self.plan[self.rank]
        lo, hi = idx[0], idx[-1] + 1

        def put(t: Any) -> Any:
            return t.detach().to(self.device).clone() if isinstance(t, torch.Tensor) else t

        state = map_state(
            [opt_state],
            [params],
            lambda ns: tuple(tuple(put(t) for t in b) for b in ns[0][lo:hi]),
            lambda ls: put(ls[0]),
        )
        own = Stage(params[lo:hi], feedback[lo : min(hi, spec.num_hidden)], state)
        return tuple(own if s == self.rank else None for s in range(self.size))

    def gather(self, staged: Tuple[Optional[Stage], ...]) -> Tuple[Params, Any]:
        """The full params and optimizer state on every rank, as the one-device step keeps them.

        A collective: every rank calls it (each stage's leaves are broadcast from their rank).
        """
        own = self._own(staged)
        model = self._model()
        dtype = torch_dtype(model.dtype)
        shapes = model.param_shapes

        def everyone(part: Sequence[Sequence[Tensor]]) -> Params:
            blocks_ = []
            for s, idx in enumerate(self.plan):
                for i, l in enumerate(idx):
                    leaves = []
                    for j, shape in enumerate(shapes[l]):
                        t = (
                            part[i][j].clone()
                            if s == self.rank
                            else torch.empty(shape, dtype=dtype, device=self.device)
                        )
                        dist.broadcast(t, src=s)
                        leaves.append(t)
                    blocks_.append(tuple(leaves))
            return tuple(blocks_)

        params = everyone(own.params)
        state = map_state([own.opt_state], [own.params], lambda ns: everyone(ns[0]), lambda ls: ls[0])
        return params, state

    @torch.no_grad()
    def step(self, staged: Tuple[Optional[Stage], ...], x: Any, y: Any) -> Tuple[Tuple[Optional[Stage], ...], Tensor]:
        """One training step on the global batch x, y (a collective: every rank calls it with the same batch).

        Args:
          staged: ``place``'s (or the previous step's) stages.
          x: the global batch's inputs, (batch, n_0) or (batch, *input_shape); batch divisible by
            ``microbatches``.
          y: its targets, (batch, n_L); one-hot rows for 'class_mean'.

        Returns:
          (the stages after the update, the loss of the batch before it (), on every rank).

        Raises:
          ValueError: a batch of the wrong shape, or one the micro-batches do not divide.
        """
        own = self._own(staged)
        batch = validation.check_batch(self.spec, x, y)
        if batch % self.microbatches:
            raise ValueError(
                f"the batch of {batch} samples is not divisible by microbatches={self.microbatches}: "
                "every micro-batch must have the same number of samples"
            )
        model = self._model()
        x, y = as_input(x, model.dtype, self.device), as_input(y, model.dtype, self.device)
        size = batch // self.microbatches
        parts = [slice(m * size, (m + 1) * size) for m in range(self.microbatches)]
        run = self._sample if self.mode == "sample" else self._grouped
        grads, loss_sum = run(own, x, y, parts)
        loss = loss_sum if loss_sum is not None else torch.empty((), dtype=x.dtype, device=self.device)
        dist.broadcast(loss, src=self.size - 1)
        tx = make_optimizer(self.opt, model.dtype)
        updates, opt_state = tx.update(grads, own.opt_state, own.params)
        new = Stage(apply_updates(own.params, updates), own.feedback, opt_state)
        loss = loss / batch if model.reduction == "mean" else loss
        return tuple(new if s == self.rank else None for s in range(self.size)), loss

    def _receive(self, parts: List[slice], x: Tensor) -> Callable[[int], Tensor]:
        """m -> micro-batch m's input to this stage: x's rows on rank 0, received from rank - 1 elsewhere."""
        chain = blocks._blocks(self._model())
        shape = (parts[0].stop - parts[0].start, *chain[self.plan[self.rank][0]].u_shape)

        def receive(m: int) -> Tensor:
            if self.rank == 0:
                return x[parts[m]]
            h = torch.empty(shape, dtype=x.dtype, device=self.device)
            dist.recv(h, src=self.rank - 1)
            return h

        return receive

    def _sample(self, own: Stage, x: Tensor, y: Tensor, parts: List[slice]) -> Tuple[Any, Optional[Tensor]]:
        model, idx, last = self._model(), self.plan[self.rank], self.rank == self.size - 1
        receive = self._receive(parts, x)
        sends: List[Any] = []  # (work, tensor): a sent tensor lives until its send completes
        kept: List[Any] = []
        errors: List[Tensor] = []
        loss: Optional[Tensor] = None
        for m, part in enumerate(parts):  # forward; sends do not wait, so the stages pipeline
            out, k = _stage_forward(model, idx, own.params, receive(m))
            kept.append(tuple((u,) if h_l is None else (u, h_l) for u, _, h_l in k))
            if not last:
                out = out.contiguous()
                sends.append((dist.isend(out, dst=self.rank + 1), out))
                continue
            e = nn.output_function(model.output)(out) - y[part]
            errors.append(e / x.shape[0] if model.reduction == "mean" else e)
            loss = _add(loss, _loss_sum(model, out, y[part]))
        grads = None
        for m, part in enumerate(parts):  # e from the last rank to every rank; each rank's updates are local
            e = (
                errors[m]
                if last
                else torch.empty((part.stop - part.start, model.n_out), dtype=x.dtype, device=self.device)
            )
            dist.broadcast(e, src=self.size - 1)
            grads = _add(grads, _stage_grads(model, idx, own.params, own.feedback, kept[m], e, grouped=False))
            kept[m] = None  # this micro-batch's activations are spent
        for work, _ in sends:
            if work is not None:
                work.wait()
        return grads, loss

    def _grouped(self, own: Stage, x: Tensor, y: Tensor, parts: List[slice]) -> Tuple[Any, Optional[Tensor]]:
        model, idx, last = self._model(), self.plan[self.rank], self.rank == self.size - 1
        if self.mode == "batch_mean":
            members = torch.ones((x.shape[0], 1), dtype=x.dtype, device=self.device)
        else:
            members = F.one_hot(torch.argmax(y, dim=1), y.shape[1]).to(y.dtype)
        receive = self._receive(parts, x)
        sends: List[Any] = []
        sums: Any = None
        for m, part in enumerate(parts):
            out, sums = _grouped_forward(
                model, idx, own.params, receive(m), members[part], y[part] if last else None, sums
            )
            if not last:
                out = out.contiguous()
                sends.append((dist.isend(out, dst=self.rank + 1), out))
        loss = None
        if last:
            e, loss = _grouped_error(model, idx, sums)
        else:
            e = torch.empty((members.shape[1], model.n_out), dtype=x.dtype, device=self.device)
        dist.broadcast(e, src=self.size - 1)
        grads = _stage_grads(model, idx, own.params, own.feedback, _grouped_kept(idx, sums), e, grouped=True)
        for work, _ in sends:
            if work is not None:
                work.wait()
        return grads, loss

    def _own(self, staged: Any) -> Stage:
        if (
            not isinstance(staged, tuple)
            or len(staged) != self.size
            or not isinstance(staged[self.rank], Stage)
            or any(s is not None for r, s in enumerate(staged) if r != self.rank)
        ):
            raise TypeError(
                f"staged must be the {self.size} entries that place() returns on rank {self.rank}, "
                f"got {type(staged).__name__}"
            )
        return staged[self.rank]


def layer_parallel(
    spec: NetSpec,
    opt: OptimizerSpec,
    devices: Union[None, int, Sequence[Any]] = None,
    microbatches: int = 1,
    mode: str = "sample",
    method: str = "dfa",
) -> LayerParallel:
    """Layer-parallel DFA: the blocks cut into contiguous stages, stage s on rank s.

    Args:
      spec: the network (an MLPSpec or a ModelSpec of any blocks).
      opt: the optimizer (sgd, momentum or adam), applied per stage to that stage's leaves.
      devices: the number of processes, which must be the torch.distributed world size, or None
        (the world size); one stage per process, so no more processes than blocks.
      microbatches: micro-batches per global batch; they flow through the stages as a pipeline.
      mode: 'sample', 'batch_mean' or 'class_mean' (both exact, by group sums over the micro-batches).
      method: 'dfa' (the only rule without a backward chain).

    Returns:
      A ``LayerParallel``: ``place``, ``step``, ``gather``, ``plan``, ``size``, ``rank``.

    Raises:
      RuntimeError: no initialized process group.
      ValueError, TypeError: a bad spec, optimizer, mode or micro-batch count, a method other than
        'dfa', devices other than the world size, or more stages than blocks.
    """
    check_layer_method(method)
    validation.check_train_step(spec, opt, method, mode)
    microbatches = validation.check_int("microbatches", microbatches, 1)
    world = _world(devices)
    plan = stage_plan(as_model(spec).num_layers, world)
    return LayerParallel(spec, opt, _device(), microbatches, mode, plan, dist.get_rank())


__all__ = ["LayerParallel", "Stage", "layer_parallel"]
