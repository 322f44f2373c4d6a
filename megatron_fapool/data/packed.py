"""The packed mode: Megatron's ``GPTDataset`` over an indexed dataset, safe to open from many processes.

Samples are exactly ``seq_length`` tokens of the documents concatenated across EOD
(Megatron's document / sample / shuffle indices, built with the compiled helpers that
ship in the megatron-core wheel, ``BlendedMegatronDatasetBuilder`` + ``GPTDatasetConfig``,
split ``"100,0,0"``, ``num_micro_batches * micro_batch_size * dp_size`` samples).

Index cache. Megatron writes the three index arrays (``.npy``) and a description file
into a cache directory, named by an MD5 of the dataset path, sample count, seed,
sequence length, split and tokenizer. Here that directory is ``PREFIX.index_cache/``
next to the data unless ``cache_dir`` is given. Megatron's own protocol (build on
global rank 0, ``torch.distributed.barrier()`` on the default group, then load) would
hang in this project, where pool ranks never open the data; so it is not used:

1. every process constructs the ``GPTDataset`` with ``defer_npy_index_mmap=True``, which
   only computes the cache file names (no collective, no build);
2. if the files are missing, the process takes an exclusive ``fcntl.flock`` on
   ``CACHE/.lock`` (released by the kernel if the holder dies, so never stale), checks
   again, and builds the index with ``BlendedMegatronDatasetBuilder`` into a private
   staging directory inside the cache directory, then renames the files into place,
   the description last (Megatron's "all four files exist" test is then true only for
   a complete cache; staging directories left by a builder that died are removed by
   the next one);
3. the arrays are memory-mapped on the first sample read.

When ``torch.distributed`` is initialised in the calling process, Megatron's builder
would call barriers and build only on global rank 0, so step 2 runs the builder in a
child Python process (no process group there; a few seconds of imports, once per
cache). Any number of processes, distributed or not, may open the same data at once;
whichever takes the lock first builds, the others load. ``flock`` needs a local or
lock-aware file system for the cache directory.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import subprocess
import sys
import tempfile

import numpy
import torch

from ..config import ConfigError
from .tokenizer import ByteTokenizer
from .types import Batch, TrainingData

__all__ = ["PackedData", "build_index", "default_cache_dir", "open_gpt_dataset"]

_SPLIT = "100,0,0"
_STAGING = ".staging-"
_CHILD_CODE = (
    "import json, sys\n"
    "from megatron_fapool.data.packed import build_index\n"
    "build_index(**json.loads(sys.argv[1]))\n"
)


def default_cache_dir(data_prefix: str) -> str:
    """Where the packed index cache of ``data_prefix`` goes by default: ``PREFIX.index_cache``."""
    return os.path.abspath(data_prefix) + ".index_cache"


def _gpt_config(data_prefix: str, *, seq_length: int, seed: int, path_to_cache: str, deferred: bool):
    from megatron.core.datasets.gpt_dataset import GPTDatasetConfig

    return GPTDatasetConfig(
        random_seed=seed,
        sequence_length=seq_length,
        blend=([data_prefix], None),
        split=_SPLIT,
        path_to_cache=path_to_cache,
        tokenizer=ByteTokenizer(),
        reset_position_ids=False,
        reset_attention_mask=False,
        eod_mask_loss=False,
        create_attention_mask=False,
        mmap_bin_files=True,
        defer_npy_index_mmap=deferred,
    )


def build_index(data_prefix: str, seq_length: int, seed: int, num_samples: int, path_to_cache: str) -> None:
    """Build the GPTDataset indices of ``data_prefix`` into ``path_to_cache`` with Megatron's builder.

    Must run where ``torch.distributed`` is not initialised (the builder would otherwise
    build on global rank 0 only and call barriers on the default group).
    """
    from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
    from megatron.core.datasets.gpt_dataset import GPTDataset

    config = _gpt_config(data_prefix, seq_length=seq_length, seed=seed, path_to_cache=path_to_cache, deferred=False)
    BlendedMegatronDatasetBuilder(GPTDataset, [num_samples, None, None], lambda: True, config).build()


def _build_index_in_child(**kwargs) -> None:
    """:func:`build_index` in a fresh Python process (no process group there)."""
    package_root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env = dict(os.environ)
    env["PYTHONPATH"] = package_root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    proc = subprocess.run([sys.executable, "-c", _CHILD_CODE, json.dumps(kwargs)], env=env,
                          capture_output=True, text=True)
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-5:]
        raise RuntimeError(f"building the packed index in a child process failed (exit {proc.returncode}): "
                           + " | ".join(tail))


@contextlib.contextmanager
def _exclusive_lock(path: str):
    """An exclusive ``flock`` on ``path`` (created if needed), held for the ``with`` block."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


