"""Compare a module's backward with central finite differences in float64."""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from .backends import get_backend, host_array
from .nn.module import Module


@dataclass
class GradcheckEntry:
    name: str
    shape: tuple
    max_abs_error: float
    max_rel_error: float
    worst_index: tuple
    analytic: float
    numeric: float
    passed: bool


def _badness(entry: GradcheckEntry):
    """Sort key of the worst entry: a NaN error first (it compares as nothing)."""
    return (bool(np.isnan(entry.max_rel_error)), entry.max_rel_error)


@dataclass
class GradcheckReport:
    entries: list = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return all(e.passed for e in self.entries)

    @property
    def worst(self) -> GradcheckEntry | None:
        return max(self.entries, key=_badness, default=None)

    def __bool__(self) -> bool:
        return self.passed

    def __str__(self) -> str:
        lines = [f"gradcheck {'passed' if self.passed else 'FAILED'}"]
        for e in self.entries:
            lines.append(
                f"  {e.name:<16} {str(e.shape):<14} max abs {e.max_abs_error:.3e}  "
                f"max rel {e.max_rel_error:.3e}  {'ok' if e.passed else 'FAIL at ' + str(e.worst_index)}"
            )
        return "\n".join(lines)


def gradcheck(module: Module, x, dy=None, eps: float = 1e-6, rtol: float = 1e-5,
              atol: float = 1e-8, raise_on_fail: bool = False, seed: int = 0,
              max_checks: int | None = None) -> GradcheckReport:
    """Check ``module.backward`` for the input and every parameter.

    Parameters are switched to float64 for the check and restored afterwards.
    The scalar checked is ``sum(module(x) * dy)`` (``dy`` random if not given).
    ``max_checks`` limits the finite differences per tensor (random elements).
    """
    backend = get_backend()
    rng = np.random.default_rng(seed)
    saved = [(p, p.data, p.grad) for _, p in module.named_parameters()]
    x64 = backend.asarray(host_array(x), dtype=np.float64)
    try:
        for p, data, _ in saved:
            p.data = backend.asarray(host_array(data), dtype=np.float64)
            p.grad = None
        y = module(x64)
        dy64 = backend.asarray(rng.standard_normal(tuple(y.shape)) if dy is None else host_array(dy),
                               dtype=np.float64)
        if tuple(dy64.shape) != tuple(y.shape):
            raise ValueError(f"gradcheck: dy has shape {tuple(dy64.shape)}, output is {tuple(y.shape)}")
        dx = module.backward(dy64)

        def objective() -> float:
            return float(host_array(module(x64)).ravel() @ host_array(dy64).ravel())

        report = GradcheckReport()
        targets = [("input", x64, dx)] + [
            (name, p.data, p.grad) for name, p in module.named_parameters()
        ]
        for name, array, analytic in targets:
            if analytic is None:
                analytic_np = np.zeros(tuple(array.shape))
            else:
                analytic_np = np.array(host_array(analytic), dtype=np.float64).reshape(tuple(array.shape))
            report.entries.append(
                _check_tensor(name, array, analytic_np, objective, eps, rtol, atol, rng, max_checks)
            )
    finally:
        for p, data, grad in saved:
            p.data = data
            p.grad = grad
    if raise_on_fail and not report.passed:
        # the worst failing tensor, as API.md promises (the full report follows)
        w = max((e for e in report.entries if not e.passed), key=_badness)
        raise AssertionError(
            f"gradcheck failed for {type(module).__name__} {w.name} {w.shape} at {w.worst_index}: "
            f"analytic {w.analytic:.6e} vs numeric {w.numeric:.6e} "
            f"(abs {w.max_abs_error:.3e}, rel {w.max_rel_error:.3e})\n{report}"
        )
    return report


def _check_tensor(name, array, analytic, objective, eps, rtol, atol, rng, max_checks):
    flat_count = int(np.prod(array.shape)) if array.shape else 1
    indices = np.arange(flat_count)
    if max_checks is not None and flat_count > max_checks:
        indices = rng.choice(flat_count, size=max_checks, replace=False)
    view = array.reshape(-1)
    numeric = np.zeros(flat_count)
    for i in indices:
        old = float(view[i])
        view[i] = old + eps
        f_plus = objective()
        view[i] = old - eps
        f_minus = objective()
        view[i] = old
        numeric[i] = (f_plus - f_minus) / (2 * eps)
    a = analytic.reshape(-1)[indices]
    n = numeric[indices]
    abs_err = np.abs(a - n)
    rel_err = abs_err / np.maximum(np.maximum(np.abs(a), np.abs(n)), 1e-12)
    ok = abs_err <= atol + rtol * np.abs(n)
    worst = int(np.argmax(abs_err - (atol + rtol * np.abs(n)))) if len(indices) else 0
    return GradcheckEntry(
        name=name, shape=tuple(array.shape),
        max_abs_error=float(abs_err.max(initial=0.0)),
        max_rel_error=float(rel_err.max(initial=0.0)),
        worst_index=tuple(int(v) for v in np.unravel_index(indices[worst], array.shape)) if len(indices) else (),
        analytic=float(a[worst]) if len(indices) else 0.0,
        numeric=float(n[worst]) if len(indices) else 0.0,
        passed=bool(ok.all()),
    )
