"""open_training_data: pure-function batches, resume, disjoint ranks, padding, cropping, packed mode, errors.

The documents of the synthetic dataset are distinct (each starts with its own number),
so a row of a batch tells which document it came from.
"""

import os
import threading

import numpy
import pytest
import torch

from megatron_fapool.config import ConfigError
from megatron_fapool.data import ByteTokenizer, open_training_data
from megatron_fapool.data import packed as packed_mod

EOD = 256
NUM_DOCS = 24


def _write(prefix, docs):
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    builder = IndexedDatasetBuilder(str(prefix) + ".bin", dtype=numpy.uint16)
    for ids in docs:
        arr = numpy.asarray(ids, dtype=numpy.uint16)
        builder.add_document(arr, [arr.size])
    builder.finalize(str(prefix) + ".idx")
    return str(prefix)


def _doc(i):
    """Document i: ``<doc NN>`` then 3 * i bytes of text, then EOD (11 + 3 i tokens)."""
    return ByteTokenizer().tokenize(f"<doc {i:02d}>" + "abc" * i) + [EOD]


@pytest.fixture(scope="module")
def docs_prefix(tmp_path_factory):
    return _write(tmp_path_factory.mktemp("docs") / "synthetic", [_doc(i) for i in range(NUM_DOCS)])


def _open(prefix, mode="documents", **kw):
    args = dict(mode=mode, seq_length=512, seed=7, micro_batch_size=2, dp_rank=0, dp_size=1, vocab_size=512,
                num_micro_batches=8)
    args.update(kw)
    return open_training_data(prefix, **args)


def _doc_number(row):
    text = ByteTokenizer().detokenize(row[:8].tolist())
    assert text.startswith("<doc "), text
    return int(text[5:7])


def _same(a, b):
    return (torch.equal(a.tokens, b.tokens) and torch.equal(a.labels, b.labels)
            and torch.equal(a.loss_mask, b.loss_mask))


def test_batch_is_a_pure_function_of_micro_index(docs_prefix):
    first = _open(docs_prefix)
    forward = [first.batch(i) for i in range(12)]
    # a fresh object (a resumed run), asked in another order, gives the same tensors
    resumed = _open(docs_prefix)
    for i in (9, 3, 11, 0, 5):
        assert _same(resumed.batch(i), forward[i]), i
    assert _same(first.batch(4), forward[4])
    # another seed gives another order
    other = _open(docs_prefix, seed=8)
    assert any(not _same(other.batch(i), forward[i]) for i in range(12))


def test_data_parallel_ranks_get_disjoint_samples_covering_an_epoch(docs_prefix):
    dp, mbs = 3, 2
    steps = NUM_DOCS // (dp * mbs)  # exactly one epoch over all ranks
    seen = {}
    for rank in range(dp):
        data = _open(docs_prefix, micro_batch_size=mbs, dp_rank=rank, dp_size=dp)
        seen[rank] = [_doc_number(row) for i in range(steps) for row in data.batch(i).tokens]
    for a in range(dp):
        for b in range(a + 1, dp):
            assert not set(seen[a]) & set(seen[b]), (seen[a], seen[b])
    everything = sum(seen.values(), [])
    assert sorted(everything) == list(range(NUM_DOCS))


def test_every_epoch_visits_all_documents_in_a_new_order(docs_prefix):
    data = _open(docs_prefix, micro_batch_size=4)
    per_epoch = NUM_DOCS // 4
    epochs = [[_doc_number(row) for i in range(e * per_epoch, (e + 1) * per_epoch) for row in data.batch(i).tokens]
              for e in range(3)]
    for order in epochs:
        assert sorted(order) == list(range(NUM_DOCS))
    assert epochs[0] != epochs[1] and epochs[1] != epochs[2]


def test_padding_and_loss_mask(docs_prefix):
    data = _open(docs_prefix, micro_batch_size=4)
    lengths_seen = set()
    for i in range(6):
        batch = data.batch(i)
        b, n = batch.tokens.shape
        assert batch.tokens.dtype == torch.long and batch.labels.dtype == torch.long
        assert batch.loss_mask.dtype == torch.float32
        real = [_doc(_doc_number(row)) for row in batch.tokens]
        assert n == max(len(d) for d in real) - 1  # padded to the longest of this micro-batch only
        lengths_seen.add(n)
        for row, doc in enumerate(real):
            m = len(doc) - 1
            assert batch.tokens[row, :m].tolist() == doc[:-1]
            assert batch.labels[row, :m].tolist() == doc[1:]
            assert batch.labels[row, m - 1] == EOD  # the document's EOD is the last label
            assert batch.loss_mask[row, :m].eq(1).all() and batch.loss_mask[row, m:].eq(0).all()
            assert batch.tokens[row, m:].eq(EOD).all() and batch.labels[row, m:].eq(EOD).all()
        assert batch.num_tokens == sum(len(d) - 1 for d in real)
    assert len(lengths_seen) > 1  # lengths vary from batch to batch


