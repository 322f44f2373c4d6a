"""The pool's threshold and cost model, fitted to measured times (``tools/calibrate_pool.py`` measures).

For every sweep point ``t`` (seconds, forward + backward of one layer of one base rank):
``Attention_Time(t)`` (local causal attention), ``FFN_Time(t)`` (the layer's MLP) and
``Pooled_Time(t)`` (the pooled attention with one pool rank); from them
``Overhead(t) = max(0, Pooled_Time(t) - Attention_Time(t) / 2)``, what a pooled call
costs beyond half of the attention.

Threshold (DESIGN.md section 2): ``min t with Attention_Time(t) > FFN_Time(t) +
Overhead(t)``. Between the last sweep point where the condition fails and the first
where it holds, ``g(t) = A - F - O`` is interpolated linearly in ``log2 t`` and the
threshold is the (floored) zero crossing. If the condition already holds at the
smallest t, the threshold is that t; if it never holds in the sweep, it is
extrapolated with the fitted models (``A = a t^2``, ``F = f t`` fitted like ``a``,
``O`` from the cost model), and a note says so.

Cost model (:class:`~megatron_fapool.attention.pool.manager.CostModel`):

* ``attention_s_per_token2``: least squares of ``A(t) = a t^2`` in relative terms
  (minimises ``sum((a t^2 - A)/A)^2``, so short and long t count alike);
* ``link_bytes_per_s``: the measured link bandwidth;
* ``call_overhead_s``: the mean of ``Overhead(t)`` over the sweep points up to the
  measured break-even (the three smallest, if the pool never wins);
* ``kv_bytes_per_token``, ``q_bytes_per_token``: the layer's sizes, as given.

Break-even: measured = the smallest sweep t where the pooled call is faster than the
local one (also interpolated in log2 t); predicted = ``CostModel.break_even()``.

:func:`fit` does all of this on :class:`Measurements`, pure (no torch, no I/O);
:func:`calibration_file` turns the result into the file format of
:mod:`megatron_fapool.config.calibration`.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

from ...config.calibration import CalibrationFile
from .manager import CostModel

__all__ = ["Fit", "Measurements", "calibration_file", "fit", "overheads"]

EXTRAPOLATION_CAP = 1 << 22  # the largest threshold an extrapolation returns
FILE_NOTES = (
    "times in seconds, forward+backward of one layer of one base rank (heads/query groups/ffn divided by TP)",
    "overhead = max(0, pooled_time - attention_time/2)",
    "attention_s_per_token2: least squares of attention_time = a t^2 in relative error",
    "call_overhead_s: mean overhead over the sweep points up to the measured break-even"
    " (the three smallest if none)",
)


def overheads(attention_time: list[float], pooled_time: list[float]) -> list[float]:
    """``Overhead(t) = max(0, Pooled_Time(t) - Attention_Time(t) / 2)`` per sweep point."""
    return [max(0.0, p - a / 2) for a, p in zip(attention_time, pooled_time)]


@dataclass(frozen=True)
class Measurements:
    """One sweep: per sequence length ``seqlens[i]`` the three times (seconds), and the layer's sizes."""

    seqlens: list[int]
    attention_time: list[float]
    ffn_time: list[float]
    pooled_time: list[float]
    link_bytes_per_s: float
    kv_bytes_per_token: float
    q_bytes_per_token: float

    def __post_init__(self):
        n = len(self.seqlens)
        if not n or any(len(x) != n for x in (self.attention_time, self.ffn_time, self.pooled_time)):
            raise ValueError(f"a sweep needs one time of each kind per sequence length (got {n} lengths)")
        if list(self.seqlens) != sorted(set(self.seqlens)):
            raise ValueError(f"sequence lengths must increase: {self.seqlens}")

    @property
    def overhead(self) -> list[float]:
        return overheads(self.attention_time, self.pooled_time)


@dataclass(frozen=True)
class Fit:
    """What :func:`fit` derives from one sweep."""

    threshold: int
    cost_model: CostModel
    call_overhead_points: list[int]  # the sweep lengths whose overheads call_overhead_s averages
    measured_break_even: int | None  # smallest sweep t with pooled < local
    measured_break_even_interpolated: float | None
    predicted_break_even: int
    notes: list[str]  # how the threshold was found

    def break_even_difference_percent(self, interpolated: bool = False) -> float | None:
        """(predicted - measured) / measured in percent; None when the pool never won."""
        measured = self.measured_break_even_interpolated if interpolated else self.measured_break_even
        if measured is None:
            return None
        return 100.0 * (self.predicted_break_even - measured) / measured


def _log2_crossing(ts: list[float], h: list[float], i: int) -> float:
    """Where ``h`` (<= 0 at ``ts[i - 1]``, > 0 at ``ts[i]``) crosses zero, linear in log2 t."""
    x0, x1 = math.log2(ts[i - 1]), math.log2(ts[i])
    return 2 ** (x0 + h[i - 1] / (h[i - 1] - h[i]) * (x1 - x0))


