# %% [markdown]
# # 04 · Frozen features
#
# Every backbone (each pretraining arm's teacher, plus any configured timm model or the official EXAONEPath
# checkpoint) embeds every dataset once with its own preprocessing: the held-out synthetic slides (slide,
# site and tissue labels known), the held-out real slides (`heldout_slides`: `data.heldout_slides_per_site`
# per site or `data.heldout_list`, at most `features.max_tiles_per_heldout_slide` tiles each; slide and site
# known, no tissue labels, so they feed the collapse metrics of stage 06 and no probe) and each real
# downstream dataset present on disk. `datasets.csv` counts what was left out and why. Outputs:
# `results/<profile>/04_features/<backbone>/<dataset>/<split>/`.


# %% tags=["parameters"]
# Parameters (papermill injects the run's values below this cell)
config_path = ""  # the resolved config.yaml of a run; empty: results/<profile>/config.yaml from ./run_all.sh
profile = "smoke"  # whose results to read when config_path is empty: a profile (smoke, ci, paper) or run folder
force = False  # True: redo finished work (per-slide ledgers, stores, checkpoints) instead of reusing it


# %%
import matplotlib
from IPython.display import display

from exaonepath_core.stages import s04_features
from exaonepath_core.stages.results import open_stage

matplotlib.use("Agg")
cfg, paths = open_stage('04', config_path, profile)


# %%
embedded = s04_features.run(cfg, paths, force=force)
display(embedded.index)
