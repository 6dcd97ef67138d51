"""Which datasets are usable: the layout check of every probe split and (deep) one decode of every image."""
from __future__ import annotations

import os
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

from exaonepath_core.data.downstream.base import DatasetLayoutError, ImageReadError, PatchDataset
from exaonepath_core.data.downstream.datasets import PAPER_ACCURACY, dataset_class


@dataclass
class ImageCheck:
    """What decoding every image of one split found: unreadable files and sizes that differ from the common one."""

    dataset: str
    split: str
    n_checked: int = 0
    unreadable: list[tuple[str, str]] = field(default_factory=list)  # (file, error)
    size_counts: Counter[tuple[int, ...]] = field(default_factory=Counter)  # image shape -> count
    size_examples: dict[tuple[int, ...], list[str]] = field(default_factory=dict)  # shape -> first files

    EXAMPLES_PER_SIZE: ClassVar[int] = 5

    @property
    def common_size(self) -> tuple[int, ...] | None:
        """The most frequent image shape (ties: the first one seen)."""
        return self.size_counts.most_common(1)[0][0] if self.size_counts else None

    @property
    def n_odd_size(self) -> int:
        """How many decodable images differ in shape from the common one."""
        return sum(n for shape, n in self.size_counts.items() if shape != self.common_size)

    @property
    def ok(self) -> bool:
        """True when every image decodes and all share one shape."""
        return not self.unreadable and self.n_odd_size == 0

    def summary(self) -> str:
        """One line: counts of unreadable and odd-sized images."""
        common = "x".join(map(str, self.common_size[:2])) if self.common_size else "none"
        return (f"{self.dataset}/{self.split}: {self.n_checked} image(s) decoded, {len(self.unreadable)} unreadable, "
                f"{self.n_odd_size} of another size than the common {common}")

    def lines(self) -> list[str]:
        """The summary, then every unreadable file with its error, then example files of each odd size."""
        out = [self.summary()]
        out += [f"  unreadable: {path}: {error}" for path, error in self.unreadable]
        for shape, n in sorted(self.size_counts.items(), key=lambda kv: -kv[1]):
            if shape != self.common_size:
                shown = self.size_examples[shape]
                more = f" (+{n - len(shown)} more)" if n > len(shown) else ""
                out.append(f"  size {'x'.join(map(str, shape[:2]))} ({n} image(s)): {', '.join(shown)}{more}")
        return out


def check_images(dataset: PatchDataset, progress: bool = False) -> ImageCheck:
    """Decode every image of `dataset` once (streaming) and record the unreadable ones and each image shape."""
    from tqdm.auto import tqdm

    report = ImageCheck(dataset.name, dataset.split)
    for i in tqdm(range(len(dataset)), disable=not progress, desc=f"decoding {dataset.name}/{dataset.split}",
                  unit="img"):
        path = dataset.item_path(i)
        report.n_checked += 1
        try:
            image = dataset[i][0]
        except ImageReadError as exc:
            cause = exc.__cause__ or exc
            report.unreadable.append((path, f"{type(cause).__name__}: {cause}"))
            continue
        report.size_counts[image.shape] += 1
        examples = report.size_examples.setdefault(image.shape, [])
        if len(examples) < ImageCheck.EXAMPLES_PER_SIZE:
            examples.append(path)
    return report


def _probe_split_datasets(name: str, root: str | os.PathLike, strict: bool) -> list[PatchDataset]:
    cls = dataset_class(name)
    return [cls(root, split, strict=strict) for split in cls.probe_splits if split is not None]


def available_datasets(roots: Mapping[str, str | os.PathLike], strict: bool = True,
                       names: Sequence[str] | None = None, deep: bool = False,
                       reports: dict[str, list[ImageCheck]] | None = None, progress: bool = False
                       ) -> dict[str, str]:
    """Dataset name -> "present", "absent: <reason>" (no root, or nothing at it), "unreadable: <reason>" (a root
    that exists but is not laid out as the adapter expects) or (deep) "damaged: <counts>", for the paper's six
    tasks and every configured root.

    The default check reads the layout only (no decoding). `deep=True` also decodes every image of every probe
    split once (`check_images`); a dataset with unreadable images or images of another size than the common
    one is "damaged". Pass a dict as `reports` to receive each dataset's per-split `ImageCheck`s; `progress`
    shows a progress bar while decoding.
    """
    names = list(names) if names is not None else list(dict.fromkeys([*PAPER_ACCURACY, *roots]))
    status = {}
    for name in names:
        if name not in roots or not str(roots[name]):
            status[name] = "absent: no root configured"
            continue
        try:
            datasets = _probe_split_datasets(name, roots[name], strict)
        except (DatasetLayoutError, KeyError, ValueError, OSError) as exc:
            # "absent" only when nothing is there: a folder that exists but is laid out wrongly says so
            kind = "unreadable" if Path(roots[name]).exists() else "absent"
            status[name] = f"{kind}: {str(exc).splitlines()[0]}"
            continue
        status[name] = "present"
        if deep:
            checks = [check_images(dataset, progress) for dataset in datasets]
            if reports is not None:
                reports[name] = checks
            bad = [c for c in checks if not c.ok]
            if bad:
                status[name] = "damaged: " + "; ".join(
                    f"{c.split}: {len(c.unreadable)} of {c.n_checked} image(s) unreadable, "
                    f"{c.n_odd_size} of another size" for c in bad)
    return status

