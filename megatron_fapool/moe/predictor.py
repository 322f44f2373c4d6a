"""A lightweight time model of MA separation: attention time, expert time, and what they balance.

Each component's time is a small roofline-shaped formula in a few coefficients (seconds
per unit) that :func:`fit` takes from measurements (``tools/calibrate_ma.py``) or that
:meth:`TimePredictor.analytic` sets from a device's peak rates::

    device = FLOPs_gemm * c_gemm + FLOPs_attn * c_attn + bytes * c_byte
    host   = kernels * c_kernel                     (the launch cost of the calls)
    T      = host + device      ("sum")   or   max(host, device)   ("max": the host queues
                                                                     kernels while the device runs)

* **Attention** (one layer's attention block on one attention GPU: QKV projection, core
  attention, output projection; heads, query groups and projections divided by TP), per
  phase ``fwd`` / ``fwd_bwd`` (``b`` sequences of ``n`` tokens, causal) and ``decode``
  (one new token for each of ``b`` sequences against a K/V cache of ``n`` tokens):
  :func:`attention_features`. Terms ``gemm_flops``, ``attn_flops``, ``bytes``, ``kernels``.
* **Experts** (one layer's local experts on one expert GPU, Megatron's ``SequentialMLP``:
  ``fc1 -> activation -> * probs -> fc2`` per expert), per phase ``fwd`` / ``fwd_bwd`` and
  ``decode`` (the forward of decode-sized loads: a few tokens per expert), from the vector of
  tokens per local expert: :func:`expert_features`. Terms ``flops`` (each expert that has
  tokens counted for at least ``ridge`` tokens: the flat part of its GEMMs' roofline, where
  reading its weights or launching it sets the time) and ``kernels`` (a ``SequentialMLP``
  runs every local expert, with or without tokens).
* **Communication** (dispatch or combine of one part, one direction): ``latency + bytes /
  bandwidth`` (:class:`CommModel`; not measurable on one GPU, so analytic unless given).

FLOP counts: forward GEMMs ``2 m n k``; causal core attention ``4 d H n (n + 1) / 2`` per
sequence; forward + backward = 3 x forward for GEMMs and 3.5 x for the core attention (its
backward recomputes the scores). Bytes: weights read once per pass, activations written
and read once. The fit minimises the *relative* squared error (short and long points count
alike) under non-negative coefficients, both ways of combining host and device and (experts)
over a grid of ridges, keeping the best on the fitted points.

What the model balances (DESIGN section 3, research notes section 4.8):

* :func:`balanced_ratio`: the attention : expert GPU ratio at which both sides take the same
  time per layer for a workload (training / prefill of ``b`` sequences of ``n`` tokens per
  attention GPU, or decode of ``b`` sequences at context ``n``); :func:`balance_point` the
  sequence length or decode batch at which a given ratio balances; :func:`check_ratio` says
  whether a configured ``a:e`` is off and by how much; :func:`best_split` the best split of a
  number of GPUs. From first principles (:meth:`TimePredictor.analytic`: one peak FLOP rate,
  one bandwidth) the paper's MoE model (hidden 4096, FFN 16384, 16 experts, top-2) at 12:4
  balances prefill only near 180K tokens (about 155K in training, whose attention backward
  costs 2.5x its forward), and decode at 16K context at about 4 sequences per attention GPU.
* :func:`split_for_pingpong`: the number of parts ``m`` a micro-batch (or decode batch) is
  split into so that attention of one part overlaps the experts of another (``m > 1`` only
  when the batch has at least ``m`` sequences, ``m`` dividing it).

A calibration file (JSON, :func:`save` / :func:`load`, validated with one-line
:class:`~megatron_fapool.config.ConfigError` s) holds the coefficients, the device, dtype and
date, the samples and the errors. :func:`evaluate`, :func:`mape` and :class:`PredictionLog`
report predicted against measured times.
"""

from __future__ import annotations

import datetime as _dt
import itertools
import json
import math
import os
from dataclasses import dataclass, replace
from typing import Any, Iterable, Literal, Mapping, Sequence

import torch
from pydantic import BaseModel, ConfigDict, NonNegativeFloat, PositiveInt, ValidationError

from ..config import ConfigError, RunConfig
from ..config.errors import from_validation_error
from ..config.model_yaml import activation

__all__ = [
    "ATTENTION_PHASES",
    "ATTENTION_TERMS",
    "Balance",
    "CommModel",
    "EXPERT_PHASES",
    "EXPERT_TERMS",
    "FORMAT",
    "KEY",
    "ModelShape",
    "PredictionLog",
    "RIDGE_GRID",
    "RatioCheck",
    "Sample",
    "SplitChoice",
    "TimePredictor",
    "VERSION",
    "Workload",
    "analytic_ridge",
    "attention_features",
    "balance_point",
    "balanced_ratio",
    "best_split",
    "check_ratio",
    "evaluate",
    "expected_active_experts",
    "expert_features",
    "fit",
    "format_table",
    "load",
    "mape",
    "nnls_relative",
    "pingpong_layer_time",
    "relative_errors",
    "samples_of",
    "save",
    "split_for_pingpong",
]

FORMAT = "megatron_fapool.moe.predictor"
VERSION = 1
KEY = "fapool.ma_separation.calibration_file"

ATTENTION_PHASES = ("fwd", "fwd_bwd", "decode")
EXPERT_PHASES = ("fwd", "fwd_bwd", "decode")
ATTENTION_TERMS = ("gemm_flops", "attn_flops", "bytes", "kernels")
EXPERT_TERMS = ("flops", "kernels")  # expert_features also counts bytes (activations), not priced
COMPONENTS = {"attention": (ATTENTION_PHASES, ATTENTION_TERMS), "expert": (EXPERT_PHASES, EXPERT_TERMS)}

GEMM_FWD_BWD = 3.0  # forward + backward of a GEMM in units of its forward (dgrad + wgrad)
ATTN_FWD_BWD = 3.5  # forward + backward of flash-style attention (backward = 2.5 x forward)
# Kernels launched (counted, the fit prices them): attention block per call; experts per local expert
ATTENTION_KERNELS = {"fwd": 4, "fwd_bwd": 12, "decode": 4}
EXPERT_KERNELS_PER_EXPERT = {"fwd": 5, "fwd_bwd": 15, "decode": 5}
EXPERT_KERNELS_FIXED = {"fwd": 2, "fwd_bwd": 4, "decode": 2}

# First-principles rates of an H200 (SXM) in bf16, for use without a calibration file: the
# datasheet's dense bf16 peak and HBM3e bandwidth, a few microseconds per kernel, and an
# NVLink-class link. One FLOP rate for every kernel: the balance points follow from the
# FLOP and byte counts alone.
H200_PEAK_FLOPS = 989e12
H200_BYTES_PER_S = 4.8e12
KERNEL_S = 3e-6
LINK_BYTES_PER_S = 300e9
LINK_LATENCY_S = 20e-6

Phase = Literal["fwd", "fwd_bwd", "decode"]


