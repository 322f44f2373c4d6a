"""What the training loop consumes: a :class:`Batch`, handed out by a :class:`TrainingData`.

Both data modes (:mod:`.batches` documents, :mod:`.packed`) build on these; the
modules of the modes import this one and not each other.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass

import numpy
import torch

__all__ = ["Batch", "TrainingData"]


@dataclass
class Batch:
    """One micro-batch: ``tokens`` predict ``labels`` where ``loss_mask`` is 1."""

    tokens: torch.Tensor  # [b, n] int64 inputs
    labels: torch.Tensor  # [b, n] int64 next tokens
    loss_mask: torch.Tensor  # [b, n] float32, 0 on padding

    @property
    def num_tokens(self) -> int:
        """The number of loss-bearing tokens (``loss_mask.sum()``)."""
        return int(self.loss_mask.sum().item())

    @property
    def shape(self) -> tuple[int, int]:
        """``(micro_batch_size, sequence length)``."""
        return tuple(self.tokens.shape)


class TrainingData(abc.ABC):
    """An opened dataset that hands out the micro-batches of one data-parallel rank.

    Slot ``k`` of micro-batch ``micro_index`` on data-parallel rank ``r`` of ``D`` holds
    global sample ``(micro_index * D + r) * micro_batch_size + k`` (:meth:`sample_ids`),
    so ranks get disjoint samples and :meth:`batch` is a pure function of ``micro_index``.
    """

    mode: str

    def __init__(self, data_prefix: str, indexed, *, seq_length: int, seed: int, micro_batch_size: int,
                 dp_rank: int, dp_size: int) -> None:
        self.data_prefix = data_prefix
        self.indexed = indexed  # megatron.core.datasets.indexed_dataset.IndexedDataset
        self.seq_length = seq_length
        self.seed = seed
        self.micro_batch_size = micro_batch_size
        self.dp_rank = dp_rank
        self.dp_size = dp_size
        self.total_documents = len(indexed)
        self.total_tokens = int(indexed.sequence_lengths.sum(dtype=numpy.int64))

    def sample_ids(self, micro_index: int) -> range:
        """The global sample numbers of this rank's micro-batch ``micro_index``."""
        if micro_index < 0:
            raise ValueError(f"micro_index must be >= 0, got {micro_index}")
        first = (micro_index * self.dp_size + self.dp_rank) * self.micro_batch_size
        return range(first, first + self.micro_batch_size)

    @abc.abstractmethod
    def batch(self, micro_index: int) -> Batch:
        """Micro-batch number ``micro_index`` of this rank (the same on every call)."""

    @abc.abstractmethod
    def describe(self) -> str:
        """One line: path, mode, documents, tokens."""
