"""Many networks at once: ``fit_many`` trains M members (seeds, feedback draws, optimizers) together.

DFA results are reported as mean +- std over seeds and feedback draws; ``fit_many`` trains
those members in one program instead of M runs of ``fit``. Each member's ``History``
equals the one ``fit(backend, spec, x, y, **fit_kwargs, **member)`` returns (float64:
same losses, params and angles to rounding, same error counts). Imports neither torch
nor JAX: the backend's ``train_epoch_many`` / ``predict_labels_many`` do the arithmetic.

    from dfa_core import MLPSpec, OptimizerSpec
    from dfa_train import fit_many
    histories = fit_many("jax", MLPSpec((784, 200, 10)), x, y, epochs=10,
                         members=[{"seed": s, "feedback_seed": 100 + s} for s in range(8)])
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import numbers
import os
import time
from types import ModuleType
from typing import Any, Callable, Dict, List, Mapping, NamedTuple, Optional, Sequence, Tuple, Union

import numpy as np
import numpy.typing as npt

from dfa_core import hardware, validation
from dfa_core.backend import RuleState
from dfa_core.init import init_feedback, init_params
from dfa_core.model import NetSpec
from dfa_core.registry import resolve_backend
from dfa_core.rules import check_kp_decay
from dfa_core.spec import OptimizerSpec
from dfa_core.tree import tree_map
from dfa_train import many_checkpoint, memory, schedule
from dfa_train.cadence import CheckpointEvery, checkpoint_due, parse_checkpoint_every
from dfa_train.state import AlignmentRecord, History, opt_state_from_numpy, opt_state_to_numpy
from dfa_train.trainer import (
    _check_data,
    _feedback_options,
    feedback_rule,
    final_confusion,
    fit,
    history_config,
    labels_of,
    projection_config,
)

MEMBER_KEYS = ("seed", "param_seed", "feedback_seed", "feedback_scale", "optimizer")
"""What a member may set for itself; everything else is shared by all members."""

SHARED_OPTIONS = (
    "x_test",
    "y_test",
    "method",
    "mode",
    "optimizer",
    "epochs",
    "batch_size",
    "seed",
    "param_seed",
    "feedback_seed",
    "feedback_dist",
    "feedback_scale",
    "feedback_options",
    "projection",
    "tol",
    "patience",
    "align_every",
    "eval_batch_size",
    "lr_milestones",
    "lr_gamma",
    "kp_decay",
)
"""``fit``'s keyword options that ``fit_many`` takes (with ``fit``'s defaults)."""

REFUSED_OPTIONS = (
    "params",
    "feedback",
    "feedback_transform",
    "resume",
    "on_epoch",
    "on_batch",
    "donate",
    "stop_on_nonfinite",
    "engine",
)
"""``fit``'s options that have no meaning for many members trained in one program."""


class Member(NamedTuple):
    """One member's own settings (the rest is shared)."""

    seed: int  # seeds the NumPy generator of its batch order
    param_seed: int  # init_params(spec, param_seed)
    feedback_seed: int  # init_feedback(spec, feedback_seed, dist, feedback_scale)
    feedback_scale: Optional[float]  # None: the preset's default
    optimizer: OptimizerSpec


