"""Probes and metrics: agreement with sklearn, bootstrap intervals, tables, and the real-data PCam probe."""
from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from PIL import Image
from sklearn.metrics import accuracy_score, balanced_accuracy_score, f1_score, roc_auc_score

from exaonepath_core.data.downstream.datasets import PAPER_ACCURACY, get_dataset
from exaonepath_core.evaluation import probes
from exaonepath_core.evaluation.features import extract_features
from exaonepath_core.evaluation.probes import (
    knn_probe,
    linear_head_probe,
    logistic_probe,
    metrics,
    plot_probe_results,
    run_probes,
    summary_table,
)
from exaonepath_core.io import atomic
from exaonepath_core.models.backbones import load_backbone, make_transform


def _blobs(n: int, n_classes: int, dim: int, separation: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(n_classes, dim)) * separation
    y = rng.integers(0, n_classes, n)
    return (centers[y] + rng.normal(size=(n, dim))).astype(np.float32), y


def test_metrics_match_sklearn_and_intervals_cover():
    rng = np.random.default_rng(0)
    y_true = rng.integers(0, 3, 400)
    y_pred = np.where(rng.random(400) < 0.7, y_true, rng.integers(0, 3, 400))
    out = metrics(y_true, y_pred, n_boot=300, seed=1)
    assert set(out) == {"accuracy", "balanced_accuracy", "macro_f1"}  # no AUROC for 3 classes
    assert out["accuracy"]["value"] == pytest.approx(accuracy_score(y_true, y_pred), abs=1e-12)
    assert out["balanced_accuracy"]["value"] == pytest.approx(balanced_accuracy_score(y_true, y_pred), abs=1e-12)
    assert out["macro_f1"]["value"] == pytest.approx(f1_score(y_true, y_pred, average="macro"), abs=1e-12)
    for values in out.values():
        assert values["ci_low"] < values["value"] < values["ci_high"]
        assert values["ci_high"] - values["ci_low"] < 0.15
    y_bin = rng.integers(0, 2, 300)
    score = np.clip(y_bin * 0.3 + rng.random(300), 0, None).round(1)  # ties on purpose
    binary = metrics(y_bin, (score > 0.65).astype(int), np.stack([1 - score, score], 1), n_boot=100)
    assert binary["auroc"]["value"] == pytest.approx(roc_auc_score(y_bin, score), abs=1e-12)
    # a class never predicted and one never present: sklearn's macro-F1 conventions
    y_true2, y_pred2 = np.array([0, 0, 1, 1, 2]), np.array([0, 0, 1, 0, 3])
    assert metrics(y_true2, y_pred2, n_boot=0)["macro_f1"]["value"] == pytest.approx(
        f1_score(y_true2, y_pred2, average="macro", zero_division=0), abs=1e-12)


def test_probes_on_separable_and_random_features():
    Xtr, ytr = _blobs(300, 3, 16, 1.5, 0)
    Xva, yva = _blobs(100, 3, 16, 1.5, 0)
    Xte, yte = _blobs(200, 3, 16, 1.5, 0)
    logistic = logistic_probe(Xtr, ytr, Xva, yva, Xte, yte, seed=0, n_boot=50)
    assert logistic["selection"] == "val" and logistic["metrics"]["accuracy"]["value"] > 0.9
    no_val = logistic_probe(Xtr, ytr, None, None, Xte, yte, seed=0, n_boot=50)
    assert no_val["selection"] == "train_split" and no_val["metrics"]["accuracy"]["value"] > 0.9
    head = linear_head_probe(Xtr, ytr, Xva, yva, Xte, yte, epochs=30, batch_size=64, lr=1e-2, n_boot=50)
    assert head["metrics"]["accuracy"]["value"] > 0.9
    knn = knn_probe(Xtr, ytr, Xte, yte, k=20, n_boot=50)
    assert knn["metrics"]["accuracy"]["value"] > 0.9 and np.allclose(knn["y_score"].sum(1), 1)
    # labels independent of features: every probe stays near chance (1/3)
    rng = np.random.default_rng(5)
    shuffled = logistic_probe(Xtr, rng.permutation(ytr), None, None, Xte, rng.permutation(yte), n_boot=50)
    assert shuffled["metrics"]["accuracy"]["value"] < 0.5
    with pytest.raises(ValueError, match="not finite"):
        knn_probe(np.full_like(Xtr, np.nan), ytr, Xte, yte)


