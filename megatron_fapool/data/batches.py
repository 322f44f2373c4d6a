"""What the training loop consumes: micro-batches of a Megatron indexed dataset.

:func:`open_training_data` opens ``PREFIX.bin`` / ``PREFIX.idx`` (written by
``tools/preprocess_data.py``) in one of two modes and returns a :class:`TrainingData`
whose :meth:`~TrainingData.batch` is a pure function of ``micro_index``: the number of
micro-batches this data-parallel rank has consumed so far (``iteration *
gradient_accumulation_steps + micro_step``). There is no iterator state, so a run
resumed at iteration ``k`` sees exactly the batches of an uninterrupted run.

Both modes cut the same global sample stream: slot ``k`` of micro-batch ``micro_index``
on data-parallel rank ``r`` of ``D`` holds global sample
``(micro_index * D + r) * micro_batch_size + k``, so ranks get disjoint samples.

* ``"documents"``: one document per sample. Documents with fewer than 2 tokens are
  left out once, at open time; the others are visited in a random permutation drawn
  with ``seed + epoch`` (a new order every epoch). A sample is the document's tokens
  (which end with EOD) cropped to ``seq_length + 1``; inputs are ``t[:-1]``, labels
  ``t[1:]``. A micro-batch is right-padded with EOD to its longest sample with a zero
  loss mask on the padding, so its length varies from step to step (right padding is
  invisible to the real tokens under causal attention).
* ``"packed"``: Megatron's ``GPTDataset`` (:mod:`megatron_fapool.data.packed`):
  documents concatenated across EOD into samples of exactly ``seq_length`` tokens.
"""

from __future__ import annotations

import os

import numpy
import torch

from ..config import ConfigError
from .packed import PackedData
from .tokenizer import ByteTokenizer
from .types import Batch, TrainingData

__all__ = ["DATA_MODES", "DocumentData", "open_training_data"]

DATA_MODES: tuple[str, ...] = ("documents", "packed")
_VOCAB_SCAN_TOKENS = 1 << 20  # tokens of the .bin checked against the model's vocabulary at open time


class DocumentData(TrainingData):
    """``mode="documents"``: one document per sample, cropped, right-padded with EOD."""

    mode = "documents"

    def __init__(self, data_prefix: str, indexed, *, eod: int, **kwargs) -> None:
        super().__init__(data_prefix, indexed, **kwargs)
        self.eod = eod
        lengths = indexed.sequence_lengths
        self.documents = numpy.flatnonzero(lengths >= 2).astype(numpy.int64)
        self.lengths = lengths
        if self.documents.size == 0:
            raise ConfigError(
                "--data-path",
                f"{data_prefix} has no document of 2 or more tokens: rebuild it with tools/preprocess_data.py"
                " from more text",
            )
        self._permutations: dict[int, numpy.ndarray] = {}  # epoch -> order; a memo, at most 2 entries

    def _permutation(self, epoch: int) -> numpy.ndarray:
        perm = self._permutations.get(epoch)
        if perm is None:
            perm = numpy.random.default_rng(self.seed + epoch).permutation(self.documents.size)
            if len(self._permutations) >= 2:
                self._permutations.pop(min(self._permutations))
            self._permutations[epoch] = perm
        return perm

    def document_of(self, sample: int) -> int:
        """The document (sequence index in the indexed dataset) of global sample ``sample``."""
        epoch, pos = divmod(sample, self.documents.size)
        return int(self.documents[self._permutation(epoch)[pos]])

    def batch(self, micro_index: int) -> Batch:
        samples = []
        for sample in self.sample_ids(micro_index):
            doc = self.document_of(sample)
            length = min(int(self.lengths[doc]), self.seq_length + 1)
            samples.append(torch.from_numpy(self.indexed.get(doc, offset=0, length=length).astype(numpy.int64)))
        n = max(t.numel() for t in samples) - 1
        b = len(samples)
        tokens = torch.full((b, n), self.eod, dtype=torch.long)
        labels = torch.full((b, n), self.eod, dtype=torch.long)
        loss_mask = torch.zeros((b, n), dtype=torch.float32)
        for i, t in enumerate(samples):
            m = t.numel() - 1
            tokens[i, :m] = t[:-1]
            labels[i, :m] = t[1:]
            loss_mask[i, :m] = 1.0
        return Batch(tokens=tokens, labels=labels, loss_mask=loss_mask)

    def describe(self) -> str:
        used = self.documents.size
        skipped = self.total_documents - used
        return (
            f"{self.data_prefix} mode=documents: {used:,} documents"
            + (f" ({skipped:,} shorter than 2 tokens left out)" if skipped else "")
            + f", {self.total_tokens:,} tokens; samples cropped to seq_length+1={self.seq_length + 1:,},"
            f" micro-batch {self.micro_batch_size} x {self.dp_size} data-parallel rank(s), seed {self.seed}"
        )


