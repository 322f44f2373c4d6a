"""The MA time predictor in a training run: the ratio check at start-up, predicted vs measured steps.

At start-up (attention rank 0's log) the predictor says whether the configured
attention : expert ratio balances this run's micro-batches and which ping-pong split it
predicts fastest. Every iteration it predicts the time of its MoE layers (attention and
experts, ``pingpong_layer_time`` x layers x accumulation steps, at the iteration's longest
sequence) and records it against the measured iteration time; the summary reports the
error. The measured time also holds what the model leaves out (embedding, output layer,
loss, optimizer step), so the error says how much of a step the predictor explains.

Without ``fapool.ma_separation.calibration_file`` the predictor is analytic (H200 peak
rates): on another machine its error is large by construction, and the log says so.
"""

from __future__ import annotations

from ..moe import predictor as tp

__all__ = ["StepTimePrediction"]


class StepTimePrediction:
    def __init__(self, run_config, layout, *, micro: int, gas: int):
        ma = run_config.fapool.ma_separation
        if ma.calibration_file:
            self.predictor, _, _ = tp.load(ma.calibration_file)
            self.source = f"calibrated: {ma.calibration_file}"
        else:
            self.predictor = tp.TimePredictor.analytic()
            self.source = ("analytic, H200 peak rates (no fapool.ma_separation.calibration_file: write one for this"
                           " machine with tools/calibrate_ma.py)")
        self.shape = tp.ModelShape.from_run_config(run_config)
        self.attention_gpus = layout.dp  # replicas: each sends its micro-batch's tokens (TP ranks share one)
        self.expert_gpus = layout.num_expert
        self.micro, self.gas, self.parts = micro, gas, ma.micro_batches
        self.ratio = ma.ratio
        self.points = tp.PredictionLog()

    def startup(self, seq_length: int) -> str:
        """The ratio check and the ping-pong choice for micro-batches of ``seq_length`` tokens."""
        work = tp.Workload("train", seq_length, self.micro)
        check = tp.check_ratio(self.predictor, self.shape, (self.attention_gpus, self.expert_gpus), work)
        split = tp.split_for_pingpong(self.predictor, self.shape, work, attention_gpus=self.attention_gpus,
                                      expert_gpus=self.expert_gpus)
        return "\n".join([
            f"== MA time predictor ({self.source}) ==",
            " " + check.message,
            f" ping-pong: micro_batches={self.parts} configured; predicted best {split.m} ({split.reason})",
        ])

    def predicted_iteration_s(self, seq_length: int) -> float:
        work = tp.Workload("train", seq_length, self.micro)
        layer = tp.pingpong_layer_time(self.predictor, self.shape, work, self.parts,
                                       attention_gpus=self.attention_gpus, expert_gpus=self.expert_gpus)
        return layer * self.shape.num_layers * self.gas

    def record(self, seq_length: int, measured_s: float) -> float:
        """One iteration's predicted vs measured time; its relative error in percent."""
        return self.points.record("iteration", self.predicted_iteration_s(seq_length), measured_s)

    def summary(self) -> str:
        pts = self.points.points.get("iteration", [])
        if not pts:
            return "MA time predictor: no iteration measured"
        pred = sum(p for p, _ in pts) / len(pts)
        meas = sum(m for _, m in pts) / len(pts)
        return (f"MA time predictor ({self.source.split(':')[0].split(',')[0]}): MoE layers predicted"
                f" {pred * 1e3:.2f} ms per iteration, measured iteration {meas * 1e3:.2f} ms"
                f" (mean over {len(pts)}); {self.points.summary()}")