# --------------------------------------------------------------------------------------
# Shapes and workloads
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelShape:
    """The sizes of one MoE layer the time model needs (whole model; ``tp`` divides the attention)."""

    hidden: int
    heads: int
    query_groups: int
    head_dim: int
    num_experts: int
    top_k: int
    expert_ffn: int
    gated: bool = False
    tp: int = 1
    dtype_bytes: int = 2
    num_layers: int = 1

    def __post_init__(self):
        for name in ("hidden", "heads", "query_groups", "head_dim", "num_experts", "top_k", "expert_ffn", "tp",
                     "dtype_bytes", "num_layers"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"ModelShape.{name} must be >= 1, got {getattr(self, name)}")
        if self.heads % self.tp or self.query_groups % self.tp:
            raise ValueError(f"heads {self.heads} and query groups {self.query_groups} must divide by TP {self.tp}")
        if self.top_k > self.num_experts:
            raise ValueError(f"top_k {self.top_k} exceeds num_experts {self.num_experts}")

    @classmethod
    def from_run_config(cls, run_config: RunConfig, *, tp: int | None = None, expert_ffn: int | None = None,
                        dtype_bytes: int | None = None) -> "ModelShape":
        """The shape of ``run_config``'s MoE model (``num_moe_experts`` must be set)."""
        lm = run_config.model.language_model
        if not lm.num_moe_experts:
            raise ConfigError("language_model.num_moe_experts", "the time predictor needs an MoE model YAML",
                              source=run_config.model_yaml_path)
        _, gated = activation(lm.activation_func)
        ffn = expert_ffn or getattr(lm, "moe_ffn_hidden_size", None) or lm.ffn_hidden_size or 4 * lm.hidden_size
        elt = dtype_bytes or torch.tensor([], dtype=run_config.params_dtype).element_size()
        return cls(hidden=lm.hidden_size, heads=lm.num_attention_heads, query_groups=lm.query_groups,
                   head_dim=lm.head_dim, num_experts=lm.num_moe_experts, top_k=lm.moe_router_topk, expert_ffn=ffn,
                   gated=gated, tp=tp or run_config.tensor_model_parallel_size, dtype_bytes=elt,
                   num_layers=lm.num_layers)

    def as_dict(self) -> dict:
        return dict(vars(self))


@dataclass(frozen=True)
class Workload:
    """What one attention GPU runs per layer: ``batch`` sequences of ``seq_len`` tokens (``train``:
    forward + backward, ``prefill``: forward), or one decode step of ``batch`` sequences whose
    K/V caches hold ``seq_len`` tokens (``decode``)."""

    phase: Literal["train", "prefill", "decode"]
    seq_len: int
    batch: int = 1

    def __post_init__(self):
        if self.phase not in ("train", "prefill", "decode"):
            raise ValueError(f"Workload.phase must be 'train', 'prefill' or 'decode', got {self.phase!r}")
        if self.seq_len < 1 or self.batch < 1:
            raise ValueError(f"Workload needs seq_len >= 1 and batch >= 1, got {self.seq_len}, {self.batch}")

    @property
    def attention_phase(self) -> str:
        return {"train": "fwd_bwd", "prefill": "fwd", "decode": "decode"}[self.phase]

    @property
    def expert_phase(self) -> str:
        return {"train": "fwd_bwd", "prefill": "fwd", "decode": "decode"}[self.phase]

    @property
    def tokens(self) -> int:
        """Tokens one attention GPU sends through the MoE layer."""
        return self.batch * (1 if self.phase == "decode" else self.seq_len)

    def describe(self) -> str:
        if self.phase == "decode":
            return f"decode of {self.batch} sequence(s) per attention GPU at context {self.seq_len}"
        return f"{self.phase} of {self.batch} x {self.seq_len} tokens per attention GPU"

    def with_batch(self, batch: int) -> "Workload":
        return replace(self, batch=batch)


# --------------------------------------------------------------------------------------
# Features: the counted FLOPs, bytes and kernels of one call
# --------------------------------------------------------------------------------------


def attention_features(shape: ModelShape, phase: str, seq_len: int, batch: int = 1) -> dict[str, float]:
    """FLOPs, bytes and kernels of one layer's attention block on one attention (TP) rank."""
    if phase not in ATTENTION_PHASES:
        raise ValueError(f"attention phase must be one of {ATTENTION_PHASES}, got {phase!r}")
    h, d, elt = shape.hidden, shape.head_dim, shape.dtype_bytes
    H, g = shape.heads // shape.tp, shape.query_groups // shape.tp
    n, b = seq_len, batch  # numbers (fractional ones too, for solving)
    qkv = (H + 2 * g) * d
    weight_bytes = (h * qkv + H * d * h) * elt
    if phase == "decode":
        proj = 2 * b * h * qkv + 2 * b * H * d * h
        core = 4 * d * H * b * n  # one query row against n keys, QK^T and PV
        kv = b * n * 2 * g * d * elt
        act = b * (2 * h + 2 * qkv + 2 * H * d) * elt
        return {"gemm_flops": float(proj), "attn_flops": float(core), "bytes": float(weight_bytes + kv + act),
                "kernels": float(ATTENTION_KERNELS[phase])}
    tokens = b * n
    proj = 2 * tokens * h * qkv + 2 * tokens * H * d * h
    core = 4 * d * H * b * (n * (n + 1) / 2)
    act = tokens * (2 * h + 2 * qkv + 2 * H * d) * elt
    byts = weight_bytes + act
    if phase == "fwd_bwd":
        proj, core, byts = GEMM_FWD_BWD * proj, ATTN_FWD_BWD * core, GEMM_FWD_BWD * byts
    return {"gemm_flops": float(proj), "attn_flops": float(core), "bytes": float(byts),
            "kernels": float(ATTENTION_KERNELS[phase])}


def expert_features(shape: ModelShape, phase: str, tokens_per_expert: Sequence[float], *,
                    active: float | None = None, ridge: float = 0.0) -> dict[str, float]:
    """FLOPs, bytes and kernels of one layer's local experts on one expert GPU.

    ``tokens_per_expert``: (token, expert) pairs of each local expert (its length is the number
    of local experts). ``flops`` are the GEMM FLOPs of each expert that has tokens, counted
    for at least ``ridge`` tokens: the roofline of one expert's GEMMs, whose time stays at
    reading its weights (or at the host's cost of running it) until its tokens reach the
    ridge. ``bytes`` are the activations written and read. ``active``: how many experts have
    tokens, when an expectation (a float, :func:`expected_active_experts`) replaces the
    count; the tokens are then spread evenly over them.
    """
    if phase not in EXPERT_PHASES:
        raise ValueError(f"expert phase must be one of {EXPERT_PHASES}, got {phase!r}")
    t = [float(x) for x in tokens_per_expert]
    if not t or any(x < 0 for x in t):
        raise ValueError(f"tokens_per_expert must be a non-empty list of counts >= 0, got {list(tokens_per_expert)}")
    h, f, elt = shape.hidden, shape.expert_ffn, shape.dtype_bytes
    gm = 2 if shape.gated else 1
    per_token = 2 * h * f * gm + 2 * f * h
    pairs = sum(t)
    if active is None:
        effective = sum(max(x, ridge) for x in t if x > 0)
    else:
        effective = active * max(pairs / active, ridge) if active > 0 else 0.0
    flops = effective * per_token
    byts = pairs * (2 * h + (gm + 2) * f) * elt
    kernels = len(t) * EXPERT_KERNELS_PER_EXPERT[phase] + EXPERT_KERNELS_FIXED[phase]
    if phase == "fwd_bwd":
        flops, byts = GEMM_FWD_BWD * flops, GEMM_FWD_BWD * byts
    return {"flops": float(flops), "bytes": float(byts), "kernels": float(kernels)}


