"""Probes on frozen features: L2 logistic regression, a torch linear head, weighted kNN; metrics with bootstrap CIs.

Embed once, fit many heads: every probe reads the folders `features.extract_features` wrote. Results are one
long-format table (task, backbone, probe, seed, metric, value, ci_low, ci_high) and a summary beside the
paper's accuracies, where datasets that are not on disk are listed as absent, never filled in.
"""
from __future__ import annotations

import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from exaonepath_core.data.cohort import TCGA_BARCODE
from exaonepath_core.data.downstream.datasets import PAPER_ACCURACY
from exaonepath_core.evaluation.features import load_features
from exaonepath_core.io import plotting

DEFAULT_CS = tuple(np.logspace(-4, 2, 7))
METRIC_NAMES = ("accuracy", "balanced_accuracy", "macro_f1", "auroc")
RESULT_COLUMNS = ("task", "backbone", "probe", "seed", "metric", "value", "ci_low", "ci_high")


# ----------------------------------------------------------------------------------------------------------
# Metrics with bootstrap intervals
# ----------------------------------------------------------------------------------------------------------
def _confusion_metrics(y_true: np.ndarray, y_pred: np.ndarray, n_classes: int) -> tuple[float, float, float]:
    """(accuracy, balanced accuracy, macro F1) from one confusion matrix, sklearn's conventions."""
    confusion = np.bincount(y_true * n_classes + y_pred, minlength=n_classes * n_classes).reshape(
        n_classes, n_classes).astype(np.float64)
    true_pos = np.diag(confusion)
    support, predicted = confusion.sum(axis=1), confusion.sum(axis=0)
    accuracy = true_pos.sum() / max(confusion.sum(), 1.0)
    in_true = support > 0
    balanced = float(np.mean(true_pos[in_true] / support[in_true])) if in_true.any() else float("nan")
    # sklearn's macro F1 averages over labels seen in y_true or y_pred, with 0 where undefined
    seen = in_true | (predicted > 0)
    f1 = np.divide(2 * true_pos, support + predicted, out=np.zeros(n_classes), where=(support + predicted) > 0)
    return float(accuracy), balanced, float(np.mean(f1[seen])) if seen.any() else float("nan")


