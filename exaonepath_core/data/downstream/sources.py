"""Where each downstream dataset comes from (citation, homepage, Zenodo record, pinned md5) and `prepare`,
which downloads and unpacks it into the adapter's layout when the source is reachable.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import tarfile
import urllib.error
import urllib.request
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

from exaonepath_core.data.downstream.check import available_datasets
from exaonepath_core.io import atomic


@dataclass(frozen=True)
class DatasetSource:
    """Where a dataset comes from and how its archives become the layout the adapter reads."""

    citation: str
    homepage: str
    zenodo_record: str | None = None  # files + md5 checksums are listed by the Zenodo API
    files: tuple[tuple[str, str | None], ...] = ()  # (file name, md5 of the archive) when pinned here
    instructions: str = ""
    layout: str = ""
    file_prefix: str = ""  # only the record's files starting with this prefix
    extra: dict[str, str] = field(default_factory=dict)


DATASET_SOURCES: dict[str, DatasetSource] = {
    "pcam": DatasetSource(
        citation="Veeling et al., Rotation equivariant CNNs for digital pathology, MICCAI 2018 (CC0)",
        homepage="https://github.com/basveeling/pcam",
        zenodo_record="2546921",
        # md5 of the .h5.gz archives, as torchvision's PCAM dataset pins them
        files=(("camelyonpatch_level_2_split_train_x.h5.gz", "1571f514728f59376b705fc836ff4b63"),
               ("camelyonpatch_level_2_split_train_y.h5.gz", "35c2d7259d906cfc8143347bb8e05be7"),
               ("camelyonpatch_level_2_split_valid_x.h5.gz", "d5b63470df7cfa627aeec8b9dc0c066e"),
               ("camelyonpatch_level_2_split_valid_y.h5.gz", "2b85f58b927af9964a4c15b8f7e8f179"),
               ("camelyonpatch_level_2_split_test_x.h5.gz", "d8c2d60d490dbd479f8199bdfa0cf6ec"),
               ("camelyonpatch_level_2_split_test_y.h5.gz", "60a7035772fbdb7f34eb86d4420cf66a")),
        instructions="download the six .h5.gz files and gunzip them into ROOT",
        layout="ROOT/camelyonpatch_level_2_split_{train,valid,test}_{x,y}.h5 (262,144 / 32,768 / 32,768)",
    ),
    "mhist": DatasetSource(
        citation="Wei et al., A Petri dish for histopathology image analysis, AIME 2021",
        homepage="https://bmirds.github.io/MHIST/",
        instructions="MHIST is released after a data-use form at the homepage (no direct download): put the "
                     "emailed annotations.csv and the unzipped images.zip in ROOT",
        layout="ROOT/annotations.csv + ROOT/images/*.png (train 2,175: HP 1,545 SSA 630; test 977: HP 617 SSA 360)",
    ),
    "crc100k": DatasetSource(
        citation="Kather et al., PLOS Medicine 2019 (NCT-CRC-HE-100K, CRC-VAL-HE-7K; CC BY 4.0)",
        homepage="https://zenodo.org/records/1214456",
        zenodo_record="1214456",
        files=(("NCT-CRC-HE-100K.zip", None), ("CRC-VAL-HE-7K.zip", None)),
        instructions="download NCT-CRC-HE-100K.zip and CRC-VAL-HE-7K.zip (md5 listed on the Zenodo record) and "
                     "unzip both into ROOT",
        layout="ROOT/NCT-CRC-HE-100K/{ADI,...,TUM}/*.tif (100,000) + ROOT/CRC-VAL-HE-7K/{ADI,...,TUM}/*.tif (7,180)",
    ),
    "til": DatasetSource(
        citation="Saltz et al., Cell Reports 2018; Abousamra et al., Front. Oncol. 2022 (TCGA TIL maps)",
        homepage="https://zenodo.org/records/6604094",
        zenodo_record="6604094",
        instructions="download the TCGA-TILs archive from the Zenodo record and extract it into ROOT",
        layout="ROOT/[images-tcga-tils/pancancer/]{train,val,test}/{til-negative,til-positive}/*.png",
    ),
    "msi_crc": DatasetSource(
        citation="Kather et al., Nature Medicine 2019 (MSI vs MSS tiles, CC BY 4.0)",
        homepage="https://zenodo.org/records/2530835",
        zenodo_record="2530835",
        file_prefix="CRC_DX_",
        instructions="download CRC_DX_{TRAIN,TEST}_{MSIMUT,MSS}.zip and unzip each into ROOT/{TRAIN,TEST}/{MSIMUT,MSS}",
        layout="ROOT/{TRAIN,TEST}/{MSIMUT,MSS}/*.png",
    ),
    "msi_stad": DatasetSource(
        citation="Kather et al., Nature Medicine 2019 (MSI vs MSS tiles, CC BY 4.0)",
        homepage="https://zenodo.org/records/2530835",
        zenodo_record="2530835",
        file_prefix="STAD_",
        instructions="download STAD_{TRAIN,TEST}_{MSIMUT,MSS}.zip and unzip each into ROOT/{TRAIN,TEST}/{MSIMUT,MSS}",
        layout="ROOT/{TRAIN,TEST}/{MSIMUT,MSS}/*.png",
    ),
}
ZENODO_API = "https://zenodo.org/api/records/"


class PrepareError(RuntimeError):
    """A dataset could not be prepared automatically; the message says how to do it by hand."""


def manual_text(name: str, root: Path) -> str:
    source = DATASET_SOURCES[name]
    pinned = "".join(f"\n    {fname}  md5 {md5 or '(see the Zenodo record)'}" for fname, md5 in source.files)
    return (f"{name}: {source.citation}\n  source: {source.homepage}\n  by hand: "
            f"{source.instructions.replace('ROOT', str(root))}\n  expected layout: "
            f"{source.layout.replace('ROOT', str(root))}" + (f"\n  files:{pinned}" if pinned else ""))


def _md5(path: Path) -> str:
    digest = hashlib.md5()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _download(url: str, target: Path, md5: str | None, timeout: float) -> None:
    """Stream `url` to `target` atomically; verify md5 when known."""
    with atomic.atomic_path(target) as tmp:
        with open(tmp, "wb") as out, urllib.request.urlopen(url, timeout=timeout) as response:
            shutil.copyfileobj(response, out, length=1 << 20)
        if md5 is not None and _md5(tmp) != md5:
            raise PrepareError(f"checksum mismatch for {url}: expected md5 {md5}")


def _extract(archive: Path, destination: Path) -> None:
    """Unpack .zip / .tar(.gz) / .gz archives into `destination`."""
    if archive.suffix == ".zip":
        with zipfile.ZipFile(archive) as handle:
            handle.extractall(destination)
    elif archive.name.endswith((".tar.gz", ".tgz", ".tar")):
        with tarfile.open(archive) as handle:
            handle.extractall(destination, filter="data")
    elif archive.suffix == ".gz":
        import gzip

        # atomic: an interrupted gunzip must not leave a truncated .h5 that the next run takes as the dataset
        with gzip.open(archive, "rb") as src, atomic.atomic_open(destination / archive.stem, "wb") as dst:
            shutil.copyfileobj(src, dst, length=1 << 20)


def prepare(name: str, root: str | os.PathLike, timeout: float = 20.0, zenodo_api: str = ZENODO_API) -> str:
    """Download and unpack dataset `name` into `root` from its official source; returns a status text.

    Raises `PrepareError` with step-by-step instructions when the source is unreachable or needs a form.
    """
    if name not in DATASET_SOURCES:
        raise KeyError(f"unknown dataset {name!r}; known: {', '.join(DATASET_SOURCES)}")
    root = Path(root)
    if available_datasets({name: root}, names=[name])[name] == "present":
        return f"{name}: already present and valid at {root}"
    source = DATASET_SOURCES[name]
    if source.zenodo_record is None:
        raise PrepareError(f"{name} cannot be downloaded automatically.\n{manual_text(name, root)}")
    try:
        with urllib.request.urlopen(zenodo_api + source.zenodo_record, timeout=timeout) as response:
            record = json.load(response)
    except (urllib.error.URLError, OSError, ValueError) as exc:
        raise PrepareError(f"{name}: the official source is unreachable ({exc}).\n{manual_text(name, root)}")
    pinned = dict(source.files)
    wanted = [f for f in record.get("files", []) if f["key"].startswith(source.file_prefix)
              and (not pinned or f["key"] in pinned)]
    if not wanted:
        raise PrepareError(f"{name}: Zenodo record {source.zenodo_record} lists none of the expected files.\n"
                           f"{manual_text(name, root)}")
    root.mkdir(parents=True, exist_ok=True)
    for entry in wanted:
        md5 = pinned.get(entry["key"]) or str(entry.get("checksum", "")).removeprefix("md5:") or None
        archive = root / entry["key"]
        if not archive.is_file():
            _download(entry["links"]["self"], archive, md5, timeout)
        destination = root
        if name in ("msi_crc", "msi_stad"):  # e.g. CRC_DX_TRAIN_MSIMUT.zip -> ROOT/TRAIN/MSIMUT
            split, _label = archive.stem.split("_")[-2:]
            destination = root / split
        destination.mkdir(parents=True, exist_ok=True)
        _extract(archive, destination)
    status = available_datasets({name: root}, names=[name])[name]
    if status != "present":
        raise PrepareError(f"{name}: downloaded, but the layout check says {status}.\n{manual_text(name, root)}")
    return f"{name}: prepared at {root}"

