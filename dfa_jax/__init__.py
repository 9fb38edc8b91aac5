"""JAX backend of the DFA framework: pure functions, jitted once per spec.

Mirrors ``dfa_torch`` name for name; choose it with ``dfa_core.get_backend("jax")``.
"""

from dfa_core.backend import BACKEND_API
from dfa_jax.arrays import NAME, asarray, precision_scope, to_numpy
from dfa_jax.blocks import user_block
from dfa_jax.dfa import (
    TRACE_COUNTS,
    Grouped,
    bp_grads,
    bp_grads_and_loss,
    bp_grads_unchecked,
    dfa_grads,
    dfa_grads_and_loss,
    dfa_grads_unchecked,
    dfa_layer_grads,
    feedback_projection,
    group,
)
from dfa_jax.epoch import predict_labels, train_epoch
from dfa_jax.layer_parallel import layer_parallel
from dfa_jax.many import (
    Hyper,
    init_opt_state_many,
    memory_free,
    predict_labels_many,
    stack_hyper,
    train_epoch_many,
)
from dfa_jax.mlp import Activations, forward, forward_with_activations, logits, loss
from dfa_jax.optim import apply_updates, make_optimizer
from dfa_jax.parallel import data_parallel
from dfa_jax.rules import grads, init_rule_state
from dfa_jax.train import KP_DECAY, METHODS, train_step

# The backend contract's names (dfa_core.backend.BACKEND_API), then this module's extras.
__all__ = [*BACKEND_API, "KP_DECAY", "METHODS", "TRACE_COUNTS"]