def _relative_lsq(ts: list[float], ys: list[float], power: int) -> float:
    """``c`` minimising ``sum((c t^power - y) / y)^2``."""
    return sum(t**power / y for t, y in zip(ts, ys)) / sum((t**power / y) ** 2 for t, y in zip(ts, ys))


def fit(m: Measurements) -> Fit:
    """Threshold, cost model and break-even of the sweep ``m`` (see the module docstring)."""
    notes = []
    seqlens, A, Fs, P, O = m.seqlens, m.attention_time, m.ffn_time, m.pooled_time, m.overhead
    ts = [float(t) for t in seqlens]
    # threshold: min t with A > F + O, zero crossing of g interpolated in log2 t
    g = [a - f - o for a, f, o in zip(A, Fs, O)]
    idx = next((i for i, x in enumerate(g) if x > 0), None)
    if idx is None:
        threshold = None  # extrapolated below, once the cost model is fitted
    elif idx == 0:
        threshold = seqlens[0]
        notes.append(f"the condition already holds at the smallest t={seqlens[0]}: threshold = that t")
    else:
        threshold = int(math.floor(_log2_crossing(ts, g, idx)))
        notes.append(f"threshold interpolated in log2 t between t={seqlens[idx - 1]} and t={seqlens[idx]}")
    # measured break-even
    be_idx = next((i for i in range(len(seqlens)) if P[i] < A[i]), None)
    measured = seqlens[be_idx] if be_idx is not None else None
    measured_interp = None
    if be_idx is not None:
        measured_interp = float(seqlens[0]) if be_idx == 0 else _log2_crossing(ts, [a - p for a, p in zip(A, P)], be_idx)
    # cost model
    a_fit = _relative_lsq(ts, A, 2)
    small = [i for i in range(len(seqlens)) if measured is not None and seqlens[i] <= measured]
    if not small:
        small = list(range(min(3, len(seqlens))))
    model = CostModel(
        attention_s_per_token2=a_fit,
        link_bytes_per_s=m.link_bytes_per_s,
        call_overhead_s=max(0.0, sum(O[i] for i in small) / len(small)),
        kv_bytes_per_token=float(m.kv_bytes_per_token),
        q_bytes_per_token=float(m.q_bytes_per_token),
    )
    if threshold is None:
        # A > F + O never held in the sweep: extrapolate with A = a t^2, F = f t (relative least
        # squares, like a) and O = the cost model's pooled time - a t^2 / 2
        f_fit = _relative_lsq(ts, Fs, 1)

        def holds(t):
            return a_fit * t * t > f_fit * t + max(0.0, model.time(t, 1) - a_fit * t * t / 2)

        lo, hi = seqlens[-1], seqlens[-1] * 2
        while hi < EXTRAPOLATION_CAP and not holds(hi):
            lo, hi = hi, hi * 2
        while lo + 1 < hi:
            mid = (lo + hi) // 2
            lo, hi = (lo, mid) if holds(mid) else (mid, hi)
        threshold = hi
        notes.append(f"Attention_Time > FFN_Time + Overhead never held up to t={seqlens[-1]}: threshold"
                     f" extrapolated with the fitted models (A = a t^2, F = {f_fit:.3g} s * t, O from the"
                     " cost model); extend --seqlens to measure it")
    return Fit(
        threshold=int(threshold), cost_model=model, call_overhead_points=[seqlens[i] for i in small],
        measured_break_even=measured, measured_break_even_interpolated=measured_interp,
        predicted_break_even=model.break_even(), notes=notes,
    )


def calibration_file(m: Measurements, result: Fit, *, pool_bytes_per_call: list[int] | None = None,
                     **about: Any) -> CalibrationFile:
    """The calibration file of sweep ``m`` and its fit; ``about``: device, date, torch, host, model."""
    return CalibrationFile(
        **about,
        seqlens=list(m.seqlens),
        attention_time=list(m.attention_time),
        ffn_time=list(m.ffn_time),
        overhead=m.overhead,
        pooled_time=list(m.pooled_time),
        pool_bytes_per_call=pool_bytes_per_call,
        link_bytes_per_s=m.link_bytes_per_s,
        threshold=result.threshold,
        measured_break_even=result.measured_break_even,
        measured_break_even_interpolated=result.measured_break_even_interpolated,
        predicted_break_even=result.predicted_break_even,
        break_even_difference_percent=result.break_even_difference_percent(),
        break_even_difference_percent_interpolated=result.break_even_difference_percent(interpolated=True),
        cost_model=asdict(result.cost_model),
        notes=result.notes + list(FILE_NOTES),
    )
