import pytest
import torch


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA GPU; skipped on CPU-only machines")
    config.addinivalue_line("markers", "slow: multi-process or long-running test")


# `make test` runs two xdist workers, a file at a time each (--dist loadfile), handing out files in
# collection order (--no-loadscope-reorder: xdist's own order is by number of tests, which puts
# files of many quick cases first and the few long launches last, where one of them runs alone).
# These are the longest files (2-core machine, 2026-12-02), longest first; the rest follow in order.
LONGEST_FIRST = [
    "tests/convert/test_end_to_end.py",
    "tests/launch/test_train_ma.py",
    "tests/launch/test_train.py",
    "tests/convert/test_reshard.py",
    "tests/launch/test_infer_ma.py",
    "tests/attention/pool/test_zigzag.py",
    "tests/moe/test_ma_gpt_equivalence.py",
    "tests/models/test_pool_gpt_equivalence.py",
    "tests/convert/test_cli.py",
    "tests/tools/test_bench_end_to_end.py",
    "tests/inference/test_generate.py",
    "tests/convert/test_dist.py",
]


def pytest_collection_modifyitems(config, items):
    rank = {path: i for i, path in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.nodeid.split("::")[0], len(rank)))  # stable: the rest keep their order
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
