"""Issue 13 acceptance: MA separation == single-process Megatron MoE GPTModel, replica by replica.

The reference is Megatron's own ``GPTModel`` from Megatron's own MoE local spec
(``TopKRouter``, allgather dispatcher, ``SequentialMLP``), same weights, run once per
attention replica on that replica's tokens (Megatron's aux loss is a per-micro-batch
statistic); attention gradients are averaged over the replicas, expert gradients summed
(divided by the replicas here, as training scales them). Bars: logits, loss, every
attention parameter's gradient and every expert's gradient within rel 1e-5; aux
(load-balancing) and z losses per layer and replica within 1e-6. Skewed routing (two
experts take every token's first choice, one expert rank gets nothing) is a second case.

The distributed path is proved: attention ranks hold no expert parameter; each expert
rank's token counters equal the reference's routing counts exactly; zeroing an expert
rank's weights changes the attention ranks' logits.
"""

import json
import os

import pytest
import torch

from megatron_fapool.testing.distributed import run_distributed

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CONFIG = os.path.join(ROOT, "configs", "tiny_moe_ma.json")
SNAPSHOT, POISON = 20, 21  # test-only expert-rank ops, merged into the server's handler table


def _config(tmp_path, ratio: str, tp: int) -> str:
    """tiny_moe_ma.json at ``ratio`` and TP ``tp``, with an aux-loss coefficient large enough to
    dominate the router gradient and a z-loss."""
    with open(CONFIG) as f:
        ds = json.load(f)
    ds["fapool"]["model_yaml"] = os.path.join(ROOT, "configs", "models", "tiny_moe.yaml")
    ds["fapool"]["ma_separation"].update(attention_expert_ratio=ratio, aux_loss_coeff=1.0, z_loss_coeff=0.1)
    ds["fapool"]["parallel"] = {"tensor_model_parallel_size": tp}
    path = tmp_path / f"ma_{ratio.replace(':', '_')}_tp{tp}.json"
    path.write_text(json.dumps(ds))
    return str(path)


def _tokens(n, replica, vocab):
    g = torch.Generator().manual_seed(1000 * n + replica)
    t = torch.randint(0, vocab, (2, n + 1), generator=g)
    return t[:, :-1], t[:, 1:]


def _skew(model):
    """Every token to experts 3 (first) and 4: a large constant in hidden unit 0 of every token
    embedding, and router rows that read only that unit. Experts 5-15 (a whole expert rank at
    2+2) get nothing."""
    from megatron_fapool.models.gpt import moe_layers

    with torch.no_grad():
        model.embedding.word_embeddings.weight[:, 0] += 1.0
        for layer in moe_layers(model):
            w = layer.router.weight
            w.zero_()
            w[3, 0] = 3.0
            w[4, 0] = 1.5


def _run_case(model, n, replica, vocab, parts=1):
    """Logits (no grad), then loss + backward; the tracker's per-layer aux and z losses of the loss
    forward. ``parts > 1``: both forwards as ping-pong parts (the reference ignores it)."""
    from megatron.core import parallel_state
    from megatron.core.transformer.moe import moe_utils

    from megatron_fapool.moe.pingpong import forward_in_parts

    ids, labels = _tokens(n, replica, vocab)
    pos = torch.arange(n).unsqueeze(0).expand_as(ids)
    mask = torch.triu(torch.ones(n, n, dtype=torch.bool), diagonal=1)[None, None]
    model.zero_grad(set_to_none=True)
    with torch.no_grad():
        logits = forward_in_parts(lambda i, p: model(i, p, mask), ids, pos, parts=parts)
    moe_utils.clear_aux_losses_tracker()
    loss = forward_in_parts(lambda i, p, t: model(i, p, mask, labels=t), ids, pos, labels, parts=parts).float().mean()
    loss.backward()
    tracker = {}
    for name, entry in moe_utils.get_moe_layer_wise_logging_tracker().items():
        values = entry["values"].detach().clone()
        # over this replica's sequence-parallel shards, as Megatron's reduce_aux_losses_tracker_across_ranks
        # (which would also average over the replicas: each is compared with its own reference here)
        if entry.get("reduce_group") is not None:
            torch.distributed.all_reduce(values, group=entry["reduce_group"])
        else:  # the z-loss: each shard's mean over its tokens; the shards are equal, so their mean
            tp = parallel_state.get_tensor_model_parallel_group()
            torch.distributed.all_reduce(values, group=tp)
            values /= torch.distributed.get_world_size(tp)
        tracker[name] = values
    moe_utils.clear_aux_losses_tracker()
    return logits.detach(), loss.detach(), tracker


# (length, skewed routing, ping-pong parts): lengths divide by nothing (TP 1) or by TP 2 only
# (sequence parallel splits the sequence); the ping-pong case repeats the one before it; the
# skewed case changes the weights, so it comes last.
ALL_CASES = ((37, False, 1), (38, False, 1), (100, False, 1), (100, False, 2), (64, True, 1))


