"""Text files to a Megatron indexed dataset (``PREFIX.bin`` + ``PREFIX.idx``).

The steps, each a function so that they can be tested and reused:

* :func:`find_input_files`: the files under the given paths, in a deterministic order
  (a sorted walk; directories named in :data:`SKIPPED_DIRS` and hidden ones are not
  entered, files are kept by extension; a path naming a file is always kept);
* :func:`select_files`: at most ``max_files`` of them, a seeded random subset that
  keeps the walk order (so a small corpus still spans the whole tree);
* :func:`split_documents`: one file's text to documents, at runs of two or more
  blank lines (``"blank-lines"``: PEP 8 separates top-level definitions by two, so
  source files give many short documents and some long ones) or one per file
  (``"file"``);
* :func:`write_indexed_dataset`: tokenizes (bytes, :class:`ByteTokenizer`), appends
  EOD to every document and writes one sequence per document through Megatron's
  ``IndexedDatasetBuilder``. The files are built under temporary names in the
  output directory and renamed at the end, so an interrupted or failed run never
  leaves a half-written dataset under the final name.

Files that cannot be read or are not valid UTF-8 are skipped and counted.
"""

from __future__ import annotations

import os
import random
import re
import uuid
from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy

from ..config import ConfigError
from .tokenizer import ByteTokenizer

__all__ = [
    "DEFAULT_EXTENSIONS",
    "LENGTH_BUCKETS",
    "SKIPPED_DIRS",
    "SPLIT_MODES",
    "CorpusStats",
    "find_input_files",
    "select_files",
    "split_documents",
    "write_indexed_dataset",
]

DEFAULT_EXTENSIONS: tuple[str, ...] = (".py", ".txt", ".rst", ".md")
SPLIT_MODES: tuple[str, ...] = ("blank-lines", "file")
SKIPPED_DIRS = frozenset({"site-packages", "dist-packages", "__pycache__"})
"""Directory names never entered by the walk (third-party packages, bytecode); hidden
directories (``.git`` ...) are skipped too. A path given explicitly is always walked."""

LENGTH_BUCKETS: tuple[int, ...] = (128, 512, 2048, 8192, 32768)
"""Upper bounds (exclusive) of the document-length histogram, in tokens; one more bucket
holds the longer ones."""

_BLANK_RUN = re.compile(r"\n(?:[ \t\f\v]*\n){2,}")
_LEADING_BLANK_LINES = re.compile(r"\A(?:[ \t\f\v]*\n)+")

ProgressFn = Callable[[int, int, int], None]
"""``progress(files_done, files_total, bytes_done)``."""


def normalize_extensions(spec: str | Sequence[str]) -> tuple[str, ...]:
    """``".py,txt"`` or ``[".py", "txt"]`` -> ``(".py", ".txt")`` (lower case, dotted)."""
    items = spec.split(",") if isinstance(spec, str) else list(spec)
    out = []
    for item in items:
        item = item.strip().lower()
        if item:
            out.append(item if item.startswith(".") else "." + item)
    if not out:
        raise ConfigError("--extensions", f"no extension in {spec!r}: give e.g. .py,.txt")
    return tuple(dict.fromkeys(out))


def find_input_files(paths: Sequence[str], extensions: Sequence[str] = DEFAULT_EXTENSIONS) -> list[str]:
    """The files under ``paths``: files as given, directories walked in sorted order.

    Raises :class:`ConfigError` (key ``--input``) if a path does not exist or if no file
    matches. Each file appears once, in the order of the first path that reaches it.
    """
    exts = normalize_extensions(extensions)
    found: dict[str, None] = {}
    for path in paths:
        if os.path.isfile(path):
            found.setdefault(os.path.abspath(path))
        elif os.path.isdir(path):
            for root, dirs, files in os.walk(path):
                dirs[:] = sorted(d for d in dirs if d not in SKIPPED_DIRS and not d.startswith("."))
                for name in sorted(files):
                    if name.lower().endswith(exts):
                        full = os.path.join(root, name)
                        if os.path.isfile(full):
                            found.setdefault(os.path.abspath(full))
        else:
            raise ConfigError("--input", f"{path} does not exist (give text files or directories)")
    if not found:
        raise ConfigError(
            "--input",
            f"no file with extension {','.join(exts)} under {' '.join(paths)} (change --extensions or the paths)",
        )
    return list(found)