def analytic_ridge(flops_per_s: float, bytes_per_s: float, dtype_bytes: int = 2) -> float:
    """Tokens at which an expert's GEMMs turn from reading weights to computing: ``flops_per_s / bytes_per_s``
    FLOP per byte times the weight bytes per token-FLOP (``dtype_bytes / 2``)."""
    return flops_per_s / bytes_per_s * dtype_bytes / 2


def expected_active_experts(local_experts: int, tokens: float, *, num_experts: int, top_k: int) -> float:
    """Expected local experts with at least one of ``tokens`` tokens, each routed uniformly to ``top_k`` of
    ``num_experts``."""
    if tokens <= 0:
        return 0.0
    return local_experts * (1.0 - (1.0 - top_k / num_experts) ** tokens)


# --------------------------------------------------------------------------------------
# Communication and the predictor
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CommModel:
    """One transfer in one direction: ``latency_s + bytes / bytes_per_s``."""

    latency_s: float = LINK_LATENCY_S
    bytes_per_s: float = LINK_BYTES_PER_S
    measured: bool = False

    def time(self, nbytes: float) -> float:
        return self.latency_s + nbytes / self.bytes_per_s if nbytes > 0 else 0.0


class TimePredictor:
    """Coefficients per (component, phase) and a :class:`CommModel`; predicts seconds.

    ``coefficients[component][phase]`` maps each term of :data:`ATTENTION_TERMS` /
    :data:`EXPERT_TERMS` to seconds per unit; ``sources`` says, per (component, phase),
    ``"fitted"`` or ``"analytic"``.
    """

    def __init__(self, coefficients: Mapping[str, Mapping[str, Mapping[str, float]]], *, comm: CommModel | None = None,
                 sources: Mapping[str, Mapping[str, str]] | None = None, about: Mapping[str, Any] | None = None,
                 ridge: Mapping[str, float] | None = None,
                 combine: Mapping[str, Mapping[str, str]] | None = None):
        coeffs: dict[str, dict[str, dict[str, float]]] = {}
        for component, (phases, terms) in COMPONENTS.items():
            given = coefficients.get(component)
            if given is None:
                raise ValueError(f"no coefficients for {component}")
            coeffs[component] = {}
            for phase in phases:
                c = given.get(phase)
                if c is None or set(c) != set(terms):
                    raise ValueError(f"{component}.{phase}: coefficients must give exactly {terms}, got"
                                     f" {sorted(c) if c else None}")
                if any(not math.isfinite(v) or v < 0 for v in c.values()):
                    raise ValueError(f"{component}.{phase}: coefficients must be finite and >= 0, got {dict(c)}")
                coeffs[component][phase] = {k: float(c[k]) for k in terms}
        self.coefficients = coeffs
        self.comm = comm or CommModel()
        self.sources = {comp: dict((sources or {}).get(comp, {})) for comp in COMPONENTS}
        for comp, (phases, _) in COMPONENTS.items():
            for p in phases:
                self.sources[comp].setdefault(p, "analytic")
        self.about = dict(about or {})
        self.combine = {comp: {p: "sum" for p in phases} for comp, (phases, _) in COMPONENTS.items()}
        for comp, phases in (combine or {}).items():
            for p, how in phases.items():
                if how not in ("sum", "max"):
                    raise ValueError(f"combine {comp}.{p}: 'sum' or 'max', got {how!r}")
                self.combine[comp][p] = how
        self.ridge = {p: 0.0 for p in EXPERT_PHASES}  # expert phase -> ridge tokens (see expert_features)
        for p, r in (ridge or {}).items():
            if p not in EXPERT_PHASES or not (r >= 0 and math.isfinite(r)):
                raise ValueError(f"ridge: expert phase {p!r} -> {r!r}: phases {EXPERT_PHASES}, tokens >= 0")
            self.ridge[p] = float(r)

    @classmethod
    def analytic(cls, *, flops_per_s: float = H200_PEAK_FLOPS, bytes_per_s: float = H200_BYTES_PER_S,
                 kernel_s: float = KERNEL_S, attention_flops_per_s: float | None = None,
                 comm: CommModel | None = None) -> "TimePredictor":
        """First principles: every FLOP at ``flops_per_s`` (core attention at ``attention_flops_per_s``
        if given), every byte at ``bytes_per_s``, ``kernel_s`` per kernel (defaults: H200 bf16)."""
        attn = attention_flops_per_s or flops_per_s
        a = {"gemm_flops": 1 / flops_per_s, "attn_flops": 1 / attn, "bytes": 1 / bytes_per_s, "kernels": kernel_s}
        e = {"flops": 1 / flops_per_s, "kernels": kernel_s}
        about = {"source": "analytic", "flops_per_s": flops_per_s, "attention_flops_per_s": attn,
                 "bytes_per_s": bytes_per_s, "kernel_s": kernel_s}
        ridge = analytic_ridge(flops_per_s, bytes_per_s)
        return cls({"attention": {p: dict(a) for p in ATTENTION_PHASES}, "expert": {p: dict(e) for p in EXPERT_PHASES}},
                   comm=comm, about=about, ridge={p: ridge for p in EXPERT_PHASES})

    # -- predictions ------------------------------------------------------------------------
    def _time(self, component: str, phase: str, feats: Mapping[str, float]) -> float:
        """The launch cost of the kernels and the device's FLOP and byte time, added (``"sum"``) or
        overlapped (``"max"``: the host queues kernels while the device runs earlier ones)."""
        c = self.coefficients[component][phase]
        host = c["kernels"] * feats["kernels"]
        device = sum(c[k] * feats[k] for k in c if k != "kernels")
        return max(host, device) if self.combine[component][phase] == "max" else host + device

    def attention_time(self, shape: ModelShape, phase: str, seq_len: int, batch: int = 1) -> float:
        """Seconds of one layer's attention block on one attention GPU."""
        return self._time("attention", phase, attention_features(shape, phase, seq_len, batch))

    def expert_time(self, shape: ModelShape, phase: str, tokens_per_expert: Sequence[float], *,
                    active: float | None = None) -> float:
        """Seconds of one layer's local experts on one expert GPU for these (token, expert) pairs."""
        return self._time("expert", phase, expert_features(shape, phase, tokens_per_expert, active=active,
                                                           ridge=self.ridge[phase]))

    def expert_time_uniform(self, shape: ModelShape, phase: str, tokens: float, local_experts: int) -> float:
        """Expert GPU time when ``tokens`` tokens (of all attention GPUs) are routed uniformly (top-k of all
        experts) and this GPU holds ``local_experts`` of them."""
        per_expert = tokens * shape.top_k / shape.num_experts
        active = expected_active_experts(local_experts, tokens, num_experts=shape.num_experts, top_k=shape.top_k)
        return self.expert_time(shape, phase, [per_expert] * local_experts, active=active)

    def comm_time(self, nbytes: float) -> float:
        return self.comm.time(nbytes)

    def predict(self, shape: ModelShape, sample: "Sample") -> float:
        """Predicted seconds of a :class:`Sample`'s call."""
        if sample.component == "attention":
            return self.attention_time(shape, sample.phase, sample.seq_len, sample.batch)
        return self.expert_time(shape, sample.phase, sample.tokens_per_expert)

    def mismatch(self, *, device: str | None = None, dtype: str | None = None) -> str | None:
        """A sentence when this calibration was made on another device or dtype than given, else None."""
        problems = []
        for key, want in (("device", device), ("dtype", dtype)):
            have = self.about.get(key)
            if want is not None and have is not None and str(have) != str(want):
                problems.append(f"{key} {have!r}, not {want!r}")
        if not problems:
            return None
        return f"the time-predictor calibration was made for {' and '.join(problems)}: predictions may be off"

    def describe(self) -> str:
        """Coefficients as rates (FLOP/s, B/s, microseconds per kernel) and the experts' ridges."""
        def rate(v, unit):
            if v <= 0:
                return "free"
            r = 1 / v
            for scale, prefix in ((1e12, "T"), (1e9, "G"), (1e6, "M")):
                if r >= scale:
                    return f"{r / scale:.3g} {prefix}{unit}/s"
            return f"{r:.3g} {unit}/s"

        lines = []
        for comp, phases in self.coefficients.items():
            for phase, c in phases.items():
                parts = []
                for k, v in c.items():
                    if k.endswith("flops"):
                        parts.append(f"{k} {rate(v, 'FLOP')}")
                    elif k == "bytes":
                        parts.append(f"bytes {rate(v, 'B')}")
                    else:
                        parts.append(f"{v * 1e6:.2f} us/kernel")
                if comp == "expert":
                    parts.append(f"ridge {self.ridge[phase]:.0f} tokens/expert")
                how = "overlapped (max)" if self.combine[comp][phase] == "max" else "added"
                parts.append(f"launch and device time {how}")
                lines.append(f"{comp:>9} {phase:<7} ({self.sources[comp][phase]}): " + ", ".join(parts))
        lines.append(f"     comm: {self.comm.latency_s * 1e6:.1f} us + bytes at {self.comm.bytes_per_s / 1e9:.0f} GB/s"
                     f" ({'measured' if self.comm.measured else 'assumed, not measured'})")
        return "\n".join(lines)


