# %% [markdown]
# # 06 · WSI-specific feature collapse, measured
#
# On features of held-out slides: slide-ID probe accuracy (vs chance), same-slide fraction among the k
# nearest neighbours, silhouette by slide and by class, and the within-slide vs leave-one-slide-out kNN gap,
# with bootstrap intervals over slides; per-site versions. The paper's claim: normalization lowers slide
# identifiability while tissue class stays predictable. Each cohort present is measured: `synthetic`
# (held-out synthetic slides, tissue labels known) and `real` (held-out real slides of the paper profile:
# slide and site ids from the tiling stage, no tissue labels, so the class metrics are rows with a `skipped:
# no tissue labels` note and the verdict checks slide identity only). Outputs:
# `results/<profile>/06_collapse/` (`collapse_metrics.csv` and `collapse_verdict.csv` with a `cohort`
# column; figures `collapse_metrics.png` / `embeddings_by_arm.png` for the synthetic cohort, `*_real.png`
# for the real one).


# %% tags=["parameters"]
# Parameters (papermill injects the run's values below this cell)
config_path = ""  # the resolved config.yaml of a run; empty: results/<profile>/config.yaml from ./run_all.sh
profile = "smoke"  # whose results to read when config_path is empty: a profile (smoke, ci, paper) or run folder


# %%
import matplotlib
from IPython.display import Image, display

from exaonepath_core.stages import s06_collapse
from exaonepath_core.stages.results import open_stage

matplotlib.use("Agg")
cfg, paths = open_stage('06', config_path, profile)


# %%
measured = s06_collapse.run(cfg, paths)
if measured.metrics.empty:
    print("nothing to measure: no held-out slide features (see 04_features/datasets.csv)")
else:
    print("arms per cohort:", measured.metrics.groupby("cohort", sort=False).arm.unique().map(list).to_dict())
display(measured.verdict)


# %%
for png in measured.figures:
    display(Image(filename=str(png)))
