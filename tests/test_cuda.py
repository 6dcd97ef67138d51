"""CUDA correctness: Macenko on the GPU equals the CPU, stain augmentation and the DINO step (bf16, fused AdamW,
torch.compile) behave on the GPU, train() on CUDA exports a teacher that loads on CPU.

Every test skips without a CUDA device (CI and the CPU machines); tools/device_check.sh runs them on a GPU.
Real tiles come from `.device_data/` (staged by tools/prepare_device_check.sh, the GPU machine has no OpenSlide)
or, failing that, from the CMU slide in the shared data folder.
"""
from __future__ import annotations

import json
import math
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from exaonepath_core.config import PretrainConfig
from exaonepath_core.data.stain.augment import stain_augment_batch
from exaonepath_core.data.stain.macenko import MacenkoNormalizer, fit_reference, macenko_normalize_batch
from exaonepath_core.data.stain.reference import MacenkoReference
from exaonepath_core.models.backbones import create_backbone
from exaonepath_core.pretrain import checkpoint as checkpoints
from exaonepath_core.pretrain import head as dino_head
from exaonepath_core.pretrain import loss as dino_losses
from exaonepath_core.pretrain import multicrop
from exaonepath_core.pretrain import train as trainer

CUDA = torch.cuda.is_available()
pytestmark = pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU (tools/device_check.sh runs these on one)")

REPO_ROOT = Path(__file__).resolve().parents[1]
TILE = 224


def _device_data_dir() -> Path:
    """Where tools/prepare_device_check.sh staged the real inputs (EXAONEPATH_DEVICE_DATA overrides)."""
    return Path(os.environ.get("EXAONEPATH_DEVICE_DATA", REPO_ROOT / ".device_data"))


def _rgb(path: Path) -> np.ndarray:
    from PIL import Image

    return np.asarray(Image.open(path).convert("RGB"))


@pytest.fixture(scope="module")
def cmu_tiles(request) -> np.ndarray:
    """The 117 real 224 px tiles of the CMU-1-Small-Region grid (tissue and background), uint8 (N, H, W, 3)."""
    staged = _device_data_dir() / "cmu_tiles_224.npy"
    if staged.is_file():
        return np.load(staged)
    shared = request.getfixturevalue("shared_data")
    openslide = pytest.importorskip("openslide", reason="no staged tiles and no OpenSlide to read the slide")
    with openslide.OpenSlide(str(shared / "wsi" / "CMU-1-Small-Region.svs")) as slide:
        width, height = slide.dimensions
        coords = [(x, y) for y in range(0, height - TILE + 1, TILE) for x in range(0, width - TILE + 1, TILE)]
        return np.stack([np.asarray(slide.read_region(xy, 0, (TILE, TILE)).convert("RGB")) for xy in coords])


@pytest.fixture(scope="module")
def stain_images(request) -> dict[str, np.ndarray]:
    """The TIA toolbox golden Macenko triple (source, target, expected output) and a TCGA H&E region."""
    names = {"source": "tiatoolbox_source_image.png", "target": "tiatoolbox_target_image.png",
             "golden": "tiatoolbox_norm_macenko.png", "tcga": "tiatoolbox_TCGA-HE-7130-01Z-00-DX1.png"}
    staged = _device_data_dir()
    if all((staged / name).is_file() for name in names.values()):
        folder = staged
    else:
        folder = request.getfixturevalue("shared_data") / "stain"
    return {key: _rgb(folder / name) for key, name in names.items()}


def _tissue_tiles(tiles: np.ndarray, count: int) -> np.ndarray:
    """The `count` tiles with the most tissue (darkest mean), for steps that should see H&E, not glass."""
    order = np.argsort(tiles.reshape(len(tiles), -1).mean(axis=1))
    return tiles[np.sort(order[:count])]