# --------------------------------------------------------------------------------------
# Samples, fitting and errors
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Sample:
    """One measured call: attention (``seq_len``, ``batch``) or experts (``tokens_per_expert``)."""

    component: Literal["attention", "expert"]
    phase: str
    measured_s: float
    seq_len: int | None = None
    batch: int = 1
    tokens_per_expert: tuple[int, ...] | None = None
    held_out: bool = False

    def __post_init__(self):
        if self.component not in COMPONENTS:
            raise ValueError(f"Sample.component must be 'attention' or 'expert', got {self.component!r}")
        phases = COMPONENTS[self.component][0]
        if self.phase not in phases:
            raise ValueError(f"a {self.component} sample's phase must be one of {phases}, got {self.phase!r}")
        if not (self.measured_s > 0 and math.isfinite(self.measured_s)):
            raise ValueError(f"Sample.measured_s must be a positive number of seconds, got {self.measured_s}")
        if self.component == "attention" and not (self.seq_len and self.seq_len > 0):
            raise ValueError("an attention sample needs seq_len >= 1")
        if self.component == "expert":
            if not self.tokens_per_expert:
                raise ValueError("an expert sample needs tokens_per_expert")
            object.__setattr__(self, "tokens_per_expert", tuple(int(x) for x in self.tokens_per_expert))

    def features(self, shape: ModelShape, ridge: float = 0.0) -> dict[str, float]:
        if self.component == "attention":
            return attention_features(shape, self.phase, self.seq_len, self.batch)
        return expert_features(shape, self.phase, self.tokens_per_expert, ridge=ridge)

    def label(self) -> str:
        if self.component == "attention":
            what = "context" if self.phase == "decode" else "n"
            return f"{what}={self.seq_len} b={self.batch}"
        t = self.tokens_per_expert
        if len(set(t)) == 1:
            return f"{len(t)} experts x {t[0]} tokens"
        return f"{len(t)} experts, tokens {list(t)}"

    def as_dict(self) -> dict:
        d = {"component": self.component, "phase": self.phase, "measured_s": self.measured_s, "held_out": self.held_out}
        if self.component == "attention":
            d.update(seq_len=self.seq_len, batch=self.batch)
        else:
            d["tokens_per_expert"] = list(self.tokens_per_expert)
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "Sample":
        tpe = d.get("tokens_per_expert")
        return cls(component=d["component"], phase=d["phase"], measured_s=float(d["measured_s"]),
                   seq_len=d.get("seq_len"), batch=int(d.get("batch", 1)),
                   tokens_per_expert=tuple(tpe) if tpe is not None else None, held_out=bool(d.get("held_out", False)))


def nnls_relative(rows: Sequence[Sequence[float]], targets: Sequence[float]) -> list[float]:
    """Non-negative ``c`` minimising ``sum_i ((rows_i . c - y_i) / y_i)^2`` (exact: every active set is tried).

    Columns are scaled to unit size first, so terms of very different magnitudes (FLOPs,
    kernels) are solved alike. Fine for the few terms of this model (2^terms subsets).
    """
    return _nnls_relative(rows, targets)[0]


def _nnls_relative(rows: Sequence[Sequence[float]], targets: Sequence[float]) -> tuple[list[float], float]:
    """:func:`nnls_relative`'s coefficients and its sum of squared relative errors."""
    if not rows:
        raise ValueError("no samples to fit")
    p = len(rows[0])
    X = torch.tensor(rows, dtype=torch.float64)
    y = torch.tensor(targets, dtype=torch.float64)
    if (y <= 0).any():
        raise ValueError("measured times must be > 0")
    A = X / y[:, None]
    scale = A.abs().amax(dim=0)
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    A = A / scale
    ones = torch.ones(len(rows), 1, dtype=torch.float64)
    best, best_res = torch.zeros(p, dtype=torch.float64), float(len(rows))  # c = 0: every relative error is -1
    for k in range(1, p + 1):
        for subset in itertools.combinations(range(p), k):
            cols = list(subset)
            sub = A[:, cols]
            res_ = torch.linalg.lstsq(sub, ones, driver="gelsd")  # rank-revealing (CPU tensors)
            if int(res_.rank) < len(cols):
                continue
            sol = res_.solution[:, 0]
            if (sol < 0).any():
                continue
            res = float(((sub @ sol) - 1).pow(2).sum())
            if res < best_res - 1e-12:
                best_res = res
                best = torch.zeros(p, dtype=torch.float64)
                best[cols] = sol
    return (best / scale).tolist(), best_res