def _check_files(data_prefix: str) -> None:
    for ext in (".bin", ".idx"):
        if not os.path.isfile(data_prefix + ext):
            raise ConfigError(
                "--data-path",
                f"{data_prefix}{ext} not found: build it with"
                f" tools/preprocess_data.py --input <text files or dirs> --output-prefix {data_prefix}",
            )


def _open_indexed(data_prefix: str):
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    try:
        return IndexedDataset(data_prefix, multimodal=False, mmap=True)
    except (OSError, ValueError, AssertionError, KeyError) as e:
        raise ConfigError(
            "--data-path",
            f"{data_prefix}.idx/.bin is not a readable Megatron indexed dataset ({type(e).__name__}: {e}):"
            " rebuild it with tools/preprocess_data.py",
        ) from None


def _check_token_ids(data_prefix: str, indexed, vocab_size: int) -> None:
    """The first tokens of the .bin must be valid ids of the model (a cheap guard against a wrong dataset)."""
    count = min(int(indexed.sequence_lengths.sum(dtype=numpy.int64)), _VOCAB_SCAN_TOKENS)
    if count == 0:
        return
    try:
        head = numpy.memmap(data_prefix + ".bin", dtype=indexed.index.dtype, mode="r", shape=(count,))
    except (OSError, ValueError) as e:
        raise ConfigError(
            "--data-path", f"{data_prefix}.bin is shorter than its .idx says ({e}): rebuild it with tools/preprocess_data.py"
        ) from None
    top = int(head.max())
    del head
    if top >= vocab_size:
        raise ConfigError(
            "--data-path",
            f"{data_prefix}.bin holds token id {top} >= the model's vocab_size {vocab_size}: it was not built"
            " by tools/preprocess_data.py (byte tokenizer, ids < 257) or the model vocabulary is too small",
        )


def open_training_data(
    data_prefix: str,
    *,
    mode: str,
    seq_length: int,
    seed: int,
    micro_batch_size: int,
    dp_rank: int,
    dp_size: int,
    vocab_size: int,
    num_micro_batches: int,
    cache_dir: str | None = None,
) -> TrainingData:
    """Open ``data_prefix.bin/.idx`` for this data-parallel rank.

    ``num_micro_batches`` (micro-batches per rank in the whole run) sizes the packed
    index: ``num_micro_batches * micro_batch_size * dp_size`` samples; the documents mode
    needs no size. ``cache_dir`` is where the packed mode keeps Megatron's index cache
    (default ``data_prefix + ".index_cache"``; see :mod:`megatron_fapool.data.packed`).

    Raises :class:`ConfigError` (one line, key naming the flag) for: an unknown mode
    (``--data-mode``), ``seq_length < 1`` (``--seq-length``), a negative seed
    (``--seed``), missing or unreadable ``.bin``/``.idx`` or an empty dataset
    (``--data-path``), a model vocabulary smaller than the tokenizer's 257 ids
    (``language_model.vocab_size``). ``ValueError`` for an impossible rank or batch size.
    """
    tokenizer = ByteTokenizer()
    if mode not in DATA_MODES:
        raise ConfigError("--data-mode", f"unknown mode {mode!r}: use one of {', '.join(DATA_MODES)}")
    if seq_length < 1:
        raise ConfigError("--seq-length", f"must be >= 1, got {seq_length}")
    if seed < 0:
        raise ConfigError("--seed", f"must be >= 0 (it seeds the data order), got {seed}")
    if vocab_size < tokenizer.vocab_size:
        raise ConfigError(
            "language_model.vocab_size",
            f"{vocab_size} is smaller than the byte tokenizer's {tokenizer.vocab_size} ids of --data-path:"
            f" set vocab_size >= {tokenizer.vocab_size} in the model YAML",
        )
    if micro_batch_size < 1 or dp_size < 1 or not 0 <= dp_rank < dp_size:
        raise ValueError(
            f"need micro_batch_size >= 1 and 0 <= dp_rank < dp_size, got {micro_batch_size}, {dp_rank}, {dp_size}"
        )
    _check_files(data_prefix)
    indexed = _open_indexed(data_prefix)
    if len(indexed) == 0 or int(indexed.sequence_lengths.sum(dtype=numpy.int64)) < 2:
        raise ConfigError(
            "--data-path", f"{data_prefix} is empty: rebuild it with tools/preprocess_data.py from more text"
        )
    _check_token_ids(data_prefix, indexed, vocab_size)
    common = dict(seq_length=seq_length, seed=seed, micro_batch_size=micro_batch_size, dp_rank=dp_rank,
                  dp_size=dp_size)
    if mode == "documents":
        return DocumentData(data_prefix, indexed, eod=tokenizer.eod, **common)
    return PackedData(data_prefix, indexed, tokenizer=tokenizer, num_micro_batches=num_micro_batches,
                      cache_dir=cache_dir, **common)
