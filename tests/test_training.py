"""The pretraining loop on a small real patch store: config loading, exact resume, NaN stop, exports, figure."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from exaonepath_core.config import ConfigError, PretrainConfig
from exaonepath_core.data.stain.reference import MacenkoReference
from exaonepath_core.models.backbones import create_backbone
from exaonepath_core.pretrain import checkpoint as checkpoints
from exaonepath_core.pretrain import cli, curves, multicrop
from exaonepath_core.pretrain import datasets as pretrain_datasets
from exaonepath_core.pretrain import loss as dino_losses
from exaonepath_core.pretrain import step as pretrain_step
from exaonepath_core.pretrain import train as trainer

PATCH = 48


def _write_raw_store(shared_data: Path, root: Path, patches_per_slide: int) -> Path:
    """A raw patch store of real H&E patches (48 px) cut from a TCGA region, as two 'slides'."""
    from exaonepath_core.data.patch_store import PatchStoreWriter

    image = np.asarray(Image.open(shared_data / "stain" / "tiatoolbox_TCGA-HE-7130-01Z-00-DX1.png").convert("RGB"))
    writer = PatchStoreWriter(root, PATCH, "raw")
    for slide, (y0, x0) in enumerate([(100, 100), (500, 500)]):
        coords = np.array([(x0 + PATCH * (i % 5), y0 + PATCH * (i // 5)) for i in range(patches_per_slide)],
                          dtype=np.int64)
        patches = np.stack([image[y:y + PATCH, x:x + PATCH] for x, y in coords])
        writer.write_slide(f"slide{slide}", coords, [patches[:10], patches[10:]])
    writer.finalize()
    return root


@pytest.fixture(scope="module")
def raw_store(shared_data, tmp_path_factory) -> Path:
    """40 patches: 5 steps per epoch at batch 8."""
    return _write_raw_store(shared_data, tmp_path_factory.mktemp("store") / "raw", 20)


def _tiny_config(store: Path, out: Path, **overrides) -> PretrainConfig:
    settings = {
        "arch": "vit_tiny_patch16_224", "patch_size": 8, "global_crop_size": 32, "local_crop_size": 16,
        "n_local_crops": 2, "out_dim": 128, "head_hidden_dim": 64, "head_bottleneck_dim": 16, "epochs": 2,
        "batch_size_per_gpu": 8, "lr": 0.002, "warmup_epochs": 1, "drop_path_rate": 0.1, "num_workers": 0,
        "seed": 3, "deterministic": True, "saveckp_freq": 100, "data_root": str(store), "input_arm": "raw",
        "output_dir": str(out), "progress_bar": False, "fused_adamw": False,
    }
    settings.update(overrides)
    return PretrainConfig(**settings)


def _load_checkpoint(out: Path) -> dict:
    return torch.load(out / "checkpoint.pth", map_location="cpu", weights_only=True)


# ---------------------------------------------------------------------------------------------------------------
# configuration
# ---------------------------------------------------------------------------------------------------------------
def test_config_yaml_rejects_unknown_and_mistyped_keys(tmp_path):
    path = tmp_path / "pretrain.yaml"
    path.write_text("arch: vit_small_patch16_224\nepochs: 30\nlr: 1\nglobal_crop_scale: [0.3, 1]\n")
    cfg = PretrainConfig.from_yaml(path)
    assert (cfg.arch, cfg.epochs, cfg.lr, cfg.global_crop_scale) == ("vit_small_patch16_224", 30, 1.0, [0.3, 1.0])
    assert isinstance(cfg.lr, float)
    path.write_text("epochs: 3\nlearning_rate: 0.1\nbatchsize: 4\n")
    with pytest.raises(ConfigError, match="batchsize, learning_rate"):
        PretrainConfig.from_yaml(path)
    path.write_text("epochs: three\n")
    with pytest.raises(ConfigError, match="epochs must be a number"):
        PretrainConfig.from_yaml(path)
    with pytest.raises(ConfigError, match="input_arm"):
        PretrainConfig(input_arm="grey")
    with pytest.raises(ConfigError, match="normalize_on_the_fly"):
        PretrainConfig(input_arm="raw", normalize_on_the_fly=True)
    cfg = PretrainConfig().with_overrides(["max_steps=5", "use_amp=false", "patch_size=8"])
    assert (cfg.max_steps, cfg.use_amp, cfg.patch_size) == (5, False, 8)
    with pytest.raises(ConfigError, match="unknown"):
        PretrainConfig().with_overrides(["nope=1"])


# ---------------------------------------------------------------------------------------------------------------
# the loop
# ---------------------------------------------------------------------------------------------------------------
def test_cli_reports_a_missing_or_malformed_config_without_a_traceback(tmp_path, capsys):
    assert cli.main(["--config", str(tmp_path / "absent.yaml")]) == 2
    assert "pretraining config not found" in capsys.readouterr().err
    listed = tmp_path / "list.yaml"
    listed.write_text("- 1\n- 2\n")
    assert cli.main(["--config", str(listed)]) == 2
    assert "expected a mapping" in capsys.readouterr().err


def test_train_writes_checkpoint_log_and_loadable_teacher(raw_store, tmp_path):
    out = tmp_path / "run"
    summary = trainer.train(_tiny_config(raw_store, out, max_steps=3))
    assert summary["steps"] == 3 and summary["steps_per_epoch"] == 5 and summary["total_steps"] == 10
    assert all(np.isfinite([summary["first_step_loss"], summary["last_step_loss"]]))
    assert summary["n_patches"] == 40 and summary["patches_unused_per_epoch"] == 0
    assert summary["center_norm"] > 0
    # 40 patches in batches of 6: 6 steps, 4 patches sit out each epoch (counted); Sinkhorn-Knopp has no centre
    odd = trainer.train(_tiny_config(raw_store, tmp_path / "odd", max_steps=1, batch_size_per_gpu=6,
                                      centering="sinkhorn_knopp"))
    assert odd["steps_per_epoch"] == 6 and odd["patches_unused_per_epoch"] == 4 and odd["center_norm"] is None

    checkpoint = _load_checkpoint(out)  # weights_only=True: tensors and plain containers only
    assert checkpoint["step"] == 3 and checkpoint["config"]["arch"] == "vit_tiny_patch16_224"
    assert checkpoint["center"].shape == (1, 128) and float(checkpoint["center"].abs().sum()) > 0

    records = curves.read_log(out / "log.jsonl")
    assert [r["step"] for r in records] == [1, 2, 3]
    for key in ("loss", "lr", "wd", "momentum", "teacher_temp", "teacher_entropy", "center_norm", "img_per_s"):
        assert all(np.isfinite(r[key]) for r in records), key
    # lr warm-up over the first epoch: base lr scaled by batch/256, starting from 0
    assert records[0]["lr"] == 0.0 and 0 < records[2]["lr"] < 0.002 * 8 / 256

    meta = json.loads((out / "teacher_backbone.json").read_text())
    assert meta == {"arch": "vit_tiny_patch16_224", "patch_size": 8, "img_size": 32, "embed_dim": 192,
                    "arm": "raw", "macenko": False, "macenko_reference": None}
    backbone = create_backbone(meta["arch"], meta["img_size"], meta["patch_size"])
    state = torch.load(out / "teacher_backbone.pth", map_location="cpu", weights_only=True)
    backbone.load_state_dict(state, strict=True)
    teacher_backbone_keys = {k[len("backbone."):]: v for k, v in checkpoint["teacher"].items()
                             if k.startswith("backbone.")}
    assert teacher_backbone_keys.keys() == state.keys()
    assert all(torch.equal(teacher_backbone_keys[k], state[k]) for k in state)
    features = checkpoints.load_teacher_backbone(out)(torch.randn(2, 3, 32, 32))
    assert features.shape == (2, 192)

    png = curves.plot_training_curves(out / "log.jsonl", tmp_path / "curves.png")
    assert png.stat().st_size > 10_000


def test_kill_and_resume_equals_uninterrupted(raw_store, tmp_path):
    full = tmp_path / "full"
    trainer.train(_tiny_config(raw_store, full, max_steps=7))
    split = tmp_path / "split"
    trainer.train(_tiny_config(raw_store, split, max_steps=3))  # "killed" mid-epoch 0 after step 3
    with open(split / "log.jsonl", "a") as handle:  # a killed run may have logged past its checkpoint
        handle.write(json.dumps({"step": 4, "loss": -1.0}) + "\n")
    summary = trainer.train(_tiny_config(raw_store, split, max_steps=7), resume=True)
    assert summary["start_step"] == 3 and summary["steps"] == 7  # crossed into epoch 1 (5 steps/epoch)

    a, b = _load_checkpoint(full), _load_checkpoint(split)
    assert a["step"] == b["step"] == 7
    for part in ("student", "teacher"):
        assert a[part].keys() == b[part].keys()
        for key in a[part]:
            assert torch.equal(a[part][key], b[part][key]), f"{part}.{key} differs after resume"
    assert torch.equal(a["center"], b["center"])
    losses_full = [r["loss"] for r in curves.read_log(full / "log.jsonl")]
    losses_split = [r["loss"] for r in curves.read_log(split / "log.jsonl")]
    assert len(losses_full) == 7 and losses_split == losses_full


def test_resuming_a_finished_run_trains_nothing_and_reports_cleanly(raw_store, tmp_path):
    out = tmp_path / "done"
    trainer.train(_tiny_config(raw_store, out, max_steps=2))
    before = _load_checkpoint(out)
    summary = trainer.train(_tiny_config(raw_store, out, max_steps=2), resume=True)
    assert (summary["start_step"], summary["steps"], summary["median_img_per_s"]) == (2, 2, None)
    after = _load_checkpoint(out)
    assert all(torch.equal(after["student"][k], before["student"][k]) for k in before["student"])


def test_resume_refuses_changed_recipe_or_a_store_of_another_size(shared_data, raw_store, tmp_path):
    out = tmp_path / "run"
    trainer.train(_tiny_config(raw_store, out, max_steps=1))
    assert _load_checkpoint(out)["n_patches"] == 40 and _load_checkpoint(out)["steps_per_epoch"] == 5
    with pytest.raises(ConfigError, match="lr"):
        trainer.train(_tiny_config(raw_store, out, max_steps=2, lr=0.1), resume=True)
    # data_root may move (resume-mutable), but not to a store of another size: 24 patches give 3 steps/epoch,
    # 42 patches the same 5 steps/epoch yet another permutation of the data
    smaller = _write_raw_store(shared_data, tmp_path / "smaller", 12)
    larger = _write_raw_store(shared_data, tmp_path / "larger", 21)
    with pytest.raises(ConfigError, match=r"trained on 40 patches, 5 steps per epoch; .* has 24 patches, 3 steps"):
        trainer.train(_tiny_config(smaller, out, max_steps=2), resume=True)
    with pytest.raises(ConfigError, match=r"trained on 40 patches, 5 steps per epoch; .* has 42 patches, 5 steps"):
        trainer.train(_tiny_config(larger, out, max_steps=2), resume=True)
    assert _load_checkpoint(out)["step"] == 1  # refused before any step
    assert json.loads((out / "pretrain_config.json").read_text())["data_root"] == str(raw_store)
    # a checkpoint written before n_patches was stored still resumes, and is still checked by steps per epoch
    old_style = _load_checkpoint(out)
    del old_style["n_patches"]
    torch.save(old_style, out / "checkpoint.pth")
    with pytest.raises(ConfigError, match=r"trained on 5 steps per epoch; .* has 24 patches, 3 steps"):
        trainer.train(_tiny_config(smaller, out, max_steps=2), resume=True)
    summary = trainer.train(_tiny_config(raw_store, out, max_steps=2), resume=True)
    assert (summary["start_step"], summary["steps"]) == (1, 2) and _load_checkpoint(out)["n_patches"] == 40


def test_nan_loss_stops_with_message_and_keeps_last_good_checkpoint(raw_store, tmp_path, monkeypatch, capsys):
    reference = tmp_path / "reference"
    trainer.train(_tiny_config(raw_store, reference, max_steps=2))

    out = tmp_path / "nan"
    config = out / "pretrain.yaml"
    out.mkdir()
    import yaml

    config.write_text(yaml.safe_dump(_tiny_config(raw_store, out, saveckp_freq=2).to_dict()))
    real_loss = dino_losses.dino_loss_from_targets
    calls = {"n": 0}

    def loss_with_nan_at_step_3(*args, **kwargs):
        calls["n"] += 1
        loss = real_loss(*args, **kwargs)
        return loss * float("nan") if calls["n"] == 4 else loss

    monkeypatch.setattr(dino_losses, "dino_loss_from_targets", loss_with_nan_at_step_3)
    code = cli.main(["--config", str(config)])
    err = capsys.readouterr().err
    assert code == 3
    assert "loss is nan at step 3" in err and "checkpoint" in err and "(step 2)" in err
    good, ref = _load_checkpoint(out), _load_checkpoint(reference)
    assert good["step"] == 2
    assert all(torch.equal(good["student"][k], ref["student"][k]) for k in ref["student"])
    assert [r["step"] for r in curves.read_log(out / "log.jsonl")] == [1, 2, 3]
    assert not list(out.glob(".*.tmp"))


def test_normalize_on_the_fly_counts_fallback_patches(raw_store, tmp_path):
    out = tmp_path / "otf"
    cfg = _tiny_config(raw_store, out, max_steps=2, input_arm="macenko", normalize_on_the_fly=True)
    summary = trainer.train(cfg)
    assert summary["steps"] == 2 and np.isfinite(summary["last_step_loss"])
    records = curves.read_log(out / "log.jsonl")
    assert all(isinstance(r["macenko_fallback"], int) and 0 <= r["macenko_fallback"] <= 8 for r in records)
    meta = json.loads((out / "teacher_backbone.json").read_text())
    assert meta["macenko"] is True and meta["arm"] == "macenko"
    assert np.allclose(meta["macenko_reference"]["stain_matrix"], MacenkoReference.default().stain_matrix)


def test_loader_views_depend_only_on_seed_epoch_index(raw_store):
    """The batched multi-crop in the collate: a sample's views do not depend on its batch mates or position."""
    from exaonepath_core.data.patch_store import PatchStoreDataset

    aug = multicrop.MultiCropAugmentation(32, 16, 2)
    dataset = pretrain_datasets.MultiCropDataset(PatchStoreDataset(raw_store), aug, seed=3)
    collate = pretrain_datasets.MultiCropCollate(aug, apply_views=True)
    batch_a = collate([dataset[(1, i)] for i in (4, 9, 17, 30)])
    batch_b = collate([dataset[(1, i)] for i in (30, 2, 9)])
    for view_a, view_b in zip(batch_a, batch_b):
        assert torch.equal(view_a[1], view_b[2]) and torch.equal(view_a[3], view_b[0])
    patches, params = pretrain_datasets.MultiCropCollate(aug, apply_views=False)([dataset[(1, i)] for i in (4, 9)])
    assert patches.dtype == torch.uint8 and patches.shape == (2, PATCH, PATCH, 3) and params.shape == (2, 4, 16)
    assert not torch.equal(dataset[(2, 9)][1], params[1])  # another epoch, other draws


