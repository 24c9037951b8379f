"""The command-line options the size-by-size benchmarks share: which state sizes, how many
interleaved repetitions, the older package measured as the baseline in the same run
(``--before``, bench/README.md), where the files go and where the JSON report goes."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Literal


def add_size_options(
    parser: argparse.ArgumentParser, *, sizes: str, reps: int, out: Path,
    reps_help: str = "interleaved repetitions",
    before: Literal["required", "optional", "none"] = "none", workdir: bool = True,
) -> None:
    """Adds ``--sizes`` (comma list, e.g. ``256MiB,1GiB``, parsed to a list of labels),
    ``--reps``, ``--before`` (unless ``"none"``), ``--workdir`` (unless False) and ``--out``
    with these defaults."""
    parser.add_argument("--sizes", default=sizes, type=size_labels,
                        help="comma list of 16MiB, 64MiB, 256MiB, 1GiB")
    parser.add_argument("--reps", type=int, default=reps, help=reps_help)
    if before != "none":
        parser.add_argument("--before", type=Path, required=before == "required", default=None,
                            help="a directory holding the older ckptd package measured as "
                            "the baseline (bench/README.md)")
    if workdir:
        parser.add_argument("--workdir", type=Path, default=None,
                            help="where files go (local disk)")
    parser.add_argument("--out", type=Path, default=out, help="the JSON report")


def size_labels(text: str) -> list[str]:
    """``"256MiB, 1GiB"`` -> ``["256MiB", "1GiB"]`` (argparse also applies it to the
    default)."""
    return [label.strip() for label in text.split(",") if label.strip()]
