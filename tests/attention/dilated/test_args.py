"""check_dilated_args: every bad argument raises a ValueError naming it; good ones are normalised."""

from __future__ import annotations

import math

import pytest
import torch

from megatron_fapool.attention.dilated import DilatedArgs, check_dilated_args, dilated_attention


def make_qkv(b, n, h, d):
    g = torch.Generator().manual_seed(0)
    return [torch.randn(b, n, h, d, generator=g) for _ in range(4)]


def test_defaults_are_normalised():
    q, k, v, _ = make_qkv(1, 16, 4, 8)
    args = check_dilated_args(q, k[:, :, :2], v[:, :, :2], [8, 16], (1, 2), head_offset=4)
    assert args == DilatedArgs((8, 16), (1, 2), True, 1 / math.sqrt(8), 4, 8, 2)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(segment_lengths=(8, 16), dilation_rates=(1,)), "segment_lengths and dilation_rates"),
        (dict(segment_lengths=(0,), dilation_rates=(1,)), r"segment_lengths\[0\] must be > 0"),
        (dict(segment_lengths=(8, -4), dilation_rates=(1, 2)), r"segment_lengths\[1\] must be > 0"),
        (dict(segment_lengths=(8,), dilation_rates=(0,)), r"dilation_rates\[0\] must be > 0"),
        (dict(segment_lengths=(8.5,), dilation_rates=(1,)), r"segment_lengths\[0\] must be an int"),
        (dict(segment_lengths=(), dilation_rates=()), "segment_lengths must not be empty"),
        (dict(segment_lengths=(8,), dilation_rates=(1,), total_heads=2), "total_heads"),
        (dict(segment_lengths=(8,), dilation_rates=(1,), head_offset=-1), "head_offset"),
        (dict(segment_lengths=(8,), dilation_rates=(1,), softmax_scale=float("nan")), "softmax_scale"),
    ],
)
def test_bad_branch_arguments_raise_value_error_naming_them(kwargs, match):
    q, k, v, _ = make_qkv(1, 16, 4, 8)
    with pytest.raises(ValueError, match=match):
        dilated_attention(q, k, v, **kwargs)


def test_bad_tensor_shapes_raise_value_error_naming_them():
    q, k, v, _ = make_qkv(1, 16, 4, 8)
    with pytest.raises(ValueError, match="q must be 4-D"):
        dilated_attention(q[0], k, v, (8,), (1,))
    with pytest.raises(ValueError, match="k and v must have the same shape"):
        dilated_attention(q, k, v[:, :, :2], (8,), (1,))
    with pytest.raises(ValueError, match="sequence"):
        dilated_attention(q, k[:, :8], v[:, :8], (8,), (1,))
    with pytest.raises(ValueError, match="multiple of k heads"):
        dilated_attention(q, k[:, :, :3], v[:, :, :3], (8,), (1,))
    with pytest.raises(ValueError, match="head_dim"):
        dilated_attention(q, k[..., :4], v[..., :4], (8,), (1,))
