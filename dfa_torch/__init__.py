"""PyTorch backend of the DFA framework: pure functions over tensors, no autograd for DFA.

Mirrors ``dfa_jax`` name for name; choose it with ``dfa_core.get_backend("torch")``.
"""

from dfa_core.backend import BACKEND_API
from dfa_torch.arrays import NAME, asarray, precision_scope, to_numpy
from dfa_torch.blocks import user_block
from dfa_torch.dfa import (
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
from dfa_torch.epoch import predict_labels, train_epoch
from dfa_torch.layer_parallel import layer_parallel
from dfa_torch.many import (
    Hyper,
    init_opt_state_many,
    memory_free,
    predict_labels_many,
    stack_hyper,
    train_epoch_many,
)
from dfa_torch.mlp import Activations, forward, forward_with_activations, logits, loss
from dfa_torch.optim import apply_updates, make_optimizer
from dfa_torch.parallel import data_parallel
from dfa_torch.rules import grads, init_rule_state
from dfa_torch.train import KP_DECAY, METHODS, train_step

# The backend contract's names (dfa_core.backend.BACKEND_API), then this module's extras.
__all__ = [*BACKEND_API, "KP_DECAY", "METHODS", "TRACE_COUNTS"]
