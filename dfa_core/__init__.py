"""Backend-neutral core of the DFA framework: network spec, seeded init, backend registry.

Imports only NumPy; torch and JAX are imported when their backend is asked for.

    from dfa_core import get_backend, MLPSpec, init_params, init_feedback
    spec = MLPSpec(layer_sizes=(784, 200, 10), activation="tanh", output="sigmoid")
    be = get_backend("jax")   # or "torch"
    grads = be.dfa_grads(spec, be.asarray(init_params(spec, seed=0)),
                         be.asarray(init_feedback(spec, seed=1)), x, y, mode="sample")
"""

from dfa_core.init import (
    DEFAULT_FEEDBACK_SCALE,
    FEEDBACK_DISTS,
    PARAM_INITS,
    init_feedback,
    init_params,
)
from dfa_core.registry import BACKEND_NAMES, get_backend
from dfa_core.spec import (
    ACTIVATIONS,
    DTYPES,
    LEAKY_RELU_SLOPE,
    METHODS,
    MODES,
    OPTIMIZERS,
    OUTPUTS,
    REDUCTIONS,
    MLPSpec,
    OptimizerSpec,
)

__version__ = "0.1.0"

__all__ = [
    "ACTIVATIONS",
    "BACKEND_NAMES",
    "DEFAULT_FEEDBACK_SCALE",
    "DTYPES",
    "FEEDBACK_DISTS",
    "LEAKY_RELU_SLOPE",
    "METHODS",
    "MODES",
    "MLPSpec",
    "OPTIMIZERS",
    "OUTPUTS",
    "OptimizerSpec",
    "PARAM_INITS",
    "REDUCTIONS",
    "get_backend",
    "init_feedback",
    "init_params",
]