def _auroc(y_true: np.ndarray, positive_score: np.ndarray) -> float:
    """Binary AUROC via the rank-sum statistic (ties get average ranks); NaN when one class is absent."""
    from scipy.stats import rankdata

    n_pos = int(y_true.sum())
    n_neg = len(y_true) - n_pos
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    ranks = rankdata(positive_score)
    return float((ranks[y_true == 1].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def metrics(y_true: Sequence[int], y_pred: Sequence[int], y_score: np.ndarray | None = None,
            n_boot: int = 200, seed: int = 0, n_classes: int | None = None,
            ci: float = 0.95, groups: Sequence[str] | None = None) -> dict[str, dict[str, float]]:
    """Top-1 accuracy, balanced accuracy, macro F1 and (binary, with scores) AUROC, each with a bootstrap CI.

    Returns {metric: {"value", "ci_low", "ci_high"}}; the interval is the percentile bootstrap over test
    samples (`n_boot` resamples; 0 disables it and the bounds are NaN), or over `groups` (e.g. patients:
    whole patients are resampled, since one patient's patches are not independent) when given.
    """
    y_true = np.asarray(y_true, dtype=np.int64)
    y_pred = np.asarray(y_pred, dtype=np.int64)
    if y_true.shape != y_pred.shape or y_true.ndim != 1 or len(y_true) == 0:
        raise ValueError(f"y_true {y_true.shape} and y_pred {y_pred.shape} must be equal non-empty 1-D arrays")
    n_classes = int(n_classes or max(y_true.max(), y_pred.max()) + 1)
    positive = None
    if y_score is not None and n_classes == 2:
        y_score = np.asarray(y_score, dtype=np.float64)
        positive = y_score[:, 1] if y_score.ndim == 2 else y_score
        if positive.shape != y_true.shape:
            raise ValueError(f"y_score {y_score.shape} does not match y_true {y_true.shape}")

    def compute(index: np.ndarray | slice) -> list[float]:
        values = list(_confusion_metrics(y_true[index], y_pred[index], n_classes))
        if positive is not None:
            values.append(_auroc(y_true[index], positive[index]))
        return values

    point = compute(slice(None))
    names = list(METRIC_NAMES[:len(point)])
    rng = np.random.default_rng(seed)
    if groups is None:
        boots = [compute(rng.integers(0, len(y_true), len(y_true))) for _ in range(n_boot)]
    else:
        groups = np.asarray(groups)
        if groups.shape != y_true.shape:
            raise ValueError(f"groups {groups.shape} does not match y_true {y_true.shape}")
        _, inverse = np.unique(groups, return_inverse=True)
        order = np.argsort(inverse, kind="stable")
        members = np.split(order, np.cumsum(np.bincount(inverse))[:-1])  # sample indices of each group
        boots = [compute(np.concatenate([members[g] for g in rng.integers(0, len(members), len(members))]))
                 for _ in range(n_boot)]
    boots = np.array(boots).reshape(n_boot, len(point))
    alpha = (1 - ci) / 2
    out = {}
    for j, name in enumerate(names):
        column = boots[:, j][np.isfinite(boots[:, j])]
        low, high = (np.quantile(column, [alpha, 1 - alpha]) if len(column) else (np.nan, np.nan))
        out[name] = {"value": float(point[j]), "ci_low": float(low), "ci_high": float(high)}
    return out


# ----------------------------------------------------------------------------------------------------------
# Probes
# ----------------------------------------------------------------------------------------------------------
def _standardize(train: np.ndarray, *others: np.ndarray | None) -> list[np.ndarray | None]:
    """Z-score every array with the train mean/std (constant features keep std 1)."""
    train = np.asarray(train, dtype=np.float64)
    mean = train.mean(axis=0)
    std = train.std(axis=0)
    std[std < 1e-12] = 1.0
    return [(train - mean) / std] + [None if x is None else (np.asarray(x, dtype=np.float64) - mean) / std
                                     for x in others]


def patient_groups(sample_ids: Sequence[str]) -> np.ndarray | None:
    """The TCGA patient (`TCGA-XX-XXXX`) in each sample id, or None when no id names one.

    Kather's MSI tiles (`blk-...-TCGA-A6-2674-01Z-00-DX1.png`) carry their patient's barcode; ids without one
    become their own group. Used to keep one patient's patches on one side of a hyper-parameter split.
    """
    found = [TCGA_BARCODE.search(str(i)) for i in sample_ids]
    if not any(found):
        return None
    return np.array([m.group(0).upper() if m else f"sample:{i}" for m, i in zip(found, sample_ids)])


def _validation_split(X: np.ndarray, y: np.ndarray, seed: int, fraction: float = 0.2,
                      groups: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray, str]:
    """(train_idx, val_idx, how) of a train split, for choosing hyper-parameters when no val split exists.

    Stratified by class; with `groups` (patients) and at least 5 of them, also grouped, so that patches of one
    patient never sit on both sides: a patch-level split rewards memorising patients and picks too weak a
    regularisation on patient-labelled tasks (MSI).
    """
    from sklearn.model_selection import StratifiedGroupKFold, train_test_split

    index = np.arange(len(y))
    counts = np.bincount(y)
    if groups is not None and len(np.unique(groups)) >= 5:
        folds = StratifiedGroupKFold(n_splits=round(1 / fraction), shuffle=True, random_state=seed)
        fit_idx, val_idx = next(folds.split(index, y, groups))
        if len(np.unique(y[fit_idx])) >= 2 and len(val_idx):
            return fit_idx, val_idx, "train_split_by_patient"
    stratify = y if counts[counts > 0].min() >= 2 else None
    fit_idx, val_idx = train_test_split(index, test_size=fraction, random_state=seed, stratify=stratify)
    return fit_idx, val_idx, "train_split"


def _check_inputs(Xtr: np.ndarray, ytr: np.ndarray, Xte: np.ndarray, yte: np.ndarray) -> None:
    if len(Xtr) != len(ytr) or len(Xte) != len(yte):
        raise ValueError(f"features/labels lengths differ: train {len(Xtr)}/{len(ytr)}, test {len(Xte)}/{len(yte)}")
    if Xtr.shape[1] != Xte.shape[1]:
        raise ValueError(f"train and test feature dimensions differ: {Xtr.shape[1]} vs {Xte.shape[1]}")
    for name, X in (("train", Xtr), ("test", Xte)):
        bad = int((~np.isfinite(X)).any(axis=1).sum())
        if bad:
            raise ValueError(f"{bad} {name} feature rows are not finite")
    if len(np.unique(ytr)) < 2:
        raise ValueError("the training labels hold a single class")


def logistic_probe(Xtr: np.ndarray, ytr: np.ndarray, Xval: np.ndarray | None, yval: np.ndarray | None,
                   Xte: np.ndarray, yte: np.ndarray, Cs: Iterable[float] = DEFAULT_CS, seed: int = 0,
                   max_iter: int = 2000, n_boot: int = 200, groups: np.ndarray | None = None,
                   test_groups: np.ndarray | None = None) -> dict[str, Any]:
    """L2 logistic regression on standardised features; C chosen by validation accuracy, then refit on train.

    Without a validation split, 20% of train (stratified, `seed`; grouped by `groups`, e.g. patients, when
    given) picks C and the final model is refit on all of train.
    """
    from sklearn.linear_model import LogisticRegression

    Xtr, ytr, Xte, yte = np.asarray(Xtr), np.asarray(ytr, dtype=np.int64), np.asarray(Xte), np.asarray(yte)
    _check_inputs(Xtr, ytr, Xte, yte)
    n_classes = int(max(ytr.max(), yte.max()) + 1)
    if Xval is None:
        fit_idx, val_idx, selection = _validation_split(Xtr, ytr, seed, groups=groups)
        X_fit, y_fit, X_sel, y_sel = Xtr[fit_idx], ytr[fit_idx], Xtr[val_idx], ytr[val_idx]
    else:
        X_fit, y_fit, X_sel, y_sel, selection = Xtr, ytr, np.asarray(Xval), np.asarray(yval, np.int64), "val"
    Z_fit, Z_sel = _standardize(X_fit, X_sel)
    scores = {}
    for C in Cs:
        model = LogisticRegression(C=float(C), max_iter=max_iter, random_state=seed)
        scores[float(C)] = float((model.fit(Z_fit, y_fit).predict(Z_sel) == y_sel).mean())
    best_C = max(scores, key=lambda c: (scores[c], -c))  # ties -> stronger regularisation
    Z_tr, Z_te = _standardize(Xtr, Xte)
    model = LogisticRegression(C=best_C, max_iter=max_iter, random_state=seed).fit(Z_tr, ytr)
    proba = np.zeros((len(Xte), n_classes))
    proba[:, model.classes_] = model.predict_proba(Z_te)
    y_pred = proba.argmax(axis=1)
    return {"probe": "logistic", "C": best_C, "selection": selection, "val_scores": scores,
            "y_pred": y_pred, "y_score": proba,
            "metrics": metrics(yte, y_pred, proba, n_boot=n_boot, seed=seed, n_classes=n_classes,
                               groups=test_groups)}


def linear_head_probe(Xtr: np.ndarray, ytr: np.ndarray, Xval: np.ndarray | None, yval: np.ndarray | None,
                      Xte: np.ndarray, yte: np.ndarray, weight_decays: Iterable[float] = (0.0, 1e-4, 1e-3, 1e-2),
                      epochs: int = 50, batch_size: int = 1024, lr: float = 1e-3, seed: int = 0,
                      device: str | None = None, n_boot: int = 200,
                      groups: np.ndarray | None = None, test_groups: np.ndarray | None = None) -> dict[str, Any]:
    """A torch linear layer (AdamW, cosine schedule) on standardised features, for sets too large for lbfgs.

    The weight decay is chosen by validation accuracy (or on a 20% split of train, grouped by `groups` when
    given), then the head is retrained with it on all of train.
    """
    Xtr, ytr, Xte, yte = np.asarray(Xtr), np.asarray(ytr, dtype=np.int64), np.asarray(Xte), np.asarray(yte)
    _check_inputs(Xtr, ytr, Xte, yte)
    n_classes = int(max(ytr.max(), yte.max()) + 1)
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))

    def train_head(X: np.ndarray, y: np.ndarray, weight_decay: float) -> tuple[torch.nn.Module, np.ndarray, np.ndarray]:
        generator = torch.Generator().manual_seed(seed)
        torch.manual_seed(seed)
        X = np.asarray(X, dtype=np.float64)
        mean, std = X.mean(axis=0), X.std(axis=0)
        std[std < 1e-12] = 1.0
        inputs = torch.as_tensor((X - mean) / std, dtype=torch.float32)
        targets = torch.as_tensor(y)
        head = torch.nn.Linear(X.shape[1], n_classes).to(dev)
        optimizer = torch.optim.AdamW(head.parameters(), lr=lr, weight_decay=weight_decay)
        steps = epochs * int(np.ceil(len(y) / batch_size))
        schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(steps, 1))
        for _ in range(epochs):
            order = torch.randperm(len(y), generator=generator)
            for start in range(0, len(y), batch_size):
                batch = order[start:start + batch_size]
                loss = torch.nn.functional.cross_entropy(head(inputs[batch].to(dev)), targets[batch].to(dev))
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                schedule.step()
        return head.eval(), mean, std

    def predict(head: torch.nn.Module, mean: np.ndarray, std: np.ndarray, X: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            logits = head(torch.as_tensor((np.asarray(X, np.float64) - mean) / std, dtype=torch.float32).to(dev))
            return torch.softmax(logits, dim=1).cpu().numpy()

    if Xval is None:
        fit_idx, val_idx, selection = _validation_split(Xtr, ytr, seed, groups=groups)
        X_fit, y_fit, X_sel, y_sel = Xtr[fit_idx], ytr[fit_idx], Xtr[val_idx], ytr[val_idx]
    else:
        X_fit, y_fit, X_sel, y_sel, selection = Xtr, ytr, np.asarray(Xval), np.asarray(yval, np.int64), "val"
    scores = {}
    for wd in weight_decays:
        head, mean, std = train_head(X_fit, y_fit, float(wd))
        scores[float(wd)] = float((predict(head, mean, std, X_sel).argmax(1) == y_sel).mean())
    best_wd = max(scores, key=lambda w: (scores[w], w))
    head, mean, std = train_head(Xtr, ytr, best_wd)
    proba = predict(head, mean, std, Xte)
    y_pred = proba.argmax(axis=1)
    return {"probe": "linear_head", "weight_decay": best_wd, "selection": selection, "val_scores": scores,
            "y_pred": y_pred, "y_score": proba,
            "metrics": metrics(yte, y_pred, proba, n_boot=n_boot, seed=seed, n_classes=n_classes,
                               groups=test_groups)}


def knn_probe(Xtr: np.ndarray, ytr: np.ndarray, Xte: np.ndarray, yte: np.ndarray, k: int = 20,
              metric: str = "cosine", temperature: float = 0.07, chunk: int = 1024, seed: int = 0,
              n_boot: int = 200, test_groups: np.ndarray | None = None) -> dict[str, Any]:
    """Weighted kNN (DINO's: votes exp(similarity / T) of the k nearest train points), cosine by default."""
    if metric not in ("cosine", "euclidean"):
        raise ValueError(f"metric must be 'cosine' or 'euclidean', got {metric!r}")
    Xtr, ytr, Xte, yte = np.asarray(Xtr), np.asarray(ytr, dtype=np.int64), np.asarray(Xte), np.asarray(yte)
    _check_inputs(Xtr, ytr, Xte, yte)
    n_classes = int(max(ytr.max(), yte.max()) + 1)
    k = min(k, len(ytr))
    train = Xtr.astype(np.float32)
    if metric == "cosine":
        train = train / np.maximum(np.linalg.norm(train, axis=1, keepdims=True), 1e-12)
    votes = np.zeros((len(Xte), n_classes))
    for start in range(0, len(Xte), chunk):  # chunks bound the (chunk, N_train) similarity matrix
        query = Xte[start:start + chunk].astype(np.float32)
        if metric == "cosine":
            query = query / np.maximum(np.linalg.norm(query, axis=1, keepdims=True), 1e-12)
            similarity = query @ train.T
        else:
            similarity = -np.sqrt(np.maximum(
                (query ** 2).sum(1)[:, None] - 2 * query @ train.T + (train ** 2).sum(1)[None], 0.0))
        nearest = np.argpartition(-similarity, k - 1, axis=1)[:, :k]
        weights = np.exp(np.take_along_axis(similarity, nearest, axis=1) / temperature
                         - (similarity.max(axis=1, keepdims=True) / temperature))
        block = votes[start:start + len(query)]
        np.add.at(block, (np.repeat(np.arange(len(query)), k), ytr[nearest].ravel()), weights.ravel())
    proba = votes / votes.sum(axis=1, keepdims=True)
    y_pred = proba.argmax(axis=1)
    return {"probe": "knn", "k": k, "metric": metric, "y_pred": y_pred, "y_score": proba,
            "metrics": metrics(yte, y_pred, proba, n_boot=n_boot, seed=seed, n_classes=n_classes,
                               groups=test_groups)}


# ----------------------------------------------------------------------------------------------------------
# Running probes over feature folders, tables, figure
# ----------------------------------------------------------------------------------------------------------
def _load_split(directory: str | os.PathLike) -> tuple[np.ndarray, np.ndarray, dict[str, Any], list[str]]:
    X, y, ids, manifest = load_features(directory)
    return np.asarray(X, dtype=np.float32), y, manifest, ids


def run_probes(task: str, feature_dirs: Mapping[str, Mapping[str, str | os.PathLike]],
               seeds: Sequence[int] = (0, 1, 2), probes: Sequence[str] = ("logistic", "knn"),
               n_boot: int = 200, knn_k: int = 20, Cs: Iterable[float] = DEFAULT_CS) -> pd.DataFrame:
    """Every probe x seed on every backbone's features of `task`, as a long-format DataFrame.

    `feature_dirs` maps backbone name -> {"train": dir, "val": dir (optional), "test": dir}.
    """
    known = {"logistic", "linear_head", "knn"}
    if set(probes) - known:
        raise ValueError(f"unknown probe(s) {sorted(set(probes) - known)}; known: {sorted(known)}")
    Cs = tuple(Cs)
    rows = []
    for backbone, dirs in feature_dirs.items():
        missing = [role for role in ("train", "test") if role not in dirs]
        if missing:
            raise KeyError(f"{task}/{backbone}: feature folder(s) for {', '.join(missing)} not given")
        Xtr, ytr, manifest_tr, ids_tr = _load_split(dirs["train"])
        groups = None if dirs.get("val") else patient_groups(ids_tr)
        Xte, yte, manifest_te, ids_te = _load_split(dirs["test"])
        test_groups = patient_groups(ids_te)  # intervals resample whole patients where ids name them
        Xval, yval = (None, None)
        if dirs.get("val"):
            Xval, yval, _, _ = _load_split(dirs["val"])
        if manifest_tr.get("class_names") != manifest_te.get("class_names"):
            raise ValueError(f"{task}/{backbone}: train and test class names differ "
                             f"({manifest_tr.get('class_names')} vs {manifest_te.get('class_names')})")
        for seed in seeds:
            for probe in probes:
                if probe == "logistic":
                    result = logistic_probe(Xtr, ytr, Xval, yval, Xte, yte, Cs=Cs, seed=seed, n_boot=n_boot,
                                            groups=groups, test_groups=test_groups)
                    hparam = f"C={result['C']:.3g} ({result['selection']})"
                elif probe == "linear_head":
                    result = linear_head_probe(Xtr, ytr, Xval, yval, Xte, yte, seed=seed, n_boot=n_boot,
                                               groups=groups, test_groups=test_groups)
                    hparam = f"weight_decay={result['weight_decay']:.3g} ({result['selection']})"
                else:
                    result = knn_probe(Xtr, ytr, Xte, yte, k=knn_k, seed=seed, n_boot=n_boot,
                                       test_groups=test_groups)
                    hparam = f"k={result['k']}"
                for metric, values in result["metrics"].items():
                    rows.append({"task": task, "backbone": backbone, "probe": probe, "seed": int(seed),
                                 "metric": metric, **values, "hparam": hparam,
                                 "n_train": len(ytr), "n_test": len(yte)})
    return pd.DataFrame(rows, columns=[*RESULT_COLUMNS, "hparam", "n_train", "n_test"])


def summary_table(df: pd.DataFrame, available: Mapping[str, str] | None = None, metric: str = "accuracy",
                  paper: Mapping[str, float] = PAPER_ACCURACY) -> pd.DataFrame:
    """Mean/std over seeds of `metric` per (task, backbone, probe) beside the paper's value.

    Paper tasks without results are listed with status "absent: <reason>" (from `available`) and NaN values.
    `seeds_differ` is False where every seed gave the same value: with a fixed val split, L-BFGS logistic
    regression and kNN are deterministic and the seed only moves the bootstrap, so std 0 is not stability.
    """
    columns = ["task", "backbone", "probe", "status", "n_seeds", "seeds_differ", "mean", "std", "ci_low", "ci_high",
               "paper_accuracy", "delta_vs_paper", "note"]
    rows = []
    if len(df):
        selected = df[df["metric"] == metric]
        for (task, backbone, probe), group in selected.groupby(["task", "backbone", "probe"], sort=False):
            mean = float(group["value"].mean())
            reference = paper.get(task, np.nan)
            per_seed = group.groupby("seed")["value"].mean()
            rows.append({"task": task, "backbone": backbone, "probe": probe, "status": "present",
                         "n_seeds": len(per_seed),
                         "seeds_differ": bool(len(per_seed) > 1 and np.ptp(per_seed.to_numpy()) > 1e-12),
                         "mean": mean,
                         # a spread needs at least two seeds: NaN, not a misleading 0.0, for one
                         "std": float(per_seed.std(ddof=0)) if len(per_seed) > 1 else np.nan,
                         "ci_low": float(group["ci_low"].mean()),
                         "ci_high": float(group["ci_high"].mean()), "paper_accuracy": reference,
                         "delta_vs_paper": mean - reference if metric == "accuracy" else np.nan,
                         # e.g. why a task has a kNN probe only: carried from the long table to the one people read
                         "note": "; ".join(dict.fromkeys(str(n) for n in group.get("note", pd.Series(dtype=str))
                                                         if isinstance(n, str) and n))})
    done = {row["task"] for row in rows}
    for task in paper:
        if task not in done:
            status = (available or {}).get(task, "absent: no results")
            if status == "present":
                status = "absent: present on disk but not probed"
            rows.append({"task": task, "backbone": "", "probe": "", "status": status, "n_seeds": 0,
                         "seeds_differ": False, "mean": np.nan, "std": np.nan, "ci_low": np.nan, "ci_high": np.nan,
                         "paper_accuracy": paper[task], "delta_vs_paper": np.nan, "note": ""})
    return pd.DataFrame(rows, columns=columns)


PROBE_LABELS = {"logistic": "logistic", "linear_head": "linear head", "knn": "kNN"}


def _probe_bars(ax, rows: pd.DataFrame, tasks: list[str], chosen: Mapping[str, str], metric: str, probe: str,
                paper: Mapping[str, float], chance: Mapping[str, float] | None) -> None:
    """The bars of `plot_probe_results`: seaborn bars per task and backbone, CIs, paper markers, chance marks."""
    import seaborn as sns

    selected = pd.concat([rows[(rows["task"] == t) & (rows["probe"] == chosen[t])] for t in tasks])
    summary = selected.groupby(["task", "backbone"], sort=False).agg(
        value=("value", "mean"), ci_low=("ci_low", "mean"), ci_high=("ci_high", "mean")).reset_index()
    backbones = list(dict.fromkeys(summary["backbone"]))
    sns.barplot(data=summary, x="task", y="value", hue="backbone", order=tasks, hue_order=backbones,
                errorbar=None, width=0.8, ax=ax)
    # seaborn draws one container of bars per backbone, in hue order, one bar per task of `tasks` it has
    for container, backbone in zip(ax.containers, backbones):
        part = summary[summary["backbone"] == backbone].set_index("task")
        for bar in container:
            task = tasks[round(bar.get_x() + bar.get_width() / 2)]
            if task not in part.index or not np.isfinite(part.at[task, "value"]):
                continue
            value, low, high = (float(part.at[task, c]) for c in ("value", "ci_low", "ci_high"))
            err = np.nan_to_num(np.array([[value - low], [high - value]])).clip(min=0)
            ax.errorbar(bar.get_x() + bar.get_width() / 2, value, yerr=err, fmt="none", ecolor="black",
                        elinewidth=1, capsize=3)
    paper_x = [i for i, t in enumerate(tasks) if t in paper]
    if paper_x and metric == "accuracy":
        ax.scatter(paper_x, [paper[tasks[i]] for i in paper_x], marker="D", color="black", zorder=3,
                   label="EXAONEPath (paper)")
    ax.set_xticks(np.arange(len(tasks)),
                  [t if chosen[t] == probe else f"{t}\n({PROBE_LABELS.get(chosen[t], chosen[t])})" for t in tasks],
                  fontsize=9)
    ax.set_xlabel("")
    ax.set_ylabel(f"test {metric.replace('_', ' ')}")
    ax.set_ylim(0, 1)
    marked = [i for i, t in enumerate(tasks) if chance and t in chance and metric == "accuracy"]
    for n, i in enumerate(marked):  # per task: chance differs (2 classes for PCam, 8 for CRC, ...)
        ax.hlines(chance[tasks[i]], i - 0.45, i + 0.45, colors="black", linestyles="--", lw=1.0, zorder=4,
                  label="chance (majority class)" if n == 0 else None)
    # beside the axes, so it never covers a bar
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    ax.set_title(f"{PROBE_LABELS.get(probe, probe).capitalize()} probes on frozen features\n"
                 f"(bars: 95% bootstrap CI; other probes named under a task)", fontsize=10)


def plot_probe_results(df: pd.DataFrame, out_png: str | os.PathLike, metric: str = "accuracy",
                       probe: str = "logistic", paper: Mapping[str, float] = PAPER_ACCURACY,
                       chance: Mapping[str, float] | None = None) -> Path:
    """Bar chart of `metric` per task and backbone (mean over seeds, bootstrap CI), paper values as markers.

    Each task shows the `probe` results; a task without them (too few samples for a logistic probe, say) shows
    the next probe that has results (linear head, then kNN), named under its tick. With no results at all the
    figure says so instead of failing, so a run over absent datasets still finishes. `chance` (task -> the
    accuracy of always answering the test split's majority class) draws a dashed mark per task.
    """
    rows = df[df["metric"] == metric] if len(df) else df
    preference = [probe, *[p for p in ("logistic", "linear_head", "knn") if p != probe]]
    chosen: dict[str, str] = {}
    for task in dict.fromkeys(rows["task"]) if len(rows) else []:
        present = set(rows.loc[rows["task"] == task, "probe"])
        chosen[task] = next(p for p in [*preference, *sorted(present)] if p in present)
    tasks = list(chosen)
    with plotting.house_style():
        figure = plotting.new_figure(max(6.0, 1.7 * len(tasks) + 3.5), 4.4)
        ax = figure.subplots()
        if not tasks:
            ax.text(0.5, 0.5, f"no {metric.replace('_', ' ')} results to plot\n(every dataset absent or too small: "
                    f"see probe_summary.csv)", ha="center", va="center", fontsize=11, transform=ax.transAxes)
            ax.set_axis_off()
        else:
            _probe_bars(ax, rows, tasks, chosen, metric, probe, paper, chance)
        figure.tight_layout()
        return plotting.save_png(figure, out_png)
