"""An expert rank's DeepSpeed engine (training/experts.py) against plain autograd arithmetic.

Three ranks: rank 0 stands for the attention ranks (its own engine, managed gradient
accumulation, two micro-batches), ranks 1 and 2 are an expert group that is *not* a
prefix of the world. At ZeRO 0, 1 and 2, with SGD (so any error in the gradient's scale
shows in the weights; Adam would hide most of it), gradient accumulation 2 and clipping
at 1.0, one step must give exactly

    p - lr * c * g,   g = (sum of the backward pieces) / DP_attention on expert ranks,
                      g = (sum of micro-batch gradients) / gas on the attention rank,
                      c = 1 / (||g_all|| + 1e-6), one global norm over all three ranks,

and every rank must report that global norm. Then the all-or-nothing checkpoint (attention
engine + both expert engines under one tag, manifest, marker, ``latest``) is written,
loaded back into fresh engines, and a rank that owns other experts is refused.
"""

import json
import os

import torch

from megatron_fapool.testing.distributed import run_distributed

LR = 0.5
DP_ATTENTION = 3  # the expert gradients are sums over 3 attention replicas
SCALE = 10.0  # large gradients: clipping at 1.0 is active


def _model(rank):
    torch.manual_seed(100 + rank)
    return torch.nn.Sequential(torch.nn.Linear(4, 3, bias=False), torch.nn.Linear(3, 2, bias=False))


def _pieces(rank, stage):
    """(uses only the first layer, x, g) of each backward piece (expert ranks) or micro-batch (rank 0)."""
    gen = torch.Generator().manual_seed(1000 * stage + rank)
    out = []
    for i in range(2 if rank == 0 else 3):
        first_only = rank != 0 and i == 2  # a piece that reaches only some parameters
        x = torch.randn(5, 4, generator=gen)
        g = SCALE * torch.randn(5, 3 if first_only else 2, generator=gen)
        out.append((first_only, x, g))
    return out


def _forward(model, first_only, x):
    return model[0](x) if first_only else model(x)


def _expected(rank, stage):
    """(initial weights, the gradient each engine should step with) of ``rank``."""
    model = _model(rank)
    init = [p.detach().clone() for p in model.parameters()]
    for first_only, x, g in _pieces(rank, stage):
        (_forward(model, first_only, x) * g).sum().backward()
    div = 2 if rank == 0 else DP_ATTENTION  # gas on the attention rank, DP on the experts
    return init, [p.grad / div for p in model.parameters()]


class _Stack(torch.nn.Module):
    def __init__(self, rank):
        super().__init__()
        self.net = _model(rank)
        self.global_ids = range(8 * (rank - 1), 8 * rank)

    def forward(self, first_only, x):
        return _forward(self.net, first_only, x)


def _config(stage):
    return {
        "train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 2, "gradient_clipping": 1.0,
        "optimizer": {"type": "SGD", "params": {"lr": LR}}, "zero_optimization": {"stage": stage},
        "steps_per_print": 10**9, "zero_allow_untested_optimizer": True,
    }


