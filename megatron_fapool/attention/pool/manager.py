"""Resource manager: per step, whether the pool joins and with how many ranks.

* ``n <= threshold``: no pool (p = 0), immediately — no bytes move for short sequences.
* ``n > threshold``: p = the cost model's best size in ``1..max_active`` (all of the
  base rank's share when no calibration is given). A change between two non-zero
  sizes is applied only after it was chosen ``hysteresis`` steps in a row, so the
  pool does not flap between sizes on noisy lengths.

Decisions are cached per (step, n): all layers of one micro-batch use the same p.
Every activation (0 -> p), release (p -> 0) and resize is counted in :class:`PoolStats`.
"""

from __future__ import annotations

from dataclasses import dataclass

from ...config.calibration import load_calibration
from .stats import PoolStats

__all__ = ["CostModel", "PoolResourceManager"]


@dataclass(frozen=True)
class CostModel:
    """Predicted time of one pooled attention call with ``p`` pool ranks (seconds).

    Fitted by ``tools/calibrate_pool.py`` on the actual hardware: local causal attention
    of one base rank's heads takes ``attention_s_per_token2 * n**2``; transfers move at
    ``link_bytes_per_s``; each pooled call costs ``call_overhead_s`` more. Per token, the
    K/V prefix sent is ``kv_bytes_per_token``, and queries and outputs of the pool
    members' chunks ``q_bytes_per_token`` each. Each active pool rank adds
    ``call_overhead_s`` (header, launches, one more party to synchronise).
    """

    attention_s_per_token2: float
    link_bytes_per_s: float
    call_overhead_s: float
    kv_bytes_per_token: float
    q_bytes_per_token: float

    def attention_time(self, n: int, p: int) -> float:
        return self.attention_s_per_token2 * n * n / (p + 1)

    def transfer_time(self, n: int, p: int) -> float:
        if p == 0:
            return 0.0
        share = p / (p + 1)
        return n * (self.kv_bytes_per_token + 2 * self.q_bytes_per_token * share) / self.link_bytes_per_s

    def time(self, n: int, p: int) -> float:
        """K/V chunks overlap with compute, so the slower of the two plus the fixed cost."""
        if p == 0:
            return self.attention_time(n, 0)
        return max(self.attention_time(n, p), self.transfer_time(n, p)) + self.call_overhead_s * p

    def best_active(self, n: int, max_active: int) -> int:
        return min(range(1, max_active + 1), key=lambda p: (self.time(n, p), p))

    def break_even(self, max_n: int = 1 << 22) -> int:
        """Smallest n (power-of-two search, then bisection) where one pool rank pays off."""
        lo, hi = 1, 2
        while hi < max_n and self.time(hi, 1) >= self.time(hi, 0):
            lo, hi = hi, hi * 2
        while lo + 1 < hi:
            mid = (lo + hi) // 2
            lo, hi = (mid, hi) if self.time(mid, 1) >= self.time(mid, 0) else (lo, mid)
        return hi


def threshold_and_cost(pool_cfg) -> tuple[int, CostModel | None]:
    """The config's threshold (``"auto"``: the calibration file's) and the calibrated cost model, if any."""
    threshold, cost = pool_cfg.threshold, None
    if pool_cfg.calibration_file:
        cal = load_calibration(pool_cfg.calibration_file)
        cost = CostModel(**cal["cost_model"])
        if threshold == "auto":
            threshold = int(cal["threshold"])
    return threshold, cost


class PoolResourceManager:
    def __init__(
        self,
        *,
        threshold: int,
        pool_share: int,
        max_active: int | None = None,
        hysteresis: int = 2,
        cost_model: CostModel | None = None,
        stats: PoolStats | None = None,
    ):
        if threshold < 0:
            raise ValueError(f"threshold must be >= 0, got {threshold}")
        self.threshold = threshold
        self.max_active = min(max_active or pool_share, pool_share)
        self.hysteresis = hysteresis
        self.cost_model = cost_model
        self.stats = stats or PoolStats()
        self.current = 0
        self._pending: tuple[int, int] | None = None  # (candidate p, consecutive steps)
        self._step = 0
        self._cache: dict[int, int] = {}

    @classmethod
    def from_config(cls, pool_cfg, *, pool_share: int, stats: PoolStats | None = None) -> "PoolResourceManager":
        threshold, cost = threshold_and_cost(pool_cfg)
        return cls(
            threshold=threshold, pool_share=pool_share, max_active=pool_cfg.max_active,
            hysteresis=pool_cfg.hysteresis, cost_model=cost, stats=stats,
        )

    def state_dict(self) -> dict:
        """What a resumed run needs to make the same decisions (hysteresis in flight)."""
        return {"current": self.current, "pending": self._pending, "step": self._step}

    def load_state_dict(self, state: dict) -> None:
        self.current = int(state["current"])
        self._pending = tuple(state["pending"]) if state["pending"] is not None else None
        self._step = int(state["step"])
        self._cache.clear()

    def new_step(self) -> None:
        """Call once per training / inference step: decisions are re-made per step."""
        self._step += 1
        self._cache.clear()

    def _target(self, n: int) -> int:
        if n <= self.threshold or self.max_active == 0:
            return 0
        if self.cost_model is None:
            return self.max_active
        return self.cost_model.best_active(n, self.max_active)

    def decide(self, n: int) -> int:
        """Active pool ranks for a sequence of ``n`` tokens in this step."""
        if n in self._cache:
            return self._cache[n]
        target = self._target(n)
        new = target
        if target and self.current and target != self.current:
            cand, count = self._pending if self._pending and self._pending[0] == target else (target, 0)
            count += 1
            if count < self.hysteresis:
                self._pending = (cand, count)
                new = self.current
            else:
                self._pending = None
        else:
            self._pending = None
        if new and not self.current:
            self.stats.activations += 1
        elif self.current and not new:
            self.stats.releases += 1
        elif new != self.current:
            self.stats.resizes += 1
        self.current = new
        self._cache[n] = new
        return new