def _fit_max(host: Sequence[float], device_rows: Sequence[Sequence[float]], y: Sequence[float],
             iterations: int = 20) -> tuple[float, list[float], float]:
    """``(c_host, c_device, sum of squared relative errors)`` of ``y ~ max(c_host * host, device_rows . c_device)``.

    Alternating: given which points are host-bound, each side is a non-negative least
    squares of its points (the host side: of ``y / host``); then every point goes to the
    side that predicts more. Started from every split of the points by their time per
    kernel (the ``k`` smallest host-bound, ``k`` = 0 .. n in a few steps); the best end wins.
    """
    n = len(y)

    def dev(cd, row):
        return sum(a * b for a, b in zip(cd, row))

    def err(ch, cd):
        return sum(((max(ch * h, dev(cd, row)) - t) / t) ** 2 for h, row, t in zip(host, device_rows, y))

    def solve(is_host):
        hs = [i for i in range(n) if is_host[i]]
        ds = [i for i in range(n) if not is_host[i]]
        ch = nnls_relative([[host[i]] for i in hs], [y[i] for i in hs])[0] if hs else 0.0
        cd = nnls_relative([device_rows[i] for i in ds], [y[i] for i in ds]) if ds else [0.0] * len(device_rows[0])
        return ch, cd

    order = sorted(range(n), key=lambda i: y[i] / host[i] if host[i] > 0 else math.inf)
    starts = sorted({0, n} | {round(n * q) for q in (0.2, 0.4, 0.6, 0.8)})
    best = None
    for k in starts:
        is_host = [False] * n
        for i in order[:k]:
            is_host[i] = True
        for _ in range(iterations):
            ch, cd = solve(is_host)
            new = [ch * host[i] > dev(cd, device_rows[i]) for i in range(n)]
            if new == is_host:
                break
            is_host = new
        e = err(ch, cd)
        if best is None or e < best[2] - 1e-12:
            best = (ch, cd, e)
    return best


#: Ridges (tokens per expert) the expert fit tries: 0 (a plain FLOP count) and 8 .. 16384 in steps of sqrt(2).
RIDGE_GRID = (0.0,) + tuple(round(2 ** (k / 2), 1) for k in range(6, 29))


def fit(samples: Iterable[Sample], shape: ModelShape, *, comm: CommModel | None = None,
        fallback: TimePredictor | None = None, include_held_out: bool = False,
        about: Mapping[str, Any] | None = None) -> TimePredictor:
    """Fit every (component, phase) that has samples (held-out ones excluded unless asked);
    the others keep ``fallback``'s (default :meth:`TimePredictor.analytic`) coefficients.

    Each group is fitted in relative error with non-negative coefficients both ways of
    :meth:`TimePredictor._time` (launch cost plus device time: :func:`nnls_relative`; or their
    maximum: :func:`_fit_max`), the experts for every ridge of :data:`RIDGE_GRID`; the
    smallest error on the fitted points wins.
    """
    samples = list(samples)
    fallback = fallback or TimePredictor.analytic()
    coeffs = {comp: {p: dict(c) for p, c in phases.items()} for comp, phases in fallback.coefficients.items()}
    sources = {comp: {p: "analytic" for p in phases} for comp, phases in coeffs.items()}
    ridge = dict(fallback.ridge)
    combine = {comp: dict(v) for comp, v in fallback.combine.items()}
    for comp, (phases, terms) in COMPONENTS.items():
        dev_terms = [t for t in terms if t != "kernels"]
        for phase in phases:
            group = [s for s in samples if s.component == comp and s.phase == phase
                     and (include_held_out or not s.held_out)]
            if not group:
                continue
            y = [s.measured_s for s in group]
            best = None
            for r in (RIDGE_GRID if comp == "expert" else (0.0,)):
                feats = [s.features(shape, ridge=r) for s in group]
                c, e = _nnls_relative([[f[t] for t in terms] for f in feats], y)
                cands = [(e, "sum", dict(zip(terms, c)))]
                ch, cd, e = _fit_max([f["kernels"] for f in feats], [[f[t] for t in dev_terms] for f in feats], y)
                cands.append((e, "max", {"kernels": ch, **dict(zip(dev_terms, cd))}))
                for e, how, cs in cands:
                    if best is None or e < best[0] - 1e-12:
                        best = (e, r, how, cs)
            coeffs[comp][phase] = {t: best[3][t] for t in terms}
            combine[comp][phase] = best[2]
            sources[comp][phase] = "fitted"
            if comp == "expert":
                ridge[phase] = best[1]
    return TimePredictor(coeffs, comm=comm or fallback.comm, sources=sources, about=about, ridge=ridge,
                         combine=combine)


def relative_errors(predicted: Sequence[float], measured: Sequence[float]) -> list[float]:
    """``(predicted - measured) / measured`` per point."""
    if len(predicted) != len(measured):
        raise ValueError(f"{len(predicted)} predictions for {len(measured)} measurements")
    return [(p - m) / m for p, m in zip(predicted, measured)]


def mape(predicted: Sequence[float], measured: Sequence[float]) -> float | None:
    """Mean absolute percentage error (percent); ``None`` without points."""
    errs = relative_errors(predicted, measured)
    return 100.0 * sum(abs(e) for e in errs) / len(errs) if errs else None


def evaluate(predictor: TimePredictor, shape: ModelShape, samples: Iterable[Sample]) -> dict:
    """Predicted vs measured per sample, and the MAPE per (component, phase) and overall, fitted and held out.

    Returns ``{"rows": [...], "mape": {"<component>.<phase>": {"fit": %, "held_out": %}, "all": {...}}}``.
    """
    rows = []
    for s in samples:
        pred = predictor.predict(shape, s)
        rows.append({**s.as_dict(), "label": s.label(), "predicted_s": pred,
                     "error_percent": 100.0 * (pred - s.measured_s) / s.measured_s})
    summary: dict[str, dict[str, float | None]] = {}

    def _m(sel):
        return mape([r["predicted_s"] for r in sel], [r["measured_s"] for r in sel])

    groups = sorted({(r["component"], r["phase"]) for r in rows})
    for comp, phase in groups:
        sel = [r for r in rows if r["component"] == comp and r["phase"] == phase]
        summary[f"{comp}.{phase}"] = {"fit": _m([r for r in sel if not r["held_out"]]),
                                      "held_out": _m([r for r in sel if r["held_out"]])}
    summary["all"] = {"fit": _m([r for r in rows if not r["held_out"]]),
                      "held_out": _m([r for r in rows if r["held_out"]])}
    return {"rows": rows, "mape": summary}


