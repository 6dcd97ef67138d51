"""Write notebooks/*.ipynb (stored without outputs) from the cell sources below.

Edit a stage here or in JupyterLab; if you edit here, run `.venv/bin/python tools/build_notebooks.py`.
tests/test_notebooks.py checks the stored notebooks carry a tagged `parameters` cell, no outputs and no
function or class definitions.
"""
from __future__ import annotations

import os
from pathlib import Path

import nbformat

ROOT = Path(__file__).resolve().parents[1]

PARAMS = '''# Parameters (papermill injects the run's values below this cell)
config_path = ""  # the resolved config.yaml of a run; empty: results/<profile>/config.yaml from ./run_all.sh
profile = "smoke"  # whose results to read when config_path is empty: a profile (smoke, ci, paper) or run folder
'''
FORCE = 'force = False  # True: redo finished work (per-slide ledgers, stores, checkpoints) instead of reusing it\n'

SETUP = """matplotlib.use("Agg")
cfg, paths = open_stage({stage!r}, config_path, profile)
"""


def params_cell(force: bool, extra: str = "") -> str:
    """The tagged parameters cell: config_path and profile; `force` only where the stage reuses finished work."""
    return PARAMS + (FORCE if force else "") + extra


def setup_cell(stage: str, imports: str, body: str) -> str:
    """The stage's set-up cell: its own imports (only what the notebook uses, sorted), SETUP, then `body`."""
    return imports + "\n" + SETUP.format(stage=stage) + "\n" + body


NOTEBOOKS: dict[str, list[tuple[str, str]]] = {}

NOTEBOOKS["01_tile_slides"] = [
    ("md", ("# 01 · Tile slides\n\nCollect the run's slides (the real CC0 slide `CMU-1-Small-Region.svs`, the synthetic "
            "multi-site cohort, real slide folders), detect tissue on a low-resolution level, lay a grid at the target "
            "mpp and store level-0 coordinates per slide with a per-slide ledger. Outputs: `results/<profile>/01_tiles/`.")),
    ("code", params_cell(force=True)),
    ("code", setup_cell("01", '''import matplotlib
from IPython.display import Image, display

from exaonepath_core.config import parse_shard
from exaonepath_core.data import cohort
from exaonepath_core.data.tiling.params import TilingParams
from exaonepath_core.data.tiling.run import tile_cohort
from exaonepath_core.io.config_file import save_config
from exaonepath_core.io.paths import write_json_atomic
from exaonepath_core.run.pipeline import open_stage
from exaonepath_core.stages import workflow
''', '''out = paths.stage_dir("01")
save_config(cfg, out / "config.yaml")
slides = cohort.build_slide_table(cfg)
workflow.write_csv_atomic(slides, out / "slides.csv")
print(slides.groupby(["source", "split"]).size().rename("slides").to_string())
''')),
    ("md", "## Tiling with a per-slide ledger (rerun skips finished slides; failed ones retried with `force`)"),
    ("code", '''params = TilingParams(target_mpp=cfg.tiling.target_mpp, tile_size=cfg.tiling.tile_size,
                      overlap=cfg.tiling.overlap, min_tissue_fraction=cfg.tiling.min_tissue_fraction,
                      verify_tiles=cfg.tiling.verify_tiles)
tiles_dir = out / params.folder_name()
overrides = {p: cfg.data.mpp_override for p in slides.path} if cfg.data.mpp_override else None
ledger = tile_cohort(list(slides.path), tiles_dir, params, workers=cfg.tiling.workers,
                     shard=parse_shard(cfg.tiling.shard), force=force, mpp_overrides=overrides)
write_json_atomic(out / "tiles.json", {"tiles_dir": str(tiles_dir), "params": params.folder_name()})
summary = workflow.tiling_summary(slides, ledger)
workflow.write_csv_atomic(summary, out / "tiling_summary.csv")
summary
'''),
    ("code", '''failed = ledger[ledger.status != "ok"]
print(f"{len(ledger)} slides, {int((ledger.status == 'ok').sum())} ok, {len(failed)} failed, "
      f"{int(ledger.n_tiles.fillna(0).sum())} tiles")
if len(failed):
    display(failed)
'''),
    ("md", "## QC: tissue mask and tile grid"),
    ("code", '''qc = sorted(tiles_dir.glob("qc/*.png"))
cmu_first = sorted(qc, key=lambda p: (not p.stem.startswith("CMU"), p.name))[: cfg.tiling.qc_figures]
for p in cmu_first:
    display(Image(filename=str(p)))
'''),
    ("md", "## The synthetic cohort: example tiles per tissue class (rows) and per site (columns)"),
    ("code", '''if cfg.data.synthetic.enabled:
    from exaonepath_core.data.synthetic.plots import plot_cohort_examples
    from exaonepath_core.data.synthetic.writer import read_manifest

    manifest = read_manifest(cohort.synthetic_cohort_dir(cfg))
    plot_cohort_examples(manifest, out / "synthetic_examples.png")
    display(Image(filename=str(out / "synthetic_examples.png")))
'''),
]

