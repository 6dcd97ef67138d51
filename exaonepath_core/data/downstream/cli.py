"""Command line of the downstream datasets (`python -m exaonepath_core.data.downstream`).

`check --dataset NAME --root DIR [--deep]` validates the layout (fast, no decoding); `--deep` also decodes
every image once and lists the unreadable ones and those whose size differs from the dataset's common size
(feature batches need one size), exiting non-zero when there is any.

`prepare --dataset NAME --root DIR` documents each official source and downloads it when the network is
reachable (it fails cleanly with instructions when it is not). `sources` prints every source.
"""
from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from exaonepath_core.data.downstream.check import ImageCheck, available_datasets
from exaonepath_core.data.downstream.datasets import DATASETS, IMAGE_FOLDER_PREFIX, dataset_class
from exaonepath_core.data.downstream.sources import DATASET_SOURCES, PrepareError, manual_text, prepare


def _check_name(name: str) -> str:
    try:
        dataset_class(name)
    except KeyError as err:
        raise argparse.ArgumentTypeError(err.args[0]) from None
    return name


def main(argv: Sequence[str] | None = None) -> int:
    """Command line: `prepare --dataset NAME --root DIR`, `check --dataset NAME --root DIR`, `sources`."""
    parser = argparse.ArgumentParser(prog="python -m exaonepath_core.data.downstream", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    for command in ("prepare", "check"):
        sub = commands.add_parser(command)
        if command == "prepare":
            sub.add_argument("--dataset", required=True, choices=sorted(DATASET_SOURCES))
        else:  # a registered name, or folder_<task> for your own {train,test}/<class>/ folders
            sub.add_argument("--dataset", required=True, type=_check_name,
                             help=f"one of {', '.join(sorted(DATASETS))}, or {IMAGE_FOLDER_PREFIX}<task>")
        sub.add_argument("--root", required=True)
        sub.add_argument("--timeout", type=float, default=20.0)
        sub.add_argument("--no-strict", action="store_true")
        if command == "check":
            sub.add_argument("--deep", action="store_true",
                             help="also decode every image once; list unreadable and odd-sized files")
    commands.add_parser("sources")
    args = parser.parse_args(argv)
    if args.command == "sources":
        for name in DATASET_SOURCES:
            print(manual_text(name, Path("ROOT")) + "\n")
        return 0
    if args.command == "check":
        reports: dict[str, list[ImageCheck]] = {}
        status = available_datasets({args.dataset: args.root}, strict=not args.no_strict, names=[args.dataset],
                                    deep=args.deep, reports=reports, progress=args.deep)
        print(f"{args.dataset}: {status[args.dataset]}")
        for check in reports.get(args.dataset, []):
            print("\n".join(check.lines()))
        return 0 if status[args.dataset] == "present" else 1
    try:
        print(prepare(args.dataset, args.root, timeout=args.timeout))
    except PrepareError as exc:
        print(f"prepare failed: {exc}", file=sys.stderr)
        return 2
    return 0