def select_files(files: Sequence[str], max_files: int | None, seed: int) -> list[str]:
    """At most ``max_files`` of ``files``: a random subset drawn with ``seed``, in the original order."""
    if max_files is None or len(files) <= max_files:
        return list(files)
    if max_files < 1:
        raise ConfigError("--max-files", f"must be >= 1, got {max_files}")
    keep = sorted(random.Random(seed).sample(range(len(files)), max_files))
    return [files[i] for i in keep]


def split_documents(text: str, how: str = "blank-lines") -> list[str]:
    """One file's text as documents (whitespace-only ones dropped).

    ``"file"``: the whole text is one document, unchanged. ``"blank-lines"``: the text is
    cut at every run of two or more blank (whitespace-only) lines; each piece loses its
    leading blank lines and trailing whitespace and ends with one newline.
    """
    if how == "file":
        return [text] if text.strip() else []
    if how != "blank-lines":
        raise ConfigError("--split-documents", f"unknown mode {how!r}: use one of {', '.join(SPLIT_MODES)}")
    docs = []
    for piece in _BLANK_RUN.split(text):
        piece = _LEADING_BLANK_LINES.sub("", piece).rstrip()
        if piece:
            docs.append(piece + "\n")
    return docs


def _bucket_labels() -> list[str]:
    def k(n: int) -> str:
        return f"{n // 1024}K" if n >= 1024 else str(n)

    labels = [f"<{k(LENGTH_BUCKETS[0])}"]
    labels += [f"{k(a)}-{k(b)}" for a, b in zip(LENGTH_BUCKETS, LENGTH_BUCKETS[1:])]
    labels.append(f">={k(LENGTH_BUCKETS[-1])}")
    return labels


@dataclass
class CorpusStats:
    """What :func:`write_indexed_dataset` wrote. Lengths count tokens including the EOD."""

    files: int = 0
    skipped_files: int = 0
    documents: int = 0
    dropped_documents: int = 0
    tokens: int = 0
    text_bytes: int = 0
    max_length: int = 0
    length_counts: list[int] = field(default_factory=lambda: [0] * (len(LENGTH_BUCKETS) + 1))

    def add_document(self, num_tokens: int) -> None:
        self.documents += 1
        self.tokens += num_tokens
        self.max_length = max(self.max_length, num_tokens)
        self.length_counts[int(numpy.searchsorted(LENGTH_BUCKETS, num_tokens, side="right"))] += 1

    def histogram(self) -> dict[str, int]:
        """Document count per length bucket (labels like ``"<128"``, ``"512-2K"``, ``">=32K"``)."""
        return dict(zip(_bucket_labels(), self.length_counts))

    def describe(self) -> str:
        """A few lines: files, documents, tokens and the length histogram."""
        mean = self.tokens / self.documents if self.documents else 0.0
        lines = [
            f"files:     {self.files:,} read, {self.skipped_files:,} skipped (unreadable or not UTF-8)",
            f"documents: {self.documents:,}"
            + (f" ({self.dropped_documents:,} shorter than --min-bytes dropped)" if self.dropped_documents else ""),
            f"tokens:    {self.tokens:,} (one EOD per document; {self.text_bytes / 1e6:.1f} MB of text),"
            f" mean {mean:,.0f} / max {self.max_length:,} per document",
            "document lengths (tokens):",
        ]
        width = max(1, max(self.length_counts))
        for label, count in self.histogram().items():
            bar = "#" * round(40 * count / width)
            lines.append(f"  {label:>9}: {count:>9,}  {bar}")
        return "\n".join(lines)