def test_long_documents_are_cropped_to_seq_length_plus_one(docs_prefix):
    seq = 16
    data = _open(docs_prefix, seq_length=seq, micro_batch_size=3)
    cropped = 0
    for i in range(8):
        batch = data.batch(i)
        assert batch.tokens.shape[1] <= seq
        for row in range(batch.tokens.shape[0]):
            doc = _doc(_doc_number(batch.tokens[row]))
            keep = doc[: seq + 1]
            m = len(keep) - 1
            assert batch.tokens[row, :m].tolist() == keep[:-1]
            assert batch.labels[row, :m].tolist() == keep[1:]
            assert int(batch.loss_mask[row].sum()) == m
            cropped += len(doc) > seq + 1
    assert cropped > 0


def test_documents_shorter_than_two_tokens_are_never_sampled(tmp_path):
    prefix = _write(tmp_path / "short", [[EOD], _doc(1), [EOD], _doc(2), [EOD]])
    data = _open(prefix, micro_batch_size=2)
    assert "2 documents" in data.describe() and "3 shorter" in data.describe()
    for i in range(10):
        for row in data.batch(i).tokens:
            assert _doc_number(row) in (1, 2)
    with pytest.raises(ConfigError, match="no document of 2 or more tokens") as e:
        _open(_write(tmp_path / "only_eod", [[EOD], [EOD], [EOD]]))
    assert e.value.key == "--data-path"


def test_describe_is_one_line(docs_prefix):
    line = _open(docs_prefix).describe()
    assert "\n" not in line
    assert docs_prefix in line and "mode=documents" in line and f"{NUM_DOCS} documents" in line
    total = sum(len(_doc(i)) for i in range(NUM_DOCS))
    assert f"{total:,} tokens" in line


@pytest.fixture(scope="module")
def stdlib_prefix(tmp_path_factory):
    """A small real corpus: 30 files of the standard library, split at blank lines."""
    import sysconfig

    from megatron_fapool.data import find_input_files, select_files, write_indexed_dataset

    files = select_files(find_input_files([sysconfig.get_paths()["stdlib"]], [".py"]), 30, seed=1)
    prefix = str(tmp_path_factory.mktemp("stdlib") / "stdlib")
    write_indexed_dataset(files, prefix)
    return prefix


def test_packed_mode_fixed_length_shifted_labels_and_resume(stdlib_prefix, tmp_path):
    seq = 64
    kw = dict(seq_length=seq, micro_batch_size=3, dp_size=2, num_micro_batches=5, cache_dir=str(tmp_path / "c"))
    rank0 = _open(stdlib_prefix, "packed", dp_rank=0, **kw)
    rank1 = _open(stdlib_prefix, "packed", dp_rank=1, **kw)
    rows = {}
    for i in range(5):
        for rank, data in ((0, rank0), (1, rank1)):
            batch = data.batch(i)
            assert batch.tokens.shape == batch.labels.shape == batch.loss_mask.shape == (3, seq)
            assert batch.tokens.dtype == torch.long and batch.loss_mask.dtype == torch.float32
            assert torch.equal(batch.labels[:, :-1], batch.tokens[:, 1:])
            assert batch.loss_mask.eq(1).all() and batch.num_tokens == 3 * seq
            assert int(batch.tokens.max()) <= EOD and int(batch.tokens.min()) >= 0
            for row in batch.tokens:
                rows.setdefault(tuple(row.tolist()), []).append((rank, i))
    assert len(rows) == 5 * 2 * 3  # every sample different: disjoint across ranks and steps
    # samples cross document boundaries (an EOD inside a sample)
    assert any(EOD in rank0.dataset[j]["tokens"] for j in range(min(rank0.length, 400)))
    # a fresh object (resume) reads the cache and gives the same batches
    again = _open(stdlib_prefix, "packed", dp_rank=1, **kw)
    assert _same(again.batch(3), rank1.batch(3))
    line = again.describe()
    assert "\n" not in line and "mode=packed" in line and str(tmp_path / "c") in line
    # the lazily computed length matches the index Megatron built
    assert again.length == again.dataset.sample_index.shape[0] - 1 >= 5 * 3 * 2
    # a complete cache: Megatron's four files, no staging directory left behind
    names = sorted(n for n in os.listdir(tmp_path / "c") if n != ".lock")
    assert len(names) == 4 and all(n.split("-", 1)[1].startswith("GPTDataset-train-") for n in names), names


