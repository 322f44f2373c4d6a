"""The ``fapool_gpt`` modeling files (:mod:`.portable`): where they are, what ``auto_map`` names, loading them.

The two files import only ``torch`` and ``transformers``; they are shipped into every
``fapool_gpt`` export and loaded from there with ``trust_remote_code=True``. This package
loads its own copies by module name only when an HF function runs (they import
``transformers``, an optional extra).
"""

from __future__ import annotations

import importlib
import os

from .requirements import require_hf

__all__ = ["PORTABLE_FILES", "portable_auto_map", "portable_config_class", "portable_model_class", "portable_path",
           "register_portable"]

PORTABLE_FILES = ("configuration_fapool_gpt.py", "modeling_fapool_gpt.py")
_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "portable")


def portable_path(name: str) -> str:
    """The path of one of :data:`PORTABLE_FILES` in this package."""
    if name not in PORTABLE_FILES:
        raise ValueError(f"{name}: not one of {PORTABLE_FILES}")
    return os.path.join(_DIR, name)


def portable_auto_map() -> dict:
    """``config.json``'s ``auto_map`` of a ``fapool_gpt`` export."""
    return {"AutoConfig": "configuration_fapool_gpt.FapoolGPTConfig",
            "AutoModelForCausalLM": "modeling_fapool_gpt.FapoolGPTForCausalLM"}


def _module(name: str):
    require_hf("the fapool_gpt model")
    return importlib.import_module(f"{__package__}.portable.{name}")


def portable_config_class():
    """``FapoolGPTConfig`` (this package's copy)."""
    return _module("configuration_fapool_gpt").FapoolGPTConfig


def portable_model_class():
    """``FapoolGPTForCausalLM`` (this package's copy)."""
    return _module("modeling_fapool_gpt").FapoolGPTForCausalLM


def register_portable() -> None:
    """Register ``fapool_gpt`` with ``AutoConfig`` / ``AutoModelForCausalLM`` in this process (idempotent), so
    ``from_pretrained`` of an export works here without ``trust_remote_code``."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config, model = portable_config_class(), portable_model_class()
    try:
        AutoConfig.register("fapool_gpt", config)
    except ValueError:  # already registered
        pass
    try:
        AutoModelForCausalLM.register(config, model)
    except ValueError:
        pass