def _write_feature_folder(path, X, y, class_names):
    path.mkdir(parents=True)
    np.save(path / "features.npy", X.astype(np.float32))
    np.save(path / "labels.npy", y.astype(np.int64))
    (path / "sample_ids.txt").write_text("".join(f"s{i}\n" for i in range(len(y))))
    (path / "manifest.json").write_text(json.dumps({"n": len(y), "dim": X.shape[1], "class_names": class_names}))


def test_run_probes_summary_and_plot(tmp_path):
    dirs = {}
    for backbone, separation in (("strong", 2.0), ("weak", 0.2)):
        dirs[backbone] = {}
        for split, seed in (("train", 1), ("test", 2)):
            X, y = _blobs(150, 2, 8, separation, seed if backbone == "strong" else seed + 10)
            # same class centres for train and test: regenerate with a shared centre seed
            rng = np.random.default_rng(100 + (backbone == "weak"))
            centers = rng.normal(size=(2, 8)) * separation
            X = centers[y] + np.random.default_rng(seed).normal(size=X.shape)
            _write_feature_folder(tmp_path / backbone / split, X, y, ["a", "b"])
            dirs[backbone][split] = tmp_path / backbone / split
    df = run_probes("toy", dirs, seeds=(0, 1), n_boot=50)
    assert list(df.columns[:8]) == ["task", "backbone", "probe", "seed", "metric", "value", "ci_low", "ci_high"]
    assert len(df) == 2 * 2 * 2 * 4  # backbones x probes x seeds x metrics (binary: with AUROC)
    accuracy = df[df.metric == "accuracy"].groupby("backbone")["value"].mean()
    assert accuracy["strong"] > 0.9 and accuracy["weak"] < accuracy["strong"] - 0.2
    table = summary_table(df, available={"pcam": "absent: no root configured", "mhist": "present"})
    present = table[table.status == "present"]
    assert set(present.task) == {"toy"} and (present.n_seeds == 2).all()
    # kNN is deterministic: its two seeds only move the bootstrap, which the table says instead of a std of 0
    knn = present[present.probe == "knn"]
    assert not knn.seeds_differ.any() and (knn["std"] == 0).all()
    absent = table.set_index("task").loc[list(PAPER_ACCURACY)]
    assert absent["mean"].isna().all()  # never faked
    assert absent.loc["pcam", "status"] == "absent: no root configured"
    assert absent.loc["mhist", "status"] == "absent: present on disk but not probed"
    assert absent.loc["crc100k", "paper_accuracy"] == pytest.approx(0.946)
    csv_path = atomic.write_csv(df, tmp_path / "out" / "probes.csv")
    assert len(pd.read_csv(csv_path)) == len(df)
    png = plot_probe_results(df, tmp_path / "out" / "probes.png")
    with Image.open(png) as image:
        assert image.size[0] > 400 and image.size[1] > 300


def test_plot_falls_back_to_knn_per_task_and_never_fails_on_no_results(tmp_path):
    """A task with kNN rows only (too small for a logistic probe) is plotted with its kNN bars; no rows at all
    gives a figure that says so, instead of stopping stage 05."""
    rows = []
    for task, probe, value in [("big", "logistic", 0.9), ("big", "knn", 0.8), ("small", "knn", 0.6)]:
        for seed in (0, 1):
            rows.append({"task": task, "backbone": "b", "probe": probe, "seed": seed, "metric": "accuracy",
                         "value": value + 0.01 * seed, "ci_low": value - 0.05, "ci_high": value + 0.05})
    df = pd.DataFrame(rows)
    png = plot_probe_results(df, tmp_path / "mixed.png")
    empty = plot_probe_results(df.iloc[0:0], tmp_path / "empty.png")
    for path in (png, empty):
        with Image.open(path) as image:
            assert image.size[0] > 400 and image.size[1] > 300
    # the mixed figure has bars for both tasks: it differs from the empty one, and pixels in two bar columns
    mixed = np.asarray(Image.open(png).convert("L"), dtype=float)
    blank = np.asarray(Image.open(empty).convert("L"), dtype=float)
    assert mixed.shape != blank.shape or np.abs(mixed - blank).mean() > 1.0
    one_seed = summary_table(df[df.seed == 0])
    two_seeds = summary_table(df)
    assert one_seed.loc[one_seed.task == "big", "std"].isna().all()  # one seed: no spread claimed
    assert two_seeds.loc[(two_seeds.task == "big") & (two_seeds.probe == "logistic"), "std"].iloc[0] == \
        pytest.approx(0.005)
    assert two_seeds.loc[two_seeds.task == "big", "seeds_differ"].all()


