"""tools/convert_checkpoint.py: bad input exits 2 with one line before anything is written; a killed
conversion leaves no output that looks complete; inspect reads only.

The checkpoint is a real one of launch/train.py (tiny RoPE model, TP 2, ZeRO 1, 2 iterations);
the broken ones are copies of it with one thing wrong each.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest

from megatron_fapool.convert.cli import main
from megatron_fapool.runtime import exit_on_user_error
from megatron_fapool.testing.launch import ROOT, subprocess_env

TOOL = os.path.join(ROOT, "tools", "convert_checkpoint.py")


@pytest.fixture
def checkpoint(rope_tp2):
    return rope_tp2["ckpt"], rope_tp2["cfg"]


def run_cli(args, capsys):
    try:
        code = exit_on_user_error(lambda: main([str(a) for a in args]))
    except SystemExit as e:
        code = e.code
    out = capsys.readouterr()
    return code, out.out, out.err


def _copy(checkpoint, tmp_path) -> str:
    dst = tmp_path / "copy"
    shutil.copytree(checkpoint[0], dst)
    return dst


def _one_error_line(code, err, *words):
    assert code == 2, err
    lines = [line for line in err.strip().splitlines() if line]
    assert len(lines) == 1 and lines[0].startswith("fapool: error:"), err
    for w in words:
        assert w in lines[0], (w, lines[0])


def test_inspect_reads_only(checkpoint, capsys):
    before = sorted(os.walk(checkpoint[0]))
    code, out, _ = run_cli(["inspect", checkpoint[0]], capsys)
    assert code == 0
    assert "layout        TP 2  PP 1  DP 1  ZeRO stage 1" in out and "iter_0000003" in out
    assert "[tp 01] decoder.layers.1.self_attention.linear_qkv.weight" in out and "complete      yes" in out
    assert sorted(os.walk(checkpoint[0])) == before


def test_not_a_checkpoint(tmp_path, capsys):
    (tmp_path / "notes.txt").write_text("x")
    code, _, err = run_cli(["inspect", tmp_path], capsys)
    _one_error_line(code, err, "is not a checkpoint", "notes.txt")


def test_latest_naming_a_half_written_tag(checkpoint, tmp_path, capsys):
    d = _copy(checkpoint, tmp_path)
    os.remove(d / "iter_0000003" / "fapool_checkpoint.json")
    out = tmp_path / "hf"
    code, _, err = run_cli(["export-hf", "--load", d, "--save", out], capsys)
    _one_error_line(code, err, "iter_0000003", "half written", "complete tags: iter_0000001, iter_0000002", "--tag")
    assert not out.exists()


def test_a_missing_tp_shard(checkpoint, tmp_path, capsys):
    d = _copy(checkpoint, tmp_path)
    os.remove(d / "iter_0000003" / "mp_rank_01_model_states.pt")
    code, _, err = run_cli(["to-dist", "--load", d, "--save", tmp_path / "dist"], capsys)
    _one_error_line(code, err, "mp_rank_01_model_states.pt is missing")
    assert not (tmp_path / "dist").exists()


def test_a_truncated_file(checkpoint, tmp_path, capsys):
    d = _copy(checkpoint, tmp_path)
    f = d / "iter_0000003" / "zero_pp_rank_0_mp_rank_00_optim_states.pt"
    f.write_bytes(f.read_bytes()[: 5000])
    code, _, err = run_cli(["inspect", d], capsys)
    _one_error_line(code, err, "zero_pp_rank_0_mp_rank_00_optim_states.pt (5000 bytes) is truncated")


def test_shapes_that_disagree_with_the_model(checkpoint, tmp_path, capsys):
    d = _copy(checkpoint, tmp_path)
    marker = d / "iter_0000003" / "fapool_checkpoint.json"
    meta = json.loads(marker.read_text())
    meta["model"]["ffn_hidden_size"] = 512
    marker.write_text(json.dumps(meta))
    code, _, err = run_cli(["verify", d, checkpoint[0]], capsys)
    _one_error_line(code, err, "shapes disagree", "linear_fc1.weight: have (128, 64) want (256, 64)")


def test_a_config_of_another_model(checkpoint, tmp_path, capsys, write_config):
    cfg = write_config(tmp_path / "c.json", tp=1, yaml="tiny_dense.yaml")
    code, _, err = run_cli(["reshard", "--load", checkpoint[0], "--deepspeed_config", cfg, "--save",
                            tmp_path / "out"], capsys)
    _one_error_line(code, err, "model is not the checkpoint's", "position_embedding_type")
    assert not (tmp_path / "out").exists()


def test_an_output_that_exists(checkpoint, tmp_path, capsys):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("mine")
    code, _, err = run_cli(["to-dist", "--load", checkpoint[0], "--save", tmp_path / "out"], capsys)
    _one_error_line(code, err, "exists", "nothing is written over")
    assert os.listdir(tmp_path / "out") == ["keep.txt"]


def test_dilated_attention_is_not_exported(checkpoint, tmp_path, capsys):
    d = _copy(checkpoint, tmp_path)
    marker = d / "iter_0000003" / "fapool_checkpoint.json"
    meta = json.loads(marker.read_text())
    meta["attention"] = {"kind": "dilated", "segment_lengths": [32], "dilation_rates": [1]}
    marker.write_text(json.dumps(meta))
    code, _, err = run_cli(["export-hf", "--load", d, "--save", tmp_path / "hf"], capsys)
    _one_error_line(code, err, "dilated")
    assert not (tmp_path / "hf").exists()


def test_a_killed_conversion_leaves_nothing_that_looks_complete(checkpoint, tmp_path):
    out = tmp_path / "dist"
    cmd = [sys.executable, TOOL, "to-dist", "--load", str(checkpoint[0]), "--save", str(out)]
    proc = subprocess.Popen(cmd, env=subprocess_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            start_new_session=True)
    partial = f"{out}.partial-{proc.pid}"
    t0 = time.time()
    while not os.path.isdir(partial) and proc.poll() is None and time.time() - t0 < 120:
        time.sleep(0.05)
    assert os.path.isdir(partial), proc.communicate()[0]
    time.sleep(1.0)  # mid-write: the workers are starting or writing
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    assert not out.exists()  # only the staging folder, never OUT
    done = subprocess.run(cmd + ["--no-verify"], env=subprocess_env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert f"removed {partial}" in done.stdout and not os.path.exists(partial)
    assert out.is_dir() and (out / "latest_checkpointed_iteration.txt").is_file()