def test_packed_cache_built_once_when_opened_concurrently(stdlib_prefix, tmp_path, monkeypatch):
    calls = []
    real = packed_mod.build_index

    def counting(**kw):
        calls.append(kw["path_to_cache"])
        return real(**kw)

    monkeypatch.setattr(packed_mod, "build_index", counting)
    dead = tmp_path / "shared" / ".staging-dead"  # left by a builder that was killed
    dead.mkdir(parents=True)
    results, errors = {}, []
    barrier = threading.Barrier(4)

    def worker(k):
        try:
            barrier.wait()
            data = _open(stdlib_prefix, "packed", seq_length=32, cache_dir=str(tmp_path / "shared"))
            results[k] = data.batch(2)
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors, errors
    assert len(calls) == 1, calls
    assert not dead.exists()
    assert sorted(n for n in os.listdir(tmp_path / "shared") if n.startswith(".")) == [".lock"]
    assert all(_same(results[k], results[0]) for k in range(4))


@pytest.mark.slow
def test_packed_with_process_group_builds_in_a_child_without_collectives(stdlib_prefix, tmp_path, monkeypatch):
    """Pool ranks never open the data: no barrier may be called on the default group."""
    import torch.distributed as dist

    reference = _open(stdlib_prefix, "packed", seq_length=48, cache_dir=str(tmp_path / "local")).batch(1)
    in_child = []
    real_child = packed_mod._build_index_in_child
    monkeypatch.setattr(packed_mod, "_build_index_in_child", lambda **kw: in_child.append(1) or real_child(**kw))
    monkeypatch.setattr(packed_mod, "build_index", lambda **kw: pytest.fail("built in a process with a group"))
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        def no_collectives(*a, **k):
            raise AssertionError("a collective was called")

        monkeypatch.setattr(dist, "barrier", no_collectives)
        monkeypatch.setattr(dist, "all_reduce", no_collectives)
        data = _open(stdlib_prefix, "packed", seq_length=48, cache_dir=str(tmp_path / "dist"))
        batch = data.batch(1)
    finally:
        monkeypatch.undo()
        dist.destroy_process_group()
    assert in_child == [1]
    assert _same(batch, reference)


@pytest.mark.parametrize(
    "change, key, text",
    [
        (dict(mode="shuffled"), "--data-mode", "unknown mode"),
        (dict(seq_length=0), "--seq-length", ">= 1"),
        (dict(vocab_size=200), "language_model.vocab_size", "257"),
        (dict(seed=-1), "--seed", ">= 0"),
    ],
)
def test_bad_arguments(docs_prefix, change, key, text):
    with pytest.raises(ConfigError) as e:
        _open(docs_prefix, **change)
    assert e.value.key == key and text in str(e.value) and "\n" not in str(e.value)


def test_bad_ranks_are_programming_errors(docs_prefix):
    with pytest.raises(ValueError):
        _open(docs_prefix, dp_rank=2, dp_size=2)
    with pytest.raises(ValueError):
        _open(docs_prefix).batch(-1)


def test_missing_files(tmp_path, docs_prefix):
    with pytest.raises(ConfigError) as e:
        _open(str(tmp_path / "nothing"))
    assert e.value.key == "--data-path"
    assert "tools/preprocess_data.py --input" in str(e.value) and f"--output-prefix {tmp_path / 'nothing'}" in str(e.value)
    half = tmp_path / "half"
    os.symlink(docs_prefix + ".bin", str(half) + ".bin")
    with pytest.raises(ConfigError, match=r"half\.idx not found"):
        _open(str(half))
    (tmp_path / "half.idx").write_bytes(b"not an index at all")
    with pytest.raises(ConfigError, match="not a readable Megatron indexed dataset") as e:
        _open(str(half))
    assert e.value.key == "--data-path"


@pytest.mark.parametrize("mode", ["documents", "packed"])
def test_empty_dataset(tmp_path, mode):
    with pytest.raises(ConfigError, match="empty") as e:
        _open(_write(tmp_path / "empty", []), mode, cache_dir=str(tmp_path / "c"))
    assert e.value.key == "--data-path"


def test_token_ids_beyond_the_model_vocabulary(tmp_path):
    prefix = _write(tmp_path / "wide", [[1, 2, 3000, EOD]])
    with pytest.raises(ConfigError, match="token id 3000") as e:
        _open(prefix, vocab_size=1024)
    assert e.value.key == "--data-path"
    assert _open(prefix, vocab_size=4096).batch(0).tokens.max() == 3000