def format_table(evaluation: Mapping[str, Any]) -> str:
    """The rows of :func:`evaluate` as a text table, then the MAPE lines."""
    head = f"{'component':<9} {'phase':<7} {'point':<38} {'measured ms':>11} {'predicted ms':>12} {'error':>8}  set"
    lines = [head, "-" * len(head)]
    for r in evaluation["rows"]:
        lines.append(f"{r['component']:<9} {r['phase']:<7} {r['label'][:38]:<38} {r['measured_s'] * 1e3:>11.4f}"
                     f" {r['predicted_s'] * 1e3:>12.4f} {r['error_percent']:>+7.1f}%"
                     f"  {'held out' if r['held_out'] else 'fit'}")
    for name, m in evaluation["mape"].items():
        f = "-" if m["fit"] is None else f"{m['fit']:.1f}%"
        h = "-" if m["held_out"] is None else f"{m['held_out']:.1f}%"
        lines.append(f"MAPE {name:<17} fit points {f:>7}   held-out points {h:>7}")
    return "\n".join(lines)


class PredictionLog:
    """Predicted vs measured times as a run goes (e.g. per training step and component)."""

    def __init__(self):
        self.points: dict[str, list[tuple[float, float]]] = {}

    def record(self, name: str, predicted_s: float, measured_s: float) -> float:
        """Add one point; returns its relative error in percent."""
        self.points.setdefault(name, []).append((float(predicted_s), float(measured_s)))
        return 100.0 * (predicted_s - measured_s) / measured_s

    def mape(self, name: str | None = None) -> float | None:
        pts = [p for k, v in self.points.items() if name is None or k == name for p in v]
        return mape([p for p, _ in pts], [m for _, m in pts])

    def summary(self) -> str:
        parts = [f"{k} {self.mape(k):.1f}% ({len(v)} points)" for k, v in self.points.items()]
        return "predictor MAPE: " + (", ".join(parts) if parts else "no points")


# --------------------------------------------------------------------------------------
# Ratio, split and ping-pong
# --------------------------------------------------------------------------------------


def _local_experts(shape: ModelShape, expert_gpus: int) -> int:
    if expert_gpus < 1 or shape.num_experts % expert_gpus:
        raise ValueError(f"{shape.num_experts} experts do not divide over {expert_gpus} expert GPUs")
    return shape.num_experts // expert_gpus


def _layer_times(predictor: TimePredictor, shape: ModelShape, workload: Workload, attention_gpus: float,
                 expert_gpus: int) -> tuple[float, float]:
    """(attention GPU seconds, expert GPU seconds) per layer; attention GPUs may be fractional (for solving)."""
    t_a = predictor.attention_time(shape, workload.attention_phase, workload.seq_len, workload.batch)
    tokens = attention_gpus * workload.tokens  # all attention GPUs' tokens reach the expert GPUs
    t_e = predictor.expert_time_uniform(shape, workload.expert_phase, tokens, _local_experts(shape, expert_gpus))
    return t_a, t_e


@dataclass(frozen=True)
class Balance:
    """The attention : expert ratio at which both take the same time per layer."""

    ratio: float | None  # attention GPUs per expert GPU; None: the experts are slower at any ratio
    expert_gpus: int
    attention_s: float  # per layer on one attention GPU
    expert_s: float  # per layer on one expert GPU, at the balanced ratio (or at the smallest ratio tried)
    note: str = ""


def balanced_ratio(predictor: TimePredictor, shape: ModelShape, workload: Workload, *, expert_gpus: int,
                   max_ratio: float = 1e4) -> Balance:
    """Attention GPUs per expert GPU (a real number) that balances ``workload`` with ``expert_gpus`` expert GPUs.

    The attention GPU's time per layer does not depend on the ratio (its workload is per
    GPU); the expert GPU's grows with it (it serves the tokens of every attention GPU,
    routed uniformly). Solved by bisection in log space.
    """
    t_a = predictor.attention_time(shape, workload.attention_phase, workload.seq_len, workload.batch)

    def excess(r):  # expert - attention at ratio r
        return _layer_times(predictor, shape, workload, r * expert_gpus, expert_gpus)[1] - t_a

    lo, hi = 1e-6, max_ratio
    if excess(lo) >= 0:
        t_e = _layer_times(predictor, shape, workload, lo * expert_gpus, expert_gpus)[1]
        return Balance(None, expert_gpus, t_a, t_e, note="the experts take longer than attention at any ratio"
                       " (their fixed cost alone exceeds the attention time)")
    if excess(hi) < 0:
        t_e = _layer_times(predictor, shape, workload, hi * expert_gpus, expert_gpus)[1]
        return Balance(math.inf, expert_gpus, t_a, t_e, note=f"no ratio up to {max_ratio:g}:1 makes the experts as slow"
                       " as attention (their time hardly grows with their tokens)")
    for _ in range(200):
        mid = math.sqrt(lo * hi)
        lo, hi = (mid, hi) if excess(mid) < 0 else (lo, mid)
        if hi / lo < 1 + 1e-9:
            break
    r = math.sqrt(lo * hi)
    return Balance(r, expert_gpus, t_a, _layer_times(predictor, shape, workload, r * expert_gpus, expert_gpus)[1])


def balance_point(predictor: TimePredictor, shape: ModelShape, workload: Workload, *, attention_gpus: int,
                  expert_gpus: int, vary: Literal["seq_len", "batch"] | None = None,
                  limit: float = 1e8) -> float | None:
    """At a fixed ``attention_gpus : expert_gpus``, the ``seq_len`` (training / prefill) or ``batch``
    (decode) at which attention and experts take the same time per layer (a real number).

    Below it the experts are the bottleneck, above it attention (the last such crossing:
    a host-bound attention floor can also win at tiny sizes). ``None``: no crossing up to
    ``limit``.
    """
    vary = vary or ("batch" if workload.phase == "decode" else "seq_len")
    if vary not in ("seq_len", "batch"):
        raise ValueError(f"vary must be 'seq_len' or 'batch', got {vary!r}")

    def excess(x):  # attention - experts at value x
        t_a, t_e = _layer_times(predictor, shape, replace(workload, **{vary: x}), attention_gpus, expert_gpus)
        return t_a - t_e

    # attention grows faster than the experts (n^2 against n; K/V reads against saturated expert weights);
    # a host-bound floor can make attention the slower one at tiny sizes too: take the last crossing
    grid = [math.exp(math.log(limit) * i / 96) for i in range(97)]
    signs = [excess(x) >= 0 for x in grid]
    up = [i for i in range(1, len(grid)) if signs[i] and not signs[i - 1]]
    if not up or not signs[-1]:
        return None
    lo, hi = grid[up[-1] - 1], grid[up[-1]]
    for _ in range(200):
        mid = math.sqrt(lo * hi)
        lo, hi = (mid, hi) if excess(mid) < 0 else (lo, mid)
        if hi / lo < 1 + 1e-9:
            break
    return math.sqrt(lo * hi)