# ---------------------------------------------------------------------------------------------------------------
# Macenko
# ---------------------------------------------------------------------------------------------------------------
def test_macenko_cuda_equals_cpu_on_real_tiles(cmu_tiles):
    tiles = torch.from_numpy(cmu_tiles)
    cpu, cpu_fallback = macenko_normalize_batch(tiles, backend="torch")
    gpu, gpu_fallback = macenko_normalize_batch(tiles.cuda())  # auto: the torch backend on CUDA
    gpu, gpu_fallback = gpu.cpu(), gpu_fallback.cpu()
    assert gpu.dtype == torch.uint8 and gpu.shape == tiles.shape
    assert torch.equal(gpu_fallback, cpu_fallback), "fallback masks differ between CUDA and CPU"
    assert 0 < int(gpu_fallback.sum()) < len(tiles)  # the grid holds background and tissue tiles
    assert torch.equal(gpu[gpu_fallback], tiles[gpu_fallback])  # fallback tiles pass through unchanged
    per_tile = (gpu.int() - cpu.int()).abs().float().mean(dim=(1, 2, 3))
    worst = {int(i): round(per_tile[i].item(), 3) for i in per_tile.argsort(descending=True)[:5]}
    # below one grey level per tile (1/255 on a 0-1 scale); rounding of float differences flips a few pixels
    assert per_tile.max().item() < 1.0, f"tiles with the largest mean |CUDA - CPU| (grey levels): {worst}"
    assert per_tile.mean().item() < 0.1, f"mean over tiles {per_tile.mean().item():.4f}; worst {worst}"
    fused, fused_fallback = macenko_normalize_batch(tiles, backend="numba")  # the CPU default backend too
    assert torch.equal(fused_fallback, gpu_fallback)
    assert (gpu.int() - fused.int()).abs().float().mean(dim=(1, 2, 3)).max().item() < 1.0


def test_macenko_cuda_matches_fingerprint_made_on_another_machine(cmu_tiles):
    path = _device_data_dir() / "cmu_macenko_cpu_fingerprint.json"
    if not path.is_file():
        pytest.skip(f"{path} not staged (run tools/prepare_device_check.sh)")
    fingerprint = json.loads(path.read_text())
    assert fingerprint["n_tiles"] == len(cmu_tiles)
    gpu, fallback = macenko_normalize_batch(torch.from_numpy(cmu_tiles).cuda())
    np.testing.assert_array_equal(fallback.cpu().numpy().astype(int), fingerprint["fallback"])
    means = gpu.cpu().numpy().reshape(len(cmu_tiles), -1, 3).mean(axis=1)
    difference = np.abs(means - np.array(fingerprint["channel_means"]))
    assert difference.max() < 0.5, difference.max()  # grey levels of the per-tile channel mean


def test_macenko_cuda_golden_image(stain_images):
    reference = fit_reference(stain_images["target"])
    normalizer = MacenkoNormalizer(reference, device="cuda")
    ours = normalizer.normalize(stain_images["source"])  # numpy in, numpy out, computed on the GPU
    error = np.abs(ours / 255 - stain_images["golden"] / 255).mean()
    assert error < 0.02, error  # the CPU test's bound (torchstain itself gives 0.0134)
    assert normalizer.patch_count == 1 and normalizer.fallback_count == 0


def test_macenko_cuda_batch_equals_one_by_one_and_chunking(cmu_tiles):
    chosen = torch.from_numpy(cmu_tiles[[0, 13, 40, 41, 57, 80, 100, 116]]).cuda()  # tissue and background
    whole, whole_fallback = macenko_normalize_batch(chosen)
    chunked, chunked_fallback = macenko_normalize_batch(chosen, chunk_size=3)
    assert torch.equal(whole_fallback, chunked_fallback)
    for i in range(len(chosen)):
        single, single_fallback = macenko_normalize_batch(chosen[i:i + 1])
        assert single_fallback.item() == whole_fallback[i].item()
        for batched in (whole, chunked):
            difference = (single[0].int() - batched[i].int()).abs()
            # batched kernels may round a handful of pixels the other way, never by more than one level
            assert difference.max().item() <= 1 and difference.float().mean().item() < 1e-3


def test_stain_augmentation_cuda_is_deterministic_per_seed(cmu_tiles):
    patches = torch.from_numpy(_tissue_tiles(cmu_tiles, 6)).cuda()
    patches = torch.cat([patches, torch.full_like(patches[:1], 250)])  # plus one blank (no stain estimate)

    def augment(seed: int, **kwargs) -> torch.Tensor:
        return stain_augment_batch(patches, torch.Generator(device="cuda").manual_seed(seed), **kwargs)

    first, again, other = augment(3), augment(3), augment(4)
    assert first.device.type == "cuda" and first.dtype == torch.uint8 and first.shape == patches.shape
    assert torch.equal(first, again) and not torch.equal(first, other)
    identity = augment(3, sigma_scale=0.0, sigma_shift=0.0)
    assert (identity.int() - patches.int()).abs().max().item() <= 1  # a = 1, s = 0 gives the input back
    change = (first.int() - patches.int()).abs().float().mean(dim=(1, 2, 3))
    assert (change[:6] > 1).all() and (change < 40).all(), change.tolist()


