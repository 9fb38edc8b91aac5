"""Backend-neutral core of the DFA framework: network specs, seeded init, backend registry.

Imports only NumPy; torch and JAX are imported when their backend is asked for.

    from dfa_core import get_backend, MLPSpec, init_params, init_feedback
    spec = MLPSpec(layer_sizes=(784, 200, 10), activation="tanh", output="sigmoid")
    be = get_backend("jax")   # or "torch"
    grads = be.dfa_grads(spec, be.asarray(init_params(spec, seed=0)),
                         be.asarray(init_feedback(spec, seed=1)), x, y, mode="sample")

Models beyond MLPs are a ``ModelSpec`` of layers (see ``dfa_core.model``), e.g. LeNet-5:

    from dfa_core import ModelSpec, Dense, Conv2d, MaxPool2d, Flatten
    lenet = ModelSpec((1, 28, 28), (Conv2d(6, 5, padding=2), MaxPool2d(2), Conv2d(16, 5),
                                    MaxPool2d(2), Flatten(), Dense(120), Dense(84), Dense(10)))
"""

from dfa_core.feedback import FEEDBACK_RULES
from dfa_core.init import (
    DEFAULT_FEEDBACK_SCALE,
    FEEDBACK_DISTS,
    PARAM_INITS,
    init_feedback,
    init_params,
)
from dfa_core.model import (
    AvgPool2d,
    Conv2d,
    Dense,
    Flatten,
    MaxPool2d,
    ModelSpec,
    Residual,
    Sequential,
    TransformerBlock,
    resnet_basic_block,
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
    "AvgPool2d",
    "BACKEND_NAMES",
    "Conv2d",
    "DEFAULT_FEEDBACK_SCALE",
    "DTYPES",
    "Dense",
    "FEEDBACK_DISTS",
    "FEEDBACK_RULES",
    "Flatten",
    "LEAKY_RELU_SLOPE",
    "METHODS",
    "MODES",
    "MLPSpec",
    "MaxPool2d",
    "ModelSpec",
    "OPTIMIZERS",
    "OUTPUTS",
    "OptimizerSpec",
    "PARAM_INITS",
    "REDUCTIONS",
    "Residual",
    "Sequential",
    "TransformerBlock",
    "get_backend",
    "init_feedback",
    "init_params",
    "resnet_basic_block",
]