def _check_options(spec: NetSpec, fit_kwargs: Mapping[str, Any]) -> Dict[str, Any]:
    """fit's shared options with fit's defaults, checked as fit checks them."""
    refused = sorted(k for k in fit_kwargs if k in REFUSED_OPTIONS)
    if refused:
        raise TypeError(
            f"fit_many does not take {refused}: they make no sense for many members trained in one "
            f"program (give per-member seeds in members instead); it takes {list(SHARED_OPTIONS)}"
        )
    unknown = sorted(k for k in fit_kwargs if k not in SHARED_OPTIONS)
    if unknown:
        raise TypeError(f"fit_many got unexpected keyword arguments {unknown}; it takes {list(SHARED_OPTIONS)}")
    defaults = inspect.signature(fit).parameters
    opts = {k: fit_kwargs.get(k, defaults[k].default) for k in SHARED_OPTIONS}
    validation.check_spec(spec)
    rules = validation.method_rules(spec, opts["method"])  # one rule name, or one per block
    validation.check_rules_mode(rules, opts["mode"])
    opts["method"] = validation.method_key(opts["method"])
    opts["projection"] = _check_projection(opts["method"], opts["projection"])
    opts["kp_decay"] = check_kp_decay(opts["kp_decay"])
    for name, minimum in (
        ("epochs", 1),
        ("batch_size", 1),
        ("patience", 1),
        ("align_every", 0),
        ("eval_batch_size", 1),
    ):
        opts[name] = validation.check_int(name, opts[name], minimum)
    tol: Optional[float] = opts["tol"]
    if tol is not None and (isinstance(tol, bool) or not isinstance(tol, numbers.Real) or not tol >= 0):
        raise ValueError(f"tol must be None or a number >= 0, got {tol!r}")
    if (opts["x_test"] is None) != (opts["y_test"] is None):
        raise ValueError("x_test and y_test must be given together (or neither)")
    opts["feedback_options"] = _feedback_options(opts["feedback_options"])
    opts["lr_milestones"], opts["lr_gamma"] = schedule.check_milestones(opts["lr_milestones"], opts["lr_gamma"])
    opts["optimizer"] = OptimizerSpec() if opts["optimizer"] is None else opts["optimizer"]
    if not isinstance(opts["optimizer"], OptimizerSpec):
        raise TypeError(f"optimizer must be a dfa_core.OptimizerSpec, got {type(opts['optimizer']).__name__}")
    return opts


def _check_projection(method: Any, projection: Any) -> Any:
    """fit's active projection (None: exact DFA), 'dfa' only; refuses a plug-in device by name."""
    projection = hardware.active(projection)
    if projection is not None and method != "dfa":
        raise ValueError(
            f"fit_many: projection (hardware effects on DFA's projection e B_l^T) applies to method 'dfa' only, "
            f"got {method!r}"
        )
    if projection is not None and projection.device is not None:
        raise ValueError(
            "fit_many does not take a projection with a plug-in device: the device is a host call outside "
            "the members' one compiled program (and sees one member's error at a time); train each member "
            "with fit(..., projection=...) instead"
        )
    return projection


def _check_members(members, opts: Dict[str, Any]) -> List[Member]:
    """One ``Member`` per entry: the shared value of each key, overridden by the entry's."""
    if isinstance(members, (str, bytes, Mapping)) or not isinstance(members, Sequence):
        raise TypeError(f"members must be a sequence of dicts, got {type(members).__name__}")
    if len(members) == 0:
        raise ValueError("members must hold at least one member (a dict, possibly empty)")
    out = []
    for i, entry in enumerate(members):
        if not isinstance(entry, Mapping):
            raise TypeError(f"members[{i}] must be a dict, got {type(entry).__name__}")
        bad = sorted(str(k) for k in entry if k not in MEMBER_KEYS)
        if bad:
            raise ValueError(f"members[{i}] has keys {bad}; a member may set only {list(MEMBER_KEYS)}")
        m = Member(**{k: entry.get(k, opts[k]) for k in MEMBER_KEYS})
        if m.optimizer is None:  # fit's default, as fit(optimizer=None) reads it
            m = m._replace(optimizer=OptimizerSpec())
        try:
            m = m._replace(seed=validation.check_int("seed", m.seed, 0))
            for name in ("param_seed", "feedback_seed"):
                validation.check_int(name, getattr(m, name), 0)
            if not isinstance(m.optimizer, OptimizerSpec):
                raise TypeError(f"optimizer must be a dfa_core.OptimizerSpec, got {type(m.optimizer).__name__}")
        except (TypeError, ValueError) as err:
            raise type(err)(f"members[{i}]: {err}") from None
        out.append(m)
    return out


def _structure(opt: OptimizerSpec) -> Tuple[str, bool]:
    """What fixes an optimizer's program: its name, and nesterov for 'momentum'."""
    return opt.name, opt.name == "momentum" and opt.nesterov


