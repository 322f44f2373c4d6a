"""Issue 3 acceptance: Megatron GPTModel with the pool == single-process Megatron GPTModel.

Same weights (the reference's, sliced per TP rank), same tokens; logits, loss and
every parameter gradient within fp32 relative error 1e-5. Lengths below and above
the threshold in one run (749 included), active pool sizes 1, 2, 3, GQA (4 heads, 2
query groups). The pool ranks' counters must show work above the threshold and
none below it.
"""

import dataclasses
import os

import pytest
import torch

from megatron_fapool.testing.distributed import run_distributed

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CONFIG = os.path.join(ROOT, "configs", "tiny_dense_rope_pool.json")
THRESHOLD = 128


def _tokens(n, seed, vocab):
    g = torch.Generator().manual_seed(seed)
    t = torch.randint(0, vocab, (2, n + 1), generator=g)
    return t[:, :-1], t[:, 1:]


def _run_case(model, n, seed, vocab):
    ids, labels = _tokens(n, seed, vocab)
    pos = torch.arange(n).unsqueeze(0).expand_as(ids)
    # Megatron's causal mask convention (True = masked); Megatron's own default builds it on CUDA
    mask = torch.triu(torch.ones(n, n, dtype=torch.bool), diagonal=1)[None, None]
    model.zero_grad(set_to_none=True)
    logits = model(ids, pos, mask)
    loss = model(ids, pos, mask, labels=labels).float().mean()
    loss.backward()
    return logits.detach(), loss.detach()


def _reference_body(rank, world, lengths):
    from megatron_fapool.config import load_run_config
    from megatron_fapool.testing.megatron_reference import cpu_reference_shims, reference_gpt_model

    cfg = load_run_config(CONFIG)
    lm = cfg.model.language_model
    model = reference_gpt_model(cfg)
    out = {"state": {k: v.detach().clone() for k, v in model.named_parameters()}, "cases": {}}
    with cpu_reference_shims():
        for n in lengths:
            logits, loss = _run_case(model, n, n, lm.vocab_size)
            grads = {k: p.grad.detach().clone() for k, p in model.named_parameters()}
            out["cases"][n] = {"logits": logits, "loss": loss, "grads": grads}
    return out


def _pool_body(rank, world, cases, reference):
    from megatron.core import parallel_state

    from megatron_fapool.attention.pool import AttentionPool, PoolServer
    from megatron_fapool.config import load_run_config
    from megatron_fapool.models.gpt import build_gpt_model
    from megatron_fapool.parallel import initialize_parallel_groups, layout_from_config
    from megatron_fapool.testing.megatron_reference import errors_against, load_sharded

    cfg = load_run_config(CONFIG)
    tp = int(os.environ["FAPOOL_TEST_TP"])
    # hysteresis 1: the test sets the active size per case and wants it applied at once
    pool_cfg = cfg.fapool.attention_pool.model_copy(update={"pool_size": world - tp, "hysteresis": 1})
    cfg = dataclasses.replace(
        cfg, tensor_model_parallel_size=tp,
        fapool=cfg.fapool.model_copy(update={"attention_pool": pool_cfg}),
    )
    layout = layout_from_config(cfg, world)
    groups = initialize_parallel_groups(layout)
    if groups.is_pool:
        return {"role": "pool", "stats": PoolServer(groups, device=torch.device("cpu")).serve().as_dict()}

    pool = AttentionPool.for_base_rank(groups, cfg.fapool.attention_pool)
    model = build_gpt_model(cfg, pool=pool)
    tp_rank, tp_group = parallel_state.get_tensor_model_parallel_rank(), parallel_state.get_tensor_model_parallel_group()
    load_sharded(model, reference["state"], tp_rank, tp)
    errors, counters = [], []
    vocab = cfg.model.language_model.vocab_size
    for n, active in cases:
        ref = reference["cases"][n]
        pool.manager.new_step()
        pool.manager.max_active = active
        before = dict(pool.stats.as_dict())
        logits, loss = _run_case(model, n, n, vocab)
        after = pool.stats.as_dict()
        err = errors_against(model, logits, loss, ref, tp_group)
        errors.append(err)
        counters.append({k: after[k] - before[k] for k in after})
    pool.shutdown(torch.device("cpu"))
    return {"role": "base", "errors": errors, "counters": counters}


CASES = [
    # 2 base ranks at TP 2, each with 1 pool rank: 749 and 256 pooled, 100 local
    (2, 4, [(749, 1), (100, 1), (256, 1)]),
    # 1 base rank + 3 pool ranks: active pool sizes 3, 2, 1 and a short local sequence
    (1, 4, [(749, 3), (100, 3), (400, 2), (300, 1)]),
]


@pytest.fixture(scope="module")
def reference():
    """The single-process reference of every length of both runs, in one process (same seed, same weights)."""
    lengths = sorted({n for _, _, cases in CASES for n, _ in cases})
    return run_distributed(_reference_body, 1, lengths, timeout=240)[0]


@pytest.mark.parametrize("tp, world, cases", CASES)
def test_pool_model_matches_single_process_megatron(tp, world, cases, reference):
    res = run_distributed(_pool_body, world, cases, reference, timeout=400, env={"FAPOOL_TEST_TP": tp})
    bases = [r for r in res if r["role"] == "base"]
    pools = [r for r in res if r["role"] == "pool"]
    assert len(bases) == tp and len(pools) == world - tp
    for b in bases:
        for (n, active), err, cnt in zip(cases, b["errors"], b["counters"]):
            assert err["logits"] <= 1e-5 and err["loss"] <= 1e-5 and err["grads"] <= 1e-5, (n, err)
            layers = 2
            if n > THRESHOLD:
                # each layer's attention went through the pool twice (logits pass + loss pass), with its backward
                assert cnt["pooled_forward"] == 2 * layers and cnt["pooled_backward"] == layers, (n, cnt)
                assert cnt["bytes_sent"] > 0 and cnt["local_calls"] == 0
            else:
                assert cnt["pooled_forward"] == 0 and cnt["pooled_backward"] == 0 and cnt["bytes_sent"] == 0, (n, cnt)
                assert cnt["local_calls"] == 2 * layers
    # pool ranks really computed: each served exactly the pooled calls it was active in
    pooled_calls = {slot: sum(2 * 2 for n, a in cases if n > THRESHOLD and a >= slot) for slot in (1, 2, 3)}
    for i, p in enumerate(pools):
        slot = i % (len(pools) // tp) + 1
        assert p["stats"]["served_forward"] == pooled_calls[slot], (i, p["stats"])
        assert p["stats"]["query_rows"] > 0