NOTEBOOKS["02_normalize_stains"] = [
    ("md", ("# 02 · Normalize stains (Macenko) into patch stores\n\nThe paper normalizes every patch with Macenko "
            "(Io=240, alpha=1, beta=0.15) before pretraining. We write the pretraining slides' tiles once into sharded "
            "stores, one per input (`raw`, `macenko`): JPEG-encoded patches in tar shards with a memory-mapped index "
            "(`normalize.store_format`), plus a storeless coordinate index; degenerate patches (background) pass through unchanged and are "
            "counted, never dropped. Outputs: `results/<profile>/02_normalize/`.")),
    ("code", params_cell(force=True)),
    ("code", setup_cell("02", '''import json
from pathlib import Path

import matplotlib
import numpy as np
from IPython.display import Image, display

from exaonepath_core.config import parse_shard
from exaonepath_core.data import cohort, normalize_store, storeless
from exaonepath_core.data.stain.qc import plot_stain_qc
from exaonepath_core.data.tiling.dataset import tile_sets, tile_sources
from exaonepath_core.io.config_file import save_config
from exaonepath_core.run.pipeline import open_stage
from exaonepath_core.stages import workflow
''', '''out = paths.stage_dir("02")
save_config(cfg, out / "config.yaml")
slides = cohort.read_slide_table(paths.stage_dir("01") / "slides.csv")
tiles_dir = Path(json.loads((paths.stage_dir("01") / "tiles.json").read_text())["tiles_dir"])
reference = workflow.stain_reference(cfg)
reference.to_json(out / "reference.json")
print("reference stain matrix (columns H, E):\\n", np.round(reference.stain_matrix, 4),
      "\\nmax concentrations:", np.round(reference.max_concentrations, 4))
''')),
    ("code", '''train_sets = tile_sets(slides[slides.split == "train"], tiles_dir)
workflow.check_pretraining_tiles(cfg, slides[slides.split == "train"], train_sets, tiles_dir)
sources = tile_sources(train_sets, batch_size=cfg.normalize.batch_size)
ledgers = {}
for mode in cfg.normalize.stores:
    ledgers[mode] = normalize_store.normalize_slides(
        sources, out / mode, mode=mode, reference=reference if mode == "macenko" else None,
        batch_size=cfg.normalize.batch_size, device=workflow.device(cfg),
        shard=parse_shard(cfg.normalize.shard), force=force,
        macenko_params=cfg.normalize.macenko_params(), store_format=cfg.normalize.store_format,
        encoding=cfg.normalize.encoding, quality=cfg.normalize.jpeg_quality,
        jpeg_subsampling=cfg.normalize.jpeg_subsampling, shard_max_bytes=cfg.normalize.shard_max_mb << 20)
# the storeless source (pretrain.data_source: storeless): the stage-01 coordinates in one compact index
print("storeless index:", storeless.write_storeless_index(train_sets, out / "storeless"), "patches")
counts = workflow.normalize_summary(ledgers)
workflow.write_csv_atomic(counts, out / "normalize_summary.csv")
counts
'''),
    ("md", "## QC: before / after Macenko for several slides"),
    ("code", '''before, after, titles = workflow.qc_examples(train_sets, reference, n_slides=6)
if before:
    plot_stain_qc(before, after, titles, reference, out / "stain_qc.png")
    display(Image(filename=str(out / "stain_qc.png")))
else:
    print("no pretraining tile to show (no train slide gave a tile; see 01_tiles/tiling_summary.csv)")
'''),
]

