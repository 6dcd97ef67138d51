"""Figures: valid PNGs of the expected layout; embeddings; atomic tables."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from exaonepath_core import collapse, figures


def _png_size(path) -> tuple[int, int]:
    with Image.open(path) as image:
        image.verify()  # raises on a truncated or corrupt PNG
    with Image.open(path) as image:
        assert image.format == "PNG"
        return image.size


def _features(seed: int = 0, n_slides: int = 6, per_slide: int = 30, dim: int = 16):
    rng = np.random.default_rng(seed)
    slides = np.repeat(np.arange(n_slides), per_slide)
    classes = rng.integers(0, 3, slides.size)
    features = 4.0 * rng.standard_normal((n_slides, dim))[slides] + rng.standard_normal((slides.size, dim))
    return features, slides, classes, slides % 2


def test_embedding_pca_and_tsne_keep_slide_structure():
    features, slides, _, _ = _features()
    for method in ("pca", "tsne"):
        xy = figures.embedding_2d(features, method=method, seed=0)
        assert xy.shape == (len(features), 2) and np.isfinite(xy).all()
        centres = np.stack([xy[slides == s].mean(0) for s in range(6)])
        within = np.mean([np.linalg.norm(xy[slides == s] - centres[s], axis=1).mean() for s in range(6)])
        between = np.linalg.norm(centres[:, None] - centres[None], axis=2)[np.triu_indices(6, 1)].mean()
        assert between > 2 * within, method  # slide clusters stay apart in 2-D


def test_embedding_subsamples_with_nan_rows():
    features, _, _, _ = _features()
    xy = figures.embedding_2d(features, method="pca", max_points=50, seed=3)
    shown = np.isfinite(xy).all(1)
    assert shown.sum() == 50 and np.isnan(xy[~shown]).all()
    with pytest.raises(ValueError, match="method"):
        figures.embedding_2d(features, method="umap")


def test_plot_embeddings_by_arm_writes_a_grid_png(tmp_path):
    features, slides, classes, sites = _features()
    xy = figures.embedding_2d(features, method="pca", max_points=120)
    embeds = {
        "raw": (xy, slides, classes, sites),
        "macenko": (xy[::-1].copy(), slides, None, sites),
        "stain_augmentation": (xy, [f"s{s}" for s in slides], classes, None),
    }
    out = figures.plot_embeddings_by_arm(embeds, tmp_path / "sub" / "embeddings.png")
    width, height = _png_size(out)
    assert width > height  # 3 arm columns x 3 rows of 4.0 x 3.8 inches
    single = figures.plot_embeddings_by_arm({"raw": (xy, slides, None, None)}, tmp_path / "one.png")
    w1, h1 = _png_size(single)
    assert width > 2 * w1 and height > 2 * h1
    assert not list(tmp_path.rglob(".*.png"))  # no temporary files left behind
    with pytest.raises(ValueError, match="slide_ids"):
        figures.plot_embeddings_by_arm({"raw": (xy, slides[:-1], None, None)}, tmp_path / "bad.png")


def test_plot_collapse_bars_from_real_metrics(tmp_path):
    tables = []
    for arm, strength in (("raw", 4.0), ("macenko", 0.5)):
        features, slides, classes, sites = _features(seed=1)
        rng = np.random.default_rng(2)
        features = strength * rng.standard_normal((6, 16))[slides] + rng.standard_normal((len(slides), 16))
        table = collapse.collapse_metrics(features, slides, classes, sites, k=5, n_boot=50)
        tables.append(table.assign(arm=arm))
    metrics_df = pd.concat(tables, ignore_index=True)
    raw = metrics_df[(metrics_df.arm == "raw") & (metrics_df.metric == collapse.SAME_SLIDE_NEIGHBOURS)]
    normalized = metrics_df[(metrics_df.arm == "macenko") & (metrics_df.metric == collapse.SAME_SLIDE_NEIGHBOURS)]
    assert raw["value"].item() > normalized["value"].item()
    out = figures.plot_collapse_bars(metrics_df, tmp_path / "bars.png")
    width, height = _png_size(out)
    assert width > 800 and height > 600  # 4 columns x 3 rows of panels for 12 metrics
    with pytest.raises(ValueError, match="arm"):
        figures.plot_collapse_bars(metrics_df.drop(columns="arm"), tmp_path / "x.png")


def test_save_table_csv_and_markdown(tmp_path):
    df = pd.DataFrame({"metric": ["a|b", "c"], "value": [0.123456, float("nan")], "n": [3, 4]})
    csv = figures.save_table(df, tmp_path / "t.csv", tmp_path / "t.md")
    back = pd.read_csv(csv)
    assert back["metric"].tolist() == ["a|b", "c"] and back["n"].tolist() == [3, 4]
    assert back["value"].iloc[0] == pytest.approx(0.123456) and np.isnan(back["value"].iloc[1])
    lines = (tmp_path / "t.md").read_text().splitlines()
    assert lines[0] == "| metric | value | n |" and lines[1] == "| --- | --- | --- |"
    assert lines[2] == "| a\\|b | 0.1235 | 3 |" and lines[3] == "| c |  | 4 |"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["t.csv", "t.md"]


def test_set_style_applies_house_rc():
    import matplotlib

    with matplotlib.rc_context():
        figures.set_style()
        assert matplotlib.rcParams["savefig.dpi"] == figures.DPI
        assert matplotlib.rcParams["axes.spines.top"] is False
