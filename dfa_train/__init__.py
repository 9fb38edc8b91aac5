"""The application above the backends: training loops, the ``dfa`` command, data, checkpoints, plots.

    from dfa_core import MLPSpec, OptimizerSpec
    from dfa_train import fit
    history = fit("jax", MLPSpec((784, 200, 10)), x_train, y_train, epochs=10)

Imports neither torch nor JAX at import time: a backend is looked up by name through
``dfa_core.get_backend`` when a run starts.
"""

from dfa_train.many import fit_many
from dfa_train.state import AlignmentRecord, EpochEnd, History, NonFiniteLossError, ResumeState
from dfa_train.trainer import confusion_matrix, fit, labels_of

__all__ = [
    "AlignmentRecord",
    "EpochEnd",
    "History",
    "NonFiniteLossError",
    "ResumeState",
    "confusion_matrix",
    "fit",
    "fit_many",
    "labels_of",
]
