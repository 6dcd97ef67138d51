"""Stage 01 (the tiling package): tissue detection, an mpp-aware tile grid, per-slide coordinate files, QC figures and a ledger.

Output folder (`out_dir`, by convention `results/<profile>/01_tiles/<TilingParams.folder_name()>/`):

    params.json              the TilingParams every file in the folder was made with
    coords/<slide_id>.h5     datasets coords (N, 2) int64 level-0 (x, y) and tissue_fraction (N,) float32;
                             attrs slide_path, slide_id, level0_patch_size, level0_step, source_mpp, target_mpp,
                             tile_size, overlap, read_level, read_scale, read_size, reason, ...
    qc/<slide_id>.png        thumbnail with the tissue mask and the tile grid
    ledger/<slide_id>.json   one record per slide (status ok|failed, reason, n_tiles, seconds), written by the
                             process that tiled it, so shards on several machines never write the same file
    ledger.csv, summary.csv  the records of all shards gathered into one table / one row of totals
                             (a slide id shared by several files of the listing: one failed row per file,
                             found over the whole listing, so every shard reports it and none tiles it)

Files are written atomically (`io/atomic.py`) with the permissions the umask gives (0644 under umask 022).

Memory: a slide of any size (say 100k x 100k px) tiles in the same memory as one of 16M px. The tissue mask is
computed on a thumbnail at `mask_mpp` (8 um/px: a 100k px side at 0.25 um/px becomes 3,125 px, capped at
`mask_max_size`), read from the coarsest pyramid level that is sharp enough and streamed in strips
(`Slide.thumbnail`; a slide without a pyramid is read from level 0 in strips of 16M px, which sets the peak:
about 360 MB measured, against 160 MB for a 2k px slide that fits in one strip); coordinates are two small
integer arrays; tiles are never read at the tiling step, and `read_tiles` / `TileDataset` read them back one
tile at a time into batches of fixed size.

Modules, in the order the data flows (each imports only the ones above it):

    params.py   TilingParams (how slides are cut) and the level-0 tile geometry
    tissue.py   the tissue mask of a thumbnail (HSV saturation, Otsu, pen-ink rejection, morphology)
    grid.py     the tile grid at the target mpp and each tile's tissue fraction
    coords.py   the coords/<slide_id>.h5 file: TileSet, its writer and reader
    qc.py       the QC figure of one slide (thumbnail, mask, kept tiles) through io/plotting
    slide.py    tile_slide: one slide from file to coords file and QC figure
    ledger.py   the per-slide JSON records and the ledger.csv / summary.csv gathered from them
    run.py      tile_cohort: listings, duplicates, shards and the worker pool over many slides
    dataset.py  reading tiles back: read_tiles, TileDataset, tile_sets / tile_sources of a slide table
    cli.py      `python -m exaonepath_core.data.tiling`
"""