NOTEBOOKS["03_pretrain_dino"] = [
    ("md", ("# 03 · DINO pretraining (one arm per run)\n\nThe runner executes this notebook once per arm "
            "(`raw`, `macenko` = the paper, `stain_augmentation`), each with the same seed, data order and steps. "
            "Training runs in a subprocess through `torchrun` (DDP) or plain python; an interrupted run resumes from "
            "its last checkpoint. Outputs: `results/<profile>/03_pretrain/<arm>/`.")),
    ("code", params_cell(force=True, extra='arm = "macenko"  # the arm this run pretrains (the runner: each of cfg.arms)\n')),
    ("code", setup_cell("03", '''import matplotlib
from IPython.display import Image, display

from exaonepath_core.io.config_file import save_config
from exaonepath_core.pretrain import training
from exaonepath_core.run.pipeline import open_stage
from exaonepath_core.stages import workflow
''', '''out = paths.stage_dir("03") / arm
out.mkdir(parents=True, exist_ok=True)
save_config(cfg, out / "config.yaml")
pretrain_yaml = workflow.write_pretrain_config(cfg, arm, paths.stage_dir("02"), out)
print(pretrain_yaml.read_text())
''')),
    ("code", '''summary = workflow.run_pretraining(pretrain_yaml, out, nproc_per_node=cfg.nproc_per_node, force=force,
                                   nnodes=cfg.nnodes, rdzv_endpoint=cfg.rdzv_endpoint)
summary
'''),
    ("md", "## Training curves: loss, schedules, teacher entropy and centre (collapse watch)"),
    ("code", '''training.plot_training_curves(out / "log.jsonl", out / "training_curves.png")
display(Image(filename=str(out / "training_curves.png")))
'''),
]

NOTEBOOKS["04_extract_features"] = [
    ("md", ("# 04 · Frozen features\n\nEvery backbone (each pretraining arm's teacher, plus any configured timm model "
            "or the official EXAONEPath checkpoint) embeds every dataset once with its own preprocessing: the held-out "
            "synthetic slides (slide, site and tissue labels known), the held-out real slides (`heldout_slides`: "
            "`data.heldout_slides_per_site` per site or `data.heldout_list`, at most "
            "`features.max_tiles_per_heldout_slide` tiles each; slide and site known, no tissue labels, so they feed "
            "the collapse metrics of stage 06 and no probe) and each real downstream dataset present on disk. "
            "`datasets.csv` counts what was left out and why. "
            "Outputs: `results/<profile>/04_features/<backbone>/<dataset>/<split>/`.")),
    ("code", params_cell(force=True)),
    ("code", setup_cell("04", '''import json

import matplotlib
import pandas as pd

from exaonepath_core.evaluation import features
from exaonepath_core.io.config_file import save_config
from exaonepath_core.run.pipeline import open_stage
from exaonepath_core.stages import workflow
''', '''out = paths.stage_dir("04")
save_config(cfg, out / "config.yaml")
backbones = workflow.backbone_specs(cfg, paths.stage_dir("03"), out)
datasets = workflow.feature_datasets(cfg, paths.stage_dir("01"))
print("backbones:", list(backbones))
for name, entry in datasets.items():
    print(f"{name}: {entry['status']}")
''')),
    ("code", '''rows = []
for bname, spec in backbones.items():
    model, transform, info = workflow.load_backbone_with_transform(spec, cfg)
    for dname, entry in datasets.items():
        if not entry["status"].startswith("present"):
            continue
        for split, ds in entry["splits"].items():
            target = out / bname / dname / split
            done = (target / "manifest.json").is_file() and not force
            if not done:
                features.extract_features(model, transform, ds, target, batch_size=cfg.features.batch_size,
                                          num_workers=cfg.features.num_workers, device=workflow.device(cfg),
                                          amp=cfg.features.amp, overwrite=force)
            m = json.loads((target / "manifest.json").read_text())
            rows.append({"backbone": bname, "dataset": dname, "split": split, "n": m.get("n"), "dim": m.get("dim"),
                         "reused": done})
table = pd.DataFrame(rows, columns=workflow.FEATURES_INDEX_COLUMNS)  # header kept when nothing was embedded
workflow.write_csv_atomic(table, out / "features_index.csv")
workflow.write_csv_atomic(workflow.dataset_status_table(datasets), out / "datasets.csv")
table
'''),
]