def test_real_pcam_subset_probe_beats_chance(shared_data, tmp_path):
    """Frozen random-init ResNet-18 features of real PCam patches: the linear probe clears 0.70 test accuracy.

    No pretrained weights exist offline; random convolutional features still carry colour/texture statistics
    (a colour-histogram baseline reaches about 0.82 here). Measured: 0.786 [0.748, 0.818] test accuracy.
    """
    root = shared_data / "patches" / "pcam_subset"
    model, info = load_backbone({"kind": "timm", "model_name": "resnet18", "input_size": 96, "seed": 0})
    transform = make_transform(info)
    dirs = {}
    # stratified subsets of train/valid keep the default test run short; the whole test split is used
    for split, role, size in (("train", "train", 1000), ("valid", "val", 200), ("test", "test", 0)):
        dataset = get_dataset("pcam_subset", root, split, strict=True).subset(size, seed=0)
        dirs[role] = extract_features(model, transform, dataset, tmp_path / split, batch_size=100, progress=False,
                                      backbone_info=info)
    df = run_probes("pcam_subset", {info.name: dirs}, seeds=(0,), probes=("logistic",), n_boot=200)
    accuracy = df[df.metric == "accuracy"].iloc[0]
    print(f"pcam_subset logistic probe on random resnet18: {accuracy.value:.3f} "
          f"[{accuracy.ci_low:.3f}, {accuracy.ci_high:.3f}] {accuracy.hparam}")
    assert accuracy.value >= 0.70
    assert accuracy.n_test == 500 and accuracy.n_train == 1000
    assert accuracy.ci_low > 0.5
    auroc = df[df.metric == "auroc"].iloc[0]
    assert auroc.value > 0.75


def test_hyperparameters_without_a_val_split_are_chosen_on_held_out_patients():
    # MSI-like: labels per patient, a strong per-patient signature, a weak label direction; ids carry the
    # TCGA barcode as Kather's tiles do
    rng = np.random.default_rng(0)

    def cohort(n_patients, per_patient, offset):
        label = rng.integers(0, 2, n_patients)
        X = np.repeat(rng.normal(0, 3, (n_patients, 64)), per_patient, 0) + rng.normal(0, 1, (n_patients * per_patient, 64))
        y = np.repeat(label, per_patient)
        X[:, 0] += 0.8 * (2 * y - 1)
        ids = [f"MSIMUT/blk-{p}x{k}-TCGA-A{(p + offset) % 10}-{1000 + p + offset:04d}-01Z-00-DX1.png"
               for p in range(n_patients) for k in range(per_patient)]
        return X, y, ids

    Xtr, ytr, ids = cohort(60, 40, 0)
    Xte, yte, _ = cohort(30, 40, 500)
    groups = probes.patient_groups(ids)
    assert len(set(groups)) == 60 and probes.patient_groups(["ADI-AAAFLCLY.tif"]) is None
    fit, val, how = probes._validation_split(Xtr, ytr, 0, groups=groups)
    assert how == "train_split_by_patient" and not set(groups[fit]) & set(groups[val])
    assert len(val) == pytest.approx(0.2 * len(ytr), rel=0.25)

    leaky = probes.logistic_probe(Xtr, ytr, None, None, Xte, yte, seed=0, n_boot=10)
    grouped = probes.logistic_probe(Xtr, ytr, None, None, Xte, yte, seed=0, n_boot=10, groups=groups)
    assert (leaky["selection"], grouped["selection"]) == ("train_split", "train_split_by_patient")
    # the patch-level split memorises patients: it rates weak regularisation ~0.94 while new patients get ~0.47
    leaky_test = leaky["metrics"]["accuracy"]["value"]
    assert leaky["val_scores"][leaky["C"]] - leaky_test > 0.3
    assert grouped["C"] < leaky["C"] and grouped["metrics"]["accuracy"]["value"] > leaky_test + 0.03
    assert abs(grouped["val_scores"][grouped["C"]] - grouped["metrics"]["accuracy"]["value"]) < 0.15


