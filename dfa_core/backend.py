"""The backend contract, written once: what ``dfa_torch`` and ``dfa_jax`` each provide.

``Backend`` is a ``typing.Protocol`` whose docstrings are the specification; both backend
modules satisfy it name for name and argument for argument. ``BACKEND_API`` is the one
tuple of public names that both backends' ``__all__``, the registry's check and the mirror
test read (a new function is added here first).

Shapes: B batch, K groups (rows after grouping), n_l layer widths, L layers, N samples.
``Params`` is ((W_1 (n_1, n_0), b_1 (n_1,)), ..., (W_L, b_L)); ``Feedback`` is
(B_1 (n_1, n_L), ..., B_{L-1}); both nested tuples of native arrays. Imports NumPy only.
"""

from __future__ import annotations

from typing import Any, Callable, ContextManager, NamedTuple, Optional, Protocol, Sequence, Tuple, runtime_checkable

from dfa_core.spec import MLPSpec, OptimizerSpec

Array = Any  # a torch.Tensor or a jax.Array
Params = Tuple[Tuple[Array, Array], ...]
Feedback = Tuple[Array, ...]
# What the checked entry points (dfa_grads, forward, fit ...) accept: NumPy or native
# arrays, in tuples or lists; they validate and convert before any compute.
ArrayLike = Any  # a NumPy array, a torch.Tensor or a jax.Array
ParamsLike = Sequence[Sequence[ArrayLike]]  # ((W_1, b_1), ..., (W_L, b_L))
FeedbackLike = Sequence[ArrayLike]  # (B_1, ..., B_{L-1})
Tree = Any  # an array or nested tuples/lists of arrays (params, feedback, optimizer state, a batch)

BACKEND_API = (
    # arrays
    "NAME",
    "asarray",
    "to_numpy",
    "precision_scope",
    # the network
    "Activations",
    "forward",
    "forward_with_activations",
    "logits",
    "loss",
    # DFA and BP gradients
    "Grouped",
    "group",
    "feedback_projection",
    "dfa_layer_grads",
    "dfa_grads",
    "dfa_grads_unchecked",
    "dfa_grads_and_loss",
    "bp_grads",
    "bp_grads_unchecked",
    "bp_grads_and_loss",
    # every learning rule, one per block if asked
    "grads",
    # optimizers and compiled training
    "make_optimizer",
    "apply_updates",
    "train_step",
    "init_rule_state",
    "train_epoch",
    "predict_labels",
    # many members in one program (fit_many)
    "Hyper",
    "stack_hyper",
    "init_opt_state_many",
    "train_epoch_many",
    "predict_labels_many",
    "memory_free",
    # models of blocks
    "user_block",
    # several devices
    "data_parallel",
    "layer_parallel",
)
"""Every public name a backend module exports, in the order of ``Backend`` below."""


class RuleState(NamedTuple):
    """The optimizer state of a ``train_step`` whose rules carry state ('kp', 'brsf'); one type for both backends.

    ``init_rule_state`` builds it; ``dfa_train.state.opt_state_to_numpy`` stores its fields as
    ``kp_feedback/i``, ``rule_seed`` and ``rule_step`` next to the inner state's keys.
    """

    inner: Any  # the optimizer's own state, make_optimizer(opt, dtype).init(params)
    kp_feedback: Tuple[Array, ...]  # per hidden block: KP's B (like W_{l+1}), zero-size elsewhere; () without kp
    rule_seed: Array  # shape=(), int32: the seed of brsf's magnitudes
    rule_step: Array  # shape=(), int32: steps taken; brsf's draw at step t uses (seed, t)


