"""The byte tokenizer (:class:`~megatron_fapool.data.tokenizer.ByteTokenizer`) as Hugging Face files.

``tokenizer.json`` is a merge-free byte-level BPE whose vocabulary maps the byte-level
character of byte ``b`` (GPT-2's ``bytes_to_unicode``) to id ``b``, plus ``<eod>`` = 256 as
the EOS special token: ``AutoTokenizer.from_pretrained`` then encodes any text to its UTF-8
bytes and decodes them back, the same ids as ``ByteTokenizer`` (no BOS, no EOS appended; the
text ``<eod>`` is five bytes, as in ``ByteTokenizer``: ``split_special_tokens``).
"""

from __future__ import annotations

from ...data.tokenizer import EOD_ID
from .requirements import require_hf

__all__ = ["EOD_TOKEN", "byte_level_chars", "write_byte_tokenizer"]

EOD_TOKEN = "<eod>"


def byte_level_chars() -> list[str]:
    """The byte-level character of each byte value 0..255 (GPT-2's ``bytes_to_unicode``)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + extra)
            extra += 1
    return [chars[b] for b in range(256)]


def write_byte_tokenizer(out_dir: str, model_max_length: int) -> list[str]:
    """Write ``tokenizer.json`` + ``tokenizer_config.json`` (+ what transformers adds) into ``out_dir``; the file names."""
    require_hf("writing the tokenizer")
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {c: b for b, c in enumerate(byte_level_chars())}
    vocab[EOD_TOKEN] = EOD_ID
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], fuse_unk=False, byte_fallback=False))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOD_TOKEN, model_max_length=model_max_length,
                                   clean_up_tokenization_spaces=False, split_special_tokens=True)
    return list(fast.save_pretrained(out_dir))
