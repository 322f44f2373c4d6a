"""The training log: Megatron's iteration line plus what the pool did, and a final summary.

One :class:`IterationStats` per optimizer step holds the numbers of *all* data-parallel
replicas (summed by the caller over the data-parallel group). :class:`IterationLog`
averages them over the log interval and formats::

     iteration       20/     100 | consumed samples:     80 | elapsed time per iteration (ms): 512.3 |
     learning rate: 2.971E-04 | global batch size:     4 | lm loss: 4.812345E+00 | grad norm: 1.234 |
     tokens/s: 2345 | TFLOP/s/GPU: 0.012 | seq len: 37..512 | pool: 5/8 micro-batches pooled,
     2 activations, 2 releases | ETA 0:00:41

An MoE model adds its router losses after the lm loss (the last iteration's of the
interval, as Megatron's tracker reports them: averaged over replicas and MoE layers,
unscaled by their coefficients): ``load balancing loss: 1.0123E+00 | z loss: 3.2E-01``.

TFLOP/s per GPU divides the model FLOPs of every replica by the time and by the number
of GPUs in the job, pool ranks included (they are GPUs this job holds).
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass, field
from datetime import timedelta

__all__ = ["IterationLog", "IterationStats"]

REDUCED_FIELDS = (
    "loss_sum", "loss_count", "tokens", "flops", "micro_batches", "pooled_micro_batches",
    "activations", "releases", "resizes", "pooled_forward", "local_calls",
)


@dataclass
class IterationStats:
    iteration: int
    elapsed_s: float = 0.0
    learning_rate: float = 0.0
    grad_norm: float | None = None
    loss_sum: float = 0.0  # sum of micro-batch mean losses, all replicas
    loss_count: float = 0.0  # number of those micro-batches
    tokens: float = 0.0  # loss-bearing tokens, all replicas
    flops: float = 0.0  # model FLOPs (forward + backward), all replicas
    micro_batches: float = 0.0
    pooled_micro_batches: float = 0.0
    activations: float = 0.0
    releases: float = 0.0
    resizes: float = 0.0
    pooled_forward: float = 0.0
    local_calls: float = 0.0
    min_len: int = 0
    max_len: int = 0
    load_balancing_loss: float | None = None  # MoE: the router's aux loss (not reduced by REDUCED_FIELDS)
    z_loss: float | None = None  # MoE with moe_z_loss_coeff: the router's z loss
    pool_demands: dict | None = None  # shared pool: the step's {base rank: longest micro-batch} (every rank's)
    pool_blocks: dict | None = None  # shared pool: the step's {base rank: pool ranks} (the same on every rank)

    @property
    def loss(self) -> float:
        return self.loss_sum / max(self.loss_count, 1)

    def reduced_vector(self) -> list[float]:
        return [float(getattr(self, k)) for k in REDUCED_FIELDS]

    def set_reduced(self, values) -> None:
        for k, v in zip(REDUCED_FIELDS, values):
            setattr(self, k, float(v))


@dataclass
class IterationLog:
    train_iters: int
    global_batch_size: int
    num_gpus: int
    log_interval: int
    pool_enabled: bool
    metrics_path: str | None = None
    _window: list[IterationStats] = field(default_factory=list)
    _all: list[IterationStats] = field(default_factory=list)
    _started: float = field(default_factory=time.perf_counter)

    def __post_init__(self):
        if self.metrics_path:  # appended to: a resumed run continues the file
            os.makedirs(os.path.dirname(os.path.abspath(self.metrics_path)), exist_ok=True)

    def record(self, s: IterationStats) -> str | None:
        """Add one iteration; returns the log line when the interval is complete."""
        self._window.append(s)
        self._all.append(s)
        if self.metrics_path:
            row = asdict(s) | {"loss": s.loss}
            with open(self.metrics_path, "a") as f:
                f.write(json.dumps(row) + "\n")
        if s.iteration % self.log_interval == 0 or s.iteration == self.train_iters:
            line = self._line(self._window)
            self._window = []
            return line
        return None

    def _line(self, w: list[IterationStats]) -> str:
        last = w[-1]
        elapsed = sum(s.elapsed_s for s in w)
        tokens = sum(s.tokens for s in w)
        flops = sum(s.flops for s in w)
        loss = sum(s.loss_sum for s in w) / max(sum(s.loss_count for s in w), 1)
        per_iter = elapsed / len(w)
        eta = timedelta(seconds=round(per_iter * (self.train_iters - last.iteration)))
        parts = [
            f" iteration {last.iteration:>8d}/{self.train_iters:>8d}",
            f"consumed samples: {last.iteration * self.global_batch_size:>10d}",
            f"elapsed time per iteration (ms): {per_iter * 1e3:.1f}",
            f"learning rate: {last.learning_rate:.3E}",
            f"global batch size: {self.global_batch_size:>5d}",
            f"lm loss: {loss:.6E}",
        ]
        if last.load_balancing_loss is not None:
            parts.append(f"load balancing loss: {last.load_balancing_loss:.6E}")
        if last.z_loss is not None:
            parts.append(f"z loss: {last.z_loss:.6E}")
        if last.grad_norm is not None:
            parts.append(f"grad norm: {last.grad_norm:.3f}")
        parts += [
            f"tokens/s: {tokens / elapsed:.0f}",
            f"TFLOP/s/GPU: {flops / elapsed / self.num_gpus / 1e12:.4g}",
            f"seq len: {min(s.min_len for s in w)}..{max(s.max_len for s in w)}",
        ]
        if self.pool_enabled:
            parts.append(
                f"pool: {sum(s.pooled_micro_batches for s in w):.0f}/{sum(s.micro_batches for s in w):.0f}"
                f" micro-batches pooled, {sum(s.activations for s in w):.0f} activations,"
                f" {sum(s.releases for s in w):.0f} releases"
            )
            if last.pool_blocks is not None:
                parts.append(f"shared pool, last step: {_blocks_text(last.pool_blocks)}")
        parts.append(f"ETA {eta}")
        return " | ".join(parts)

    def summary(self, *, start_iteration: int, checkpoints: list[str]) -> str:
        done = self._all
        if not done:
            return f"training summary: nothing to do (already at iteration {start_iteration})"
        elapsed = sum(s.elapsed_s for s in done)
        tokens = sum(s.tokens for s in done)
        flops = sum(s.flops for s in done)
        lines = [
            "== training summary ==",
            f"iterations      {start_iteration + 1}..{done[-1].iteration} ({len(done)} run here)"
            f" in {elapsed:.1f}s of steps, {time.perf_counter() - self._started:.1f}s wall",
            f"lm loss         {done[0].loss:.4f} (first) -> {done[-1].loss:.4f} (last)",
            f"throughput      {tokens / elapsed:.0f} tokens/s, {flops / elapsed / self.num_gpus / 1e12:.4f}"
            f" TFLOP/s per GPU over {self.num_gpus} GPUs",
        ]
        if self.pool_enabled:
            lines.append(
                f"attention pool  {sum(s.pooled_micro_batches for s in done):.0f} of"
                f" {sum(s.micro_batches for s in done):.0f} micro-batches pooled,"
                f" {sum(s.activations for s in done):.0f} activations, {sum(s.releases for s in done):.0f} releases,"
                f" {sum(s.resizes for s in done):.0f} resizes"
            )
        lines.append("checkpoints     " + (", ".join(checkpoints) if checkpoints else "none saved"))
        return "\n".join(lines)


def _blocks_text(blocks: dict) -> str:
    """``{base rank: pool ranks}`` as ``base 0 <- pool [2, 3]; base 1 local``-style text."""
    if not blocks:
        return "no base rank pooled"
    return "; ".join(f"base {b} <- pool {list(r)}" for b, r in sorted(blocks.items()))
