"""Colocated MoE: ``build_gpt_model`` of an MoE YAML is Megatron's own MoE GPTModel, never a dense one.

Single process: the model built from ``configs/tiny_moe.json`` (and from a YAML setting every MoE
key) equals Megatron's ``GPTModel`` with Megatron's own MoE local spec (``MoELayer``, Megatron's
``TopKRouter``, allgather dispatcher, ``SequentialMLP``) with the same weights: logits, loss and
every gradient within rel 1e-5, the load-balancing and z losses of Megatron's tracker within 1e-6.
TP 2 (sequence parallel, experts whole on both TP ranks) against the same reference, after the TP
sum of the sequence-parallel gradients that Megatron's ``finalize_model_grads`` does.
"""

import dataclasses
import json
import os

import pytest
import torch

from megatron_fapool.config import ConfigError, load_run_config
from megatron_fapool.testing.distributed import run_distributed

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CONFIG = os.path.join(ROOT, "configs", "tiny_moe.json")
SEQ, BATCH, LAYERS, EXPERTS = 64, 2, 2, 16
# every MoE key; fp64 router; capacity 1.0 drops tokens of over-full experts
KEYS = {"moe_ffn_hidden_size": 128, "moe_aux_loss_coeff": 0.02, "moe_z_loss_coeff": 0.001,
        "moe_expert_capacity_factor": 1.0, "moe_router_dtype": "fp64"}
# for TP 2: capacity is decided per call, i.e. per TP rank's s/TP tokens under sequence parallelism
TP_KEYS = {k: v for k, v in KEYS.items() if k != "moe_expert_capacity_factor"}


def _config_with(directory, name, keys):
    lines = open(os.path.join(ROOT, "configs", "models", "tiny_moe.yaml")).read().rstrip("\n")
    lines += "\n" + "".join(f"  {k}: {v}\n" for k, v in keys.items())
    (directory / f"{name}.yaml").write_text(lines)
    data = json.load(open(CONFIG))
    data["fapool"]["model_yaml"] = str(directory / f"{name}.yaml")
    (directory / f"{name}.json").write_text(json.dumps(data))
    return str(directory / f"{name}.json")


def _tokens(vocab):
    g = torch.Generator().manual_seed(11)
    t = torch.randint(0, vocab, (BATCH, SEQ + 1), generator=g)
    pos = torch.arange(SEQ).unsqueeze(0).expand(BATCH, SEQ)
    mask = torch.triu(torch.ones(SEQ, SEQ, dtype=torch.bool), diagonal=1)[None, None]
    return t[:, :-1], t[:, 1:], pos, mask


def _run(model, vocab):
    """Logits (no grad), then loss + backward; Megatron's aux-loss tracker and the tokens the experts got."""
    from megatron.core.transformer.moe import moe_utils

    from megatron_fapool.models.gpt import moe_layers

    ids, labels, pos, mask = _tokens(vocab)
    model.zero_grad(set_to_none=True)
    with torch.no_grad():
        logits = model(ids, pos, mask)
    moe_utils.clear_aux_losses_tracker()
    routed = []
    hooks = [layer.experts.register_forward_pre_hook(lambda m, args: routed.append(int(args[1].sum())))
             for layer in moe_layers(model)]
    loss = model(ids, pos, mask, labels=labels).float().mean()
    loss.backward()
    for h in hooks:
        h.remove()
    tracker = {k: v["values"].clone() for k, v in moe_utils.get_moe_layer_wise_logging_tracker().items()}
    grads = {k: p.grad.detach().clone() for k, p in model.named_parameters()}
    return {"logits": logits, "loss": loss.detach(), "grads": grads, "tracker": tracker, "routed": routed}