def _groups(members: Sequence[Member]) -> Dict[Tuple[str, bool], List[int]]:
    """Member indices by optimizer structure, in order of first appearance; each group is one program."""
    groups: Dict[Tuple[str, bool], List[int]] = {}
    for i, m in enumerate(members):
        groups.setdefault(_structure(m.optimizer), []).append(i)
    return groups


def _check_memory(be, spec: NetSpec, opts, groups, n_train: int, n_test: int) -> None:
    """Refuses, before allocating, a run whose largest group would not fit (groups run one after another)."""
    need, worst = 0, ("", 0)  # worst: (optimizer, members) of the largest group
    for (name, _), idx in groups.items():
        est = memory.estimate_memory(
            spec,
            len(idx),
            n_train,
            n_test,
            opts["batch_size"],
            opts["eval_batch_size"],
            name,
            opts["method"],
            bool(opts["align_every"]),
            opts["projection"],
        )
        if est > need:
            need, worst = est, (name, len(idx))
    memory.check_memory(
        be,
        need,
        f"fit_many ({worst[1]} '{worst[0]}' members of {memory.describe(spec)} in "
        f"{spec.dtype}, {n_train} training samples, batch {opts['batch_size']}; train "
        "fewer members per call, a smaller eval_batch_size or batch_size)",
    )


class _Data(NamedTuple):
    """The datasets, checked and put on the backend's device once, shared by all members."""

    x: Any  # (N, n_0) native array
    y: Any  # (N, n_L) native array
    labels: np.ndarray  # (N,) int64 true training labels
    x_test: Any  # (N_test, n_0) native array, or None
    test_labels: Optional[np.ndarray]  # (N_test,) int64, or None


@dataclasses.dataclass
class _Record:
    """One member's history so far (fit's loop state, less what lives on the device)."""

    losses: List[float] = dataclasses.field(default_factory=list)
    errors: List[float] = dataclasses.field(default_factory=list)
    accuracies: List[float] = dataclasses.field(default_factory=list)
    times: List[float] = dataclasses.field(default_factory=list)
    alignment: List[AlignmentRecord] = dataclasses.field(default_factory=list)
    within_tol: int = 0
    stopped_early: bool = False
    active: bool = True  # False once tol stopped it: its params and results freeze
    pred: Optional[np.ndarray] = None  # (N,) train labels after its last epoch
    test_pred: Optional[np.ndarray] = None  # (N_test,)
    params: Any = None  # its final ((W_l, b_l), ...) NumPy arrays
    feedback: Tuple[np.ndarray, ...] = ()  # its final feedback (KP's trained B), NumPy


def _stack(trees: Sequence[Any]) -> Any:
    """M NumPy trees of the same structure -> one tree whose leaves have a leading member axis."""
    return tree_map(lambda *leaves: np.stack(leaves), *trees)


def _record_epoch(
    spec: NetSpec,
    rec: _Record,
    m: int,
    epoch: int,
    step0: int,
    host: Dict[str, np.ndarray],
    opts,
    data: _Data,
    seconds: float,
) -> None:
    """Appends member m's epoch to its record, as fit's loop does, and applies fit's tol rule."""
    n = data.labels.shape[0]
    batch_losses = np.asarray(host["losses"][m], dtype=np.float64)
    if spec.reduction == "mean":
        batch_losses = batch_losses * np.diff(np.append(np.arange(0, n, opts["batch_size"]), n))
    rec.losses.append(float(np.sum(batch_losses) / n))
    rec.times.append(seconds)
    rec.pred = np.asarray(host["pred"][m], dtype=np.int64)
    rec.errors.append(float(np.mean(rec.pred != data.labels)))
    if data.test_labels is not None:
        rec.test_pred = np.asarray(host["test_pred"][m], dtype=np.int64)
        rec.accuracies.append(float(np.mean(rec.test_pred == data.test_labels)))
    if "angles" in host:
        for s in range(batch_losses.shape[0]):
            if (step0 + s) % opts["align_every"] == 0:
                weights, deltas = host["angles"][m, s]
                rec.alignment.append(
                    AlignmentRecord(step0 + s, epoch, tuple(map(float, weights)), tuple(map(float, deltas)))
                )
    if opts["tol"] is not None and epoch >= 1:
        rec.within_tol = rec.within_tol + 1 if abs(rec.errors[-1] - rec.errors[-2]) <= opts["tol"] else 0
        if rec.within_tol >= opts["patience"]:
            rec.stopped_early = epoch + 1 < opts["epochs"]
            rec.active = False


