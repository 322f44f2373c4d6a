"""FLOP accounting: Megatron's formula for the dense parts, attended pairs for attention."""

import dataclasses
import os

import pytest

from megatron_fapool.attention.dilated import dilated_attention_flops
from megatron_fapool.config import load_run_config
from megatron_fapool.training.flops import (
    dense_attention_forward_flops,
    flop_count,
    model_flops_per_token,
    step_flops,
)

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DENSE = os.path.join(ROOT, "configs", "paper_dense_pool.json")
DILATED = os.path.join(ROOT, "configs", "paper_dilated.json")
TINY_DILATED = os.path.join(ROOT, "configs", "tiny_dilated.json")


def _with_dilated(cfg, **update):
    dil = cfg.fapool.dilated_attention.model_copy(update=update)
    return dataclasses.replace(cfg, fapool=cfg.fapool.model_copy(update={"dilated_attention": dil}))


def test_paper_dense_model_by_hand():
    """4 layers, hidden 4096, 32 heads of 128, FFN 16384 (GELU), vocab 32000, n = 16384, causal."""
    cfg = load_run_config(DENSE)
    n, batch = 16384, 3
    h, layers, ffn, vocab = 4096, 4, 16384, 32000
    qkv = 2 * h * (3 * h)  # per token and layer, forward
    proj = 2 * h * h
    mlp = 2 * h * ffn + 2 * ffn * h
    logits = 2 * h * vocab  # per token, once
    attention = 4 * 128 * 32 * (n * (n + 1) // 2)  # per sequence and layer: QK^T and PV, lower triangle
    forward = n * layers * (qkv + proj + mlp) + n * logits + layers * attention
    assert step_flops(cfg, batch, n) == batch * 3 * forward
    assert model_flops_per_token(cfg, n) == pytest.approx(3 * forward / n, rel=1e-12)
    fc = flop_count(cfg, n)
    assert fc.attention == layers * attention and fc.logits == n * logits
    # Megatron-LM's closed form (12 B n L h^2 (...)) counts n^2 / 2 pairs: the same up to the diagonal
    megatron = 12 * batch * n * layers * h * h * ((1 + 1 + n / (2 * h)) + ffn / h + vocab / (2 * layers * h))
    assert step_flops(cfg, batch, n) - megatron == pytest.approx(batch * 3 * layers * 4 * 128 * 32 * n / 2, rel=1e-9)


def test_dilated_attention_term_is_much_smaller_than_dense_at_128k():
    n = 131072
    dense = flop_count(load_run_config(DENSE), n)
    dilated = flop_count(load_run_config(DILATED), n)  # same shape; w = 2048 r, r = 1..16
    assert dilated.dense_parts == dense.dense_parts
    assert dilated.attention == 4 * dilated_attention_flops(
        n, (2048, 4096, 8192, 16384, 32768), (1, 2, 4, 8, 16), num_heads=32, head_dim=128
    )
    # per head, branch r attends ~ n * 1024 / r pairs: ~1984 n in all, vs n (n + 1) / 2 dense
    assert dilated.attention < 0.04 * dense.attention
    assert dilated.attention == pytest.approx(dense.attention * 1984 / ((n + 1) / 2), rel=0.05)
    assert step_flops(load_run_config(DILATED), 1, n) < 0.35 * step_flops(load_run_config(DENSE), 1, n)


@pytest.mark.parametrize("causal", [True, False])
def test_one_dense_branch_is_dense_attention(causal):
    """A single branch with w >= n and r = 1 attends exactly the dense pairs."""
    cfg = load_run_config(TINY_DILATED)
    n = 749
    lm = cfg.model.language_model
    one = _with_dilated(cfg, segment_lengths=[1024], dilation_rates=[1])
    off = _with_dilated(cfg, enabled=False)
    assert flop_count(one, n, causal=causal) == flop_count(off, n, causal=causal)
    assert flop_count(off, n, causal=causal).attention == lm.num_layers * dense_attention_forward_flops(
        n, num_heads=lm.num_attention_heads, head_dim=lm.head_dim, causal=causal
    )
    # the tiny model's own branches (w 128..512) attend far fewer pairs than dense at n = 749
    assert flop_count(cfg, n, causal=causal).attention < flop_count(off, n, causal=causal).attention


def test_gated_mlp_and_gqa_terms():
    cfg = load_run_config(TINY_DILATED)  # hidden 64, 4 heads, 2 query groups, FFN 256, GELU
    n = 100
    lm = cfg.model.language_model
    h, d = 64, 16
    fc = flop_count(cfg, n)
    assert fc.projections == lm.num_layers * n * (2 * h * (4 * d + 2 * 2 * d) + 2 * 4 * d * h)
    assert fc.mlp == lm.num_layers * n * (2 * h * 256 + 2 * 256 * h)
    swiglu = dataclasses.replace(
        cfg, model=cfg.model.model_copy(update={"language_model": lm.model_copy(update={"activation_func": "swiglu"})})
    )
    assert flop_count(swiglu, n).mlp == lm.num_layers * n * (2 * h * 512 + 2 * 256 * h)
