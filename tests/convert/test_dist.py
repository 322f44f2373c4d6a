"""Megatron distributed checkpoints and the DeepSpeed <-> dist conversion (CPU, gloo).

* ours -> dist -> ours at the same layout (TP 2, ZeRO 1) gives back DeepSpeed's files with every
  tensor bitwise equal: module weights, fp32 masters, Adam moments and step, LR scheduler,
  counters, client state (iteration, pool manager, RNG);
* the dist checkpoint read at TP 1 (Megatron's sharded_state_dict) equals the TP merge of the
  training checkpoint's shards done by the converter's own placement rules, and the TP 1
  weights-only save / load round trip is bitwise;
* bad input is a ConfigError before any work, also when a spawned worker finds it.
"""

from __future__ import annotations

import json
import os

import pytest
import torch

from megatron_fapool.config import ConfigError, load_run_config
from megatron_fapool.convert import dist as dio
from megatron_fapool.convert.deepspeed_io import dist_to_ours, ours_to_dist
from megatron_fapool.convert.ours import OurCheckpoint, open_ours, read_weights
from megatron_fapool.convert.progress import Progress
from megatron_fapool.runtime.spawn import spawn_world
from megatron_fapool.testing.launch import ROOT

SEQ = 64


def _equal(a, b, path: str, out: list) -> None:
    """Every difference between two loaded DeepSpeed files (tensors: dtype, shape and bits)."""
    if torch.is_tensor(a):
        if not (torch.is_tensor(b) and a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)):
            out.append(path)
    elif isinstance(a, dict):
        if not isinstance(b, dict) or set(a) != set(b):
            out.append(f"{path}: keys differ")
        else:
            for k in a:
                _equal(a[k], b[k], f"{path}.{k}", out)
    elif isinstance(a, (list, tuple)):
        if not isinstance(b, (list, tuple)) or len(a) != len(b):
            out.append(f"{path}: lengths differ")
        else:
            for i, (x, y) in enumerate(zip(a, b)):
                _equal(x, y, f"{path}[{i}]", out)
    elif hasattr(a, "__dict__") and type(a) is type(b) and type(a).__eq__ is object.__eq__:
        _equal(vars(a), vars(b), path, out)  # e.g. DeepSpeed's loss scaler
    elif a != b:
        out.append(f"{path}: {a!r} != {b!r}")


@pytest.fixture(scope="module")
def trained(rope_tp2):
    """3 iterations of launch/train.py at TP 2, ZeRO 1 (2 micro-batches per step), a checkpoint after each."""
    return rope_tp2


@pytest.fixture(scope="module")
def dist_ckpt(trained):
    out = str(trained["dir"] / "dist")
    ours_to_dist(open_ours(trained["ckpt"]), out, optimizer=True, progress=Progress(quiet=True), timeout=240)
    return out


def test_round_trip_is_bitwise(trained, dist_ckpt, tmp_path):
    out = str(tmp_path / "back")
    tag_dir = dist_to_ours(dist_ckpt, load_run_config(trained["cfg"]), out, progress=Progress(quiet=True), timeout=240)
    src = os.path.join(trained["ckpt"], "iter_0000003")
    assert tag_dir == os.path.join(out, "iter_0000003") and open(os.path.join(out, "latest")).read() == "iter_0000003"
    files = sorted(f for f in os.listdir(src) if f.endswith(".pt"))
    assert files == sorted(f for f in os.listdir(tag_dir) if f.endswith(".pt"))
    assert "zero_pp_rank_0_mp_rank_01_optim_states.pt" in files
    for f in files:
        a = torch.load(os.path.join(src, f), map_location="cpu", weights_only=False)
        b = torch.load(os.path.join(tag_dir, f), map_location="cpu", weights_only=False)
        diffs = []
        _equal(a, b, f, diffs)
        assert not diffs, diffs[:10]
    # the state that matters is really in those files (not two empty dicts alike)
    model = torch.load(os.path.join(tag_dir, "mp_rank_01_model_states.pt"), weights_only=False)
    assert model["global_steps"] == 3 and model["iteration"] == 3 and model["lr_scheduler"]["last_batch_iteration"] == 2
    optim = torch.load(os.path.join(tag_dir, "zero_pp_rank_0_mp_rank_00_optim_states.pt"), weights_only=False)
    state = optim["optimizer_state_dict"]["base_optimizer_state"]["state"][0]
    assert float(state["step"]) == 3 and state["exp_avg"].abs().sum() > 0 and state["exp_avg_sq"].abs().sum() > 0
    a, b = (json.load(open(os.path.join(d, "fapool_checkpoint.json"))) for d in (src, tag_dir))
    assert a == b


