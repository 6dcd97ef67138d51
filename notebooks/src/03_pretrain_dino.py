# %% [markdown]
# # 03 · DINO pretraining (one arm per run)
#
# The runner executes this notebook once per arm (`raw`, `macenko` = the paper, `stain_augmentation`), each
# with the same seed, data order and steps. Training runs in a subprocess through `torchrun` (DDP) or plain
# python; an interrupted run resumes from its last checkpoint. Outputs:
# `results/<profile>/03_pretrain/<arm>/`.


# %% tags=["parameters"]
# Parameters (papermill injects the run's values below this cell)
config_path = ""  # the resolved config.yaml of a run; empty: results/<profile>/config.yaml from ./run_all.sh
profile = "smoke"  # whose results to read when config_path is empty: a profile (smoke, ci, paper) or run folder
force = False  # True: redo finished work (per-slide ledgers, stores, checkpoints) instead of reusing it
arm = "macenko"  # the arm this run pretrains (the runner: each of cfg.arms)


# %%
import matplotlib
from IPython.display import Image, display

from exaonepath_core.stages import s03_pretrain
from exaonepath_core.stages.results import open_stage

matplotlib.use("Agg")
cfg, paths = open_stage('03', config_path, profile)


# %%
pretrained = s03_pretrain.run(cfg, paths, arm, force=force)
print(pretrained.pretrain_yaml.read_text())
display(pretrained.summary)


# %% [markdown]
# ## Training curves: loss, schedules, teacher entropy and centre (collapse watch)


# %%
display(Image(filename=str(pretrained.training_curves)))
