"""One comparison for every equivalence test: ``max|actual - expected| <= rel * max|expected|``.

Built on :func:`torch.testing.assert_close` (its messages, its handling of ``inf``: infinite
entries must be equal, NaN fails), with the absolute tolerance scaled by the reference's
largest finite magnitude, so a bound reads the same for outputs, losses and gradients.
"""

from __future__ import annotations

import torch

__all__ = ["assert_rel_close", "rel_err"]


def _finite_max(expected: torch.Tensor) -> float:
    fin = expected[torch.isfinite(expected)]
    return float(fin.abs().max()) if fin.numel() else 0.0


def rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """``max|actual - expected| / max|expected|`` over the reference's finite entries (for reports)."""
    a, e = actual.detach().double().cpu(), expected.detach().double().cpu()
    fin = torch.isfinite(e)
    scale = _finite_max(e) or 1.0
    return float((a[fin] - e[fin]).abs().max()) / scale if fin.any() else 0.0


def assert_rel_close(actual: torch.Tensor, expected: torch.Tensor, *, rel: float, msg: str | None = None) -> None:
    """Fail unless every entry is within ``rel * max|expected|`` (non-finite entries must match exactly)."""
    a, e = actual.detach().double().cpu(), expected.detach().double().cpu()
    atol = rel * (_finite_max(e) or 1.0)
    torch.testing.assert_close(a, e, rtol=0.0, atol=atol, equal_nan=False, check_dtype=False,
                               msg=(lambda m: f"{msg}: {m}") if msg else None)