def _cases(tp):
    return [c for c in ALL_CASES if c[0] != (38 if tp == 1 else 37)]


def _grads(model):
    return {k: (p.grad if p.grad is not None else torch.zeros_like(p)).detach().clone()
            for k, p in model.named_parameters()}


def _reference_body(rank, world, cfg_path, replicas, cases):
    """Per case and replica: logits, loss, grads, aux/z losses, tokens per (layer, expert) fwd and bwd."""
    from megatron_fapool.config import load_run_config
    from megatron_fapool.models.gpt import moe_layers
    from megatron_fapool.testing.megatron_reference import cpu_reference_shims, reference_gpt_model

    cfg = load_run_config(cfg_path)
    vocab = cfg.model.language_model.vocab_size
    model = reference_gpt_model(cfg)
    with cpu_reference_shims():
        out = {"state": {k: v.detach().clone() for k, v in model.named_parameters()}, "cases": []}
        layers = moe_layers(model)
        counts = torch.zeros(len(layers), cfg.model.language_model.num_moe_experts, dtype=torch.int64)

        def counter(i):
            def hook(module, args):
                counts[i] += args[1].to(torch.int64)
            return hook

        for i, layer in enumerate(layers):
            layer.experts.register_forward_pre_hook(counter(i))
        for n, skew, _ in cases:
            if skew:
                _skew(model)
            per_replica = []
            for r in range(replicas):
                counts.zero_()
                logits, loss, tracker = _run_case(model, n, r, vocab)
                grads = _grads(model)
                per_replica.append({"logits": logits, "loss": loss, "tracker": tracker, "grads": grads,
                                    "tokens_forward": counts.clone()})
            out["cases"].append(per_replica)
    return out


def _attention_rank(groups, cfg, reference, cases):
    from megatron.core import parallel_state as ps
    from megatron.core.transformer.spec_utils import ModuleSpec

    from megatron_fapool.models.gpt import build_gpt_model, finalize_tensor_parallel_grads
    from megatron_fapool.moe.remote import ExpertClient, RemoteExperts
    from megatron_fapool.testing.compare import rel_err
    from megatron_fapool.testing.megatron_reference import cpu_reference_shims, errors_against, load_sharded

    lm = cfg.model.language_model
    tp_group, dp_group = ps.get_tensor_model_parallel_group(), ps.get_data_parallel_group()
    dp, dp_rank = ps.get_data_parallel_world_size(), ps.get_data_parallel_rank()
    client = ExpertClient(groups, num_experts=lm.num_moe_experts)
    model = build_gpt_model(cfg, experts=ModuleSpec(RemoteExperts, params={"client": client}))
    load_sharded(model, reference["state"], ps.get_tensor_model_parallel_rank(), ps.get_tensor_model_parallel_world_size())
    report = {"expert_params": [k for k, _ in model.named_parameters() if "experts" in k], "cases": []}
    with cpu_reference_shims():
        for (n, skew, parts), refs in zip(cases, reference["cases"]):
            if skew:
                _skew(model)
            ref = refs[dp_rank]
            logits, loss, tracker = _run_case(model, n, dp_rank, lm.vocab_size, parts)
            finalize_tensor_parallel_grads(model, tp_group)
            for p in model.parameters():  # average over the replicas, as DeepSpeed does
                torch.distributed.all_reduce(p.grad, group=dp_group)
                p.grad /= dp
            mean = {k: sum(r["grads"][k] for r in refs) / dp for k in ref["grads"]}
            err = errors_against(model, logits, loss, {"logits": ref["logits"], "loss": ref["loss"], "grads": mean},
                                 tp_group)
            err["aux"] = max(rel_err(tracker[k], ref["tracker"][k]) for k in ref["tracker"])
            err["aux_values"] = {k: (tracker[k].tolist(), ref["tracker"][k].tolist()) for k in ref["tracker"]}
            err["aux_names"] = sorted(tracker)
            report["cases"].append(err)
            client.send_header(torch.device("cpu"), op=SNAPSHOT)
        # poison: the expert ranks zero their weights; the logits must change
        before = logits
        client.send_header(torch.device("cpu"), op=POISON)
        after, _, _ = _run_case(model, cases[-1][0], dp_rank, lm.vocab_size)
        report["poisoned_change"] = rel_err(after, before)
    report["stats"] = client.stats
    client.shutdown(torch.device("cpu"))
    return report