class _GroupCheckpoint(NamedTuple):
    """Where and how often a group writes its checkpoint (``many_checkpoint``)."""

    path: str  # the group's .npz
    digest: str  # ``many_checkpoint.fingerprint`` of the call
    every: CheckpointEvery  # the cadence


def _save_group(be, ckpt: _GroupCheckpoint, epoch: int, done: bool, params, opt_state, rngs, recs) -> None:
    kept = [f.name for f in dataclasses.fields(_Record) if f.name not in ("params", "feedback")]  # set at the end
    records = [{name: getattr(rec, name) for name in kept} for rec in recs]
    saved = many_checkpoint.Saved(
        epoch,
        done,
        be.to_numpy(params),
        opt_state_to_numpy(be, opt_state),
        [rng.bit_generator.state for rng in rngs],
        records,
    )
    many_checkpoint.save(ckpt.path, ckpt.digest, saved)


def _restore_group(be, saved: many_checkpoint.Saved, opt_state, rngs) -> Tuple[Any, Any, List[_Record]]:
    """(params, opt_state, records) of a group's checkpoint; its generators take their saved states."""
    for rng, state in zip(rngs, saved.rng_states):
        rng.bit_generator.state = state
    recs = [_Record(**rec) for rec in saved.records]
    return be.asarray(saved.params), opt_state_from_numpy(be, opt_state, saved.opt_arrays), recs