def best_split(predictor: TimePredictor, shape: ModelShape, workload: Workload, gpus: int) -> list[dict]:
    """Every split of ``gpus`` into ``a`` attention + ``e`` expert GPUs (``e`` dividing the experts), best
    first: per-layer time ``max(attention, experts)`` without overlap and tokens per second per GPU."""
    out = []
    for e in range(1, gpus):
        if shape.num_experts % e:
            continue
        a = gpus - e
        t_a, t_e = _layer_times(predictor, shape, workload, a, e)
        step = max(t_a, t_e)
        out.append({"attention_gpus": a, "expert_gpus": e, "attention_s": t_a, "expert_s": t_e, "layer_s": step,
                    "tokens_per_s_per_gpu": a * workload.tokens / step / gpus})
    return sorted(out, key=lambda x: -x["tokens_per_s_per_gpu"])


@dataclass(frozen=True)
class RatioCheck:
    ok: bool
    configured: tuple[int, int]
    balanced: Balance  # the balanced ratio for this workload at the configured number of expert GPUs
    attention_s: float  # per layer, one attention GPU, at the configured ratio
    expert_s: float  # per layer, one expert GPU, at the configured ratio
    off_by: float  # configured a/e over the balanced ratio (> 1: too many attention GPUs for the work)
    balance_point: float | None  # seq_len (train/prefill) or batch (decode) the configured ratio balances at
    message: str


def check_ratio(predictor: TimePredictor, shape: ModelShape, configured: tuple[int, int], workload: Workload, *,
                tolerance: float = 0.25) -> RatioCheck:
    """Whether ``configured`` = (attention GPUs, expert GPUs) balances ``workload``, with a one-line message.

    Off means the busier side's predicted time per layer exceeds the other's by more than
    ``tolerance``. The message gives both times, the balanced ratio for the workload, by how
    much the configured one is off, and the sequence length (training / prefill) or decode
    batch at which the configured ratio would balance.
    """
    a, e = (int(x) for x in configured)
    if a < 1 or e < 1:
        raise ValueError(f"a ratio needs >= 1 attention and expert GPU, got {a}:{e}")
    t_a, t_e = _layer_times(predictor, shape, workload, a, e)
    bal = balanced_ratio(predictor, shape, workload, expert_gpus=e)
    ratio = a / e
    if bal.ratio is None:
        off_by = math.inf
    elif bal.ratio == math.inf:
        off_by = 0.0
    else:
        off_by = ratio / bal.ratio
    slower, faster = max(t_a, t_e), min(t_a, t_e)
    ok = faster > 0 and slower / faster - 1 <= tolerance
    bound = "expert-bound" if t_e > t_a else "attention-bound"
    idle = (1 - faster / slower) * 100 if slower > 0 else 0.0
    msg = (f"MA ratio {a}:{e} for {workload.describe()}: predicted per layer attention {t_a * 1e3:.3f} ms,"
           f" experts {t_e * 1e3:.3f} ms: {'balanced within' if ok else 'OFF by more than'} {tolerance:.0%}"
           f" ({bound}, the {'attention' if t_e > t_a else 'expert'} GPUs idle {idle:.0f}% of it)")
    if bal.ratio is None or bal.ratio == math.inf:
        msg += f"; {bal.note} with {e} expert GPU(s)"
    else:
        msg += f"; balanced at {bal.ratio:.2f}:1 with {e} expert GPU(s)"
        if not ok:
            msg += (f", so {ratio:.2f}:1 has {off_by:.1f}x too many attention GPUs" if off_by > 1 else
                    f", so {ratio:.2f}:1 has {1 / off_by:.1f}x too few attention GPUs")
    point = balance_point(predictor, shape, workload, attention_gpus=a, expert_gpus=e)
    if point is not None:
        if workload.phase == "decode":
            msg += f"; {a}:{e} balances decode at this context at {point:.1f} sequences per attention GPU"
        else:
            msg += f"; {a}:{e} balances {workload.phase} of {workload.batch} sequence(s) at {point:,.0f} tokens each"
    return RatioCheck(ok, (a, e), bal, t_a, t_e, off_by, point, msg)


@dataclass(frozen=True)
class SplitChoice:
    m: int
    layer_s: dict[int, float]  # predicted per-layer time for each m tried
    reason: str


def _dispatch_bytes(shape: ModelShape, tokens: float) -> float:
    """Bytes one attention GPU sends for ``tokens`` tokens (a hidden vector and a prob per (token, expert))."""
    return tokens * shape.top_k * (shape.hidden * shape.dtype_bytes + 4)


