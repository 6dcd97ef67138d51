"""Writing a cohort: every slide's TIFF, class map and sidecar, then ``spec.json`` and ``manifest.csv``.

Reuse: a finished cohort of the same spec is returned untouched and finished slides of an interrupted run are
kept; a folder holding another spec is refused unless forced. Every file is written atomically, and a slide's
sidecar last, so its presence with a matching digest marks the slide as complete.
"""
from __future__ import annotations

import json
import os
from concurrent.futures import ProcessPoolExecutor, as_completed
from multiprocessing import get_all_start_methods, get_context
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from exaonepath_core.data.synthetic.render import build_context
from exaonepath_core.data.synthetic.spec import (
    BACKGROUND,
    CLASS_NAMES,
    GENERATOR_VERSION,
    CohortSpec,
    slide_id_for,
)
from exaonepath_core.data.synthetic.stains import site_stain_params
from exaonepath_core.data.synthetic.tiff import write_pyramid
from exaonepath_core.io import atomic


def _generate_slide(out_dir: str, spec_dict: dict[str, Any], site: int, slide: int) -> dict[str, Any]:
    """Render one slide and its sidecar and class map (atomic writes); returns its manifest row."""
    spec = CohortSpec.from_dict(spec_dict)
    out = Path(out_dir)
    site_stain = site_stain_params(spec)[site]
    ctx = build_context(spec, site, slide, site_stain)
    slide_id = slide_id_for(site, slide)
    tiff_path = out / f"{slide_id}.tiff"
    map_path = out / f"{slide_id}_classmap.npy"
    sidecar_path = out / f"{slide_id}.json"
    description = f"EXAONEPath synthetic slide {slide_id} site{site} spec {spec.digest()}"
    with atomic.atomic_path(tiff_path) as tmp:
        sizes = write_pyramid(ctx, tmp, description)
    with atomic.atomic_path(map_path) as tmp, open(tmp, "wb") as fh:
        np.save(fh, ctx.class_map)
    counts = np.bincount(ctx.class_map[ctx.class_map >= 0], minlength=len(CLASS_NAMES))
    fractions = {name: float(c) / ctx.class_map.size for name, c in zip(CLASS_NAMES, counts)}
    sidecar = {
        "slide_id": slide_id, "site": f"site{site}", "site_index": site, "slide_index": slide,
        "seed": list(ctx.entropy), "spec_digest": spec.digest(), "generator_version": GENERATOR_VERSION,
        "width": spec.slide_size_px, "height": spec.slide_size_px, "mpp": spec.mpp,
        "level_dimensions": [list(s) for s in sizes],
        "level_downsamples": [spec.level_downsample ** k for k in range(spec.n_levels)],
        "stain": ctx.stain.to_dict(), "site_stain": site_stain.to_dict(),
        "class_names": list(CLASS_NAMES), "background_label": BACKGROUND,
        "class_map_path": map_path.name, "class_map_downsample": spec.class_map_downsample,
        "class_map_shape": list(ctx.class_map.shape), "class_area_fractions": fractions,
    }
    # The sidecar is written last: its presence with a matching digest marks the slide as complete.
    atomic.write_text(sidecar_path, json.dumps(sidecar, indent=1))
    return _manifest_row(out, sidecar)


def _manifest_row(out: Path, sidecar: dict[str, Any]) -> dict[str, Any]:
    st, site_st = sidecar["stain"], sidecar["site_stain"]
    row: dict[str, Any] = {
        "slide_id": sidecar["slide_id"], "site": sidecar["site"], "site_index": sidecar["site_index"],
        "slide_index": sidecar["slide_index"],
        "path": str((out / f"{sidecar['slide_id']}.tiff").resolve()),
        "sidecar_path": str((out / f"{sidecar['slide_id']}.json").resolve()),
        "class_map_path": str((out / sidecar["class_map_path"]).resolve()),
        "width": sidecar["width"], "height": sidecar["height"], "mpp": sidecar["mpp"],
        "n_levels": len(sidecar["level_dimensions"]),
    }
    for prefix, params in (("", st), ("site_", site_st)):
        for stain in ("h", "e"):
            for channel, value in zip("rgb", params[f"{stain}_od"]):
                row[f"{prefix}{stain}_od_{channel}"] = value
        for key in ("h_scale", "e_scale", "io", "blur_sigma"):
            row[f"{prefix}{key}"] = params[key]
    for name, fraction in sidecar["class_area_fractions"].items():
        row[f"area_{name}"] = fraction
    return row