def _single_body(rank, world, configs):
    from megatron.core import parallel_state
    from megatron.core.transformer.moe.router import TopKRouter

    from megatron_fapool.models.gpt import build_gpt_model, moe_layers
    from megatron_fapool.moe import FapoolTopKRouter
    from megatron_fapool.testing.compare import rel_err
    from megatron_fapool.testing.megatron_reference import (
        cpu_reference_shims, load_sharded, megatron_reference_spec, reference_gpt_model,
    )

    out = {}
    for name, path in configs.items():
        cfg = load_run_config(path)
        vocab = cfg.model.language_model.vocab_size
        ref_model = reference_gpt_model(cfg)
        state = {k: v.detach().clone() for k, v in ref_model.named_parameters()}
        with cpu_reference_shims():
            ref = _run(ref_model, vocab)
        model = build_gpt_model(cfg)
        load_sharded(model, state, 0, 1)
        got = _run(model, vocab)
        layers = moe_layers(model)
        res = {
            "ref": {"state": state, **ref},
            "errors": {
                "logits": rel_err(got["logits"], ref["logits"]),
                "loss": abs(got["loss"].item() - ref["loss"].item()) / abs(ref["loss"].item()),
                "grads": {k: rel_err(g, ref["grads"][k]) for k, g in got["grads"].items()},
                "tracker": {k: float((got["tracker"][k] - v).abs().max()) for k, v in ref["tracker"].items()},
            },
            "tracker": got["tracker"], "routed": got["routed"], "ref_routed": ref["routed"],
            "names": sorted(got["grads"]), "ref_names": sorted(ref["grads"]),
            "routers": [type(layer.router) for layer in layers],
            "ref_routers": [type(layer.router) for layer in moe_layers(ref_model)],
            "config": {k: getattr(model.config, k) for k in (
                "num_moe_experts", "moe_router_topk", "moe_ffn_hidden_size", "moe_aux_loss_coeff", "moe_z_loss_coeff",
                "moe_expert_capacity_factor", "moe_router_dtype", "moe_token_dispatcher_type",
                "moe_router_load_balancing_type", "expert_model_parallel_size", "expert_tensor_parallel_size",
                "sequence_parallel")},
            "expert_shape": tuple(layers[0].experts.local_experts[0].linear_fc1.weight.shape),
            # DeepSpeed's is_moe_param(p) is `hasattr(p, "allreduce") and not p.allreduce`: such a parameter
            # needs DeepSpeed's own expert groups. At expert parallel size 1 there is none.
            "deepspeed_moe_params": [n for n, p in model.named_parameters()
                                     if hasattr(p, "allreduce") and not p.allreduce],
        }
        # the experts do the work: zeroing every expert's output weight changes the logits
        with torch.no_grad():
            for layer in layers:
                for expert in layer.experts.local_experts:
                    expert.linear_fc2.weight.zero_()
            ids, _, pos, mask = _tokens(vocab)
            res["zeroed_experts_change"] = rel_err(model(ids, pos, mask), got["logits"])
        # an MoE config with a dense layer spec is refused, never built dense
        try:
            build_gpt_model(cfg, layer_spec=megatron_reference_spec())
        except ValueError as e:
            res["dense_spec_error"] = str(e)
        out[name] = res
        parallel_state.destroy_model_parallel()
    out["router_classes"] = (FapoolTopKRouter, TopKRouter)
    return out


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    d = tmp_path_factory.mktemp("moe")
    configs = {"default": CONFIG, "keys": _config_with(d, "keys", KEYS), "tp": _config_with(d, "tp", TP_KEYS)}
    return {"configs": configs, **run_distributed(_single_body, 1, configs, timeout=240)[0]}


@pytest.mark.parametrize("name", ["default", "keys", "tp"])
def test_moe_model_equals_megatrons_moe_gpt(single, name):
    r = single[name]
    e = r["errors"]
    assert e["logits"] <= 1e-5 and e["loss"] <= 1e-5, e
    worst = max(e["grads"], key=e["grads"].get)
    assert e["grads"][worst] <= 1e-5, (worst, e["grads"][worst])
    assert set(e["tracker"]) == ({"load_balancing_loss"} if name == "default" else {"load_balancing_loss", "z_loss"})
    assert max(e["tracker"].values()) <= 1e-6, e["tracker"]
    assert (r["tracker"]["load_balancing_loss"] > 0.5).all()  # every layer logged its aux loss
    assert r["routed"] == r["ref_routed"]
    assert r["zeroed_experts_change"] > 1e-3


