"""fastnn: one model code, three array backends (NumPy, Numba, CuPy).

The public surface is exactly ../shared/API.md; everything else is internal.
"""
from __future__ import annotations

__version__ = "0.1.0"

from .backends import (
    Backend,
    asarray,
    available_backends,
    get_backend,
    get_default_dtype,
    set_default_dtype,
    to_numpy,
    use_backend,
)
from .errors import (
    BackendUnavailable,
    DTypeError,
    FastnnError,
    InputError,
    OutOfMemory,
    ShapeError,
    StateKeyError,
    TrainingDiverged,
)
from .threads import get_num_threads, set_num_threads
from .precision import get_precision, set_precision
from .random import manual_seed
from .nn import (
    BCELoss,
    BCEWithLogitsLoss,
    CrossEntropyLoss,
    GELU,
    LeakyReLU,
    Linear,
    Loss,
    Module,
    MSELoss,
    Parameter,
    ReLU,
    Sequential,
    Sigmoid,
    Softmax,
    Tanh,
)
from . import functional
from .optim import SGD, Adam, AdamW, Optimizer, RMSprop
from .train import History, evaluate, fit, predict
from .gradcheck import gradcheck
from .io import load, save