def _body(rank, world_size, tmp):
    import deepspeed
    import torch.distributed as dist

    from megatron_fapool.parallel import ParallelGroups
    from megatron_fapool.parallel.roles import compute_layout
    from megatron_fapool.parallel.service import Header
    from megatron_fapool.training import checkpoint as ckpt
    from megatron_fapool.training.deepspeed_world import base_ranks_as_world
    from megatron_fapool.training.experts import STEP, ExpertTrainer
    from megatron_fapool.training.global_norm import install_global_grad_norm

    layout = compute_layout(3, tp=1, pp=1, num_attention_heads=4, num_query_groups=2, num_layers=2,
                            attention_expert_ratio=(1, 2), num_experts=16)
    assert layout.num_base == 1 and layout.expert_group(0) == (1, 2)
    everyone = dist.new_group([0, 1, 2])
    attention = dist.new_group([0])
    experts = dist.new_group([1, 2])
    alone = {r: dist.new_group([r]) for r in range(3)}
    groups = ParallelGroups(layout=layout, rank=rank, base=attention if rank == 0 else None,
                            expert=experts if rank else None, dispatch=everyone,
                            expert_self=alone[rank] if rank else None)
    report = {}
    for stage in (0, 1, 2):
        if rank == 0:
            model = _model(0)
            with base_ranks_as_world(attention, 1):
                engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=list(model.parameters()),
                                                       config=_config(stage))
                install_global_grad_norm(engine, group=everyone, contributes=True)
                for first_only, x, g in _pieces(0, stage):
                    engine.backward((_forward(model, first_only, x) * g).sum())
                    engine.step()
                norm = engine.get_global_grad_norm()
                weights = [p.detach().clone() for p in model.parameters()]
                ckpt.save_checkpoint(engine, os.path.join(tmp, f"z{stage}"), 1, metadata={"iteration": 1},
                                     client_state={"iteration": 1}, group=everyone,
                                     manifest=ckpt.expert_manifest(layout, 16))
        else:
            stack = _Stack(rank)
            with ExpertTrainer.world(groups):
                import deepspeed.comm as ds

                world = (ds.get_world_size(), ds.get_rank(), ds.get_global_rank(None, 1))
                trainer = ExpertTrainer(stack, _config(stage), groups, torch.device("cpu"), micro=1, gas=2,
                                        attention_dp=DP_ATTENTION, save_dir=os.path.join(tmp, f"z{stage}"))
                for first_only, x, g in _pieces(rank, stage):
                    trainer.backward(stack(first_only, x), g)
                trainer.handlers()[STEP](None, Header(op=STEP, call_id=1))
                norm = trainer.engine.get_global_grad_norm()
                weights = [p.detach().clone() for p in stack.parameters()]
                trainer.handlers()[12](None, Header(op=12, call_id=1))  # SAVE, in the commit of rank 0's save
                # a fresh engine loads what was saved
                fresh = _Stack(rank)
                again = ExpertTrainer(fresh, _config(stage), groups, torch.device("cpu"), micro=1, gas=2,
                                      attention_dp=DP_ATTENTION, save_dir=None)
                loaded = again.load(os.path.join(tmp, f"z{stage}"), "iter_0000001")
                same = all(torch.equal(a, b) for a, b in zip(weights, fresh.parameters()))
                stranger = _Stack(rank)
                stranger.global_ids = range(100, 108)  # another rank's experts
                other = ExpertTrainer(stranger, _config(stage), groups, torch.device("cpu"), micro=1, gas=2,
                                      attention_dp=DP_ATTENTION, save_dir=None)
                try:
                    other.load(os.path.join(tmp, f"z{stage}"), "iter_0000001")
                    refused = None
                except Exception as e:  # noqa: BLE001
                    refused = str(e)
            report[stage] = {"world": world, "loaded": loaded, "same": same, "refused": refused}
        report.setdefault(stage, {}).update(weights=weights, norm=float(norm))
    return report


def test_expert_engine_steps_with_the_attention_engine(tmp_path):
    results = run_distributed(_body, 3, str(tmp_path), timeout=240)
    for stage in (0, 1, 2):
        expected = {r: _expected(r, stage) for r in range(3)}
        total = sum(float(g.double().pow(2).sum()) for r in range(3) for g in expected[r][1]) ** 0.5
        assert total > 1.5  # clipping is active
        coef = 1.0 / (total + 1e-6)
        for r in range(3):
            got = results[r][stage]
            assert abs(got["norm"] - total) <= 1e-5 * total, (stage, r, got["norm"], total)
            init, grads = expected[r]
            for w, p0, g in zip(got["weights"], init, grads):
                want = p0 - LR * coef * g
                assert torch.allclose(w, want, rtol=1e-5, atol=1e-6), (stage, r, (w - want).abs().max())
        for r in (1, 2):
            got = results[r][stage]
            # DeepSpeed's world on the expert ranks: 2 ranks, this one's index, index 1 = global rank 2
            assert got["world"] == (2, r - 1, 2), got["world"]
            assert got["loaded"] == 1 and got["same"]
            assert got["refused"] and "holds experts" in got["refused"] and "this rank owns [100," in got["refused"]
        tag = tmp_path / f"z{stage}" / "iter_0000001"
        names = sorted(os.listdir(tag / "experts"))
        assert "mp_rank_00_model_states.pt" in names and "mp_rank_01_model_states.pt" in names, names
        manifest = json.loads((tag / "experts" / "manifest.json").read_text())
        assert [r["rank"] for r in manifest["expert_ranks"]] == [1, 2]
        assert manifest["expert_ranks"][1]["experts"] == list(range(8, 16))
        assert (tmp_path / f"z{stage}" / "latest").read_text() == "iter_0000001"
        assert (tag / "fapool_checkpoint.json").is_file()
