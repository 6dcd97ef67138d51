# %% [markdown]
# # 05 · Linear probes
#
# L2 logistic regression on frozen features (regularisation chosen on the validation split, or where there
# is none on 20% of train, held-out patients when the ids name TCGA patients), kNN (k=20, cosine) as a
# second view; top-1 accuracy (the paper's metric), balanced accuracy, macro F1, AUROC, each with a
# bootstrap 95% interval (resampling patients where known), over several seeds (`seeds_differ` says whether
# they changed anything but the bootstrap). Absent datasets are listed as absent, never faked. Outputs:
# `results/<profile>/05_probes/`.


# %% tags=["parameters"]
# Parameters (papermill injects the run's values below this cell)
config_path = ""  # the resolved config.yaml of a run; empty: results/<profile>/config.yaml from ./run_all.sh
profile = "smoke"  # whose results to read when config_path is empty: a profile (smoke, ci, paper) or run folder


# %%
import matplotlib
from IPython.display import Image, display

from exaonepath_core.stages import s05_probes
from exaonepath_core.stages.results import open_stage

matplotlib.use("Agg")
cfg, paths = open_stage('05', config_path, profile)


# %%
probed = s05_probes.run(cfg, paths)
display(probed.summary)


# %%
display(Image(filename=str(probed.figure)))
