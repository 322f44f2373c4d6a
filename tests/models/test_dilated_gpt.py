"""Issue 6 "in the model": a dilated GPT at TP 2, and with the pool splitting heads,
equals the single-process model.

Reference: Megatron's ``GPTModel`` at TP 1 with the ``Dilated`` core attention (what
``build_gpt_model`` selects for ``configs/tiny_dilated.json`` without a pool), built in
the base rank of the first run (its process is a TP 1 world for Megatron) and passed
on. Same weights (sliced per TP rank), same tokens; logits, loss and every parameter
gradient within fp32 relative error 1e-5, at lengths below and above the pool
threshold (749 included). Two runs (process start-up dominates the test's time):

* 1 base + 2 pool ranks: 4 heads / 2 query groups over 3 members (heads split one by
  one, the key/value head of a split group replicated and its dK/dV summed) and over
  2 members (split at the group boundary).
* TP 2 with one pool rank per base rank: the pool held at 0 (plain TP 2: head offsets
  0..1 and 2..3), then pooled (a rank's 2 heads share one key/value head).

The pool counters of both sides show the pool ran above the threshold and not below.
"""

import dataclasses
import os

import pytest
import torch

from megatron_fapool.testing.distributed import run_distributed

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CONFIG = os.path.join(ROOT, "configs", "tiny_dilated.json")
THRESHOLD = 128
LAYERS = 2
LENGTHS = (749, 100, 300)


def _tokens(n, seed, vocab):
    g = torch.Generator().manual_seed(seed)
    t = torch.randint(0, vocab, (2, n + 1), generator=g)
    return t[:, :-1], t[:, 1:]


def _run_case(model, n, vocab):
    ids, labels = _tokens(n, n, vocab)
    pos = torch.arange(n).unsqueeze(0).expand_as(ids)
    model.zero_grad(set_to_none=True)
    logits = model(ids, pos, None)
    loss = model(ids, pos, None, labels=labels).float().mean()
    loss.backward()
    return logits.detach(), loss.detach()


def _config(tp, pool_size):
    from megatron_fapool.config import load_run_config

    cfg = load_run_config(CONFIG)
    pool = cfg.fapool.attention_pool.model_copy(
        update={"enabled": pool_size > 0, "pool_size": pool_size, "threshold": THRESHOLD, "hysteresis": 1}
    )
    return dataclasses.replace(
        cfg, tensor_model_parallel_size=tp, fapool=cfg.fapool.model_copy(update={"attention_pool": pool})
    )


def _reference(model, lengths, vocab):
    """Logits, loss and gradients of the TP 1 model per length, and its weights."""
    out = {"state": {k: v.detach().clone() for k, v in model.named_parameters()}, "cases": {}}
    for n in lengths:
        logits, loss = _run_case(model, n, vocab)
        grads = {k: p.grad.detach().clone() for k, p in model.named_parameters()}
        out["cases"][n] = {"logits": logits, "loss": loss, "grads": grads}
    return out


