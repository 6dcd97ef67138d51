"""Live training metrics: TensorBoard event files and a W&B run mirror log.jsonl, from a short real training."""
from __future__ import annotations

import json
import sys
import types
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from exaonepath_core.config import PretrainConfig
from exaonepath_core.pretrain import checkpoint as checkpoints
from exaonepath_core.pretrain import train as trainer
from exaonepath_core.pretrain import train_metrics

PATCH = 48
# the curves the issue asks for (gpu_mem_mb too, on CUDA only)
WATCHED = ("loss", "lr", "wd", "teacher_temp", "momentum", "teacher_entropy", "img_per_s")


@pytest.fixture(scope="module")
def real_patches(shared_data) -> list[np.ndarray]:
    """24 real H&E patches (48 px) cut from a TCGA region."""
    image = np.asarray(Image.open(shared_data / "stain" / "tiatoolbox_TCGA-HE-7130-01Z-00-DX1.png").convert("RGB"))
    return [np.ascontiguousarray(image[100 + PATCH * (i // 6):100 + PATCH * (i // 6 + 1),
                                       100 + PATCH * (i % 6):100 + PATCH * (i % 6 + 1)]) for i in range(24)]


def _tiny_config(out: Path, **overrides) -> PretrainConfig:
    settings = {
        "arch": "vit_tiny_patch16_224", "patch_size": 8, "global_crop_size": 32, "local_crop_size": 16,
        "n_local_crops": 2, "out_dim": 64, "head_hidden_dim": 32, "head_bottleneck_dim": 16, "epochs": 1,
        "batch_size_per_gpu": 8, "lr": 0.002, "warmup_epochs": 0, "num_workers": 0, "seed": 1,
        "saveckp_freq": 100, "input_arm": "raw", "output_dir": str(out), "progress_bar": False,
        "fused_adamw": False, "device": "cpu",
    }
    settings.update(overrides)
    return PretrainConfig(**settings)


def _log(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / checkpoints.LOG_NAME).read_text().splitlines()]


def test_tensorboard_event_files_hold_the_logged_scalars(tmp_path, real_patches, monkeypatch):
    pytest.importorskip("tensorboard", reason="TensorBoard curves need the tensorboard package (in the lock)")
    from tensorboard.backend.event_processing import event_accumulator

    monkeypatch.delitem(sys.modules, "wandb", raising=False)
    out = tmp_path / "run"
    trainer.train(_tiny_config(out), dataset=real_patches)
    assert "wandb" not in sys.modules, "wandb must be imported only when pretrain.wandb_project is set"
    records = _log(out)
    assert [r["step"] for r in records] == [1, 2, 3]  # 24 patches / batch 8 = 3 steps, 1 epoch

    events = list((out / train_metrics.TENSORBOARD_DIR).glob("events.out.tfevents.*"))
    assert len(events) == 1
    acc = event_accumulator.EventAccumulator(str(events[0]), size_guidance={event_accumulator.SCALARS: 0})
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    for name in WATCHED:
        tag = train_metrics.SCALAR_PREFIX + name
        assert tag in tags, f"{tag} missing from the event file (has {sorted(tags)})"
        scalars = acc.Scalars(tag)
        assert [s.step for s in scalars] == [r["step"] for r in records]
        # event files store float32
        np.testing.assert_allclose([s.value for s in scalars], [r[name] for r in records], rtol=1e-6)
    assert train_metrics.SCALAR_PREFIX + "gpu_mem_mb" not in tags  # None on CPU: not a curve of zeros


def test_tensorboard_off_and_absent(tmp_path, monkeypatch, capsys):
    cfg = _tiny_config(tmp_path / "a", tensorboard=False)
    assert not train_metrics.open_live_metrics(cfg, tmp_path / "a", is_main=True, start_step=0).enabled
    # a None entry makes `import torch.utils.tensorboard` raise ImportError, as when tensorboard is missing
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)
    metrics = train_metrics.open_live_metrics(_tiny_config(tmp_path / "b"), tmp_path / "b", True, 0)
    assert not metrics.enabled
    assert "TensorBoard curves off" in capsys.readouterr().out
    metrics.log({"step": 1, "loss": 1.0})  # no sink: a no-op, not an error
    metrics.close()


def test_only_rank_zero_logs(tmp_path):
    cfg = _tiny_config(tmp_path, wandb_project="never-imported")
    assert not train_metrics.open_live_metrics(cfg, tmp_path, is_main=False, start_step=0).enabled


def test_record_scalars_keep_finite_numbers_only():
    scalars = train_metrics.record_scalars({"step": 3, "epoch": 0, "loss": 2.5, "gpu_mem_mb": None,
                                            "centering": "center", "grad_norm": float("nan"), "flag": True})
    assert scalars == {"train/epoch": 0.0, "train/loss": 2.5}


class _FakeWandb(types.ModuleType):
    """Records wandb.init / run.log / run.finish calls (no network in tests)."""

    def __init__(self) -> None:
        super().__init__("wandb")
        self.inits: list[dict] = []
        self.logged: list[tuple[int, dict]] = []
        self.exit_codes: list[int] = []

    def init(self, **kwargs):
        self.inits.append(kwargs)
        fake = self

        class _Run:
            def log(self, data, step):
                fake.logged.append((step, dict(data)))

            def finish(self, exit_code):
                fake.exit_codes.append(exit_code)

        return _Run()


def test_wandb_run_mirrors_the_log_and_a_resume_continues_it(tmp_path, real_patches, monkeypatch):
    fake = _FakeWandb()
    monkeypatch.setitem(sys.modules, "wandb", fake)
    out = tmp_path / "run"
    cfg = _tiny_config(out, tensorboard=False, wandb_project="exaonepath-test", max_steps=2)
    trainer.train(cfg, dataset=real_patches)
    trainer.train(_tiny_config(out, tensorboard=False, wandb_project="exaonepath-test", max_steps=3),
                   resume=True, dataset=real_patches)

    assert len(fake.inits) == 2 and fake.exit_codes == [0, 0]
    first, second = fake.inits
    assert first["project"] == second["project"] == "exaonepath-test"
    assert first["id"] == second["id"] == (out / train_metrics.WANDB_RUN_ID_FILE).read_text().strip()
    assert first["resume"] == "allow" and first["dir"] == str(out)
    assert first["config"]["wandb_project"] == "exaonepath-test"
    records = _log(out)
    assert [step for step, _ in fake.logged] == [r["step"] for r in records] == [1, 2, 3]
    for (step, data), record in zip(fake.logged, records, strict=True):
        for name in WATCHED:
            assert data[train_metrics.SCALAR_PREFIX + name] == pytest.approx(record[name], rel=1e-12), (step, name)


def test_wandb_project_without_wandb_installed_names_the_fix(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)
    cfg = _tiny_config(tmp_path, tensorboard=False, wandb_project="p")
    with pytest.raises(ImportError, match="pip install wandb"):
        train_metrics.open_live_metrics(cfg, tmp_path, is_main=True, start_step=0)


def test_wandb_run_is_marked_failed_when_training_raises(tmp_path, monkeypatch):
    fake = _FakeWandb()
    monkeypatch.setitem(sys.modules, "wandb", fake)
    metrics = train_metrics.open_live_metrics(_tiny_config(tmp_path, tensorboard=False, wandb_project="p"),
                                              tmp_path, is_main=True, start_step=0)
    with pytest.raises(RuntimeError, match="loss is nan"):
        try:
            raise RuntimeError("loss is nan")
        finally:
            metrics.close()  # as training's finally does
    assert fake.exit_codes == [1]