def _complete_sidecar(out: Path, site: int, slide: int, digest: str) -> dict[str, Any] | None:
    """The sidecar of a finished slide of this spec, or None when the slide must be (re)generated."""
    slide_id = slide_id_for(site, slide)
    sidecar_path = out / f"{slide_id}.json"
    if not sidecar_path.is_file() or not (out / f"{slide_id}.tiff").is_file():
        return None
    try:
        sidecar = json.loads(sidecar_path.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    if sidecar.get("spec_digest") != digest or not (out / sidecar.get("class_map_path", "")).is_file():
        return None
    return sidecar


def read_manifest(out: str | os.PathLike) -> pd.DataFrame:
    """The cohort manifest of folder `out`, its file paths anchored to that folder."""
    out = Path(out)
    manifest = pd.read_csv(out / "manifest.csv")
    # Every file of the cohort lives in its folder: anchor the stored absolute paths to the folder being read,
    # so a cohort copied or moved elsewhere is read from where it is now, never from where it was written.
    for column in ("path", "sidecar_path", "class_map_path"):
        manifest[column] = [str((out / Path(p).name).resolve()) for p in manifest[column]]
    return manifest


def _reusable_manifest(out: Path, spec: CohortSpec, wanted: dict[str, Any], force: bool
                       ) -> pd.DataFrame | None:
    """The finished manifest of this spec in `out`, or None; refuses another spec's folder (unless force)."""
    spec_path, manifest_path = out / "spec.json", out / "manifest.csv"
    if not spec_path.is_file():
        return None
    try:
        stored = json.loads(spec_path.read_text())
    except json.JSONDecodeError as err:
        if not force:
            raise FileExistsError(f"{spec_path} is not valid JSON ({err}); pass force=True to regenerate "
                                  f"the cohort or choose another folder") from err
        stored = {}
    # The same spec from an older generator version (another digest) is a stale cache of ours: it is
    # regenerated without asking; only a different spec is refused.
    if not force and stored.get("spec") != wanted["spec"]:
        raise FileExistsError(
            f"{out} holds a synthetic cohort of another spec ({stored.get('spec')}); "
            f"pass force=True to regenerate it or choose another folder")
    if stored.get("digest") == wanted["digest"] and manifest_path.is_file() and not force:
        manifest = read_manifest(out)
        missing = [p for p in manifest["path"] if not Path(p).is_file()]
        if not missing and len(manifest) == spec.n_sites * spec.slides_per_site:
            return manifest
    return None


def _render_slides(out: Path, spec: CohortSpec, todo: list[tuple[int, int]], workers: int, progress: bool
                   ) -> dict[tuple[int, int], dict[str, Any]]:
    """Render the slides `todo` ((site, slide) pairs) in `workers` processes; their manifest rows by job."""
    rows: dict[tuple[int, int], dict[str, Any]] = {}
    bar = None
    if progress and todo:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(todo), desc=f"synthetic slides -> {out.name}", unit="slide")
    try:
        if workers <= 1:
            for site, slide in todo:
                rows[(site, slide)] = _generate_slide(str(out), spec.to_dict(), site, slide)
                if bar is not None:
                    bar.update()
        else:
            # fork: spawn would re-run an unguarded calling script (no `if __name__ == "__main__"`) in
            # every worker. The workers use only numpy/scipy code paths without thread pools, so inheriting a
            # parent's torch/OpenMP threads is harmless here.
            method = "fork" if "fork" in get_all_start_methods() else "spawn"
            with ProcessPoolExecutor(workers, mp_context=get_context(method)) as pool:
                futures = {pool.submit(_generate_slide, str(out), spec.to_dict(), site, slide): (site, slide)
                           for site, slide in todo}
                for future in as_completed(futures):
                    rows[futures[future]] = future.result()
                    if bar is not None:
                        bar.update()
    finally:
        if bar is not None:
            bar.close()
    return rows


def generate_cohort(out_dir: str | os.PathLike, spec: CohortSpec, force: bool = False, progress: bool = True,
                    workers: int | None = None) -> pd.DataFrame:
    """Generate (or reuse) the cohort in `out_dir`; returns the manifest also written to out_dir/manifest.csv.

    Reuse: an existing manifest of the same spec is returned untouched, and finished slides of an interrupted
    run are kept. A folder holding a different spec is refused unless `force` (then it is regenerated).
    `workers` processes render slides in parallel (default: up to 2, the CPU count otherwise).
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    manifest_path = out / "manifest.csv"
    wanted = {"spec": spec.to_dict(), "digest": spec.digest(), "generator_version": GENERATOR_VERSION}
    reused = _reusable_manifest(out, spec, wanted, force)
    if reused is not None:
        return reused
    if manifest_path.exists():
        manifest_path.unlink()  # stale until the new one is complete
    atomic.write_text(out / "spec.json", json.dumps(wanted, indent=1, sort_keys=True))

    jobs = [(site, slide) for site in range(spec.n_sites) for slide in range(spec.slides_per_site)]
    rows: dict[tuple[int, int], dict[str, Any]] = {}
    todo = []
    for site, slide in jobs:
        sidecar = None if force else _complete_sidecar(out, site, slide, spec.digest())
        if sidecar is None:
            todo.append((site, slide))
        else:
            rows[(site, slide)] = _manifest_row(out, sidecar)
    workers = min(len(todo), workers if workers is not None else min(2, os.cpu_count() or 1)) if todo else 0
    rows.update(_render_slides(out, spec, todo, workers, progress))
    manifest = pd.DataFrame([rows[job] for job in jobs])
    atomic.write_csv(manifest, manifest_path)
    return manifest