def test_stain_augmentation_arm_changes_colours_deterministically(raw_store, tmp_path):
    from exaonepath_core.data.patch_store import PatchStoreDataset

    patches = PatchStoreDataset(raw_store)
    aug = multicrop.MultiCropAugmentation(32, 16, 1)
    plain = pretrain_datasets.MultiCropDataset(patches, aug, seed=3)
    stained = pretrain_datasets.MultiCropDataset(patches, aug, seed=3, stain_augmentation=True)
    collate = pretrain_datasets.MultiCropCollate(aug, apply_views=True)
    views_plain, views_a, views_b = (collate([dataset[(0, 5)]]) for dataset in (plain, stained, stained))
    assert all(torch.equal(a, b) for a, b in zip(views_a, views_b))  # same (seed, epoch, index): same views
    assert float((views_a[0] - views_plain[0]).abs().mean()) > 1e-3  # the stain perturbation is applied
    summary = trainer.train(_tiny_config(raw_store, tmp_path / "sa", max_steps=2, input_arm="stain_augmentation"))
    assert summary["steps"] == 2 and np.isfinite(summary["last_step_loss"])


@pytest.mark.slow
def test_torchrun_two_gloo_processes_train_and_resume(raw_store, tmp_path):
    """`torchrun --nproc_per_node=2` on CPU (gloo) trains, checkpoints both ranks' RNG, and resumes."""
    import yaml

    out = tmp_path / "ddp"
    out.mkdir()
    config = out / "pretrain.yaml"
    config.write_text(yaml.safe_dump(_tiny_config(raw_store, out, batch_size_per_gpu=4, max_steps=3).to_dict()))
    torchrun = shutil.which("torchrun", path=str(Path(sys.executable).parent)) or "torchrun"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [torchrun, "--standalone", "--nproc_per_node=2", "-m", "exaonepath_core.pretrain.cli",
         "--config", str(config), "--plot"],
        capture_output=True, text=True, timeout=600, env=env, cwd=Path(__file__).resolve().parents[1], check=False,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    checkpoint = _load_checkpoint(out)
    assert checkpoint["world_size"] == 2 and checkpoint["step"] == 3 and len(checkpoint["rng"]) == 2
    assert (out / "training_curves.png").is_file()
    resumed = subprocess.run(
        [torchrun, "--standalone", "--nproc_per_node=2", "-m", "exaonepath_core.pretrain.cli",
         "--config", str(config), "--resume", "--set", "max_steps=5"],
        capture_output=True, text=True, timeout=600, env=env, cwd=Path(__file__).resolve().parents[1], check=False,
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert _load_checkpoint(out)["step"] == 5
    assert [r["step"] for r in curves.read_log(out / "log.jsonl")] == [1, 2, 3, 4, 5]


def test_excluded_slides_are_left_out_of_the_pretraining_data(raw_store, tmp_path, capsys):
    """A store that holds a held-out slide (reused across held-out choices) does not feed it to pretraining."""
    from exaonepath_core.pretrain.datasets import load_patch_dataset as _load_patch_dataset

    everything = _load_patch_dataset(_tiny_config(raw_store, tmp_path))
    assert sorted(set(everything.slide_ids)) == ["slide0", "slide1"] and len(everything) == 40
    kept = _load_patch_dataset(_tiny_config(raw_store, tmp_path, exclude_slide_ids=["slide1", "not_in_store"]))
    assert set(kept.slide_ids) == {"slide0"} and len(kept) == 20
    assert "1 excluded (held-out) slide(s)" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------------------------
# the GPU speed paths, run on CPU: torch.compile, channels-last, bf16 autocast
# ---------------------------------------------------------------------------------------------------------------
def test_compiled_channels_last_run_matches_eager_run(raw_store, tmp_path):
    # fp32 on both sides: the 2e-4 bound is about compile + channels-last, not bf16 rounding (precision auto
    # picks bf16 on CPUs with native bf16)
    eager = trainer.train(_tiny_config(raw_store, tmp_path / "eager", max_steps=3, deterministic=False,
                                        precision="fp32"))
    fast = trainer.train(_tiny_config(raw_store, tmp_path / "fast", max_steps=3, deterministic=False,
                                       compile=True, channels_last=True, precision="fp32"))
    eager_losses = [r["loss"] for r in curves.read_log(tmp_path / "eager" / "log.jsonl")]
    fast_losses = [r["loss"] for r in curves.read_log(tmp_path / "fast" / "log.jsonl")]
    assert len(fast_losses) == 3 and fast["steps"] == eager["steps"] == 3
    np.testing.assert_allclose(fast_losses, eager_losses, rtol=2e-4)
    # compiling in place keeps timm's state_dict layout: the checkpoint and the export load into plain modules
    ckpt_eager, ckpt_fast = _load_checkpoint(tmp_path / "eager"), _load_checkpoint(tmp_path / "fast")
    assert list(ckpt_fast["teacher"]) == list(ckpt_eager["teacher"])
    assert not any("_orig_mod" in k for k in ckpt_fast["student"])
    x = torch.randn(2, 3, 32, 32)
    out_eager = checkpoints.load_teacher_backbone(tmp_path / "eager")(x)
    out_fast = checkpoints.load_teacher_backbone(tmp_path / "fast")(x)
    torch.testing.assert_close(out_fast, out_eager, rtol=1e-3, atol=1e-3)


def test_bf16_autocast_steps_track_fp32(raw_store, tmp_path):
    trainer.train(_tiny_config(raw_store, tmp_path / "fp32", max_steps=3, precision="fp32"))
    trainer.train(_tiny_config(raw_store, tmp_path / "bf16", max_steps=3, precision="bf16"))
    fp32 = curves.read_log(tmp_path / "fp32" / "log.jsonl")
    bf16 = curves.read_log(tmp_path / "bf16" / "log.jsonl")
    assert all(np.isfinite([r["loss"], r["teacher_entropy"], r["grad_norm"]]).all() for r in bf16)
    np.testing.assert_allclose([r["loss"] for r in bf16], [r["loss"] for r in fp32], rtol=0.02)
    ckpt = _load_checkpoint(tmp_path / "bf16")
    # autocast computes in bf16 but keeps the master weights, the centre and the optimizer moments in fp32
    assert {t.dtype for t in ckpt["student"].values() if t.is_floating_point()} == {torch.float32}
    assert ckpt["center"].dtype == torch.float32
    moved = [k for k in ckpt["student"] if not torch.equal(ckpt["student"][k], _load_checkpoint(tmp_path / "fp32")
                                                             ["student"][k])]
    assert moved, "the bf16 run must differ numerically from the fp32 one (autocast was not applied)"


# ---------------------------------------------------------------------------------------------------------------
# one writer per run folder, trainers die with their starter, changed runs move aside
# ---------------------------------------------------------------------------------------------------------------
def test_a_second_trainer_on_the_same_folder_is_refused(raw_store, tmp_path, capsys):
    import fcntl

    import yaml

    out = tmp_path / "busy"
    out.mkdir()
    config = out / "pretrain.yaml"
    config.write_text(yaml.safe_dump(_tiny_config(raw_store, out, max_steps=1).to_dict()))
    with open(out / ".train.lock", "a+") as holder:  # what a trainer left running by a killed kernel holds
        fcntl.flock(holder, fcntl.LOCK_EX | fcntl.LOCK_NB)
        holder.write("pid 12345 on elsewhere\n")
        holder.flush()
        assert cli.main(["--config", str(config)]) == 4
    err = capsys.readouterr().err
    assert "another training process (pid 12345 on elsewhere) is writing" in err
    assert not (out / "checkpoint.pth").exists()
    assert cli.main(["--config", str(config)]) == 0  # released: the run goes ahead
    assert (out / "checkpoint.pth").is_file()


def test_the_trainer_process_dies_with_the_process_that_started_it(tmp_path):
    import time

    pid_file = tmp_path / "child.pid"
    (tmp_path / "child.py").write_text(
        f"import os, time\nopen({str(pid_file)!r}, 'w').write(str(os.getpid()))\ntime.sleep(60)\n")
    (tmp_path / "starter.py").write_text(
        "import subprocess, sys, time\n"
        "from exaonepath_core.stages.s03_pretrain import _die_with_parent\n"
        f"subprocess.Popen([sys.executable, {str(tmp_path / 'child.py')!r}], preexec_fn=_die_with_parent)\n"
        "time.sleep(60)\n")
    parent = subprocess.Popen([sys.executable, str(tmp_path / "starter.py")],
                              cwd=Path(__file__).resolve().parents[1])
    try:
        for _ in range(600):
            if pid_file.is_file() and pid_file.read_text():
                break
            time.sleep(0.1)
        child = int(pid_file.read_text())
        parent.kill()  # SIGKILL: no cleanup code runs in the parent
        parent.wait()
        for _ in range(100):
            stat = Path(f"/proc/{child}/stat")
            if not stat.is_file() or stat.read_text().split()[2] == "Z":  # gone, or a zombie awaiting init
                break
            time.sleep(0.1)
        else:
            os.kill(child, 9)
            pytest.fail("the child outlived its parent by 10 s")
    finally:
        if parent.poll() is None:
            parent.kill()


def test_changed_settings_move_an_arms_earlier_run_aside(tmp_path, capsys):
    from exaonepath_core.config import load_config
    from exaonepath_core.stages import s03_pretrain

    out = tmp_path / "03_pretrain" / "raw"
    cfg = load_config("ci", {"results_root": str(tmp_path)})
    first = s03_pretrain.write_pretrain_config(cfg, "raw", tmp_path / "02_normalize", out)
    (out / "checkpoint.pth").write_bytes(b"trained")
    mtime = first.stat().st_mtime_ns
    # same settings, or only ones a resumed run may change: the run stays and resumes
    assert s03_pretrain.write_pretrain_config(cfg, "raw", tmp_path / "02_normalize", out).stat().st_mtime_ns == mtime
    longer = load_config("ci", {"results_root": str(tmp_path), "pretrain.max_steps": 50})
    s03_pretrain.write_pretrain_config(longer, "raw", tmp_path / "02_normalize", out)
    assert (out / "checkpoint.pth").is_file() and not list(out.parent.glob("raw.superseded-*"))
    # a new learning rate, or patches normalized with another beta: a new run, the old one kept aside
    for change in ({"pretrain.lr": 0.004}, {"normalize.beta": 0.3}):
        changed = load_config("ci", {"results_root": str(tmp_path), **change})
        s03_pretrain.write_pretrain_config(changed, "raw", tmp_path / "02_normalize", out)
        assert not (out / "checkpoint.pth").exists()
        (out / "checkpoint.pth").write_bytes(b"trained")
    assert len(list(out.parent.glob("raw.superseded-*"))) == 2
    printed = capsys.readouterr().out
    assert "trained with other settings (lr)" in printed and "the patch store's config" in printed


def test_precision_setting_resolves_per_device_and_old_use_amp_configs_still_load():
    cpu = torch.device("cpu")
    assert pretrain_step.resolve_precision("fp16", cpu) == "fp16"
    assert pretrain_step.resolve_precision("auto", cpu, use_amp=False) == "fp32"
    assert pretrain_step.resolve_precision("auto", cpu) in ("bf16", "fp32")  # bf16 only where the CPU has it natively
    assert PretrainConfig(use_amp=False).precision == "auto"  # an old config: fp32, as before
    assert pretrain_step.run_precision(PretrainConfig(use_amp=False), cpu) == "fp32"
    with pytest.raises(ConfigError, match="precision must be one of auto, bf16, fp16, fp32; got 'half'"):
        PretrainConfig(precision="half")
    with pytest.raises(ConfigError, match="use_amp is false but precision is 'bf16'"):
        PretrainConfig(use_amp=False, precision="bf16")


def test_nan_loss_without_per_step_reads_stops_before_the_bad_update(raw_store, tmp_path, monkeypatch, capsys):
    """Fused AdamW: the finite check stays on the device and is read at log / checkpoint steps only."""
    out = tmp_path / "nan"
    out.mkdir()
    import yaml

    config = out / "pretrain.yaml"
    config.write_text(yaml.safe_dump(_tiny_config(raw_store, out, saveckp_freq=2, log_every=5, fused_adamw=True,
                                                  max_steps=6).to_dict()))
    real_loss = dino_losses.dino_loss_from_targets
    calls = {"n": 0}

    def loss_with_inf_at_step_2(*args, **kwargs):
        calls["n"] += 1
        loss = real_loss(*args, **kwargs)
        return loss * float("inf") if calls["n"] == 3 else loss

    monkeypatch.setattr(dino_losses, "dino_loss_from_targets", loss_with_inf_at_step_2)
    code = cli.main(["--config", str(config)])
    err = capsys.readouterr().err
    assert code == 3
    # read at the step-4 checkpoint boundary: the first bad step is named, the step-2 checkpoint is kept
    assert "loss is inf at step 2" in err and "(step 2)" in err
    assert calls["n"] == 4 and _load_checkpoint(out)["step"] == 2
