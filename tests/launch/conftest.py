"""Run an entry point's ``main`` as rank 0 of a would-be job, in this process.

For bad-input tests: the preflight refuses before any process group exists, so there is
nothing to launch, and importing Megatron and DeepSpeed once (not once per case in a
fresh interpreter) keeps the suite fast. The result looks like ``subprocess.run``'s.
"""

import functools
import importlib.util
import os
import subprocess

import pytest

from megatron_fapool.runtime import exit_on_user_error

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@functools.lru_cache(maxsize=None)
def _entry_point(script: str):
    path = os.path.join(ROOT, "launch", f"{script}.py")
    spec = importlib.util.spec_from_file_location(f"fapool_launch_{script}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def rank0(monkeypatch, capsys):
    """``rank0(script, args, world=4)``: ``launch/<script>.py``'s main as rank 0 of ``world`` ranks."""
    def run(script: str, args, world: int = 4) -> subprocess.CompletedProcess:
        for key, value in (("WORLD_SIZE", str(world)), ("RANK", "0"), ("LOCAL_RANK", "0")):
            monkeypatch.setenv(key, value)
        main = _entry_point(script).main
        try:
            code = exit_on_user_error(lambda: main(list(args)))
        except SystemExit as e:
            code = e.code
        out = capsys.readouterr()
        return subprocess.CompletedProcess(list(args), code, out.out, out.err)
    return run
