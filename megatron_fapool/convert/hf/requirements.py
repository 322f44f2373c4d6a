"""``transformers`` and ``safetensors`` are an optional extra: the HF functions check for them when called."""

from __future__ import annotations

import importlib.util

from ...config import ConfigError

__all__ = ["HF_PACKAGES", "require_hf"]

HF_PACKAGES = ("transformers", "safetensors", "tokenizers")


def require_hf(what: str) -> None:
    """Raise :class:`ConfigError` saying how to install the extra when one of :data:`HF_PACKAGES` is missing."""
    missing = []
    for name in HF_PACKAGES:
        try:
            if importlib.util.find_spec(name) is None:
                missing.append(name)
        except (ImportError, ValueError):
            missing.append(name)
    if missing:
        raise ConfigError(
            "transformers", f"{what} needs {', '.join(missing)} (not installed): pip install -e .[hf]"
        )