def _read_text(path: str) -> str | None:
    """The file's text (universal newlines), or None if unreadable or not UTF-8."""
    try:
        with open(path, encoding="utf-8") as f:
            return f.read()
    except (OSError, UnicodeDecodeError):
        return None


def _temp_prefix(output_prefix: str) -> str:
    head, tail = os.path.split(os.path.abspath(output_prefix))
    return os.path.join(head, f".{tail}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")


def write_indexed_dataset(
    files: Sequence[str],
    output_prefix: str,
    *,
    split: str = "blank-lines",
    min_bytes: int = 0,
    tokenizer: ByteTokenizer | None = None,
    progress: ProgressFn | None = None,
) -> CorpusStats:
    """Tokenize ``files`` into ``output_prefix.bin`` / ``.idx``, one sequence per document.

    Documents whose UTF-8 text is shorter than ``min_bytes`` are dropped. Raises
    :class:`ConfigError` (key ``--input``) if no document is left. The dataset appears
    under its final name only when complete: ``.bin`` and ``.idx`` are written under
    temporary names in the same directory, the old ``.idx`` (if any) is removed, then
    ``.bin`` and ``.idx`` are renamed into place (a run interrupted between the renames
    leaves a ``.bin`` without ``.idx``, which readers reject, never a mismatched pair).
    """
    from megatron.core.datasets.indexed_dataset import DType, IndexedDatasetBuilder

    tokenizer = tokenizer or ByteTokenizer()
    if split not in SPLIT_MODES:
        raise ConfigError("--split-documents", f"unknown mode {split!r}: use one of {', '.join(SPLIT_MODES)}")
    final_bin, final_idx = output_prefix + ".bin", output_prefix + ".idx"
    out_dir = os.path.dirname(os.path.abspath(output_prefix))
    try:
        os.makedirs(out_dir, exist_ok=True)
    except OSError as e:
        raise ConfigError("--output-prefix", f"cannot create {out_dir}: {e.strerror}") from None
    tmp = _temp_prefix(output_prefix)
    tmp_bin, tmp_idx = tmp + ".bin", tmp + ".idx"
    dtype = DType.optimal_dtype(tokenizer.vocab_size)
    stats = CorpusStats()
    builder = None
    try:
        builder = IndexedDatasetBuilder(tmp_bin, dtype=dtype)
        for done, path in enumerate(files, start=1):
            text = _read_text(path)
            if text is None:
                stats.skipped_files += 1
            else:
                stats.files += 1
                for doc in split_documents(text, split):
                    data = doc.encode("utf-8")
                    if len(data) < min_bytes:
                        stats.dropped_documents += 1
                        continue
                    ids = numpy.empty(len(data) + 1, dtype=dtype)
                    ids[:-1] = numpy.frombuffer(data, dtype=numpy.uint8)
                    ids[-1] = tokenizer.eod
                    builder.add_document(ids, [ids.size])
                    stats.text_bytes += len(data)
                    stats.add_document(ids.size)
            if progress is not None:
                progress(done, len(files), stats.text_bytes)
        if stats.documents == 0:
            raise ConfigError(
                "--input",
                f"no document in the {len(files)} file(s) ({stats.skipped_files} unreadable or not UTF-8,"
                f" {stats.dropped_documents} document(s) shorter than --min-bytes {min_bytes})",
            )
        builder.finalize(tmp_idx)
        if os.path.exists(final_idx):
            os.remove(final_idx)
        os.replace(tmp_bin, final_bin)
        os.replace(tmp_idx, final_idx)
    finally:
        if builder is not None and not builder.data_file.closed:
            builder.data_file.close()
        for leftover in (tmp_bin, tmp_idx):
            if os.path.exists(leftover):
                os.remove(leftover)
    return stats