NOTEBOOKS["05_linear_probes"] = [
    ("md", ("# 05 · Linear probes\n\nL2 logistic regression on frozen features (regularisation chosen on the "
            "validation split, or where there is none on 20% of train, held-out patients when the ids name TCGA "
            "patients), kNN (k=20, cosine) as a second view; top-1 accuracy (the paper's metric), balanced "
            "accuracy, macro F1, AUROC, each with a bootstrap 95% interval (resampling patients where known), over "
            "several seeds (`seeds_differ` says whether they changed anything but the bootstrap). Absent datasets are "
            "listed as absent, never faked. Outputs: `results/<profile>/05_probes/`.")),
    ("code", params_cell(force=False)),
    ("code", setup_cell("05", '''import matplotlib
from IPython.display import Image, display

from exaonepath_core.evaluation import probes
from exaonepath_core.io.config_file import save_config
from exaonepath_core.run.pipeline import open_stage
from exaonepath_core.stages import workflow
''', '''out = paths.stage_dir("05")
save_config(cfg, out / "config.yaml")
results = workflow.run_all_probes(cfg, paths.stage_dir("04"))
workflow.write_csv_atomic(results, out / "probe_results_long.csv")
summary = workflow.probe_summary(results, paths.stage_dir("04"))
workflow.write_csv_atomic(summary, out / "probe_summary.csv")
summary
''')),
    ("code", '''chance = workflow.task_chance(paths.stage_dir("04"))  # majority-class rate of each task's test split
probes.plot_probe_results(results, out / "probe_results.png", chance=chance)
display(Image(filename=str(out / "probe_results.png")))
'''),
]