def _body(rank, world, tp, cases, reference):
    from megatron.core import parallel_state

    from megatron_fapool.attention import Dilated, FapoolCoreAttention, Pooled
    from megatron_fapool.attention.pool import AttentionPool, PoolServer
    from megatron_fapool.models.gpt import build_gpt_model
    from megatron_fapool.parallel import initialize_parallel_groups, layout_from_config
    from megatron_fapool.testing.megatron_reference import errors_against, load_sharded

    cfg = _config(tp, world - tp)
    groups = initialize_parallel_groups(layout_from_config(cfg, world))
    if groups.is_pool:
        return {"role": "pool", "stats": PoolServer(groups, device=torch.device("cpu")).serve().as_dict()}

    vocab = cfg.model.language_model.vocab_size
    if reference is None:
        # TP 1: the reference is this process's own single-process model (no pool), built first
        assert tp == 1
        torch.manual_seed(7)
        ref_model = build_gpt_model(cfg)
        core = ref_model.decoder.layers[0].self_attention.core_attention
        assert type(core) is FapoolCoreAttention and type(core.attend) is Dilated
        assert core.head_offset == 0 and core.total_heads == 4
        reference = _reference(ref_model, sorted({n for n, _ in cases}), vocab)
        del ref_model
    pool = AttentionPool.for_base_rank(groups, cfg.fapool.attention_pool) if world > tp else None
    model = build_gpt_model(cfg, pool=pool)
    tp_rank, tp_group = parallel_state.get_tensor_model_parallel_rank(), parallel_state.get_tensor_model_parallel_group()
    core = model.decoder.layers[0].self_attention.core_attention
    assert type(core.attend) is (Pooled if pool else Dilated)
    assert type(getattr(core.attend, "inner", core.attend)) is Dilated
    assert core.head_offset == tp_rank * (4 // tp) and core.total_heads == 4
    load_sharded(model, reference["state"], tp_rank, tp)
    errors, counters = [], []
    for n, active in cases:
        ref = reference["cases"][n]
        if pool is not None:
            pool.manager.new_step()
            pool.manager.max_active = active
            before = dict(pool.stats.as_dict())
        logits, loss = _run_case(model, n, vocab)
        if pool is not None:
            counters.append({k: v - before[k] for k, v in pool.stats.as_dict().items()})
        err = errors_against(model, logits, loss, ref, tp_group)
        errors.append(err)
    if pool is not None:
        pool.shutdown(torch.device("cpu"))
    return {"role": "base", "errors": errors, "counters": counters, "reference": reference if rank == 0 else None}


def _check(res, tp, world, cases):
    bases = [r for r in res if r["role"] == "base"]
    pools = [r for r in res if r["role"] == "pool"]
    assert len(bases) == tp and len(pools) == world - tp
    for b in bases:
        for (n, a), err in zip(cases, b["errors"]):
            assert err["logits"] <= 1e-5 and err["loss"] <= 1e-5 and err["grads"] <= 1e-5, (n, a, err)
        for (n, a), cnt in zip(cases, b["counters"]):
            if n > THRESHOLD and a > 0:
                # each layer went through the pool twice (logits pass + loss pass), with one backward
                assert cnt["pooled_forward"] == 2 * LAYERS and cnt["pooled_backward"] == LAYERS, (n, a, cnt)
                assert cnt["bytes_sent"] > 0 and cnt["local_calls"] == 0, (n, a, cnt)
            else:
                assert cnt["pooled_forward"] == 0 and cnt["bytes_sent"] == 0, (n, a, cnt)
                assert cnt["local_calls"] == 2 * LAYERS, (n, a, cnt)
    per_base = len(pools) // tp if pools else 0
    for i, p in enumerate(pools):
        slot = i % per_base + 1  # index in its base rank's pool, 1-based
        pooled = [n for n, a in cases if n > THRESHOLD and a >= slot]
        s = p["stats"]
        assert s["served_forward"] == 2 * LAYERS * len(pooled), (i, s)
        assert s["served_backward"] == LAYERS * len(pooled), (i, s)
        assert s["query_rows"] == 2 * LAYERS * sum(pooled), (i, s)


# 1 base + 2 pool ranks. 4 heads / 2 query groups: 3 members split heads one by one (base head 0,
# member 1 head 1 -- both on key/value head 0, whose dK/dV the base sums -- member 2 heads 2-3);
# 2 members split at the group boundary. 100 < threshold: local.
POOL_CASES = [(749, 2), (100, 2), (300, 1), (749, 1)]
# TP 2 with one pool rank per base rank: first with the pool held at 0 (plain TP 2 at every
# length: head offsets 0..1 and 2..3), then pooled (a rank's 2 heads share 1 key/value head).
TP_CASES = [(749, 0), (100, 0), (300, 0), (749, 1), (100, 1), (300, 1)]


@pytest.fixture(scope="module")
def pool_run():
    """1 base + 2 pool ranks; the base rank also computes the TP 1 reference (no pool)."""
    return run_distributed(_body, 3, 1, POOL_CASES, None, timeout=180)


def test_pool_splitting_heads_matches_single_process(pool_run):
    _check(pool_run, 1, 3, POOL_CASES)


def test_tp2_with_and_without_pool_matches_single_process(pool_run):
    reference = next(r["reference"] for r in pool_run if r["role"] == "base")
    res = run_distributed(_body, 4, 2, TP_CASES, reference, timeout=180)
    _check(res, 2, 4, TP_CASES)