def _expert_rank(groups, cfg, reference):
    from megatron_fapool.models.gpt import expert_transformer_config
    from megatron_fapool.moe.serve import ExpertServer, ExpertStack

    lm = cfg.model.language_model
    stack = ExpertStack.for_rank(groups, expert_transformer_config(cfg), num_layers=lm.num_layers,
                                 num_experts=lm.num_moe_experts)
    stack.load_from_megatron(reference["state"])
    snapshots = []

    def snapshot(server, h):
        names = server.stack.megatron_names()
        grads = {names[k]: g for k, g in _grads(server.stack).items()}
        snapshots.append({"grads": grads, "tokens_forward": server.stats.tokens_forward.clone(),
                          "tokens_backward": server.stats.tokens_backward.clone(),
                          "order": list(server.stats.recent_forward)})
        server.stats.recent_forward.clear()
        server.stats.tokens_forward.zero_()
        server.stats.tokens_backward.zero_()
        server.stack.zero_grad(set_to_none=False)

    def poison(server, h):
        with torch.no_grad():
            for p in server.stack.parameters():
                p.zero_()

    server = ExpertServer(groups, stack, device=torch.device("cpu"), num_experts=lm.num_moe_experts,
                          handlers=[{SNAPSHOT: snapshot, POISON: poison}])
    server.serve()
    return {"ids": list(stack.global_ids), "snapshots": snapshots,
            "params": sum(p.numel() for p in stack.parameters())}


def _ma_body(rank, world, cfg_path, reference, cases):
    from megatron_fapool.config import load_run_config
    from megatron_fapool.parallel import initialize_parallel_groups, layout_from_config

    cfg = load_run_config(cfg_path)
    groups = initialize_parallel_groups(layout_from_config(cfg, world), timeout_s=90)
    torch.manual_seed(0)
    if groups.is_base:
        return _attention_rank(groups, cfg, reference, cases)
    return _expert_rank(groups, cfg, reference)


def _check(results, reference, num_attention, tp, cases):
    from megatron_fapool.testing.compare import rel_err

    replicas = num_attention // tp
    attention, experts = results[:num_attention], results[num_attention:]
    for r in attention:
        assert r["expert_params"] == []  # nothing of the experts on attention ranks
        assert r["stats"].forward_calls > 0 and r["stats"].bytes_sent > 0
        for err in r["cases"]:
            assert err["logits"] < 1e-5 and err["loss"] < 1e-5, err
            assert err["grads"] < 1e-5, err
            assert err["aux"] < 1e-6, err
            assert err["aux_names"] == ["load_balancing_loss", "z_loss"]
        assert r["poisoned_change"] > 1e-2  # the expert ranks computed the experts
    ids = [i for e in experts for i in e["ids"]]
    assert ids == list(range(16))  # every expert on exactly one expert rank, contiguous blocks
    for c, refs in enumerate(reference["cases"]):
        # token counters: exactly the reference routing summed over replicas (per replica two
        # forwards, logits and loss, and one backward)
        ref_tokens = sum(r["tokens_forward"] for r in refs)
        got = torch.cat([e["snapshots"][c]["tokens_forward"] for e in experts], dim=1)
        assert torch.equal(got, ref_tokens)
        assert torch.equal(2 * torch.cat([e["snapshots"][c]["tokens_backward"] for e in experts], dim=1), ref_tokens)
        # ping-pong ran: the expert ranks served the parts in turns, layer by layer (logits, then loss)
        parts = cases[c][2]
        order = [(layer, p) for layer in range(2) for p in range(parts)]
        assert all(e["snapshots"][c]["order"] == order * 2 for e in experts)
        # dropless: 2 forwards x 2 layers x batch 2 x n tokens x top-2, per replica
        assert int(ref_tokens.sum()) == 2 * 2 * 2 * cases[c][0] * 2 * replicas
        for e in experts:
            for name, g in e["snapshots"][c]["grads"].items():
                mean = sum(r["grads"][name] for r in refs) / replicas
                assert rel_err(g / replicas, mean) < 1e-5, (c, name)
    skewed = sum(r["tokens_forward"] for r in reference["cases"][-1])
    assert int(skewed[:, 5:].sum()) == 0 and torch.equal(skewed[:, 3], skewed.sum(1) // 2), skewed


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The single-process reference of every case for 3 replicas (2+2 uses the first 2)."""
    cfg_path = _config(tmp_path_factory.mktemp("reference"), "3:1", 1)
    return run_distributed(_reference_body, 1, cfg_path, 3, ALL_CASES, timeout=240)[0]


@pytest.mark.slow
# 3 + 1: data-parallel attention ranks, one expert rank; tp2+2: tensor-parallel attention ranks, two
# expert ranks of 8 experts each (ratio 1:1)
@pytest.mark.parametrize("ratio,world,tp", [("3:1", 4, 1), ("1:1", 4, 2)], ids=["3+1", "tp2+2"])
def test_ma_separation_matches_megatron_moe(tmp_path, reference, ratio, world, tp):
    cfg_path = _config(tmp_path, ratio, tp)
    a, e = (int(x) for x in ratio.split(":"))
    num_attention = world * a // (a + e)
    cases = _cases(tp)
    picked = {"state": reference["state"],
              "cases": [r[: num_attention // tp] for c, r in zip(ALL_CASES, reference["cases"]) if c in cases]}
    results = run_distributed(_ma_body, world, cfg_path, picked, cases, timeout=300)
    _check(results, picked, num_attention, tp, cases)
