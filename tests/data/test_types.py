"""The batch types both data modes share: :class:`Batch` and :class:`TrainingData`."""

import numpy
import pytest
import torch

from megatron_fapool.data.types import Batch, TrainingData


class _Data(TrainingData):
    mode = "test"

    def batch(self, micro_index):
        raise NotImplementedError

    def describe(self):
        return "test"


class _Indexed:
    def __init__(self, lengths):
        self.sequence_lengths = numpy.array(lengths, dtype=numpy.int32)

    def __len__(self):
        return len(self.sequence_lengths)


def _data(dp_rank, dp_size, micro_batch_size=3):
    return _Data("prefix", _Indexed([4, 5, 6]), seq_length=8, seed=0, micro_batch_size=micro_batch_size,
                 dp_rank=dp_rank, dp_size=dp_size)


def test_batch_counts_loss_bearing_tokens():
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0]])
    batch = Batch(tokens=torch.zeros(2, 3, dtype=torch.long), labels=torch.zeros(2, 3, dtype=torch.long),
                  loss_mask=mask)
    assert batch.num_tokens == 3 and batch.shape == (2, 3)


def test_sample_ids_cut_one_stream_into_disjoint_rank_slices():
    ranks = [_data(r, 2) for r in range(2)]
    assert ranks[0].total_documents == 3 and ranks[0].total_tokens == 15
    seen = [s for m in range(4) for d in ranks for s in d.sample_ids(m)]
    assert seen == list(range(4 * 2 * 3))  # micro-batch m: rank 0's 3 samples, then rank 1's
    with pytest.raises(ValueError, match="micro_index"):
        ranks[0].sample_ids(-1)
