# %% [markdown]
# # 07 · Figures and tables
#
# Gathers every stage's outputs: the probe table beside the paper's reported numbers, the collapse figure
# per arm, QC figures and training curves, and writes `results/<profile>/index.html` linking each with one
# line of context.


# %% tags=["parameters"]
# Parameters (papermill injects the run's values below this cell)
config_path = ""  # the resolved config.yaml of a run; empty: results/<profile>/config.yaml from ./run_all.sh
profile = "smoke"  # whose results to read when config_path is empty: a profile (smoke, ci, paper) or run folder


# %%
import matplotlib
from IPython.display import display

from exaonepath_core.stages import s07_report
from exaonepath_core.stages.results import open_stage

matplotlib.use("Agg")
cfg, paths = open_stage('07', config_path, profile)


# %%
index, items, tables = s07_report.run(cfg, paths)
print(index, len(items), "items")
display(tables.get("paper_table"))
