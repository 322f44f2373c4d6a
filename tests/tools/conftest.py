"""``load_tool``: a script of ``tools/`` as a module, seeing its shared modules as it does when run.

``python tools/x.py`` puts ``tools/`` first on ``sys.path``, so a tool imports its shared
modules as ``_common`` and ``_strategies``. Here they are loaded from their files and put in
``sys.modules`` under those names for the test only (``monkeypatch``), and the tool after them.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

TOOLS = Path(__file__).resolve().parents[2] / "tools"
SHARED = ("_common", "_strategies")


@pytest.fixture
def load_tool(monkeypatch):
    """``load_tool("bench_inference")``: the module (registered under its name, as dataclasses need)."""

    def module(name: str):
        spec = importlib.util.spec_from_file_location(name, TOOLS / f"{name}.py")
        mod = importlib.util.module_from_spec(spec)
        monkeypatch.setitem(sys.modules, name, mod)
        spec.loader.exec_module(mod)
        return mod

    def load(name: str):
        for shared in SHARED:
            module(shared)
        return sys.modules[name] if name in SHARED else module(name)

    return load
