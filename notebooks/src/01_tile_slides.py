# %% [markdown]
# # 01 · Tile slides
#
# Collect the run's slides (the real CC0 slide `CMU-1-Small-Region.svs`, the synthetic multi-site cohort,
# real slide folders), detect tissue on a low-resolution level, lay a grid at the target mpp and store
# level-0 coordinates per slide with a per-slide ledger. Outputs: `results/<profile>/01_tiles/`.


# %% tags=["parameters"]
# Parameters (papermill injects the run's values below this cell)
config_path = ""  # the resolved config.yaml of a run; empty: results/<profile>/config.yaml from ./run_all.sh
profile = "smoke"  # whose results to read when config_path is empty: a profile (smoke, ci, paper) or run folder
force = False  # True: redo finished work (per-slide ledgers, stores, checkpoints) instead of reusing it


# %%
import matplotlib
from IPython.display import Image, display

from exaonepath_core.stages import s01_tile
from exaonepath_core.stages.results import open_stage

matplotlib.use("Agg")
cfg, paths = open_stage('01', config_path, profile)


# %% [markdown]
# ## Tiling with a per-slide ledger (rerun skips finished slides; failed ones retried with `force`)


# %%
tiled = s01_tile.run(cfg, paths, force=force)
print(tiled.slides.groupby(["source", "split"]).size().rename("slides").to_string())
display(tiled.summary)


# %%
failed = tiled.ledger[tiled.ledger.status != "ok"]
print(f"{len(tiled.ledger)} slides, {int((tiled.ledger.status == 'ok').sum())} ok, {len(failed)} failed, "
      f"{int(tiled.ledger.n_tiles.fillna(0).sum())} tiles")
if len(failed):
    display(failed)


# %% [markdown]
# ## QC: tissue mask and tile grid


# %%
for png in tiled.qc_images:
    display(Image(filename=str(png)))


# %% [markdown]
# ## The synthetic cohort: example tiles per tissue class (rows) and per site (columns)


# %%
if tiled.synthetic_examples is not None:
    display(Image(filename=str(tiled.synthetic_examples)))