def _run_group(
    be,
    spec: NetSpec,
    opts,
    members: Sequence[Member],
    feedback_np,
    data: _Data,
    ckpt: Optional[_GroupCheckpoint] = None,
    progress: Optional[Callable[[int, int], None]] = None,
) -> List[_Record]:
    """Trains one group (members of one optimizer structure) as one program; returns their records.

    With ``ckpt``, starts from the group's checkpoint when there is one (a finished group only
    returns its records) and writes it as ``ckpt.every`` says and at the end."""
    name, nesterov = _structure(members[0].optimizer)
    params = be.asarray(_stack([init_params(spec, m.param_seed) for m in members]))
    feedback = be.asarray(_stack(feedback_np))
    hyper = be.stack_hyper([m.optimizer for m in members], spec.dtype)
    opt_state = be.init_opt_state_many(name, nesterov, params, hyper)
    opt_state = _rule_state(be, spec, opts, opt_state, feedback_np, members)
    epoch_fn = be.train_epoch_many(
        spec,
        name,
        nesterov,
        opts["method"],
        opts["mode"],
        opts["batch_size"],
        opts["align_every"],
        opts["projection"],
        opts["kp_decay"],
    )
    predict = be.predict_labels_many(spec, opts["eval_batch_size"])
    rngs = [np.random.default_rng(m.seed) for m in members]
    recs = [_Record() for _ in members]
    first, last_write_s, written_at = 0, 0.0, time.perf_counter()
    saved = many_checkpoint.load(ckpt.path, ckpt.digest) if ckpt is not None else None
    if saved is not None:
        params, opt_state, recs = _restore_group(be, saved, opt_state, rngs)
        first = opts["epochs"] if saved.done else saved.epoch
    n = data.labels.shape[0]
    num_batches = -(-n // opts["batch_size"])
    for epoch in range(first, opts["epochs"]):
        # Each member keeps fit's batch order: one permutation per epoch from its own seed.
        orders = be.asarray(np.stack([rng.permutation(n) for rng in rngs]).astype(np.int32))
        active = np.array([r.active for r in recs])
        step0 = epoch * num_batches
        if opts["lr_milestones"]:  # each member's rate for this epoch (the optimizer state does not hold it)
            at = [schedule.optimizer_at(m.optimizer, epoch, opts["lr_milestones"], opts["lr_gamma"]) for m in members]
            hyper = be.stack_hyper(at, spec.dtype)
        start = time.perf_counter()
        params, opt_state, losses, angles = epoch_fn(
            params, feedback, opt_state, hyper, active, data.x, data.y, orders, step0
        )
        device = {"losses": losses, "pred": predict(params, data.x)}
        if data.x_test is not None:
            device["test_pred"] = predict(params, data.x_test)
        if angles is not None:
            device["angles"] = angles
        # The epoch's one host transfer; it also waits for the epoch and its evaluation.
        host = dict(zip(device, be.to_numpy(tuple(device.values()))))
        seconds = time.perf_counter() - start
        for m, rec in enumerate(recs):
            if rec.active:
                _record_epoch(spec, rec, m, epoch, step0, host, opts, data, seconds)
        if progress is not None:
            progress(epoch + 1, opts["epochs"])
        if not any(r.active for r in recs):
            break
        last = epoch + 1 == opts["epochs"]  # the write after the loop covers the last epoch
        since = time.perf_counter() - written_at
        if ckpt is not None and not last and checkpoint_due(ckpt.every, epoch + 1, since, last_write_s):
            start = time.perf_counter()
            _save_group(be, ckpt, epoch + 1, False, params, opt_state, rngs, recs)
            written_at = time.perf_counter()
            last_write_s = written_at - start
    if ckpt is not None and (saved is None or not saved.done):
        _save_group(be, ckpt, opts["epochs"], True, params, opt_state, rngs, recs)
    params_np = be.to_numpy(params)
    kp_np = be.to_numpy(tuple(getattr(opt_state, "kp_feedback", ())))  # KP's trained B, (M, ...) per block
    for m, rec in enumerate(recs):
        rec.params = tuple(tuple(np.array(t[m]) for t in block) for block in params_np)
        rec.feedback = _final_feedback(kp_np, m, feedback_np[m])
    return recs


def _final_feedback(kp_np: Tuple[np.ndarray, ...], m: int, drawn: Sequence[np.ndarray]) -> Tuple[np.ndarray, ...]:
    """Member m's feedback as fit's History holds it: KP's trained B (kp_np[l][m]) where block l
    trains one, else the matrices drawn at the start."""
    if not kp_np:
        return tuple(np.asarray(f) for f in drawn)
    return tuple(np.array(b[m]) if b[m].size else np.asarray(f) for b, f in zip(kp_np, drawn))


def _rule_state(be, spec: NetSpec, opts, inner, feedback_np, members: Sequence[Member]) -> Any:
    """The members' stacked ``RuleState`` when a rule is 'kp' or 'brsf' or the projection draws noise
    (else ``inner``): per member what ``init_rule_state(spec, method, inner, feedback, seed, projection)``
    builds for fit, rule_seed being the member's seed (as fit's run seed)."""
    rules = validation.method_rules(spec, opts["method"])
    noisy = opts["projection"] is not None and opts["projection"].noise is not None
    if not noisy and not any(r in validation.STATEFUL_RULES for r in rules[:-1]):
        return inner
    kp: Tuple[Any, ...] = ()
    if "kp" in rules[:-1]:  # KP's B starts as the drawn feedback; (M, 0) where a block is not kp
        kp = tuple(
            np.stack([fb[l] for fb in feedback_np]) if r == "kp" else np.zeros((len(members), 0), spec.dtype)
            for l, r in enumerate(rules[:-1])
        )
    seeds = np.array([m.seed for m in members], dtype=np.int32)
    return RuleState(inner, be.asarray(kp), be.asarray(seeds), be.asarray(np.zeros_like(seeds)))


def _history(be, spec: NetSpec, opts, member: Member, rec: _Record, data: _Data) -> History:
    """Member's History, with the config fit(**fit_kwargs, **member) records."""
    confusion, split = final_confusion(spec, data.labels, rec.pred, data.test_labels, rec.test_pred)
    settings = {
        "method": opts["method"],
        "mode": opts["mode"],
        "optimizer": member.optimizer.to_dict(),
        "epochs": opts["epochs"],
        "batch_size": opts["batch_size"],
        "seed": member.seed,
        "param_seed": member.param_seed,
        "feedback_seed": member.feedback_seed,
        "feedback_dist": opts["feedback_dist"],
        "feedback_scale": member.feedback_scale,
        "feedback_options": opts["feedback_options"],
        "tol": opts["tol"],
        "patience": opts["patience"],
        "align_every": opts["align_every"],
    }
    if opts["projection"] is not None:  # as fit records it: only when set
        settings["projection"] = projection_config(opts["projection"])
    if opts["lr_milestones"]:  # likewise
        settings["lr_milestones"], settings["lr_gamma"] = list(opts["lr_milestones"]), opts["lr_gamma"]
    if "kp" in validation.method_rules(spec, opts["method"]):  # likewise: runs without a kp block
        settings["kp_decay"] = opts["kp_decay"]
    config = history_config(be, spec, settings, data.labels.shape[0], data.test_labels)
    return History(
        loss=tuple(rec.losses),
        train_error=tuple(rec.errors),
        test_accuracy=tuple(rec.accuracies),
        time_s=tuple(rec.times),
        confusion=confusion,
        confusion_split=split,
        alignment=tuple(rec.alignment),
        stopped_early=rec.stopped_early,
        config=config,
        params=rec.params,
        feedback=rec.feedback,
    )


def fit_many(
    backend: Union[str, ModuleType],
    spec: NetSpec,
    x_train: npt.ArrayLike,
    y_train: npt.ArrayLike,
    *,
    members: Sequence[Mapping[str, Any]],
    checkpoint_dir: Optional[str] = None,
    checkpoint_every: Union[str, int] = "auto",
    progress: Optional[Callable[[int, int, int, int], None]] = None,
    **fit_kwargs: Any,
) -> Tuple[History, ...]:
    """Trains M members of ``spec`` together; member m's History equals fit's for it alone.

    Members that share an optimizer structure (its name; and nesterov for 'momentum')
    train as one program: on JAX one jitted ``jax.vmap`` over the members of a
    ``lax.scan`` over the epoch's batches (``<backend>.train_epoch_many``), on torch
    one ``torch.func.vmap`` per step; the learning rate, momentum, b1, b2 and eps are
    per-member arrays, so members that differ only in those numbers share it. Groups of
    other structures run one after another. The data live on the device once; each
    member draws its own batch order (``np.random.default_rng(seed).permutation(N)``
    per epoch, as fit); an epoch of a group ends with one host transfer (losses,
    predictions, angles). With ``tol`` a member stops as fit would: its history ends
    and its params freeze at its stop epoch while the others go on.

    Every learning rule fit trains (``method`` in dfa_core.METHODS, or a tuple of one per
    block) and every ``Projection`` but a plug-in device: each member's feedback is drawn for
    the rule as fit draws it; KP's B, brsf's draw counter and projection noise live in a
    stacked ``RuleState`` seeded with each member's ``seed``, as fit seeds it, so brsf's
    magnitudes and the noise are each member's own.

    Args:
      backend: 'torch', 'jax' or a backend module (``dfa_torch``, ``dfa_jax``).
      spec: the network (its dtype is the dtype of every member).
      x_train: inputs, (N, n_0).
      y_train: targets, (N, n_L).
      members: non-empty sequence of dicts; each may set ``seed``, ``param_seed``,
        ``feedback_seed``, ``feedback_scale`` and ``optimizer`` (an OptimizerSpec) for
        itself, over the shared values. ``{}`` is a member with the shared settings.
      checkpoint_dir: a folder for the groups' checkpoints (``many_checkpoint``: one file per
        group, written atomically), or None for none. A call that finds checkpoints there
        from the same settings continues from them (a finished group is not rerun), so a
        crashed call, repeated, resumes; the histories equal an uninterrupted call's.
      checkpoint_every: when a group writes: 'auto' (under 5% of its time), N epochs, or 'Ns'
        seconds (``cadence.parse_checkpoint_every``); always at a group's end.
      progress: called as progress(group, groups, epoch, epochs) after each epoch of a group
        (group 0-based, epoch 1-based: the epochs it has run), or None.
      **fit_kwargs: fit's options shared by all members: x_test, y_test, method, mode,
        optimizer, epochs, batch_size, seed, param_seed, feedback_seed, feedback_dist,
        feedback_scale, feedback_options, projection, tol, patience, align_every,
        eval_batch_size, lr_milestones, lr_gamma, kp_decay (fit's defaults).

    Returns:
      One History per member, in the members' order, each equal to
      ``fit(backend, spec, x_train, y_train, **fit_kwargs, **member)`` except
      ``time_s``: the wall seconds of the member's group's epoch (all its members
      together, evaluation included).

    Raises:
      TypeError: an option fit_many cannot honour (params, feedback, feedback_transform,
        resume, on_epoch, on_batch, donate, stop_on_nonfinite, engine) or an unknown one;
        a member that is not a dict or holds a value of the wrong type.
      ValueError: a member key other than ``MEMBER_KEYS`` (naming the member's index),
        bad options or data as fit raises them, a projection with a plug-in ``device`` (a
        host call, outside the one program: train those members with fit), or an estimated memory
        (``estimate_memory``) above what the device has free (``available_memory``).
      ImportError: the backend's framework is not installed.
    """
    be = resolve_backend(backend)
    opts = _check_options(spec, fit_kwargs)
    member_list = _check_members(members, opts)
    if checkpoint_dir is not None and not isinstance(checkpoint_dir, (str, os.PathLike)):
        raise TypeError(f"checkpoint_dir must be a folder path or None, got {type(checkpoint_dir).__name__}")
    every = parse_checkpoint_every(checkpoint_every)
    x_np, y_np = _check_data(spec, x_train, y_train, opts["mode"], "training")
    test = None
    if opts["x_test"] is not None:
        test = _check_data(spec, opts["x_test"], opts["y_test"], "sample", "test")
    feedback_np = []
    for i, m in enumerate(member_list):
        try:
            feedback_np.append(
                init_feedback(
                    spec,
                    m.feedback_seed,
                    opts["feedback_dist"],
                    m.feedback_scale,
                    method=feedback_rule(opts["method"]),
                    **opts["feedback_options"],
                )
            )
        except (TypeError, ValueError) as err:
            raise type(err)(f"members[{i}]: {err}") from None
    groups = _groups(member_list)
    _check_memory(be, spec, opts, groups, x_np.shape[0], 0 if test is None else test[0].shape[0])
    records: Dict[int, _Record] = {}  # member index -> its record; every group fills its members'
    with be.precision_scope(spec.dtype):
        x_nat, y_nat = be.asarray((x_np, y_np))
        data = _Data(
            x_nat,
            y_nat,
            labels_of(y_np),
            be.asarray(test[0]) if test is not None else None,
            labels_of(test[1]) if test is not None else None,
        )
        digest = many_checkpoint.fingerprint(spec, member_list, opts, x_np.shape[0])
        for g, idx in enumerate(groups.values()):
            ckpt = None
            if checkpoint_dir is not None:
                ckpt = _GroupCheckpoint(many_checkpoint.group_path(os.fspath(checkpoint_dir), g), digest, every)
            group = [member_list[i] for i in idx]
            report = None if progress is None else functools.partial(progress, g, len(groups))
            recs = _run_group(be, spec, opts, group, [feedback_np[i] for i in idx], data, ckpt, report)
            for i, rec in zip(idx, recs):
                records[i] = rec
    return tuple(_history(be, spec, opts, m, records[i], data) for i, m in enumerate(member_list))


__all__ = [
    "MEMBER_KEYS",
    "REFUSED_OPTIONS",
    "SHARED_OPTIONS",
    "Member",
    "fit_many",
]
