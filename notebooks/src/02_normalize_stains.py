# %% [markdown]
# # 02 · Normalize stains (Macenko) into patch stores
#
# The paper normalizes every patch with Macenko (Io=240, alpha=1, beta=0.15) before pretraining. We write
# the pretraining slides' tiles once into sharded stores, one per input (`raw`, `macenko`): JPEG-encoded
# patches in tar shards with a memory-mapped index (`normalize.store_format`), plus a storeless coordinate
# index; degenerate patches (background) pass through unchanged and are counted, never dropped. Outputs:
# `results/<profile>/02_normalize/`.


# %% tags=["parameters"]
# Parameters (papermill injects the run's values below this cell)
config_path = ""  # the resolved config.yaml of a run; empty: results/<profile>/config.yaml from ./run_all.sh
profile = "smoke"  # whose results to read when config_path is empty: a profile (smoke, ci, paper) or run folder
force = False  # True: redo finished work (per-slide ledgers, stores, checkpoints) instead of reusing it


# %%
import matplotlib
import numpy as np
from IPython.display import Image, display

from exaonepath_core.stages import s02_normalize
from exaonepath_core.stages.results import open_stage

matplotlib.use("Agg")
cfg, paths = open_stage('02', config_path, profile)


# %%
normalized = s02_normalize.run(cfg, paths, force=force)
reference = normalized.reference
print("reference stain matrix (columns H, E):\n", np.round(reference.stain_matrix, 4),
      "\nmax concentrations:", np.round(reference.max_concentrations, 4))
print("storeless index:", normalized.storeless_patches, "patches")
display(normalized.summary)


# %% [markdown]
# ## QC: before / after Macenko for several slides


# %%
if normalized.stain_qc is not None:
    display(Image(filename=str(normalized.stain_qc)))
else:
    print("no pretraining tile to show (no train slide gave a tile; see 01_tiles/tiling_summary.csv)")
