"""Hugging Face export and import of the converter's canonical form (:mod:`..canonical`).

* :func:`check_exportable` (:mod:`.arch`): the exact target architecture of a model card, or a
  :class:`~megatron_fapool.config.ConfigError` naming the feature none computes;
* :func:`export_hf` (:mod:`.export`): canonical weights -> safetensors shards + index + configs +
  tokenizer (+ the portable ``fapool_gpt`` files);
* :func:`read_hf` (:mod:`.importer`): an HF folder -> card + canonical weights;
* :mod:`.mapping`: the per-tensor rules, both directions (a verification table maps back with them).

``transformers``, ``safetensors`` and ``tokenizers`` are an optional extra (``pip install -e .[hf]``):
this package imports without them and its functions say how to install them when called.
"""

from .arch import ARCHES, check_exportable, mismatches
from .export import DEFAULT_MAX_SHARD_BYTES, check_weights, export_hf
from .hfconfig import card_of_hf_config, hf_config_dict
from .importer import open_hf_tensors, read_hf, read_hf_card
from .mapping import Rule, canonical_shapes, canonical_to_hf, hf_shapes, hf_to_canonical, rules_for
from .portable_files import portable_model_class, register_portable
from .requirements import require_hf
from .tokenizer import write_byte_tokenizer

__all__ = [
    "ARCHES", "DEFAULT_MAX_SHARD_BYTES", "Rule", "canonical_shapes", "canonical_to_hf", "card_of_hf_config",
    "check_exportable", "check_weights", "export_hf", "hf_config_dict", "hf_shapes", "hf_to_canonical",
    "mismatches", "open_hf_tensors", "portable_model_class", "read_hf", "read_hf_card", "register_portable",
    "require_hf", "rules_for", "write_byte_tokenizer",
]
