#!/usr/bin/env python
"""Turn text files into a Megatron indexed dataset (PREFIX.bin + PREFIX.idx) for training.

    python tools/preprocess_data.py --input DIR_OR_FILE [...] --output-prefix data/corpus

Tokens are UTF-8 bytes (``ByteTokenizer``: ids 0..255, EOD = 256, vocab 257; nothing to
download); every document ends with EOD and is one sequence of the dataset. Directories
are walked in sorted order (``site-packages``, ``dist-packages``, ``__pycache__`` and
hidden directories are not entered) keeping files with the given extensions; files named
on the command line are always kept. Files that are unreadable or not UTF-8 are skipped
and counted. ``--split-documents blank-lines`` (default) cuts each file at runs of two or
more blank lines (PEP 8 puts two between top-level definitions: many short documents,
some long ones); ``file`` makes one document per file. ``--max-files N`` keeps a random
subset of N files (drawn with ``--seed``, in walk order). The dataset is written under
temporary names and renamed when complete, so a failed run never leaves half a dataset.

A real corpus on every machine, Python's own standard library::

    python tools/preprocess_data.py --output-prefix data/stdlib --max-files 400 \\
        --input "$(python -c 'import sysconfig; print(sysconfig.get_paths()["stdlib"])')"

Exits 2 with one ``fapool: error:`` line if an input path does not exist or no file matches.
"""

from __future__ import annotations

import argparse
import sys
import time

from megatron_fapool.config import ConfigError
from megatron_fapool.data.corpus import (
    DEFAULT_EXTENSIONS,
    SPLIT_MODES,
    find_input_files,
    normalize_extensions,
    select_files,
    write_indexed_dataset,
)
from megatron_fapool.runtime import exit_on_user_error

PROGRESS_EVERY_S = 2.0


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--input", nargs="+", required=True, metavar="PATH", help="text files and/or directories")
    p.add_argument("--output-prefix", required=True, metavar="PREFIX", help="writes PREFIX.bin and PREFIX.idx")
    p.add_argument("--extensions", default=",".join(DEFAULT_EXTENSIONS),
                   help="comma-separated file extensions kept from directories (default: %(default)s)")
    p.add_argument("--split-documents", choices=SPLIT_MODES, default="blank-lines",
                   help="blank-lines: a document per block between runs of 2+ blank lines; file: one per file"
                        " (default: %(default)s)")
    p.add_argument("--max-files", type=int, default=None, metavar="N",
                   help="use at most N files, a random subset drawn with --seed (default: all)")
    p.add_argument("--min-bytes", type=int, default=0, metavar="N",
                   help="drop documents shorter than N bytes of UTF-8 text (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="seed of the --max-files subset (default: %(default)s)")
    return p.parse_args(argv)


class _Progress:
    """Prints ``files done / total, MB`` at most every PROGRESS_EVERY_S seconds."""

    def __init__(self) -> None:
        self.start: float | None = None
        self.last = 0.0

    def __call__(self, done: int, total: int, text_bytes: int) -> None:
        now = time.perf_counter()
        if self.start is None:  # the clock starts with the first file (after the imports)
            self.start = self.last = now
        elif now - self.last >= PROGRESS_EVERY_S and done < total:
            self.last = now
            print(f"  {done:,} / {total:,} files, {text_bytes / 1e6:.1f} MB, {now - self.start:.0f} s", flush=True)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.max_files is not None and args.max_files < 1:
        raise ConfigError("--max-files", f"must be >= 1, got {args.max_files}")
    if args.min_bytes < 0:
        raise ConfigError("--min-bytes", f"must be >= 0, got {args.min_bytes}")
    t0 = time.perf_counter()
    found = find_input_files(args.input, normalize_extensions(args.extensions))
    files = select_files(found, args.max_files, args.seed)
    print(f"preprocess: {len(files):,} of {len(found):,} files -> {args.output_prefix}.bin/.idx"
          f" (split: {args.split_documents})", flush=True)
    stats = write_indexed_dataset(files, args.output_prefix, split=args.split_documents,
                                  min_bytes=args.min_bytes, progress=_Progress())
    print(stats.describe())
    print(f"wrote {args.output_prefix}.bin and {args.output_prefix}.idx in {time.perf_counter() - t0:.1f} s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(exit_on_user_error(main))