NOTEBOOKS["06_feature_collapse"] = [
    ("md", ("# 06 · WSI-specific feature collapse, measured\n\nOn features of held-out slides: slide-ID probe "
            "accuracy (vs chance), same-slide fraction among the k nearest neighbours, silhouette by slide and by "
            "class, and the within-slide vs leave-one-slide-out kNN gap, with bootstrap intervals over slides; "
            "per-site versions. The paper's claim: normalization lowers slide identifiability while tissue class "
            "stays predictable. Each cohort present is measured: `synthetic` (held-out synthetic slides, tissue "
            "labels known) and `real` (held-out real slides of the paper profile: slide and site ids from the tiling "
            "stage, no tissue labels, so the class metrics are rows with a `skipped: no tissue labels` note and the "
            "verdict checks slide identity only). Outputs: `results/<profile>/06_collapse/` (`collapse_metrics.csv` "
            "and `collapse_verdict.csv` with a `cohort` column; figures `collapse_metrics.png` / "
            "`embeddings_by_arm.png` for the synthetic cohort, `*_real.png` for the real one).")),
    ("code", params_cell(force=False)),
    ("code", setup_cell("06", '''import matplotlib
from IPython.display import Image, display

from exaonepath_core.io import plotting
from exaonepath_core.io.config_file import save_config
from exaonepath_core.run.pipeline import open_stage
from exaonepath_core.stages import workflow
''', '''out = paths.stage_dir("06")
save_config(cfg, out / "config.yaml")
plotting.set_style()
metrics, embeds = workflow.collapse_by_arm(cfg, paths.stage_dir("04"))
workflow.write_csv_atomic(metrics, out / "collapse_metrics.csv")
verdict = workflow.collapse_verdict(metrics)
workflow.write_csv_atomic(verdict, out / "collapse_verdict.csv")
workflow.write_collapse_by_model(metrics, out)  # every backbone, peers included, ranked by slide identifiability
if metrics.empty:
    print("nothing to measure: no held-out slide features (see 04_features/datasets.csv)")
else:
    print("arms per cohort:", metrics.groupby("cohort", sort=False).arm.unique().map(list).to_dict())
verdict
''')),
    ("code", '''for png in workflow.write_collapse_figures(metrics, embeds, out):
    display(Image(filename=str(png)))
'''),
]

NOTEBOOKS["07_figures_and_tables"] = [
    ("md", ("# 07 · Figures and tables\n\nGathers every stage's outputs: the probe table beside the paper's reported "
            "numbers, the collapse figure per arm, QC figures and training curves, and writes "
            "`results/<profile>/index.html` linking each with one line of context.")),
    ("code", params_cell(force=False)),
    ("code", setup_cell("07", '''import matplotlib

from exaonepath_core.io.config_file import save_config
from exaonepath_core.report import html_index
from exaonepath_core.run.pipeline import open_stage
from exaonepath_core.stages import workflow
''', '''out = paths.stage_dir("07")
save_config(cfg, out / "config.yaml")
workflow.write_model_comparison(cfg, paths)  # the paper's table and Figure 1, published beside measured
items, tables = workflow.report_items(cfg, paths)
for name, df in tables.items():
    workflow.write_csv_atomic(df, out / f"{name}.csv")
index = html_index.write_index_html(paths.profile_dir, items, title=f"EXAONEPath compendium — {cfg.results_name} run",
                                preamble=workflow.report_preamble(cfg, paths))
missing = [p for p in html_index.linked_files(index) if not p.exists()]
assert not missing, missing
print(index, len(items), "items")
tables.get("paper_table")
''')),
]


def build() -> list[Path]:
    """Write every notebook; returns their paths."""
    written = []
    for name, cells in NOTEBOOKS.items():
        nb = nbformat.v4.new_notebook()
        for i, (kind, src) in enumerate(cells):
            cell = nbformat.v4.new_markdown_cell(src) if kind == "md" else nbformat.v4.new_code_cell(src)
            if kind == "code" and src.startswith("# Parameters"):
                cell.metadata["tags"] = ["parameters"]
            cell.id = f"{name[:2]}-cell-{i}"  # stable ids: rebuilding gives the same bytes
            nb.cells.append(cell)
        nb.metadata["kernelspec"] = {"name": "python3", "language": "python", "display_name": "Python 3"}
        nb.metadata["language_info"] = {"name": "python"}
        path = ROOT / "notebooks" / f"{name}.ipynb"
        path.parent.mkdir(exist_ok=True)
        # Atomic: a reader (JupyterLab, the runner) never sees a half-written notebook.
        tmp = path.with_name(f".{path.name}.tmp")
        nbformat.write(nb, tmp)
        os.replace(tmp, path)
        written.append(path)
    return written


if __name__ == "__main__":
    for p in build():
        print(p.relative_to(ROOT))