def _cache_files(dataset) -> list[str]:
    """The four files of a complete cache; the description, written last, comes last."""
    description = dataset.path_to_document_index.replace("-document_index.npy", "-description.txt")
    return [dataset.path_to_document_index, dataset.path_to_sample_index, dataset.path_to_shuffle_index,
            description]


def open_gpt_dataset(data_prefix: str, *, seq_length: int, seed: int, num_samples: int, cache_dir: str):
    """Megatron's ``GPTDataset`` (train split, all documents), building its index cache if needed.

    See the module docstring for how concurrent openers share the cache.
    """
    from megatron.core.datasets.gpt_dataset import GPTDataset
    from megatron.core.datasets.utils import Split

    prefix = os.path.abspath(data_prefix)
    try:
        os.makedirs(cache_dir, exist_ok=True)
    except OSError as e:
        raise ConfigError(
            "--data-path",
            f"cannot create the packed-mode index cache {cache_dir} ({e.strerror}): make the data directory"
            " writable or pass cache_dir to open_training_data",
        ) from None
    config = _gpt_config(prefix, seq_length=seq_length, seed=seed, path_to_cache=cache_dir, deferred=True)
    low_level = GPTDataset.build_low_level_dataset(prefix, config)
    indices = numpy.arange(GPTDataset.numel_low_level_dataset(low_level), dtype=numpy.int32)
    dataset = GPTDataset(low_level, prefix, indices, num_samples, Split.train, config)
    files = _cache_files(dataset)
    if not all(map(os.path.isfile, files)):
        with _exclusive_lock(os.path.join(cache_dir, ".lock")):
            if not all(map(os.path.isfile, files)):
                _build_cache(files, cache_dir, data_prefix=prefix, seq_length=seq_length, seed=seed,
                             num_samples=num_samples)
    return dataset


def _build_cache(files: list[str], cache_dir: str, **kwargs) -> None:
    """Build into a staging directory and rename into ``cache_dir``; call with the cache lock held."""
    for name in os.listdir(cache_dir):  # left by a builder that died (only lock holders stage)
        if name.startswith(_STAGING):
            shutil.rmtree(os.path.join(cache_dir, name), ignore_errors=True)
    staging = tempfile.mkdtemp(prefix=_STAGING, dir=cache_dir)
    try:
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            _build_index_in_child(path_to_cache=staging, **kwargs)
        else:
            build_index(path_to_cache=staging, **kwargs)
        built = [os.path.join(staging, os.path.basename(f)) for f in files]
        missing = [os.path.basename(f) for f in built if not os.path.isfile(f)]
        if missing:
            raise RuntimeError(f"megatron-core did not write the expected index files {missing} into {staging}")
        for src, dst in zip(built, files):
            os.replace(src, dst)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


class PackedData(TrainingData):
    """``mode="packed"``: fixed-length samples of Megatron's ``GPTDataset``.

    Global samples past the built index (``micro_index >= num_micro_batches``) wrap
    around modulo its length.
    """

    mode = "packed"

    def __init__(self, data_prefix: str, indexed, *, tokenizer: ByteTokenizer, num_micro_batches: int,
                 cache_dir: str | None = None, **kwargs) -> None:
        super().__init__(data_prefix, indexed, **kwargs)
        if num_micro_batches < 1:
            raise ConfigError("--train-iters", f"packed data needs >= 1 micro-batch per rank, got {num_micro_batches}")
        self.eod = tokenizer.eod
        self.num_micro_batches = num_micro_batches
        self.num_samples = num_micro_batches * self.micro_batch_size * self.dp_size
        self.cache_dir = os.path.abspath(cache_dir) if cache_dir else default_cache_dir(data_prefix)
        self.dataset = open_gpt_dataset(data_prefix, seq_length=self.seq_length, seed=self.seed,
                                        num_samples=self.num_samples, cache_dir=self.cache_dir)
        self.length = len(self.dataset)

    def batch(self, micro_index: int) -> Batch:
        items = [self.dataset[s % self.length] for s in self.sample_ids(micro_index)]
        return Batch(
            tokens=torch.stack([it["tokens"] for it in items]),
            labels=torch.stack([it["labels"] for it in items]),
            loss_mask=torch.stack([it["loss_mask"] for it in items]).to(torch.float32),
        )

    def describe(self) -> str:
        return (
            f"{self.data_prefix} mode=packed: {self.total_documents:,} documents, {self.total_tokens:,} tokens;"
            f" {self.length:,} samples of {self.seq_length:,} tokens (Megatron GPTDataset, seed {self.seed}),"
            f" micro-batch {self.micro_batch_size} x {self.dp_size} data-parallel rank(s),"
            f" index cache {self.cache_dir}"
        )
