"""The calibration file: what ``tools/calibrate_pool.py`` measured and fitted, as JSON.

``fapool.attention_pool.calibration_file`` names one; with ``"threshold": "auto"`` the
pool's threshold comes from it, and its ``cost_model`` (the fields of
:class:`megatron_fapool.attention.pool.manager.CostModel`) sizes the pool per step.
Only ``threshold`` and ``cost_model`` are read back; the rest records where they came
from (the sweep, the break-even check, the model and machine).

:class:`CalibrationFile` is the format, :func:`load_calibration` its reader (every
problem is a one-line :class:`ConfigError` naming the file) and
:func:`write_calibration` its writer. The fit that fills it is
:func:`megatron_fapool.attention.pool.calibrate.fit`.
"""

from __future__ import annotations

import json
import os
from typing import Any

from pydantic import BaseModel, ConfigDict, NonNegativeInt, ValidationError

from .errors import ConfigError, from_validation_error

__all__ = ["CalibratedCost", "CalibrationFile", "load_calibration", "write_calibration"]

KEY = "fapool.attention_pool.calibration_file"
REQUIRED = ("threshold", "cost_model")


class CalibratedCost(BaseModel):
    """The arguments of ``CostModel`` (seconds, bytes, bytes per second)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    attention_s_per_token2: float
    link_bytes_per_s: float
    call_overhead_s: float
    kv_bytes_per_token: float
    q_bytes_per_token: float


class CalibrationFile(BaseModel):
    """One calibration: the threshold and cost model, and the measurements they were fitted to.

    Times are seconds of forward + backward of one layer of one base rank, per sweep
    point ``seqlens[i]``. Keys beyond these are kept as they are.
    """

    model_config = ConfigDict(extra="allow", frozen=True)

    # where and on what it was measured
    device: str | None = None
    date: str | None = None
    torch: str | None = None
    host: str | None = None
    model: dict[str, Any] | None = None
    # the sweep
    seqlens: list[int] | None = None
    attention_time: list[float] | None = None
    ffn_time: list[float] | None = None
    overhead: list[float] | None = None
    pooled_time: list[float] | None = None
    pool_bytes_per_call: list[int] | None = None
    link_bytes_per_s: float | None = None
    # what the pool reads back, and the break-even: measured in the sweep, predicted by the cost model
    threshold: NonNegativeInt
    measured_break_even: int | None = None
    measured_break_even_interpolated: float | None = None
    predicted_break_even: int | None = None
    break_even_difference_percent: float | None = None
    break_even_difference_percent_interpolated: float | None = None
    cost_model: CalibratedCost
    notes: list[str] | None = None

def load_calibration(path: str) -> dict:
    """The calibration file at ``path`` as a dict, validated (``threshold``, ``cost_model`` at least)."""
    try:
        with open(path) as f:
            data = json.load(f)
    except FileNotFoundError:
        raise ConfigError(KEY, f"file not found: {path} (run tools/calibrate_pool.py)") from None
    except json.JSONDecodeError as e:
        raise ConfigError(KEY, f"{path} is not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(KEY, f"{path} holds a {type(data).__name__}, not an object: rerun tools/calibrate_pool.py")
    for key in REQUIRED:
        if key not in data:
            raise ConfigError(KEY, f"{path} has no '{key}': rerun tools/calibrate_pool.py")
    try:
        return CalibrationFile.model_validate(data).model_dump(exclude_unset=True)
    except ValidationError as e:
        raise ConfigError(KEY, f"{path}: {from_validation_error(e, prefix='')}") from None


def write_calibration(path: str, calibration: CalibrationFile) -> None:
    """Write ``calibration`` to ``path`` as indented JSON (whole or not at all: a temporary file, then rename)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path + ".tmp", "w") as f:
        json.dump(calibration.model_dump(exclude_unset=True), f, indent=2)
    os.replace(path + ".tmp", path)
