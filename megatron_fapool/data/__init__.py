"""Offline real-text data for training: byte tokenizer, corpus preprocessing, micro-batches.

* :mod:`.tokenizer`: :class:`ByteTokenizer` (UTF-8 bytes, EOD = 256, vocab 257);
* :mod:`.corpus`: text files -> Megatron indexed dataset (``tools/preprocess_data.py``);
* :mod:`.types`: :class:`TrainingData`, whose ``batch(micro_index)`` gives a :class:`Batch`;
* :mod:`.batches`: :func:`open_training_data` -> a :class:`TrainingData` of either mode,
  and the documents mode;
* :mod:`.packed`: the packed mode over Megatron's ``GPTDataset`` and its index cache.

megatron-core is imported only when a dataset is built or opened.
"""

from .batches import DATA_MODES, DocumentData, open_training_data
from .corpus import CorpusStats, find_input_files, select_files, split_documents, write_indexed_dataset
from .packed import PackedData, default_cache_dir
from .tokenizer import BYTE_VOCAB_SIZE, EOD_ID, ByteTokenizer
from .types import Batch, TrainingData

__all__ = [
    "BYTE_VOCAB_SIZE",
    "DATA_MODES",
    "EOD_ID",
    "Batch",
    "ByteTokenizer",
    "CorpusStats",
    "DocumentData",
    "PackedData",
    "TrainingData",
    "default_cache_dir",
    "find_input_files",
    "open_training_data",
    "select_files",
    "split_documents",
    "write_indexed_dataset",
]
