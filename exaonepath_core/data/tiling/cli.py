"""`python -m exaonepath_core.data.tiling`: tile a folder or list of slides, print the summary and failures."""
from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

import pandas as pd

from exaonepath_core.config import parse_shard
from exaonepath_core.data.tiling.params import TilingParams, tiling_dir
from exaonepath_core.data.tiling.run import list_slides, tile_cohort
from exaonepath_core.io.slides import SLIDE_SUFFIXES


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m exaonepath_core.data.tiling`: tile a slide folder or list; prints a summary and the failures.

    Exit status: 0 when every slide of the shard tiled (0 tiles counts as tiled, with a reason), 1 when any
    slide failed (all other slides are still processed and the table printed; see ledger.csv), 2 for bad
    arguments.
    """
    parser = argparse.ArgumentParser(
        prog="python -m exaonepath_core.data.tiling", description=main.__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    defaults = TilingParams()
    parser.add_argument("--slides", required=True, help="folder of slides (recursive), one slide, or a text file of paths")
    parser.add_argument("--out", required=True, help="stage folder; tiles go to OUT/<params folder name>/")
    parser.add_argument("--target-mpp", type=float, default=defaults.target_mpp,
                        help="um per pixel of the tiles (0.5 = 20x; default %(default)s)")
    parser.add_argument("--tile-size", type=int, default=defaults.tile_size,
                        help="tile side in pixels at --target-mpp (default %(default)s)")
    parser.add_argument("--overlap", type=int, default=defaults.overlap,
                        help="pixels at --target-mpp shared by neighbouring tiles (default %(default)s)")
    parser.add_argument("--min-tissue", type=float, default=defaults.min_tissue_fraction,
                        help="minimum tissue fraction per tile (default %(default)s)")
    parser.add_argument("--workers", type=int, default=1,
                        help="slides tiled in parallel, one process each (default %(default)s)")
    parser.add_argument("--shard", default="0/1",
                        help="i/N: tile the i-th of N deterministic parts, i counted from 0 (0/N ... N-1/N; "
                             "default %(default)s = everything)")
    parser.add_argument("--force", action="store_true", help="retry slides that failed before")
    parser.add_argument("--mpp-override", type=float, default=None,
                        help="um/px at level 0 for every slide (for slides without, or with anisotropic, mpp)")
    parser.add_argument("--no-qc", action="store_true", help="skip the per-slide QC figures")
    parser.add_argument("--verify-tiles", action="store_true",
                        help="decode every kept tile once, so a slide with corrupt tile data fails here (2x reads)")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    try:
        shard = parse_shard(args.shard)
        params = TilingParams(
            target_mpp=args.target_mpp, tile_size=args.tile_size, overlap=args.overlap,
            min_tissue_fraction=args.min_tissue, qc_figure=not args.no_qc, verify_tiles=args.verify_tiles,
        )
        if args.workers < 1:
            raise ValueError(f"--workers must be >= 1, got {args.workers}")
        if args.mpp_override is not None and not args.mpp_override > 0:
            raise ValueError(f"--mpp-override must be > 0, got {args.mpp_override}")
        slides = list_slides(args.slides)
    except (ValueError, FileNotFoundError) as exc:
        parser.error(str(exc))
    if not slides:
        parser.error(f"no slides found in {args.slides} (extensions: {', '.join(SLIDE_SUFFIXES)})")
    out = tiling_dir(args.out, params)
    rows = tile_cohort(slides, out, params, workers=args.workers, shard=shard, force=args.force,
                       mpp_overrides=args.mpp_override, progress=not args.no_progress)
    print_cohort_report(rows, out, shard)
    return 1 if (rows["status"] != "ok").any() else 0


def print_cohort_report(rows: pd.DataFrame, out_dir: Path, shard: tuple[int, int]) -> None:
    """Print this shard's counts, its failures, 0-tile and upsampled slides, then the whole folder's summary."""
    ok = rows["status"] == "ok"
    n_tiles = pd.to_numeric(rows["n_tiles"], errors="coerce").fillna(0).astype(int)
    reasons = rows["reason"].fillna("").astype(str)
    print(f"tiling folder: {out_dir}")
    which = "all slides" if shard[1] == 1 else f"shard {shard[0]}/{shard[1]} (0-based)"
    print(f"{which}: {len(rows)} slides, {int(ok.sum())} ok, {int((~ok).sum())} failed, "
          f"{int(n_tiles[ok].sum())} tiles")
    for _, row in rows[~ok].iterrows():
        print(f"  FAILED {row['slide_id']} ({row['slide_path']}): {row['reason']}")
    for _, row in rows[ok & (n_tiles == 0)].iterrows():
        print(f"  0 tiles {row['slide_id']}: {row['reason']}")
    upsampled = rows[ok & reasons.str.contains("upsampled", regex=False)]
    for _, row in upsampled.iterrows():
        print(f"  WARNING upsampled {row['slide_id']}: {row['reason']}")
    anisotropic = rows[ok & reasons.str.contains("anisotropic", regex=False)]
    for _, row in anisotropic.iterrows():
        print(f"  WARNING pixel size {row['slide_id']}: {row['reason']}")
    if shard[1] == 1:
        print("summary.csv (whole folder):")
    else:
        print(f"summary.csv (whole folder: every shard so far, not only shard {shard[0]}/{shard[1]}):")
    print(pd.read_csv(out_dir / "summary.csv").to_string(index=False))
