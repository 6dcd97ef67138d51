"""The whole pretraining loop against its step alone, and the host time of the device-side multi-crop.

1. Loop vs step, same configuration, same process, alternating rounds: `train.train` on a small real patch
   store (96 px tiles cut at ~1 um/px from the CMU-1 small-region slide in EXAONEPATH_TEST_DATA/wsi; the loader,
   decode, the stain step where the arm has one, the multi-crop and the step), against `step.DINOTrainStep`
   fed pre-made crops of the same shapes. Both rates are medians over steps with the first (warm-up) left out;
   the loop's rate is measured between its host reads, so it includes waiting for data.
2. `host_ms_per_step` for the device path at the ViT-B/16 recipe's shapes (batch 64, 2 x 224 + 10 x 96 crops):
   the main thread's CPU time (`time.thread_time`, robust to a shared machine's waits; wall time beside it) to run `MultiCropAugmentation.apply_on_device` (build every weight from the parameter
   tensor and queue every op) with the recipe's batch and crop counts at a tiny spatial size, so the kernels
   themselves cost ~nothing and what remains is the per-op host cost (Python, dispatcher, allocation) a GPU run
   pays while its kernels run on the device. The op sequence does not depend on image size or parameters (no
   host reads: the path runs on meta tensors, a test checks it). Drawing the parameters (`sample_params`) runs in
   the loader's workers beside the step and is reported apart (`param_sampling_ms_per_batch`).

    .venv/bin/python benchmarks/pretrain_loop.py --quick [--json out.json] [--arm raw|macenko|stain_augmentation]
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from exaonepath_core import config
from exaonepath_core.models.backbones import create_backbone
from exaonepath_core.pretrain import head as dino_head
from exaonepath_core.pretrain import multicrop, view_params
from exaonepath_core.pretrain import step as pretrain_step
from exaonepath_core.pretrain import train as trainer

TILE = 96
SMOKE = {  # the smoke profile's pretraining settings (configs/smoke.yaml), fewer steps
    "arch": "vit_tiny_patch16_224", "patch_size": 16, "drop_path_rate": 0.0, "out_dim": 1024,
    "head_hidden_dim": 512, "head_bottleneck_dim": 128, "global_crop_size": 64, "local_crop_size": 32,
    "n_local_crops": 4, "norm_last_layer": False, "batch_size_per_gpu": 64, "lr": 0.002, "warmup_epochs": 0,
    "centering": "sinkhorn_knopp", "teacher_temp": 0.02, "warmup_teacher_temp": 0.02, "freeze_last_layer": 0,
    "momentum_teacher": 0.99, "num_workers": 0, "progress_bar": False, "saveckp_freq": 10**6,
}


def build_store(root: Path, data: Path) -> Path:
    """A raw patch store of 96 px tiles of the CMU-1 small region at half resolution, as two 'slides'."""
    import openslide

    from exaonepath_core.data.patch_store import PatchStoreWriter

    path = data / "wsi" / "CMU-1-Small-Region.svs"
    if not path.is_file():
        raise FileNotFoundError(f"benchmark slide not found: {path} (set EXAONEPATH_TEST_DATA to shared/data)")
    slide = openslide.OpenSlide(str(path))
    width, height = slide.dimensions
    region = np.asarray(slide.read_region((0, 0), 0, (width, height)).convert("RGB"))[::2, ::2]  # ~1 um/px
    slide.close()
    rows, cols = region.shape[0] // TILE, region.shape[1] // TILE
    coords = np.array([(c * TILE, r * TILE) for r in range(rows) for c in range(cols)], dtype=np.int64)
    tiles = np.stack([region[y:y + TILE, x:x + TILE] for x, y in coords])
    writer = PatchStoreWriter(root, TILE, "raw")
    half = len(coords) // 2
    for index, part in enumerate((slice(0, half), slice(half, None))):
        writer.write_slide(f"cmu_part{index}", coords[part] * 2, [tiles[part]])
    writer.finalize()
    return root


def loop_rate(cfg: config.PretrainConfig) -> tuple[float, int]:
    """The training loop's median img/s (first read interval left out) and its number of steps."""
    summary = trainer.train(cfg)
    return float(summary["median_img_per_s"]), int(summary["steps"])


def step_rates(cfg: config.PretrainConfig, steps: int) -> list[float]:
    """img/s of `DINOTrainStep` alone on pre-made crops of the loop's shapes (first step left out)."""
    torch.manual_seed(cfg.seed)
    nets = []
    for drop_path in (cfg.drop_path_rate, 0.0):
        backbone = create_backbone(cfg.arch, cfg.global_crop_size, cfg.patch_size, drop_path_rate=drop_path)
        head = dino_head.DINOHead(backbone.num_features, cfg.out_dim, cfg.head_hidden_dim, cfg.head_bottleneck_dim,
                                  norm_last_layer=cfg.norm_last_layer, fp32_last_layer=cfg.fp32_last_layer)
        nets.append(dino_head.MultiCropWrapper(backbone, head))
    student, teacher = nets
    teacher.load_state_dict(student.state_dict())
    teacher.requires_grad_(False)
    device = torch.device("cpu")
    optimizer = pretrain_step.make_optimizer(student, cfg.fused_adamw)
    step = pretrain_step.DINOTrainStep(student, student, teacher, optimizer,
                                       student_temp=cfg.student_temp, centering=cfg.centering,
                                       sinkhorn_iterations=cfg.sinkhorn_iterations, clip_grad=cfg.clip_grad,
                                       precision=pretrain_step.run_precision(cfg, device))
    gen = torch.Generator().manual_seed(0)
    sizes = [cfg.global_crop_size] * 2 + [cfg.local_crop_size] * cfg.n_local_crops
    crops = [torch.randn(cfg.batch_size_per_gpu, 3, s, s, generator=gen) for s in sizes]
    center = torch.zeros(1, cfg.out_dim)
    rates = []
    for _ in range(steps):
        start = time.perf_counter()
        result = step(crops, center, lr=1e-4, weight_decay=0.04, teacher_temp=cfg.teacher_temp,
                      momentum=0.99, freeze_last_layer=False)
        center = step.next_center(center, result.teacher_out, cfg.center_momentum)
        float(result.loss_tensor)
        rates.append(cfg.batch_size_per_gpu / (time.perf_counter() - start))
    return rates[1:]


