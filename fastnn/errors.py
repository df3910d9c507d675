"""Exceptions users can catch. Bad input is a ValueError/TypeError as well.
Also ``warn_at_caller``: fastnn's warnings name the user's line."""
from __future__ import annotations

import contextlib
import os
import sys
import warnings


class FastnnError(Exception):
    """Base class of every error fastnn defines."""


class BackendUnavailable(FastnnError, RuntimeError):
    """A backend was asked for by name but cannot run here; the message says why."""


class ShapeError(FastnnError, ValueError):
    """An input has the wrong shape; the message names the layer and both shapes."""


class InputError(FastnnError, ValueError):
    """An input has a wrong value (range, non-finite data, unknown option)."""


class StateKeyError(InputError, KeyError):
    """A state dict lacks keys the model needs or has ones it does not know."""

    __str__ = Exception.__str__  # the message as written, not KeyError's repr of it


class DTypeError(FastnnError, TypeError):
    """An input has the wrong dtype (e.g. float labels for CrossEntropyLoss)."""


class TrainingDiverged(FastnnError, ArithmeticError):
    """The training loss became NaN or infinite; the message names epoch and batch."""


class OutOfMemory(FastnnError, MemoryError):
    """A layer ran out of (device) memory; the message names the layer and the size."""


class CaptureUnsupported(FastnnError, RuntimeError):
    """A training step cannot be recorded in a CUDA graph; fit then runs it op by op."""


@contextlib.contextmanager
def naming_out_of_memory(who: str, what: str, nbytes: int, device: str,
                         advice: str = "use a smaller batch or model"):
    """Inside, a MemoryError (CuPy's, or a backend's own) becomes OutOfMemory
    naming ``who`` (a layer, fit, an optimizer), ``what`` it was allocating and
    the bytes; an OutOfMemory from deeper down already names its layer."""
    try:
        yield
    except OutOfMemory:
        raise
    except MemoryError as exc:
        raise out_of_memory(who, what, nbytes, device, advice) from exc


def out_of_memory(who: str, what: str, nbytes: int, device: str,
                  advice: str = "use a smaller batch or model") -> OutOfMemory:
    """The OutOfMemory ``naming_out_of_memory`` raises, for hot paths that catch
    MemoryError themselves (a context manager and its message per allocation
    cost more than a small layer's whole step)."""
    return OutOfMemory(f"{who}: out of memory allocating {what} ({nbytes:,} bytes) "
                       f"on {device}; {advice}")


_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__)) + os.sep


def warn_at_caller(message: str, category: type[Warning] = RuntimeWarning) -> None:
    """warnings.warn attributed to the first frame outside fastnn (the user's
    ``fit(...)`` line, say), however deep inside fastnn the cause was found: a
    fixed stacklevel names a different internal line on each path. With no
    frame outside fastnn, the outermost one is named."""
    frame, level = sys._getframe(1), 2  # stacklevel 2 = whoever called this helper
    while frame.f_back is not None and frame.f_code.co_filename.startswith(_PACKAGE_DIR):
        frame, level = frame.f_back, level + 1
    warnings.warn(message, category, stacklevel=level)