# ---------------------------------------------------------------------------------------------------------------
# DINO on the GPU
# ---------------------------------------------------------------------------------------------------------------
def _tiny_student(seed: int, out_dim: int = 64) -> dino_head.MultiCropWrapper:
    torch.manual_seed(seed)
    backbone = create_backbone("vit_tiny_patch16_224", img_size=32, patch_size=8)
    head = dino_head.DINOHead(backbone.num_features, out_dim=out_dim, hidden_dim=64, bottleneck_dim=16)
    return dino_head.MultiCropWrapper(backbone, head)


def _real_views(tiles: np.ndarray, batch: int) -> list[torch.Tensor]:
    """Multi-crop views (2 x 32 px global, 2 x 16 px local) of real tissue tiles, fixed by seed, on the GPU."""
    aug = multicrop.MultiCropAugmentation(global_size=32, local_size=16, n_local=2)
    chosen = _tissue_tiles(tiles, batch)
    per_sample = [aug(chosen[i], torch.Generator().manual_seed(i)) for i in range(batch)]
    return [torch.stack([s[c] for s in per_sample]).cuda() for c in range(aug.n_crops)]


def test_bf16_fused_adamw_steps_decrease_loss_on_cuda(cmu_tiles):
    student, teacher = _tiny_student(0).cuda(), _tiny_student(1).cuda()
    teacher.load_state_dict(student.state_dict())
    teacher.requires_grad_(False)
    views = _real_views(cmu_tiles, 8)
    center = torch.zeros(1, 64, device="cuda")
    optimizer = torch.optim.AdamW([p for p in student.parameters() if p.requires_grad], lr=1e-3, fused=True)
    losses = []
    for _ in range(10):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            with torch.no_grad():
                teacher_out = teacher(views[:2])
            student_out = student(views)
        assert student_out.dtype == torch.bfloat16  # autocast really ran the network in bf16
        loss = dino_losses.dino_loss(student_out, teacher_out, center, 0.1, 0.04)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        dino_losses.ema_update_(teacher, student, 0.99)
        center = dino_losses.update_center(center, teacher_out, 0.9)
        losses.append(loss.item())
    assert all(math.isfinite(x) for x in losses), losses
    assert losses[-1] < 0.9 * losses[0], losses
    assert all(p.dtype == torch.float32 for p in student.parameters())  # fp32 master weights


def test_compiled_backbone_matches_eager_and_keeps_state_dict_keys(cmu_tiles):
    torch.manual_seed(0)
    eager = create_backbone("vit_tiny_patch16_224", img_size=32, patch_size=8).cuda().eval()
    compiled = create_backbone("vit_tiny_patch16_224", img_size=32, patch_size=8).cuda().eval()
    compiled.load_state_dict(eager.state_dict())
    keys = list(compiled.state_dict().keys())
    compiled.compile()  # in place, as train.py does, so checkpoints keep the timm layout
    assert list(compiled.state_dict().keys()) == keys
    views = _real_views(cmu_tiles, 8)
    for crops in (views[0], views[2]):  # both resolutions (dynamic_img_size)
        with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
            expected, actual = eager(crops).float(), compiled(crops).float()
        assert actual.shape == expected.shape and torch.isfinite(actual).all()
        # bf16 rounding with fused kernels in another order: small, but not zero
        relative = ((actual - expected).norm(dim=1) / expected.norm(dim=1)).max().item()
        cosine = torch.nn.functional.cosine_similarity(actual, expected, dim=1).min().item()
        assert relative < 0.05 and cosine > 0.999, (tuple(crops.shape), relative, cosine)
    # gradients through the compiled graph agree too
    for net in (eager, compiled):
        net.train()
        net.zero_grad(set_to_none=True)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            net(views[0]).float().square().mean().backward()
    grad_eager = torch.cat([p.grad.flatten() for p in eager.parameters()])
    grad_compiled = torch.cat([p.grad.flatten() for p in compiled.parameters()])
    cosine = torch.nn.functional.cosine_similarity(grad_eager, grad_compiled, dim=0).item()
    assert cosine > 0.99, cosine


