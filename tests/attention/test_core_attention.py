"""FapoolCoreAttention and its strategies: layout at the boundary, strategy choice, refusals.

One gloo process (Megatron's TP group of size 1 must exist); the pooled algorithms
themselves are tested across processes in tests/attention/pool/ and tests/models/.
"""

import pytest
import torch

from megatron_fapool.testing.distributed import run_distributed


def _body(rank, world):
    from megatron.core.transformer.enums import AttnMaskType
    from megatron.core.transformer.transformer_config import TransformerConfig

    from megatron_fapool.attention import Dense, Dilated, FapoolCoreAttention, Pooled
    from megatron_fapool.attention.dilated import dilated_attention
    from megatron_fapool.attention.kernels.reference import reference_attention
    from megatron_fapool.attention.pool import AttentionPool, PoolResourceManager, PoolStats
    from megatron_fapool.parallel import compute_layout, initialize_parallel_groups
    from megatron_fapool.testing.compare import rel_err

    initialize_parallel_groups(compute_layout(1, num_attention_heads=4, num_query_groups=2))
    cfg = TransformerConfig(num_layers=1, hidden_size=64, num_attention_heads=4, num_query_groups=2,
                            attention_dropout=0.0,
                            use_cpu_initialization=True)
    out = {}
    g = torch.Generator().manual_seed(0)
    s, b = 75, 2
    q = torch.randn(s, b, 4, 16, generator=g)  # Megatron's [s, b, h, d]
    k, v = (torch.randn(s, b, 2, 16, generator=g) for _ in range(2))

    dense = FapoolCoreAttention(cfg, 1, AttnMaskType.causal, attend=Dense("math"))
    ref = reference_attention(*(t.double().transpose(0, 1) for t in (q, k, v)), causal=True, softmax_scale=0.25)
    ref = ref[0] if isinstance(ref, tuple) else ref
    got = dense(q, k, v, None)
    out["dense_shape"] = tuple(got.shape)
    out["dense_err"] = rel_err(got, ref.transpose(0, 1).reshape(s, b, 64))

    # below the threshold a pooled strategy runs its inner one here and counts a local call
    stats = PoolStats()
    pool = AttentionPool(client=None, manager=PoolResourceManager(threshold=100, pool_share=1, stats=stats),
                         stats=stats)
    pooled = FapoolCoreAttention(cfg, 1, AttnMaskType.causal, attend=Pooled(Dense("math"), pool))
    out["pooled_equal"] = torch.equal(pooled(q, k, v, None), got)
    out["local_calls"] = stats.local_calls

    # dilated: global head offsets; a pool member needs a query head, so with one head per
    # rank a sequence over the threshold still stays here
    dil = Dilated([32, 64], [1, 2], "math")
    layer = FapoolCoreAttention(cfg, 1, AttnMaskType.causal, attend=dil)
    want = dilated_attention(*(t.transpose(0, 1) for t in (q, k, v)), [32, 64], [1, 2], True, 0.25,
                             head_offset=0, total_heads=4, backend="math")
    out["dilated_err"] = rel_err(layer(q, k, v, None), want.reshape(b, s, 64).transpose(0, 1))
    one_head = TransformerConfig(num_layers=1, hidden_size=16, num_attention_heads=1, attention_dropout=0.0,
                              use_cpu_initialization=True)
    stats2 = PoolStats()
    pool2 = AttentionPool(client=None, manager=PoolResourceManager(threshold=10, pool_share=1, stats=stats2),
                          stats=stats2)
    capped = FapoolCoreAttention(one_head, 1, AttnMaskType.causal, attend=Pooled(dil, pool2))
    capped(q[:, :, :1], k[:, :, :1], v[:, :, :1], None)
    out["capped_local_calls"] = stats2.local_calls

    errors = {}
    for name, make in {
        "cross": lambda: FapoolCoreAttention(cfg, 1, AttnMaskType.causal, attention_type="cross", attend=dil),
        "dropout": lambda: FapoolCoreAttention(cfg, 1, AttnMaskType.causal, attention_dropout=0.1),
        "mask": lambda: FapoolCoreAttention(cfg, 1, AttnMaskType.arbitrary),
        "branches": lambda: Dilated([32, 64], [1]),
    }.items():
        try:
            make()
        except ValueError as e:
            errors[name] = str(e)
    out["errors"] = errors
    return out


def test_core_attention_strategies():
    res = run_distributed(_body, 1, timeout=120)[0]
    assert res["dense_shape"] == (75, 2, 64)
    assert res["dense_err"] <= 1e-5 and res["dilated_err"] <= 1e-6
    assert res["pooled_equal"] and res["local_calls"] == 1
    assert res["capped_local_calls"] == 1
    errors = res["errors"]
    assert "self-attention only" in errors["cross"]
    assert "attention_dropout" in errors["dropout"]
    assert "not supported" in errors["mask"]
    assert "equal length" in errors["branches"]
