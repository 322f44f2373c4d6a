"""The ``fapool`` section of the DeepSpeed JSON, as strict pydantic models.

DeepSpeed ignores unknown top-level keys, so this section is validated here with
unknown keys rejected at every level. Every model is frozen: the resolved config is
a value, passed around, never mutated.
"""

from __future__ import annotations

from typing import Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, NonNegativeInt, PositiveInt, model_validator

__all__ = [
    "ATTENTION_BACKENDS",
    "AttentionBackendConfig",
    "AttentionPoolConfig",
    "DilatedAttentionConfig",
    "FAPoolConfig",
    "MASeparationConfig",
    "ParallelConfig",
    "known_keys",
]

ATTENTION_BACKENDS = (
    "auto",
    "math",
    "sdpa_flash",
    "sdpa_efficient",
    "sdpa_cudnn",
    "sdpa_math",
    "flex",
    "flash_attn",
)


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)


class ParallelConfig(_Section):
    """Megatron grid of the base ranks. May instead come from the model YAML's
    ``model_parallel`` section; giving both with different values is an error."""

    tensor_model_parallel_size: Optional[PositiveInt] = None
    pipeline_model_parallel_size: Optional[PositiveInt] = None


class AttentionPoolConfig(_Section):
    """FA Pool: extra ranks that join a layer's attention for long sequences."""

    enabled: bool = False
    pool_size: NonNegativeInt = Field(
        0, description="total pool ranks in the world; split evenly over the base ranks (sharing 'dedicated')"
    )
    sharing: Literal["dedicated", "shared"] = Field(
        "dedicated", description="'dedicated': each base rank owns pool_size / base ranks; 'shared': one pool that"
        " every base rank (every replica) draws on, assigned per training step"
    )
    threshold: Union[NonNegativeInt, Literal["auto"]] = Field(
        4096, description="sequence length above which the pool joins; 'auto' reads the calibration file"
    )
    calibration_file: Optional[str] = Field(
        None, description="JSON written by tools/calibrate_pool.py (needed for threshold 'auto')"
    )
    max_active: Optional[PositiveInt] = Field(
        None, description="cap on active pool ranks per base rank (default: all of its share)"
    )
    hysteresis: NonNegativeInt = Field(
        2, description="steps a new choice of active pool size must persist before it is applied"
    )
    kv_chunk_tokens: PositiveInt = Field(
        1 << 20,
        description="largest K/V piece sent in one collective; one piece measured fastest"
        " (docs/benchmarks.md, FA Pool attention), so the default sends one",
    )

    @model_validator(mode="after")
    def _check(self):
        if self.enabled and self.pool_size == 0:
            raise ValueError("attention_pool.enabled is true but pool_size is 0: set pool_size >= 1")
        if self.threshold == "auto" and not self.calibration_file:
            raise ValueError(
                "threshold 'auto' needs calibration_file (write one with tools/calibrate_pool.py)"
            )
        return self


class MASeparationConfig(_Section):
    """MoE layers whose attention and experts live on different ranks.

    The model keys (``num_experts``, ``top_k``, ``capacity_factor``, ``aux_loss_coeff``,
    ``z_loss_coeff``) describe the MoE model: ``None`` takes the model YAML's value
    (``num_moe_experts``, ``moe_router_topk``, ``moe_expert_capacity_factor``,
    ``moe_aux_loss_coeff``, ``moe_z_loss_coeff``); a value given here fills a key the YAML
    leaves out and must equal the YAML's where both give one. They apply whether or not
    ``enabled`` is true, so switching MA separation changes where the experts run, never
    the model. They never make a dense YAML an MoE model.
    """

    enabled: bool = False
    attention_expert_ratio: str = Field("3:1", pattern=r"^\s*[1-9]\d*\s*:\s*[1-9]\d*\s*$")
    num_experts: Optional[PositiveInt] = Field(None, description="must equal the YAML's num_moe_experts")
    top_k: Optional[PositiveInt] = Field(None, description="the YAML's moe_router_topk")
    capacity_factor: Optional[float] = Field(None, gt=0, description="the YAML's moe_expert_capacity_factor")
    aux_loss_coeff: Optional[float] = Field(None, ge=0, description="the YAML's moe_aux_loss_coeff (default 0.01)")
    z_loss_coeff: Optional[float] = Field(None, ge=0, description="the YAML's moe_z_loss_coeff")
    micro_batches: PositiveInt = Field(
        1, description="ping-pong: parts a micro-batch is split into, so attention of one overlaps experts of another"
    )
    on_expert_loss: Literal["fail", "degrade"] = Field(
        "fail", description="inference: 'degrade' masks a lost expert rank's experts from routing and goes on"
    )
    calibration_file: Optional[str] = Field(None, description="time-predictor calibration, relative to the JSON")

    @property
    def ratio(self) -> tuple[int, int]:
        a, e = (int(x) for x in self.attention_expert_ratio.split(":"))
        return a, e

    @model_validator(mode="after")
    def _check(self):
        if self.top_k is not None and self.num_experts is not None and self.top_k > self.num_experts:
            raise ValueError(f"top_k ({self.top_k}) exceeds num_experts ({self.num_experts})")
        return self


class DilatedAttentionConfig(_Section):
    """LongNet dilated attention: branches (segment length w_k, dilation rate r_k)."""

    enabled: bool = False
    segment_lengths: list[PositiveInt] = Field(default_factory=lambda: [2048, 4096, 8192, 16384, 32768])
    dilation_rates: list[PositiveInt] = Field(default_factory=lambda: [1, 2, 4, 8, 16])

    @model_validator(mode="after")
    def _check(self):
        if len(self.segment_lengths) != len(self.dilation_rates):
            raise ValueError(
                f"segment_lengths has {len(self.segment_lengths)} entries but dilation_rates has "
                f"{len(self.dilation_rates)}: give one (w, r) pair per branch"
            )
        if not self.segment_lengths:
            raise ValueError("at least one branch is needed")
        return self


class AttentionBackendConfig(_Section):
    backend: Literal[ATTENTION_BACKENDS] = "auto"  # type: ignore[valid-type]


class FAPoolConfig(_Section):
    """The whole ``fapool`` section."""

    model_yaml: str = Field(description="Megatron-style model YAML, relative to the JSON file")
    parallel: ParallelConfig = ParallelConfig()
    attention_pool: AttentionPoolConfig = AttentionPoolConfig()
    ma_separation: MASeparationConfig = MASeparationConfig()
    dilated_attention: DilatedAttentionConfig = DilatedAttentionConfig()
    attention_backend: AttentionBackendConfig = AttentionBackendConfig()


def known_keys(model: type[BaseModel], path: tuple[str, ...]) -> list[str] | None:
    """Keys allowed at ``path`` inside ``model`` (for 'unknown key' messages)."""
    for part in path:
        field = model.model_fields.get(part)
        annotation = getattr(field, "annotation", None)
        if not (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
            return None
        model = annotation
    return list(model.model_fields)