def test_intervals_resample_whole_patients_when_ids_name_them():
    # 20 patients x 50 patches; each patient's patches are all right or all wrong (14 of 20 right)
    y_true = np.zeros(1000, dtype=np.int64)
    y_pred = np.repeat((np.arange(20) >= 14).astype(np.int64), 50)
    groups = np.repeat([f"TCGA-AA-{p:04d}" for p in range(20)], 50)
    by_patch = metrics(y_true, y_pred, n_boot=400, seed=0, n_classes=2)["accuracy"]
    by_patient = metrics(y_true, y_pred, n_boot=400, seed=0, n_classes=2, groups=groups)["accuracy"]
    assert by_patch["value"] == by_patient["value"] == pytest.approx(0.7)
    # patch resampling treats 1000 patches as independent (half-width ~0.03); 20 patients give ~0.2
    assert by_patch["ci_high"] - by_patch["ci_low"] < 0.08
    assert by_patient["ci_high"] - by_patient["ci_low"] > 0.25
    assert by_patient["ci_low"] < 0.55 and by_patient["ci_high"] > 0.85
    with pytest.raises(ValueError, match="groups"):
        metrics(y_true, y_pred, n_boot=5, groups=groups[:10])


def test_a_feature_folder_without_its_test_split_is_listed_not_dropped(tmp_path):
    from exaonepath_core.stages import workflow

    for backbone, splits in (("raw", ("train", "test")), ("macenko", ("train",)), ("untrained_raw", ("test",))):
        for split in splits:
            (tmp_path / backbone / "crc_subset" / split).mkdir(parents=True)
            (tmp_path / backbone / "crc_subset" / split / "manifest.json").write_text("{}")
    weights = tmp_path / "untrained_backbones" / "raw"  # stage 04 keeps the untrained weights here: not features
    weights.mkdir(parents=True)
    (weights / "teacher_backbone.pth").write_bytes(b"weights")
    tasks, incomplete = workflow.probe_feature_dirs(tmp_path)
    assert list(tasks) == ["crc_subset"] and list(tasks["crc_subset"]) == ["raw"]
    assert incomplete == [{"task": "crc_subset", "backbone": "macenko", "missing": "test"},
                          {"task": "crc_subset", "backbone": "untrained_raw", "missing": "train"}]
    summary = workflow.probe_summary(pd.DataFrame(), tmp_path)
    rows = summary[summary.task == "crc_subset"].set_index("backbone")["status"]
    assert rows.to_dict() == {
        "macenko": "not probed: no test split features (see stage 04's datasets.csv)",
        "untrained_raw": "not probed: no train split features (see stage 04's datasets.csv)"}


def test_chance_per_task_is_the_test_majority_rate_and_is_drawn(tmp_path):
    from exaonepath_core.stages import workflow

    for split, labels in (("train", [0, 1, 1, 2]), ("test", [0, 0, 0, 1, 2, 2, 1, 0])):
        d = tmp_path / "feats" / "raw" / "crc" / split
        d.mkdir(parents=True)
        (d / "manifest.json").write_text("{}")
        np.save(d / "labels.npy", np.asarray(labels))
    assert workflow.task_chance(tmp_path / "feats") == {"crc": 0.5}
    results = pd.DataFrame([{"task": "crc", "backbone": "raw", "probe": "logistic", "seed": 0, "metric": "accuracy",
                             "value": 0.7, "ci_low": 0.6, "ci_high": 0.8}])
    out = probes.plot_probe_results(results, tmp_path / "bars.png", chance={"crc": 0.5})
    with Image.open(out) as im:
        assert im.size[0] > 500
    summary = workflow.probe_summary(pd.DataFrame([{**results.iloc[0], "value": 0.71599999999}]), tmp_path / "feats")
    assert summary.loc[summary.task == "crc", "mean"].item() == 0.716  # rounded for reading
    noted = results.assign(probe="knn", note="kNN only (k=3): 4 training samples, smallest class 1")
    summary = workflow.probe_summary(noted, tmp_path / "feats").set_index("task")
    assert summary.loc["crc", "note"] == "kNN only (k=3): 4 training samples, smallest class 1"
