"""Stage 04, frozen features: every backbone (each arm's teacher, the untrained initialisation, configured timm
models, peers and the official EXAONEPath checkpoint) embeds every dataset present once, with its own
preprocessing. Outputs: `results/<run>/04_features/<backbone>/<dataset>/<split>/`."""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import torch

from exaonepath_core.config import PretrainConfig, ProjectConfig, pick_device
from exaonepath_core.evaluation import features
from exaonepath_core.io import atomic
from exaonepath_core.io.config_file import save_config
from exaonepath_core.models import backbones, peers
from exaonepath_core.models.backbones import resolve_backbone_spec
from exaonepath_core.report import stage_tables
from exaonepath_core.stages import datasets as stage_datasets
from exaonepath_core.stages import s01_tile, s02_normalize, s03_pretrain
from exaonepath_core.stages.base import StageSpec

SPEC = StageSpec("04", "04_extract_features", "04_features", ("features", "data.downstream_roots"), reuses_work=True)


@dataclass
class FeaturesResult:
    """What stage 04 wrote, for its notebook to show."""

    backbones: dict[str, str]
    datasets: dict[str, dict]
    index: pd.DataFrame


def backbone_specs(cfg: ProjectConfig, pretrain_dir: Path, features_dir: Path | None = None) -> dict[str, str]:
    """Backbones to embed with: each arm's teacher, the untrained initialisation (when asked) and
    `features.extra_backbones`."""
    specs = {f"dino_{arm}": f"ours:{Path(pretrain_dir) / arm / 'teacher_backbone.pth'}" for arm in cfg.arms}
    if cfg.features.include_untrained and features_dir is not None:
        specs.update(untrained_backbones(cfg, Path(features_dir) / "untrained_backbones",
                                         Path(pretrain_dir).parent / s02_normalize.SPEC.folder / "reference.json"))
    for spec in cfg.features.extra_backbones:
        kind, _, target = spec.partition(":")
        if kind == "peer" and not _peer_weights_present(spec):
            continue  # listed as absent (with the reason) by peer_status; never replaced by random weights
        base = (f"peer_{target.partition('=')[0]}" if kind == "peer" else f"{kind}_{Path(target).stem}").replace(
            "/", "_")
        name = base
        if name in specs and Path(target).parent.name:  # two EXAONEPath.ckpt in different folders
            name = f"{kind}_{Path(target).parent.name}_{Path(target).stem}".replace("/", "_")
        n = 2
        while name in specs:  # never replace an earlier backbone
            name, n = f"{base}_{n}", n + 1
        specs[name] = spec
    return specs


def _peer_weights_present(spec: str) -> bool:
    """Whether a `peer:` spec's weights file can be found locally (prints why not)."""
    options = resolve_backbone_spec(spec)
    try:
        peers.resolve_weights(options["peer"], options.get("path"))
    except peers.PeerWeightsAbsent as err:
        print(f"[features] {spec}: absent ({err})", flush=True)
        return False
    return True


def untrained_backbones(cfg: ProjectConfig, out_dir: Path, reference_json: Path) -> dict[str, str]:
    """The pretraining arms' common starting point (same seed, same timm initialisation as `training.train`),
    exported twice: fed raw inputs and fed Macenko-normalized inputs. Comparing a trained arm with these
    separates what DINO learned from what the input transformation alone does to slide identifiability."""
    pcfg = PretrainConfig.from_mapping(dict(cfg.pretrain))
    torch.manual_seed(cfg.seed)  # training.train seeds the same way before building the student
    model = backbones.create_backbone(pcfg.arch, pcfg.global_crop_size, pcfg.patch_size, drop_path_rate=pcfg.drop_path_rate)
    reference = json.loads(Path(reference_json).read_text()) if Path(reference_json).is_file() else None
    specs = {}
    for arm in ("raw", "macenko"):
        folder = Path(out_dir) / arm
        folder.mkdir(parents=True, exist_ok=True)
        weights = atomic.torch_save(model.state_dict(), folder / "teacher_backbone.pth")
        meta = {"arch": pcfg.arch, "patch_size": pcfg.patch_size or 16, "img_size": pcfg.global_crop_size,
                "embed_dim": int(model.num_features), "arm": arm, "macenko": arm == "macenko",
                "macenko_reference": reference if arm == "macenko" else None, "name": f"untrained_{arm}",
                "note": "untrained initialisation (seed as in pretraining)"}
        atomic.write_json(folder / "teacher_backbone.json", meta)
        specs[f"untrained_{arm}"] = f"ours:{weights}"
    return specs


