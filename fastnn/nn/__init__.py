"""Layers, activations and losses."""
from .activation import GELU, ElementwiseActivation, LeakyReLU, ReLU, Sigmoid, Softmax, Tanh
from .linear import Linear
from .losses import BCELoss, BCEWithLogitsLoss, CrossEntropyLoss, Loss, MSELoss
from .module import Module, Sequential
from .parameter import Parameter

__all__ = [
    "GELU", "ElementwiseActivation", "LeakyReLU", "ReLU", "Sigmoid", "Softmax", "Tanh",
    "Linear", "BCELoss", "BCEWithLogitsLoss", "CrossEntropyLoss", "Loss", "MSELoss",
    "Module", "Sequential", "Parameter",
]