def test_moe_layers_have_router_and_experts_and_no_dense_mlp(single):
    fapool_router, megatron_router = single["router_classes"]
    for name in ("default", "keys"):
        r = single[name]
        assert r["names"] == r["ref_names"]  # Megatron's parameter names, so checkpoints map 1:1
        for i in range(LAYERS):
            prefix = f"decoder.layers.{i}.mlp."
            assert f"{prefix}router.weight" in r["names"]
            experts = {n.split(".")[6] for n in r["names"] if n.startswith(prefix + "experts.local_experts.")}
            assert experts == {str(j) for j in range(EXPERTS)}
            assert not any(n.startswith(prefix + "linear_fc") for n in r["names"])
        assert r["routers"] == [fapool_router] * LAYERS and r["ref_routers"] == [megatron_router] * LAYERS
        assert "the layer spec built 0 MoE layers" in r["dense_spec_error"]
        assert r["deepspeed_moe_params"] == []


def test_every_moe_key_reaches_the_built_model(single):
    default, keys = single["default"], single["keys"]
    assert default["config"] == {
        "num_moe_experts": 16, "moe_router_topk": 2, "moe_ffn_hidden_size": 256, "moe_aux_loss_coeff": 0.01,
        "moe_z_loss_coeff": None, "moe_expert_capacity_factor": None, "moe_router_dtype": "fp32",
        "moe_token_dispatcher_type": "allgather", "moe_router_load_balancing_type": "aux_loss",
        "expert_model_parallel_size": 1, "expert_tensor_parallel_size": 1, "sequence_parallel": False,
    }
    assert keys["config"] == {**default["config"], "moe_ffn_hidden_size": 128, "moe_aux_loss_coeff": 0.02,
                              "moe_z_loss_coeff": 0.001, "moe_expert_capacity_factor": 1.0, "moe_router_dtype": "fp64"}
    assert default["expert_shape"] == (256, 64) and keys["expert_shape"] == (128, 64)
    tokens = SEQ * BATCH * 2  # top-2
    assert default["routed"] == [tokens] * LAYERS  # no token dropped without a capacity factor
    assert all(n < tokens for n in keys["routed"])  # capacity 1.0 dropped some


def _tp_body(rank, world, path, reference):
    from megatron.core import parallel_state
    import torch.distributed as dist

    from megatron_fapool.models.gpt import build_gpt_model, finalize_tensor_parallel_grads, moe_layers
    from megatron_fapool.parallel import initialize_parallel_groups, layout_from_config
    from megatron_fapool.testing.compare import rel_err
    from megatron_fapool.testing.megatron_reference import cpu_reference_shims, errors_against, load_sharded

    cfg = dataclasses.replace(load_run_config(path), tensor_model_parallel_size=2)
    initialize_parallel_groups(layout_from_config(cfg, world))
    tp_group = parallel_state.get_tensor_model_parallel_group()
    with cpu_reference_shims():  # Megatron's sequence-parallel collectives allocate on CUDA
        model = build_gpt_model(cfg)
        load_sharded(model, reference["state"], parallel_state.get_tensor_model_parallel_rank(), 2)
        got = _run(model, cfg.model.language_model.vocab_size)
    router = "decoder.layers.0.mlp.router.weight"
    expert = "decoder.layers.0.mlp.experts.local_experts.0.linear_fc1.weight"
    before = {n: rel_err(dict(model.named_parameters())[n].grad, reference["grads"][n]) for n in (router, expert)}
    reduced = finalize_tensor_parallel_grads(model, tp_group)
    err = errors_against(model, got["logits"], got["loss"], reference, tp_group)
    lb = got["tracker"]["load_balancing_loss"].clone()
    dist.all_reduce(lb, group=tp_group)  # Megatron logs it reduced over TP x CP
    z = got["tracker"]["z_loss"].clone()
    dist.all_reduce(z, group=tp_group)  # each TP rank's mean over its half: the average is the whole's
    layer = moe_layers(model)[0]
    return {
        "errors": err, "before": before, "reduced": reduced,
        "aux": {"load_balancing_loss": float((lb - reference["tracker"]["load_balancing_loss"]).abs().max()),
                "z_loss": float((z / 2 - reference["tracker"]["z_loss"]).abs().max())},
        "sequence_parallel": model.config.sequence_parallel, "etp": model.config.expert_tensor_parallel_size,
        "marked": (layer.router.weight.sequence_parallel,
                   all(p.sequence_parallel for p in layer.experts.parameters())),
        "routed": got["routed"],
    }