def load_backbone_with_transform(spec: str, cfg: ProjectConfig):
    """Model (eval, on the run's device), its batch transform and info. Each backbone carries its own
    preprocessing: our macenko arm's teacher (its export records the arm and reference) and the official
    EXAONEPath checkpoint see Macenko-normalized inputs, the others raw inputs."""
    options = resolve_backbone_spec(spec)  # paths read as the config check read them (repository root, ~)
    if options["kind"] == "exaonepath" and options.get("macenko_reference") is None:
        # the official checkpoint sees the run's Macenko reference, the one our macenko arm was trained with
        options["macenko_reference"] = s02_normalize.stain_reference(cfg).to_dict()
        if not cfg.normalize.reference_image:
            print(f"[features] note: {spec} gets Macenko with the standard H&E reference; EXAONEPath's own code "
                  "fits its normaliser to one TCGA crop (target_TCGA-55-A48X_coords_[19440  9824]_[4096 4096].png "
                  "in its repository): set normalize.reference_image to that image to feed it the colours it "
                  "was trained on", flush=True)
    model, info = backbones.load_backbone(options)
    if options["kind"] == "peer":  # a peer keeps its authors' recipe (resize, crop, mean/std)
        return model.to(pick_device(cfg.device)).eval(), backbones.make_transform(info), info
    # the run's evaluation recipe, the same for every backbone (features.center_crop_fraction), and the run's
    # Macenko estimate (normalize.Io / alpha / beta, as the macenko store was written) for those that normalize
    crop = info.preprocess.crop
    info.preprocess = dataclasses.replace(
        info.preprocess, crop=crop, resize=round(crop / cfg.features.center_crop_fraction),
        macenko_params=cfg.normalize.macenko_params() if info.preprocess.macenko else None)
    return model.to(pick_device(cfg.device)).eval(), backbones.make_transform(info), info


def run(cfg: ProjectConfig, paths, force: bool = False) -> FeaturesResult:
    """Embed every present dataset split with every backbone (a split with a manifest is reused unless
    `force`); write `features_index.csv` (header kept when nothing was embedded) and `datasets.csv`."""
    out = paths.stage_dir(SPEC.key)
    save_config(cfg, out / "config.yaml")
    specs = backbone_specs(cfg, paths.stage_dir(s03_pretrain.SPEC.key), out)
    sets = stage_datasets.feature_datasets(cfg, paths.stage_dir(s01_tile.SPEC.key))
    print("backbones:", list(specs))
    for name, entry in sets.items():
        print(f"{name}: {entry['status']}")
    rows = []
    for bname, spec in specs.items():
        model, transform, _ = load_backbone_with_transform(spec, cfg)
        for dname, entry in sets.items():
            if not entry["status"].startswith("present"):
                continue
            for split, ds in entry["splits"].items():
                target = out / bname / dname / split
                done = (target / "manifest.json").is_file() and not force
                if not done:
                    features.extract_features(model, transform, ds, target, batch_size=cfg.features.batch_size,
                                              num_workers=cfg.features.num_workers, device=pick_device(cfg.device),
                                              amp=cfg.features.amp, overwrite=force)
                m = json.loads((target / "manifest.json").read_text())
                rows.append({"backbone": bname, "dataset": dname, "split": split, "n": m.get("n"),
                             "dim": m.get("dim"), "reused": done})
    index = pd.DataFrame(rows, columns=list(stage_tables.FEATURES_INDEX_COLUMNS))
    atomic.write_csv(index, out / "features_index.csv")
    atomic.write_csv(stage_datasets.dataset_status_table(sets), out / "datasets.csv")
    return FeaturesResult(specs, sets, index)


def warnings(stage_dir: Path, cfg: ProjectConfig) -> list[str]:
    """Each configured downstream dataset that stage 04 did not load, with the reason."""
    out = []
    status = stage_tables.read_csv_or_none(Path(stage_dir) / "datasets.csv")
    if status is not None:
        detail = dict(zip(status["dataset"], status["detail"].astype(str)))
        for name, root in cfg.data.downstream_roots.items():
            text = detail.get(name, "not listed")
            if not text.startswith("present"):
                out.append(f"dataset {name} (data.downstream_roots: {root}) was not loaded: {text}")
    return out