def pingpong_layer_time(predictor: TimePredictor, shape: ModelShape, workload: Workload, m: int, *,
                        attention_gpus: int, expert_gpus: int) -> float:
    """Per-layer time with the batch split into ``m`` parts (steady state, layers chained).

    Each part goes attention -> dispatch -> experts -> combine -> next layer's attention.
    The attention GPU, the expert GPU and each link direction serve the ``m`` parts one after
    another, and a part cannot come back before its round trip: per layer
    ``max(m a, m e, m c, a + 2 c + e)`` with ``a``, ``e``, ``c`` one part's attention,
    expert and one-way transfer time (the transfer at the busier end: the expert GPU
    receives from ``attention_gpus / expert_gpus`` attention GPUs). ``m = 1``: ``a + 2c + e``.
    """
    if m < 1 or (m > 1 and m > workload.batch):
        raise ValueError(f"cannot split a batch of {workload.batch} into {m} parts")
    part = workload.with_batch(max(1, workload.batch // m))
    t_a, t_e = _layer_times(predictor, shape, part, attention_gpus, expert_gpus)
    nbytes = _dispatch_bytes(shape, part.tokens) * max(1.0, attention_gpus / expert_gpus)
    c = predictor.comm_time(nbytes) * (2 if workload.phase == "train" else 1)  # backward sends as much again
    if m == 1:
        return t_a + 2 * c + t_e
    return max(m * t_a, m * t_e, m * c, t_a + 2 * c + t_e)


def split_for_pingpong(predictor: TimePredictor, shape: ModelShape, workload: Workload, *, attention_gpus: int,
                       expert_gpus: int, max_m: int = 4, min_gain: float = 0.05) -> SplitChoice:
    """The ping-pong split ``m`` (1, 2, ...) with the smallest predicted per-layer time.

    ``m > 1`` needs a batch of at least ``m`` sequences that ``m`` divides (the split is along
    the batch) and must win by ``min_gain`` over ``m = 1``.
    """
    times = {1: pingpong_layer_time(predictor, shape, workload, 1, attention_gpus=attention_gpus,
                                    expert_gpus=expert_gpus)}
    for m in range(2, max_m + 1):
        if workload.batch >= m and workload.batch % m == 0:
            times[m] = pingpong_layer_time(predictor, shape, workload, m, attention_gpus=attention_gpus,
                                           expert_gpus=expert_gpus)
    if len(times) == 1:
        return SplitChoice(1, times, f"a batch of {workload.batch} cannot be split into 2 or more equal parts")
    best = min(times, key=times.get)
    gain = times[1] / times[best] - 1
    if best == 1 or gain < min_gain:
        return SplitChoice(1, times, f"no split wins by {min_gain:.0%} (best m={best}: {gain:+.1%})")
    return SplitChoice(best, times, f"m={best} is predicted {gain:.0%} faster per layer than no split")


# --------------------------------------------------------------------------------------
# The calibration file
# --------------------------------------------------------------------------------------


class _Group(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    coefficients: dict[str, NonNegativeFloat]
    source: Literal["fitted", "analytic"]
    ridge_tokens: NonNegativeFloat | None = None  # experts only (see expert_features)
    combine: Literal["sum", "max"] = "sum"


class _Comm(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    latency_s: NonNegativeFloat
    bytes_per_s: float
    measured: bool


class _Shape(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    hidden: PositiveInt
    heads: PositiveInt
    query_groups: PositiveInt
    head_dim: PositiveInt
    num_experts: PositiveInt
    top_k: PositiveInt
    expert_ffn: PositiveInt
    gated: bool
    tp: PositiveInt
    dtype_bytes: PositiveInt
    num_layers: PositiveInt


class _File(BaseModel):
    model_config = ConfigDict(extra="allow", frozen=True)

    format: Literal["megatron_fapool.moe.predictor"]
    version: int
    device: str
    dtype: str
    date: str
    torch: str | None = None
    host: str | None = None
    shape: _Shape
    attention: dict[Literal["fwd", "fwd_bwd", "decode"], _Group]
    expert: dict[Literal["fwd", "fwd_bwd", "decode"], _Group]
    comm: _Comm
    samples: list[dict] | None = None
    error: dict | None = None
    notes: list[str] | None = None


def save(path: str, predictor: TimePredictor, shape: ModelShape, *, device: str, dtype: str,
         date: str | None = None, samples: Sequence[Sample] = (), notes: Sequence[str] = (),
         **extra: Any) -> dict:
    """Write the calibration file (whole or not at all); returns what was written."""
    date = date or _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    data: dict[str, Any] = {
        "format": FORMAT, "version": VERSION, "device": device, "dtype": dtype, "date": date,
        "torch": torch.__version__, "shape": shape.as_dict(),
        "attention": {p: {"coefficients": predictor.coefficients["attention"][p],
                          "source": predictor.sources["attention"][p],
                          "combine": predictor.combine["attention"][p]} for p in ATTENTION_PHASES},
        "expert": {p: {"coefficients": predictor.coefficients["expert"][p], "source": predictor.sources["expert"][p],
                       "ridge_tokens": predictor.ridge[p], "combine": predictor.combine["expert"][p]}
                   for p in EXPERT_PHASES},
        "comm": {"latency_s": predictor.comm.latency_s, "bytes_per_s": predictor.comm.bytes_per_s,
                 "measured": predictor.comm.measured},
    }
    if samples:
        ev = evaluate(predictor, shape, samples)
        data["samples"] = [{k: v for k, v in r.items() if k != "label"} for r in ev["rows"]]
        data["error"] = ev["mape"]
    data.update(extra)
    if notes:
        data["notes"] = list(notes)
    _validate(data, path)  # never write what load() would refuse
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path + ".tmp", "w") as f:
        json.dump(data, f, indent=1)
    os.replace(path + ".tmp", path)
    return data


def _validate(data: Any, path: str) -> _File:
    if not isinstance(data, dict):
        raise ConfigError(KEY, f"{path} holds a {type(data).__name__}, not an object: rerun tools/calibrate_ma.py")
    if data.get("format") != FORMAT:
        raise ConfigError(KEY, f"{path} is not a time-predictor calibration (format {data.get('format')!r},"
                               f" expected {FORMAT!r}): write one with tools/calibrate_ma.py")
    if data.get("version") != VERSION:
        raise ConfigError(KEY, f"{path} has version {data.get('version')!r}, this reader reads version {VERSION}:"
                               " rerun tools/calibrate_ma.py")
    try:
        parsed = _File.model_validate(data)
    except ValidationError as e:
        raise ConfigError(KEY, f"{path}: {from_validation_error(e, prefix='')}") from None
    for comp, (phases, terms) in COMPONENTS.items():
        groups = getattr(parsed, comp)
        missing = [p for p in phases if p not in groups]
        if missing:
            raise ConfigError(KEY, f"{path}: {comp} has no phase {', '.join(missing)}: rerun tools/calibrate_ma.py")
        for p in phases:
            if set(groups[p].coefficients) != set(terms):
                raise ConfigError(KEY, f"{path}: {comp}.{p}.coefficients must hold exactly {', '.join(terms)};"
                                       f" got {', '.join(sorted(groups[p].coefficients))}")
            bad = [k for k, v in groups[p].coefficients.items() if not math.isfinite(v)]
            if bad:
                raise ConfigError(KEY, f"{path}: {comp}.{p}.{bad[0]} is not a finite number")
    if not (parsed.comm.bytes_per_s > 0 and math.isfinite(parsed.comm.bytes_per_s)):
        raise ConfigError(KEY, f"{path}: comm.bytes_per_s must be > 0, got {parsed.comm.bytes_per_s}")
    return parsed


def load(path: str) -> tuple[TimePredictor, ModelShape, dict]:
    """``(predictor, shape it was measured for, the whole file as a dict)``; every problem is a one-line ConfigError."""
    try:
        with open(path) as f:
            data = json.load(f)
    except FileNotFoundError:
        raise ConfigError(KEY, f"file not found: {path} (run tools/calibrate_ma.py)") from None
    except json.JSONDecodeError as e:
        raise ConfigError(KEY, f"{path} is not valid JSON: {e}") from None
    parsed = _validate(data, path)
    coeffs = {comp: {p: dict(g.coefficients) for p, g in getattr(parsed, comp).items()} for comp in COMPONENTS}
    sources = {comp: {p: g.source for p, g in getattr(parsed, comp).items()} for comp in COMPONENTS}
    comm = CommModel(parsed.comm.latency_s, parsed.comm.bytes_per_s, parsed.comm.measured)
    about = {"device": parsed.device, "dtype": parsed.dtype, "date": parsed.date, "path": path, "source": "file"}
    shape = ModelShape(**parsed.shape.model_dump())
    ridge = {p: g.ridge_tokens or 0.0 for p, g in parsed.expert.items()}
    combine = {comp: {p: g.combine for p, g in getattr(parsed, comp).items()} for comp in COMPONENTS}
    return (TimePredictor(coeffs, comm=comm, sources=sources, about=about, ridge=ridge, combine=combine), shape,
            data)


def samples_of(data: Mapping[str, Any]) -> list[Sample]:
    """The samples a loaded calibration file holds."""
    return [Sample.from_dict(s) for s in data.get("samples") or []]