def test_dist_layout_and_card(trained, dist_ckpt):
    iter_dir = dio.resolve_dist_dir(dist_ckpt)
    assert iter_dir == os.path.join(dist_ckpt, "iter_0000003") and dio.resolve_dist_dir(iter_dir) == iter_dir
    card, training, info = dio.read_card(iter_dir)
    assert card == open_ours(trained["ckpt"]).card
    assert (training.iteration, training.global_steps, training.adam_step, training.consumed_samples) == (3, 3, 3, 6)
    assert info["optimizer"] and info["source"]["tp"] == 2 and info["source"]["zero_stage"] == 1
    from megatron.core.dist_checkpointing import load_tensors_metadata

    with dio.cpu_shim():
        keys = load_tensors_metadata(iter_dir)
    qkv = "decoder.layers.self_attention.linear_qkv.weight"  # Megatron's keys: layers stacked, global shapes
    assert tuple(keys[qkv].global_shape) == (2, 128, 64)
    for kind in dio.OPTIMIZER_KEYS:
        assert tuple(keys[f"optimizer.state.{kind}.{qkv}"].global_shape) == (2, 128, 64)


def test_tp1_read_equals_the_shard_merge_and_weights_round_trip(trained, dist_ckpt, tmp_path):
    card, weights = dio.load_weights_dist(dist_ckpt)  # Megatron's resharding to TP 1
    merged = read_weights(open_ours(trained["ckpt"]))  # the converter's own TP merge of the model files
    assert weights.keys() == merged.keys()
    for k in weights:
        assert weights[k].dtype == merged[k].dtype and torch.equal(weights[k], merged[k]), k
    dio.save_weights_dist(card, weights, str(tmp_path / "w"), source={"kind": "test"})
    card2, again = dio.load_weights_dist(str(tmp_path / "w"))
    assert card2 == card and all(torch.equal(again[k], weights[k]) for k in weights)
    _, training, info = dio.read_card(dio.resolve_dist_dir(str(tmp_path / "w")))
    assert training is None and not info["optimizer"]
    bad = dict(weights)
    bad.pop("decoder.final_layernorm.weight")
    with pytest.raises(ConfigError, match="missing.*decoder.final_layernorm.weight"):
        dio.save_weights_dist(card, bad, str(tmp_path / "bad"))


def test_inspect_lists_the_dist_checkpoint(dist_ckpt):
    from megatron_fapool.convert.listing import describe
    from megatron_fapool.convert.sources import open_source

    text = describe(open_source(dist_ckpt))
    assert "kind          dist" in text and "iteration 3; optimizer state yes" in text
    assert "optimizer.state.exp_avg.decoder.layers.self_attention.linear_qkv.weight" in text and "(2, 128, 64)" in text


def test_incomplete_or_foreign_dist_dirs_are_refused(dist_ckpt, tmp_path):
    with pytest.raises(ConfigError, match="no such directory"):
        dio.resolve_dist_dir(str(tmp_path / "nope"))
    half = tmp_path / "half" / "iter_0000003"
    half.mkdir(parents=True)
    (half / "metadata.json").write_text("{}")
    (tmp_path / "half" / dio.LATEST).write_text("3")
    with pytest.raises(ConfigError, match="no fapool_dist.json"):
        dio.resolve_dist_dir(str(tmp_path / "half"))


def test_bad_targets_are_refused_before_any_work(trained, dist_ckpt, tmp_path):
    src = open_ours(trained["ckpt"])
    ma = OurCheckpoint(root=src.root, tag=src.tag, meta={**src.meta, "model": {**src.meta["model"], "ma_separation": True}},
                       card=src.card)
    with pytest.raises(ConfigError, match="MA separation.*without --optimizer"):
        ours_to_dist(ma, str(tmp_path / "x"), optimizer=True, progress=Progress(quiet=True))
    yaml_text = open(os.path.join(ROOT, "configs", "models", "tiny_dense_rope.yaml")).read()
    (tmp_path / "wide.yaml").write_text(yaml_text.replace("hidden_size: 64", "hidden_size: 96"))
    wide = load_run_config(trained["cfg"], model_yaml=str(tmp_path / "wide.yaml"))
    with pytest.raises(ConfigError, match="not the checkpoint's: hidden_size=64 \\(target: 96\\)"):
        dist_to_ours(dist_ckpt, wide, str(tmp_path / "y"), progress=Progress(quiet=True))
    with pytest.raises(ConfigError, match="--optimizer: 'keep'"):
        dist_to_ours(dist_ckpt, load_run_config(trained["cfg"]), str(tmp_path / "z"), optimizer="keep",
                     progress=Progress(quiet=True))
    assert not any(os.path.exists(tmp_path / n) for n in ("x", "y", "z"))


def _refuses_on_rank_1(rank, world_size):
    if rank == 1:
        raise ConfigError("--load", "bad file found by a worker")
    return rank


def test_a_workers_config_error_is_raised_as_itself():
    with pytest.raises(ConfigError, match="^--load: bad file found by a worker$"):
        spawn_world(_refuses_on_rank_1, 2, timeout=60)