def test_tp2_sequence_parallel_matches_single_process(single):
    reference = single["tp"]["ref"]
    res = run_distributed(_tp_body, 2, single["configs"]["tp"], reference, timeout=300)
    for r in res:
        e = r["errors"]
        assert e["logits"] <= 1e-5 and e["loss"] <= 1e-5 and e["grads"] <= 1e-5, e
        assert max(r["aux"].values()) <= 1e-6, r["aux"]
        assert r["sequence_parallel"] and r["etp"] == 1 and r["marked"] == (True, True)
        # without the TP sum the shared gradients are one TP rank's half: the sum is needed
        assert min(r["before"].values()) > 1e-2, r["before"]
        assert r["reduced"] > 0
    # each TP rank routed its own half of the tokens
    assert [a + b for a, b in zip(res[0]["routed"], res[1]["routed"])] == single["tp"]["ref_routed"]


# --- config-only checks (no process group) ------------------------------------------------------

def test_expert_transformer_config_is_whole_experts_at_tp1():
    from megatron_fapool.models.gpt import expert_transformer_config

    cfg = dataclasses.replace(load_run_config(os.path.join(ROOT, "configs", "tiny_moe_ma.json")),
                              tensor_model_parallel_size=2, pipeline_model_parallel_size=2)
    tc = expert_transformer_config(cfg)
    assert (tc.tensor_model_parallel_size, tc.pipeline_model_parallel_size, tc.expert_model_parallel_size,
            tc.expert_tensor_parallel_size, tc.sequence_parallel) == (1, 1, 1, 1, False)
    assert (tc.num_moe_experts, tc.moe_router_topk, tc.moe_ffn_hidden_size, tc.moe_aux_loss_coeff,
            tc.moe_router_dtype, tc.params_dtype) == (16, 2, 256, 0.01, "fp32", torch.float32)
    with pytest.raises(ConfigError, match="num_moe_experts: not set"):
        expert_transformer_config(load_run_config(os.path.join(ROOT, "configs", "tiny_dense_pool.json")))


@pytest.mark.skipif(torch.cuda.is_available(), reason="the refusal is of CPU-only machines")
def test_moe_at_tp2_is_refused_on_cpu_unless_it_runs_without_sequence_parallelism():
    from megatron_fapool.models.gpt import check_runnable_here

    cfg = dataclasses.replace(load_run_config(CONFIG), tensor_model_parallel_size=2)
    with pytest.raises(ConfigError, match="tensor_model_parallel_size: 2 with an MoE model needs a GPU"):
        check_runnable_here(cfg)
    check_runnable_here(cfg, sequence_parallel=False)  # inference builds it so
    check_runnable_here(dataclasses.replace(cfg, tensor_model_parallel_size=1), seq_length=511)


def test_sequence_parallel_length_must_divide_by_tp():
    from megatron_fapool.models.gpt import check_runnable_here

    cfg = dataclasses.replace(load_run_config(CONFIG), tensor_model_parallel_size=2)
    with pytest.raises(ConfigError, match="--seq-length: 511 is not divisible by tensor_model_parallel_size=2"):
        check_runnable_here(cfg, seq_length=511)
