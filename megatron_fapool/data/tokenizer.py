"""A byte-level tokenizer that needs no download: UTF-8 bytes are the tokens.

Ids ``0..255`` are the bytes of the UTF-8 encoding, ``256`` is the end-of-document
token (EOD), so ``vocab_size == 257``. Any text round-trips exactly.

It has what Megatron's ``GPTDatasetConfig`` / ``GPTDataset`` use from a tokenizer
(megatron-core 0.16.1): ``vocab_size`` (picks the token dtype of the ``.bin`` file),
``eod``, and ``unique_identifiers`` (part of the hash that names the index cache).
There is deliberately no ``pad`` token: Megatron then uses its own out-of-vocabulary
pad id (-1) for short samples and masks their loss, and the documents mode of
:mod:`megatron_fapool.data.batches` pads with EOD under a zero loss mask. The class
does not subclass ``MegatronLegacyTokenizer``, whose constructor logs a deprecation
warning; it duck-types the same interface (``tokenize``, ``detokenize``,
``vocab_size``, ``vocab``, ``inv_vocab``, ``eod``).
"""

from __future__ import annotations

import json
from collections import OrderedDict
from typing import Iterable

import numpy

__all__ = ["ByteTokenizer", "EOD_ID", "BYTE_VOCAB_SIZE"]

EOD_ID = 256
BYTE_VOCAB_SIZE = 257


class ByteTokenizer:
    """UTF-8 bytes as token ids 0..255, end of document 256."""

    def __init__(self) -> None:
        self.unique_identifiers: OrderedDict[str, object] = OrderedDict(
            [("class", type(self).__name__), ("vocab_size", BYTE_VOCAB_SIZE), ("eod", EOD_ID)]
        )
        self.unique_description = json.dumps(self.unique_identifiers, indent=4)

    @property
    def vocab_size(self) -> int:
        """257: 256 byte values and EOD."""
        return BYTE_VOCAB_SIZE

    @property
    def eod(self) -> int:
        """The end-of-document id (256), appended after every document."""
        return EOD_ID

    @property
    def vocab(self) -> dict[str, int]:
        """Token text to id: ``"<0xAB>"`` for byte 0xAB, ``"<eod>"`` for EOD."""
        table = {f"<0x{b:02X}>": b for b in range(256)}
        table["<eod>"] = EOD_ID
        return table

    @property
    def inv_vocab(self) -> dict[int, str]:
        """Id to token text (the inverse of :attr:`vocab`)."""
        return {i: t for t, i in self.vocab.items()}

    def tokenize(self, text: str) -> list[int]:
        """The UTF-8 bytes of ``text`` as ids (no EOD appended)."""
        return list(text.encode("utf-8"))

    def tokenize_array(self, text: str) -> numpy.ndarray:
        """Like :meth:`tokenize`, as a ``uint16`` array, fast for large texts."""
        return numpy.frombuffer(text.encode("utf-8"), dtype=numpy.uint8).astype(numpy.uint16)

    def detokenize(self, ids: Iterable[int]) -> str:
        """Decode ids back to text; EOD ids are dropped, invalid UTF-8 becomes U+FFFD.

        Ids outside ``0..256`` raise ``ValueError``.
        """
        data = bytes(int(i) for i in ids if int(i) != EOD_ID)
        return data.decode("utf-8", errors="replace")

    def __repr__(self) -> str:
        return f"ByteTokenizer(vocab_size={BYTE_VOCAB_SIZE}, eod={EOD_ID})"
