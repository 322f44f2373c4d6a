"""tools/preprocess_data.py: real standard-library text -> Megatron indexed dataset, read back exactly.

Most runs call ``main(argv)`` in-process (one import of megatron-core for the whole
file); one runs the script as a subprocess to check the real exit code and stderr.
"""

import importlib.util
import os
import subprocess
import sys
import sysconfig

import numpy
import pytest

from megatron_fapool.config import ConfigError
from megatron_fapool.data import ByteTokenizer, find_input_files, select_files, split_documents
from megatron_fapool.data import corpus as corpus_mod
from megatron_fapool.runtime import exit_on_user_error

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SCRIPT = os.path.join(ROOT, "tools", "preprocess_data.py")
STDLIB = sysconfig.get_paths()["stdlib"]
EOD = 256


def _load_tool():
    spec = importlib.util.spec_from_file_location("preprocess_data_tool", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


tool = _load_tool()


def _read_back(prefix):
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    ds = IndexedDataset(prefix)
    return [ds[i].astype(numpy.int64).tolist() for i in range(len(ds))]


def _expected(files, how):
    tok = ByteTokenizer()
    out = []
    for path in files:
        try:
            with open(path, encoding="utf-8") as f:
                text = f.read()
        except UnicodeDecodeError:
            continue
        out += [tok.tokenize(doc) + [EOD] for doc in split_documents(text, how)]
    return out


def _run(argv, capsys):
    """main(argv) as the script runs it; returns (exit code, stdout, stderr)."""
    code = 0
    try:
        exit_on_user_error(lambda: tool.main(argv))
    except SystemExit as e:
        code = e.code
    out, err = capsys.readouterr()
    return code, out, err


def test_stdlib_blank_lines_round_trip_and_mixed_lengths(tmp_path, capsys):
    prefix = str(tmp_path / "stdlib")
    code, out, _ = _run(["--input", STDLIB, "--output-prefix", prefix, "--max-files", "40", "--seed", "3",
                         "--extensions", ".py"], capsys)
    assert code == 0
    files = select_files(find_input_files([STDLIB], [".py"]), 40, seed=3)
    assert len(files) == 40
    got = _read_back(prefix)
    assert got == _expected(files, "blank-lines")
    assert all(doc[-1] == EOD and EOD not in doc[:-1] for doc in got)
    lengths = numpy.array([len(d) for d in got])
    assert len(got) > 40  # several documents per file
    assert lengths.min() < 128 and lengths.max() > 2048  # many short, some long
    assert len(numpy.unique(numpy.searchsorted([128, 512, 2048, 8192], lengths))) >= 4
    # the summary
    assert f"documents: {len(got):,}" in out and f"tokens:    {int(lengths.sum()):,}" in out
    for label in ("<128", "128-512", "512-2K", "2K-8K", "8K-32K", ">=32K"):
        assert label + ":" in out
    assert not [n for n in os.listdir(tmp_path) if n.startswith(".")]  # no temporary files left


def test_file_mode_documents_are_the_files(tmp_path, capsys):
    prefix = str(tmp_path / "files")
    code, _, _ = _run(["--input", STDLIB, "--output-prefix", prefix, "--max-files", "6",
                       "--split-documents", "file", "--extensions", "py"], capsys)
    assert code == 0
    files = select_files(find_input_files([STDLIB], [".py"]), 6, seed=0)
    tok = ByteTokenizer()
    texts = []
    for path in files:
        try:
            with open(path, encoding="utf-8") as f:
                text = f.read()
        except UnicodeDecodeError:  # skipped by the tool too
            continue
        if text.strip():
            texts.append(text)
    got = _read_back(prefix)
    assert [tok.detokenize(doc) for doc in got] == texts
    assert [len(doc) for doc in got] == [len(t.encode("utf-8")) + 1 for t in texts]


def test_same_arguments_give_identical_files_and_seed_changes_the_subset(tmp_path, capsys):
    for name in ("a", "b"):
        assert _run(["--input", STDLIB, "--output-prefix", str(tmp_path / name), "--max-files", "10"], capsys)[0] == 0
    for ext in (".bin", ".idx"):
        assert (tmp_path / f"a{ext}").read_bytes() == (tmp_path / f"b{ext}").read_bytes()
    found = find_input_files([STDLIB])
    assert select_files(found, 10, seed=0) != select_files(found, 10, seed=1)
    assert found == find_input_files([STDLIB])  # deterministic walk
    top = [p for p in found if os.path.dirname(p) == STDLIB]
    assert top == sorted(top) and len(top) > 100  # files of a directory in sorted order
    assert found.index(os.path.join(STDLIB, "abc.py")) < found.index(os.path.join(STDLIB, "asyncio", "events.py"))
    assert not any(f"{os.sep}site-packages{os.sep}" in p or "__pycache__" in p for p in found)


def test_split_documents_at_runs_of_two_blank_lines():
    text = "\n\nimport os\n\n\ndef f():\n    pass\n\n    \ndef g():\n\n    return 1\n\n\n\n\nclass C:\n    x = 1\n\n"
    assert split_documents(text, "blank-lines") == [
        "import os\n", "def f():\n    pass\n", "def g():\n\n    return 1\n", "class C:\n    x = 1\n"
    ]
    assert split_documents(text, "file") == [text]
    assert split_documents("\n \n\n\t\n", "blank-lines") == [] == split_documents(" \n", "file")
    with pytest.raises(ConfigError):
        split_documents("x", "paragraphs")


def test_min_bytes_drops_short_documents_and_undecodable_files_are_skipped(tmp_path, capsys):
    src = tmp_path / "src"
    src.mkdir()
    (src / "a.txt").write_text("tiny\n\n\n" + "a long enough document\n" * 3)
    (src / "b.txt").write_bytes(b"\xff\xfe not utf-8 \x80\n")
    (src / "c.bin").write_text("not a text extension\n")
    prefix = str(tmp_path / "out" / "small")  # the output directory is created
    code, out, _ = _run(["--input", str(src), "--output-prefix", prefix, "--min-bytes", "10"], capsys)
    assert code == 0
    assert _read_back(prefix) == [ByteTokenizer().tokenize("a long enough document\n" * 3) + [EOD]]
    assert "1 read, 1 skipped" in out and "1 shorter than --min-bytes dropped" in out


def test_failed_run_leaves_no_dataset_and_keeps_the_old_one(tmp_path, capsys, monkeypatch):
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    prefix = str(tmp_path / "atomic")
    argv = ["--input", STDLIB, "--output-prefix", prefix, "--max-files", "8"]
    real = IndexedDatasetBuilder.add_document
    calls = []

    def failing(self, *a, **k):
        calls.append(1)
        if len(calls) > 5:
            raise RuntimeError("disk full (simulated)")
        return real(self, *a, **k)

    monkeypatch.setattr(IndexedDatasetBuilder, "add_document", failing)
    with pytest.raises(RuntimeError, match="simulated"):
        tool.main(argv)
    assert os.listdir(tmp_path) == []  # neither final nor temporary files

    monkeypatch.setattr(IndexedDatasetBuilder, "add_document", real)
    assert _run(argv, capsys)[0] == 0
    before = {ext: (tmp_path / f"atomic{ext}").read_bytes() for ext in (".bin", ".idx")}
    calls.clear()
    monkeypatch.setattr(IndexedDatasetBuilder, "add_document", failing)
    with pytest.raises(RuntimeError):
        tool.main(argv + ["--split-documents", "file"])
    assert sorted(os.listdir(tmp_path)) == ["atomic.bin", "atomic.idx"]
    assert {ext: (tmp_path / f"atomic{ext}").read_bytes() for ext in (".bin", ".idx")} == before


@pytest.mark.parametrize(
    "argv_tail, needle",
    [
        (["--input", "{tmp}/does-not-exist"], "does-not-exist does not exist"),
        (["--input", "{tmp}/nomatch"], "no file with extension .py,.txt,.rst,.md"),
        (["--input", "{tmp}/nomatch", "--extensions", ".rs"], "no file with extension .rs"),
        (["--input", "{tmp}/nomatch", "--max-files", "0"], "--max-files: must be >= 1"),
    ],
)
def test_user_errors_exit_2_with_one_line(tmp_path, capsys, argv_tail, needle):
    (tmp_path / "nomatch").mkdir()
    (tmp_path / "nomatch" / "data.bin").write_bytes(b"\0")
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv_tail] + ["--output-prefix", str(tmp_path / "x")]
    code, _, err = _run(argv, capsys)
    assert code == 2
    assert err.count("\n") == 1 and err.startswith("fapool: error: ") and needle in err, err
    assert not [n for n in os.listdir(tmp_path) if n.startswith("x")]


def test_script_error_exit_code_and_stderr(tmp_path):
    env = dict(os.environ, PYTHONPATH=ROOT)
    proc = subprocess.run([sys.executable, SCRIPT, "--input", str(tmp_path / "missing"), "--output-prefix",
                           str(tmp_path / "x")], capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 2, proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if "Warning" not in ln and "warnings.warn" not in ln]
    assert lines == [f"fapool: error: --input: {tmp_path / 'missing'} does not exist (give text files or directories)"]
    assert "Traceback" not in proc.stderr


def test_help_uses_the_module_docstring(capsys):
    with pytest.raises(SystemExit) as e:
        tool.main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert "Megatron indexed dataset" in out and "--split-documents" in out and "sysconfig" in out


def test_corpus_module_rejects_empty_input(tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n\n")
    with pytest.raises(ConfigError, match="no document") as e:
        corpus_mod.write_indexed_dataset([str(empty)], str(tmp_path / "out"))
    assert e.value.key == "--input"
    assert os.listdir(tmp_path) == ["empty.txt"]