@runtime_checkable
class Backend(Protocol):
    """A backend module: the DFA math over one framework's arrays. All functions are pure.

    The ``*_unchecked`` and ``*_and_loss`` functions and compiled steps take arrays of
    ``spec.dtype`` and check nothing (check a dataset once, not every batch); the others
    validate shapes, dtypes and values in Python before any tracing.
    """

    NAME: str  # 'torch' or 'jax'
    Activations: type  # NamedTuple(a, h, y_hat) of a training forward pass
    Grouped: type  # NamedTuple(a, f_a, h, e, count) of a grouped batch

    def asarray(self, tree: Any, device: Optional[str] = None) -> Any:
        """NumPy (or native) arrays in nested tuples -> native arrays, dtypes kept."""

    def to_numpy(self, tree: Any) -> Any:
        """Native arrays in nested tuples -> NumPy arrays, same structure (waits for the device)."""

    def precision_scope(self, dtype: str) -> ContextManager[None]:
        """Context in which arrays of ``dtype`` keep their precision (JAX's x64 switch)."""

    def forward(self, spec: MLPSpec, params: Params, x: Array) -> Array:
        """y_hat = g(a_L), (B, n_L)."""

    def forward_with_activations(self, spec: MLPSpec, params: Params, x: Array) -> Any:
        """Activations(a=(a_1..a_L), h=(h_0..h_{L-1}), y_hat): what a DFA step keeps."""

    def logits(self, spec: MLPSpec, params: Params, x: Array) -> Array:
        """a_L, (B, n_L)."""

    def loss(self, spec: MLPSpec, params: Params, x: Array, y: Array) -> Array:
        """The loss paired with ``spec.output``, reduced by ``spec.reduction``: ()."""

    def group(self, spec: MLPSpec, acts: Any, y: Array, mode: str) -> Any:
        """Grouped(a, f_a, h, e, count): rows G a, f'(G a), G h, G y_hat - G y for ``mode``."""

    def feedback_projection(self, spec: MLPSpec, feedback: Feedback, e: Array) -> Tuple[Array, ...]:
        """(e B_1^T, ..., e B_{L-1}^T), each (K, n_l)."""

    def dfa_layer_grads(self, spec: MLPSpec, grouped: Any, projections: Tuple[Array, ...]) -> Params:
        """delta_l = proj_l * f'(a'_l); gW_l = delta_l^T h'_{l-1}, gb_l = sum delta_l; reduced."""

    def dfa_grads(
        self,
        spec: MLPSpec,
        params: Params,
        feedback: Feedback,
        x: Array,
        y: Array,
        mode: str = "sample",
        check_values: bool = True,
    ) -> Params:
        """The DFA gradients of one batch, checked; the output layer's equal BP's."""

    def dfa_grads_unchecked(
        self, spec: MLPSpec, params: Params, feedback: Feedback, x: Array, y: Array, mode: str
    ) -> Params:
        """``dfa_grads`` without checks."""

    def dfa_grads_and_loss(
        self, spec: MLPSpec, params: Params, feedback: Feedback, x: Array, y: Array, mode: str
    ) -> Tuple[Params, Array]:
        """The fused, memory-lean DFA gradients and the batch's loss (before any update)."""

    def bp_grads(self, spec: MLPSpec, params: Params, x: Array, y: Array, check_values: bool = True) -> Params:
        """Autodiff gradients of ``loss``, checked."""

    def bp_grads_unchecked(self, spec: MLPSpec, params: Params, x: Array, y: Array) -> Params:
        """``bp_grads`` without checks."""

    def bp_grads_and_loss(self, spec: MLPSpec, params: Params, x: Array, y: Array) -> Tuple[Params, Array]:
        """BP gradients and the batch's loss in one pass."""

    def grads(
        self,
        spec: MLPSpec,
        params: Params,
        feedback: Any,
        x: Array,
        y: Array,
        method: Any = "dfa",
        mode: str = "sample",
        key: Any = None,
        check_values: bool = True,
    ) -> Params:
        """The gradients of one batch under any learning rule, or one rule per block; checked.

        A top-down loop over the blocks. Block l computes u_l = prefix_l(h_{l-1}),
        a_l = g_l(theta_l, u_l), h_l = f_l(a_l); e' = G y_hat - G y (G the grouping of ``mode``,
        the identity for 'sample'; e' / K for reduction 'mean'). The output block L always takes
        delta_L = e' (its gradient is backprop's under every rule). For l = L-1, ..., 1 the rule of
        hidden block l gives its teaching signal, with J_{l+1}(M) the vector-Jacobian product of
        h -> g_{l+1}(M, b_{l+1}, prefix_{l+1}(h)) at h_l (for a Dense block delta M, for a Conv2d
        the transposed convolution with kernel M, through the prefix's pools and flatten):

        * bp:   delta_l = J_{l+1}(W_{l+1})[delta_{l+1}] * f'(a_l) (exact backprop; composites too).
        * fa:   delta_l = J_{l+1}(B_l)[delta_{l+1}] * f'(a_l), B_l a fixed random matrix shaped
          like W_{l+1} (Lillicrap et al. 2016; a kernel for a conv block, Nokland 2016).
        * kp:   as fa with a trained B_l: ``train_step`` gives W_{l+1} and B_l the same update plus
          weight decay, W <- W + u - lambda W, B <- B + u - lambda B, so W - B shrinks by
          (1 - lambda) per step (Kolen-Pollack, Akrout et al. 2019).
        * usf:  as fa with B_l = s sign(W_{l+1}), s = sqrt(2 / (fan_in + fan_out)) of W_{l+1}
          (uniform sign-concordant feedback, Liao et al. 2016, scaled as in Sanfiz & Akrout 2021).
        * frsf: as fa with B_l = |R_l| * sign(W_{l+1}), R_l fixed (feedback entry l).
        * brsf: as frsf with |R_l| redrawn every batch, U(0, sqrt(6 / (fan_in + fan_out))) (the
          magnitude of Xavier-uniform, as biotorch draws it; Sanfiz & Akrout 2021), from ``key``.
        * dfa:  delta_l = reshape(e' B_l^T, a_l's shape) * f'(a'_l), B_l (a_size_l, n_L) (Nokland 2016).
        * drtp: delta_l = reshape(y' B_l^T, a_l's shape) * f'(a'_l), y' = G y (/ K for 'mean'): the
          target in place of the error (Frenkel et al. 2021; their sign convention, targets as given).
        * shallow: the block's gradients are zero (only the output block trains).

        Block l's parameter gradients are then the VJP of g_l w.r.t. theta_l at u'_l applied to
        delta_l (exact backprop inside a block). Grouping modes belong to dfa and drtp; every other
        rule needs mode 'sample'. ``method`` may be a sequence of L names (one per block; the output
        block's entry is only a label: it always trains from e'); a chain rule (bp, fa, kp, usf, brsf,
        frsf) below a 'shallow' block, or fa/kp/usf/brsf/frsf below a composite, raises.

        Args:
          spec: the network (MLPSpec or ModelSpec).
          params: per block (W, b) or a composite's leaves, spec.dtype.
          feedback: one entry per hidden block l = 1..L-1: B_l (a_size_l, n_L) for dfa/drtp; a
            matrix (or kernel) shaped like W_{l+1} for fa/kp, the magnitudes |R_l| for frsf (and,
            optionally, this batch's |R_l| for brsf, which then ignores ``key``); a zero-size array
            where the rule needs nothing. () when no block's rule needs feedback.
          x: inputs, (batch, n_0) or (batch, *input_shape).
          y: targets, (batch, n_L); one-hot for 'class_mean' and for drtp.
          method: a name in dfa_core.METHODS, or a sequence of L names.
          mode: 'sample', 'batch_mean' or 'class_mean' (the last two for dfa/drtp only).
          key: brsf's randomness: an int seed, or a native key (a jax.random key; a
            torch.Generator on the params' device); needed when brsf draws its magnitudes.
          check_values: reject non-finite x, y, params or feedback (and non-one-hot y for 'class_mean').

        Returns:
          Per block the gradients of its params, shaped like params.
        """

    def make_optimizer(self, opt: OptimizerSpec, dtype: str = "float32") -> Any:
        """(init, update) with optax's semantics: update returns updates already scaled by -lr."""

    def apply_updates(self, params: Params, updates: Params) -> Params:
        """params + updates, leaf by leaf (a new tuple)."""

    def train_step(
        self,
        spec: MLPSpec,
        opt: OptimizerSpec,
        method: str = "dfa",
        mode: str = "sample",
        donate: bool = False,
        with_alignment: bool = False,
        kp_decay: float = 1e-4,
        projection: Any = None,
    ) -> Callable:
        """step(params, feedback, opt_state, x, y) -> (params, opt_state, loss[, angles]), compiled once.

        ``method``: any name in dfa_core.METHODS or a tuple of L names (see ``grads``). For 'kp'
        and 'brsf' the opt_state is ``RuleState`` (``init_rule_state``): KP's B is trained state
        there (the ``feedback`` argument's kp entries are ignored) and checkpointed with it.
        ``kp_decay`` is KP's weight decay lambda per step (>= 0, on W_{l+1} and B_l of kp blocks
        only; Akrout et al. 2019). ``with_alignment`` is for 'dfa' and 'bp'. ``projection`` (a
        ``dfa_core.hardware.Projection``, method 'dfa' only) quantises and perturbs the projection
        e' B_l^T; with noise the opt_state is a ``RuleState`` and step t draws from (seed, t).
        """

    def init_rule_state(
        self, spec: MLPSpec, method: Any, opt_state: Any, feedback: Any, seed: int = 0, projection: Any = None
    ) -> Any:
        """The ``opt_state`` a ``train_step`` of ``method`` takes: ``RuleState`` when a rule carries state.

        For 'kp' (anywhere in ``method``) the state holds KP's B_l, copied from ``feedback``'s
        entries of the kp blocks; for 'brsf' the seed of the per-batch magnitudes (step t draws
        from (seed, t)), and likewise for a ``projection`` with noise. Other methods get
        ``opt_state`` back unchanged.
        """

    def train_epoch(
        self,
        spec: MLPSpec,
        opt: OptimizerSpec,
        method: str = "dfa",
        mode: str = "sample",
        batch_size: int = 200,
        donate: bool = False,
        align_every: int = 0,
        projection: Any = None,
        parallel: Any = None,
        kp_decay: float = 1e-4,
    ) -> Callable:
        """epoch(params, feedback, opt_state, x, y, order, step0) -> (params, opt_state, losses, angles).

        One whole epoch over the device-resident set x (N, n_0), y (N, n_L) in the batches
        order[i B:(i+1) B] (the last one ragged, exact); losses (num_batches,), each batch's
        loss before its update; angles (num_batches, 2, L) on steps (step0 + i) %
        align_every == 0, or None when align_every is 0.
        """

    def predict_labels(self, spec: MLPSpec, batch_size: int = 10000) -> Callable:
        """predict(params, x) -> (N,) labels: argmax of y_hat, or y_hat > 0.5 with one output."""

    Hyper: type  # NamedTuple of per-member optimizer numbers (learning_rate, momentum, b1, b2, eps), each (M,)

    def stack_hyper(self, opts: Tuple[OptimizerSpec, ...], dtype: str = "float32") -> Any:
        """The members' optimizer numbers as a ``Hyper`` of (M,) arrays."""

    def init_opt_state_many(self, optimizer: str, nesterov: bool, params: Params, hyper: Any) -> Any:
        """The stacked optimizer state of M members (params with a leading member axis)."""

    def train_epoch_many(
        self,
        spec: MLPSpec,
        optimizer: str = "sgd",
        nesterov: bool = False,
        method: Any = "dfa",
        mode: str = "sample",
        batch_size: int = 200,
        align_every: int = 0,
        projection: Any = None,
        kp_decay: float = 1e-4,
    ) -> Callable:
        """epoch(params, feedback, opt_state, hyper, active, x, y, orders, step0) for M members at once.

        ``train_epoch`` per member (orders (M, N), one permutation each), all in one program;
        inactive members compute but stay frozen. Every rule, ``projection`` (not a plug-in device:
        it runs on the host) and ``kp_decay`` as ``train_epoch``; each member's RuleState draws as
        its single run would. Returns (params, opt_state, losses (M, S), angles (M, S, 2, L) or None).
        """

    def predict_labels_many(self, spec: MLPSpec, batch_size: int = 10000) -> Callable:
        """predict(params, x) -> (M, N) labels of M stacked members."""

    def memory_free(self) -> Optional[Tuple[int, str]]:
        """(bytes free, where) on the backend's device as the framework reports it; None on CPU."""

    def user_block(self, fn: Any, out_activation: Optional[str] = None) -> Any:
        """A ``dfa_core.model.UserBlock`` for a ModelSpec's layers: one block, one feedback point.

        torch: ``fn`` is any ``torch.nn.Module`` (run through ``torch.func.functional_call``);
        JAX: a pure ``(init, apply)`` pair. Cross-backend parity is not expected for user blocks.
        """

    def data_parallel(self, devices: Any = None) -> Any:
        """The data-parallel setup for ``train_step`` / ``train_epoch``'s ``parallel`` keyword, or None
        on one device (``dfa_core.parallel``). JAX: a mesh of ``devices`` devices in this process;
        torch: this process's place in a torchrun launch (one process per device)."""

    def layer_parallel(
        self,
        spec: MLPSpec,
        opt: OptimizerSpec,
        devices: Any = None,
        microbatches: int = 1,
        mode: str = "sample",
        method: str = "dfa",
    ) -> Any:
        """Layer-parallel DFA: blocks cut into contiguous stages, stage s on device s; ``place``,
        ``step`` (one global batch, micro-batches pipelined) and ``gather``; equals the one-device step."""