def host_ms_per_step(repeats: int) -> dict:
    """Host time of the device multi-crop at the recipe's batch and crop counts (see the module docstring)."""
    recipe = multicrop.MultiCropAugmentation(global_size=224, local_size=96, n_local=10)
    batch = 64
    gen = torch.Generator().manual_seed(0)
    start = time.perf_counter()
    params = torch.stack([recipe.sample_params(256, 256, gen) for _ in range(batch)])
    sampling_ms = (time.perf_counter() - start) * 1e3
    # same op sequence, tiny pixels: the kernels cost ~nothing, the host work per op remains
    tiny = multicrop.MultiCropAugmentation(global_size=4, local_size=2, n_local=10)
    images = torch.zeros(batch, 8, 8, 3, dtype=torch.uint8)
    tiny_params = params.clone()
    tiny_params[..., view_params.P_TOP:view_params.P_WIDTH + 1] = torch.tensor([0.0, 0.0, 8.0, 8.0])
    from torch.utils._python_dispatch import TorchDispatchMode

    class CountOps(TorchDispatchMode):
        count = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            CountOps.count += 1
            return func(*args, **(kwargs or {}))

    with CountOps():
        tiny.apply_on_device(images, tiny_params)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the host thread of a GPU run; avoids intra-op pool wake-ups here
    times = []
    try:
        for _ in range(repeats + 2):
            # CPU time of this thread: what the host spends, not the waits for a core on a shared machine
            start, start_wall = time.thread_time(), time.perf_counter()
            tiny.apply_on_device(images, tiny_params)
            times.append(((time.thread_time() - start) * 1e3, (time.perf_counter() - start_wall) * 1e3))
    finally:
        torch.set_num_threads(threads)
    return {"host_ms_per_step": statistics.median(t[0] for t in times[2:]),
            "host_wall_ms_per_step": statistics.median(t[1] for t in times[2:]),
            "host_ops_per_step": CountOps.count, "param_sampling_ms_per_batch": sampling_ms}


def main(argv: list[str] | None = None) -> dict:
    """Run both measurements and print/return the result dict."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="few steps (CI / loaded machines)")
    parser.add_argument("--json", type=Path, default=None, help="write the result here")
    parser.add_argument("--arm", default="raw", choices=config.INPUT_ARMS)
    parser.add_argument("--rounds", type=int, default=None, help="alternating loop / step rounds (2 quick, 3)")
    parser.add_argument("--data", type=Path, default=Path(os.environ.get("EXAONEPATH_TEST_DATA", "../shared/data")))
    args = parser.parse_args(argv)
    rounds = args.rounds or (2 if args.quick else 3)
    steps = 4 if args.quick else 8

    host = host_ms_per_step(repeats=5 if args.quick else 20)
    with tempfile.TemporaryDirectory(prefix="pretrain_loop_") as tmp:
        store = build_store(Path(tmp) / "store", args.data)
        loop_rates, single_rates = [], []
        for round_index in range(rounds):  # alternate so load drift hits both
            cfg = config.PretrainConfig(**SMOKE, input_arm=args.arm, data_root=str(store), epochs=100,
                                          max_steps=steps, output_dir=str(Path(tmp) / f"run{round_index}"))
            rate, _ = loop_rate(cfg)
            loop_rates.append(rate)
            single_rates.extend(step_rates(cfg, steps))
    loop_ips, step_ips = statistics.median(loop_rates), statistics.median(single_rates)
    result = {
        "loop_img_per_s": loop_ips,
        "step_img_per_s": step_ips,
        "loop_over_step": loop_ips / step_ips,
        **host,
        "host_ms_how": "main-thread time of apply_on_device at batch 64, 2x224+10x96 crop counts, tiny pixels "
                       "(kernels ~free): per-op host cost of the fixed op sequence; sample_params apart (workers)",
        "config": f"smoke pretrain settings, arm {args.arm}, {steps} steps x {rounds} rounds",
        "precision": pretrain_step.resolve_precision("auto", torch.device("cpu")),
        "loop_img_per_s_rounds": loop_rates,
        "torch": torch.__version__,
        "load_avg": list(os.getloadavg()),
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }
    print(f"loop  : {loop_ips:8.2f} img/s   step alone: {step_ips:8.2f} img/s   loop/step {result['loop_over_step']:.2f}")
    print(f"device multi-crop host time at ViT-B/16 recipe shapes: {host['host_ms_per_step']:.2f} ms/step "
          f"({host['host_ops_per_step']} ops; parameter sampling {host['param_sampling_ms_per_batch']:.1f} ms/batch "
          "in the loader workers)")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        tmp_json = args.json.with_name(f".{args.json.name}.tmp")
        tmp_json.write_text(json.dumps(result, indent=2) + "\n")
        tmp_json.replace(args.json)
    return result


if __name__ == "__main__":
    main()