def test_train_on_cuda_exports_a_teacher_loadable_on_cpu(cmu_tiles, tmp_path):
    from exaonepath_core.data.patch_store import PatchStoreWriter

    patch = 64
    tissue = _tissue_tiles(cmu_tiles, 16)
    crops = tissue[:, :patch * 3, :patch * 3].reshape(16, 3, patch, 3, patch, 3).transpose(0, 1, 3, 2, 4, 5)
    crops = np.ascontiguousarray(crops.reshape(-1, patch, patch, 3))  # 144 real 64 px patches
    store = tmp_path / "raw"
    writer = PatchStoreWriter(store, patch, "raw")
    for slide, part in enumerate(np.array_split(np.arange(len(crops)), 2)):
        coords = np.stack([part % 9 * patch, part // 9 * patch], axis=1).astype(np.int64)
        writer.write_slide(f"cmu{slide}", coords, [crops[part]])
    writer.finalize()
    out = tmp_path / "run"
    cfg = PretrainConfig(
        arch="vit_tiny_patch16_224", patch_size=8, global_crop_size=32, local_crop_size=16, n_local_crops=2,
        out_dim=128, head_hidden_dim=64, head_bottleneck_dim=16, epochs=2, batch_size_per_gpu=16, lr=0.002,
        warmup_epochs=1, num_workers=0, seed=3, saveckp_freq=100, data_root=str(store), input_arm="macenko",
        normalize_on_the_fly=True, output_dir=str(out), progress_bar=False, device="cuda", use_amp=True,
        fused_adamw=True, compile=False, max_steps=4,
    )
    summary = trainer.train(cfg)
    assert summary["steps"] == 4 and summary["device"].startswith("cuda")
    assert math.isfinite(summary["first_step_loss"]) and math.isfinite(summary["last_step_loss"])
    meta = json.loads((out / "teacher_backbone.json").read_text())
    assert meta["arm"] == "macenko" and meta["macenko"] is True
    assert MacenkoReference.from_dict(meta["macenko_reference"]).allclose(MacenkoReference.default())
    state = torch.load(out / "teacher_backbone.pth", map_location="cpu", weights_only=True)
    assert all(t.device.type == "cpu" for t in state.values())
    backbone = checkpoints.load_teacher_backbone(out)  # CPU
    checkpoint = torch.load(out / "checkpoint.pth", map_location="cpu", weights_only=True)
    teacher = {k[len("backbone."):]: v for k, v in checkpoint["teacher"].items() if k.startswith("backbone.")}
    assert teacher.keys() == state.keys() and all(torch.equal(teacher[k], state[k]) for k in state)
    features = backbone(torch.randn(2, 3, 32, 32))
    assert features.shape == (2, 192) and torch.isfinite(features).all()


def test_device_multicrop_on_cuda_equals_the_host_path_and_prefetch_keeps_batches(cmu_tiles):
    """The CUDA multi-crop (weights built on the GPU from the parameter tensor) gives the host path's views, and
    the one-batch-ahead prefetcher delivers every batch intact on the device."""
    from exaonepath_core.pretrain import prefetch

    aug = multicrop.MultiCropAugmentation(global_size=64, local_size=32, n_local=4)
    tiles = torch.from_numpy(np.ascontiguousarray(cmu_tiles[:8]))
    params = torch.stack([aug.sample_params(tiles.shape[1], tiles.shape[2], torch.Generator().manual_seed(i))
                          for i in range(len(tiles))])
    host = aug.apply(tiles, params)
    batches = [(tiles.pin_memory(), params), (tiles.flip(0).pin_memory(), params.flip(0))]
    moved = list(prefetch.to_device(batches, torch.device("cuda")))
    assert len(moved) == 2 and all(t.is_cuda and p.is_cuda for t, p in moved)
    assert torch.equal(moved[1][0].cpu(), tiles.flip(0))
    device = aug.apply(*moved[0])
    for view_host, view_device in zip(host, device):
        torch.testing.assert_close(view_device.cpu(), view_host, rtol=0, atol=1e-4)
