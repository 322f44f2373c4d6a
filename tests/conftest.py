import fcntl
import json
import os
import shutil

import pytest
import torch


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA GPU; skipped on CPU-only machines")
    config.addinivalue_line("markers", "slow: multi-process or long-running test")


# `make test` runs two xdist workers, a file at a time each (--dist loadfile), handing out files in
# collection order (--no-loadscope-reorder: xdist's own order is by number of tests, which puts
# files of many quick cases first and the few long launches last, where one of them runs alone).
# These are the longest files (2-core machine, 2026-12-03, after the merges of that day), longest first; the
# rest follow in order.
LONGEST_FIRST = [
    "tests/convert/test_end_to_end.py",
    "tests/launch/test_train.py",
    "tests/convert/test_reshard.py",
    "tests/launch/test_train_ma.py",
    "tests/launch/test_infer_ma.py",
    "tests/launch/test_train_shared_pool.py",
    "tests/models/test_pool_gpt_equivalence.py",
    "tests/tools/test_bench_end_to_end.py",
    "tests/attention/pool/test_zigzag.py",
    "tests/moe/test_ma_gpt_equivalence.py",
    "tests/models/test_dilated_gpt.py",
    "tests/convert/test_cli.py",
    "tests/inference/test_generate.py",
    "tests/convert/test_dist.py",
]


@pytest.fixture(scope="session")
def build_once(tmp_path_factory):
    """``build_once(name, build)``: ``build(folder)`` (it returns JSON) once per test session, shared by the xdist
    workers (a lock and a marker in the session's base folder): a corpus or a trained checkpoint that tests of
    several files read is built once, not once per worker or per module. What it builds is read-only to tests."""
    base = tmp_path_factory.getbasetemp()
    root = base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base  # popen-gwN's parent: this session's

    def run(name: str, build):
        folder, done = root / f"shared-{name}", root / f"shared-{name}.json"
        with open(root / f"shared-{name}.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)  # another worker building it: wait, then reuse
            if done.exists():
                return json.loads(done.read_text())
            shutil.rmtree(folder, ignore_errors=True)  # a build that failed
            folder.mkdir()
            out = build(folder)
            done.write_text(json.dumps(out))
            return out
    return run


def pytest_collection_modifyitems(config, items):
    rank = {path: i for i, path in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.nodeid.split("::")[0], len(rank)))  # stable: the rest keep their order
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
