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


def rel_err(actual: torch.Tensor, expected: torch.Tensor, *, dim: int = 1, chunk: int = 8192) -> float:
    """``max|actual - expected| / max|expected|`` over the reference's finite entries (NaN where
    ``actual`` is NaN there), for reports and benchmarks.

    Computed on the tensors' device, ``chunk`` slices along ``dim`` (dim 0 for 1-D tensors) at a
    time in float64, so a 128K-token check on a GPU neither copies to the host nor doubles memory.
    """
    if actual.shape != expected.shape:
        raise ValueError(f"shape mismatch {tuple(actual.shape)} vs {tuple(expected.shape)}")
    dim = dim if expected.dim() > dim else 0
    worst = scale = torch.zeros((), dtype=torch.float64, device=expected.device)
    for a, e in zip(actual.detach().split(chunk, dim), expected.detach().split(chunk, dim)):
        a, e = a.to(e.device, torch.float64), e.double()
        fin = torch.isfinite(e)
        if fin.any():
            worst = torch.maximum(worst, (a[fin] - e[fin]).abs().max())  # NaN propagates
            scale = torch.maximum(scale, e[fin].abs().max())
    return float(worst) / (float(scale) or 1.0)


def assert_rel_close(actual: torch.Tensor, expected: torch.Tensor, *, rel: float, msg: str | None = None) -> None:
    """Fail unless every entry is within ``rel * max|expected|`` (non-finite entries must match exactly)."""
    a, e = actual.detach().double().cpu(), expected.detach().double().cpu()
    atol = rel * (_finite_max(e) or 1.0)
    torch.testing.assert_close(a, e, rtol=0.0, atol=atol, equal_nan=False, check_dtype=False,
                               msg=(lambda m: f"{msg}: {m}") if msg else None)
