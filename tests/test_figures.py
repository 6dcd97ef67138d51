"""Figures: valid PNGs of the expected layout; embeddings; atomic tables."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from exaonepath_core.data.tiling.coords import TileSet
from exaonepath_core.data.tiling.qc import plot_tiling_qc
from exaonepath_core.evaluation import collapse
from exaonepath_core.io import plotting
from exaonepath_core.report import figures


@pytest.fixture
def saved_figures(monkeypatch):
    """The matplotlib Figures the plot functions save (they return only the PNG path)."""
    from matplotlib.figure import Figure

    captured = []
    original = Figure.savefig

    def recording_savefig(self, *args, **kwargs):
        captured.append(self)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(Figure, "savefig", recording_savefig)
    return captured


def _overlapping_pairs(texts) -> list[tuple[str, str]]:
    """Pairs of drawn text artists whose window boxes intersect (the figure must have been drawn)."""
    shown = [t for t in texts if t.get_visible() and t.get_text()]
    boxes = [t.get_window_extent() for t in shown]
    return [(shown[i].get_text(), shown[j].get_text())
            for i in range(len(boxes)) for j in range(i + 1, len(boxes)) if boxes[i].overlaps(boxes[j])]


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


def test_embedding_records_its_method():
    features, _, _, _ = _features()
    xy = figures.embedding_2d(features, method="pca", max_points=100)
    assert xy.method == "pca" and xy[::-1].copy().method == "pca" and xy[np.isfinite(xy).all(1)].method == "pca"
    assert type(xy * 2.0) is np.ndarray and type(np.isfinite(xy).all()) is np.bool_  # results are plain arrays


def test_embeddings_figure_names_method_and_point_count(tmp_path, saved_figures):
    features, slides, classes, sites = _features()  # 180 points
    xy = figures.embedding_2d(features, method="pca", max_points=120)
    figures.plot_embeddings_by_arm({"raw": (xy, slides, classes, sites), "macenko": (xy, slides, classes, sites)},
                                   tmp_path / "e.png")
    title = saved_figures[-1]._suptitle.get_text().replace("\n", " ")
    assert title.startswith("PCA") and "120 of 180 points per arm" in title
    panels = [ax.get_title() for ax in saved_figures[-1].axes if ax.get_title()]
    assert "raw: by slide (6 slides)" in panels and "macenko: by class (3 classes)" in panels
    # a plain array names no method unless the caller passes one; unequal arms list each count
    plain = np.asarray(xy)
    figures.plot_embeddings_by_arm({"a": (plain, slides, None, None), "b": (plain[:90], slides[:90], None, None)},
                                   tmp_path / "f.png", method="tsne")
    title = saved_figures[-1]._suptitle.get_text().replace("\n", " ")
    in_b = int(np.isfinite(plain[:90]).all(1).sum())
    assert title.startswith("t-SNE") and f"a 120 of 180, b {in_b} of 90" in title
    figures.plot_embeddings_by_arm({"a": (plain, slides, None, None)}, tmp_path / "g.png")
    assert "method not recorded" in saved_figures[-1]._suptitle.get_text().replace("\n", " ")
    tsne = figures.Embedding2D(plain, "tsne")
    with pytest.raises(ValueError, match="different methods"):
        figures.plot_embeddings_by_arm({"a": (xy, slides, None, None), "b": (tsne, slides, None, None)},
                                       tmp_path / "h.png")


def test_collapse_bars_labels_do_not_overlap(tmp_path, saved_figures):
    metric_names = [*collapse.SLIDE_METRICS, *collapse.CLASS_METRICS, *collapse.SITE_METRICS]
    assert set(metric_names) <= set(figures.METRIC_DISPLAY_NAMES)  # every real metric has a readable title
    assert len(set(figures.METRIC_DISPLAY_NAMES.values())) == len(figures.METRIC_DISPLAY_NAMES)
    for arms in (["raw", "macenko", "stain_augmentation"],
                 ["raw", "macenko", "stain_augmentation", "hue_jitter_strong", "timm:vit_base_patch16_224"]):
        rows = [{"arm": arm, "metric": m, "value": 0.2 + 0.1 * i, "ci_low": 0.1, "ci_high": 0.5 + 0.1 * i,
                 "chance": 0.125} for i, arm in enumerate(arms) for m in metric_names]
        figures.plot_collapse_bars(pd.DataFrame(rows), tmp_path / "bars.png")
        figure = saved_figures[-1]
        figure.canvas.draw()
        axes = [ax for ax in figure.axes if ax.get_visible()]
        assert len(axes) == 12
        texts = [t for ax in axes for t in (*ax.get_xticklabels(), ax.title, *ax.texts)]  # texts: "chance"
        assert _overlapping_pairs(texts) == []
        titles = [ax.get_title().replace("\n", " ") for ax in axes]
        assert "k-NN class accuracy, other slides" in titles and "same-slide neighbours (k-NN fraction)" in titles
        ticks = [t.get_text().replace("\n", "") for t in axes[0].get_xticklabels()]
        assert ticks == arms  # wrapped at '_' / ':', nothing dropped


def test_tiling_qc_legend_names_mask_and_tiles(tmp_path, saved_figures):
    thumbnail = np.full((100, 150, 3), 235, np.uint8)
    mask = np.zeros((100, 150), bool)
    mask[20:80, 30:120] = True  # 36% of the thumbnail
    coords = np.array([[x, y] for y in range(800, 3200, 448) for x in range(1200, 4800, 448)])
    plot_tiling_qc("/nowhere/slide_a.svs", coords, mask, tmp_path / "qc.png", thumbnail=thumbnail,
                   level0_patch_size=448, level0_dimensions=(6000, 4000))
    legend = saved_figures[-1].axes[0].get_legend()
    assert [t.get_text() for t in legend.get_texts()] == ["tissue mask (36% of slide)", f"tiles kept ({len(coords)})"]
    assert saved_figures[-1].axes[0].get_title() == f"slide_a: {len(coords)} tiles of 448 px at level 0"
    tile_set = TileSet(slide_id="slide_a", slide_path="/nowhere/slide_a.svs", coords=coords[:5],
                       tissue_fraction=np.ones(5, np.float32), tile_size=224, level0_patch_size=448,
                       read_level=0, read_size=448, target_mpp=0.5, source_mpp=0.25)
    plot_tiling_qc("/nowhere/slide_a.svs", tile_set, None, tmp_path / "qc2.png", thumbnail=thumbnail,
                   level0_dimensions=(6000, 4000))
    axis = saved_figures[-1].axes[0]
    assert [t.get_text() for t in axis.get_legend().get_texts()] == ["tiles kept (5)"]  # no mask given: no entry
    assert "5 tiles of 224 px at 0.5 um/px = 448 px at level 0" in axis.get_title()


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
        plotting.set_style()
        assert matplotlib.rcParams["savefig.dpi"] == plotting.DPI
        assert matplotlib.rcParams["axes.spines.top"] is False
