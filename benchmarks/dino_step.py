"""DINO training-step throughput: our step against facebookresearch/dino's own `train_one_epoch` step.

The baseline is DINO's code, imported unchanged from `../shared/baselines/facebookresearch-dino` (its ViT,
`DINOHead`, `MultiCropWrapper`, `DINOLoss`, `get_params_groups`, `clip_gradients`, `cancel_gradients_last_layer`
and the body of `train_one_epoch`: schedules into the param groups, autocast + GradScaler when fp16 (CUDA only, as
upstream), `teacher(images[:2])`, `student(images)`, the loss, `.item()` check, clipping, the optimizer step and
the EMA loop). A world-size-1 gloo group exists because `DINOLoss.update_center` all-reduces unconditionally.
Ours is the training loop's own step, `step.DINOTrainStep`, at the precision the loop picks for the device
(`step.resolve_precision("auto")`: bf16 autocast where the CPU has native bf16, with the head's last layer
and the loss in fp32). Both train models of the same sizes (DINO's ViT vs our timm ViT, same patch size, width,
depth and head) on the same pre-made crops, timed in alternating rounds in one process; medians are compared.

    .venv/bin/python benchmarks/dino_step.py --quick [--config quick|vits16] [--json out.json]
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import resource
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from exaonepath_core.config import PRECISIONS
from exaonepath_core.models.backbones import create_backbone
from exaonepath_core.pretrain import head as dino_head
from exaonepath_core.pretrain import step as pretrain_step

CONFIGS = {
    # the smoke profile's tiny ViT at small crops (patch 8 so the crops hold 64 / 16 tokens)
    "quick": {"dino_arch": "vit_tiny", "arch": "vit_tiny_patch16_224", "patch_size": 8, "global_size": 64,
              "local_size": 32, "n_local": 4, "batch": 16, "out_dim": 2048, "hidden_dim": 512,
              "bottleneck_dim": 128},
    # ViT-S/16 at the recipe's crops, 2 x 224 + 10 x 96, batch 16, DINO's default head
    "vits16": {"dino_arch": "vit_small", "arch": "vit_small_patch16_224", "patch_size": 16, "global_size": 224,
               "local_size": 96, "n_local": 10, "batch": 16, "out_dim": 65536, "hidden_dim": 2048,
               "bottleneck_dim": 256},
    # the paper profile (GPU): ViT-B/16, 2 x 224 + 8 x 96, batch 64
    "vitb16": {"dino_arch": "vit_base", "arch": "vit_base_patch16_224", "patch_size": 16, "global_size": 224,
               "local_size": 96, "n_local": 8, "batch": 64, "out_dim": 65536, "hidden_dim": 2048,
               "bottleneck_dim": 256},
}
HYPER = {"lr": 1e-4, "wd": 0.04, "momentum": 0.996, "teacher_temp": 0.04, "student_temp": 0.1, "clip": 3.0}


def default_baseline_dir() -> Path:
    """`<repo>/../shared/baselines` or, failing that, the `baselines` folder beside EXAONEPATH_TEST_DATA."""
    repo = Path(__file__).resolve().parents[1]
    candidates = [repo.parent / "shared" / "baselines"]
    if os.environ.get("EXAONEPATH_TEST_DATA"):
        candidates.append(Path(os.environ["EXAONEPATH_TEST_DATA"]).resolve().parent / "baselines")
    candidates.append(Path("/work/shared/baselines"))
    return next((c for c in candidates if (c / "facebookresearch-dino").is_dir()), candidates[0])


def import_dino(baseline_dir: Path) -> dict:
    """DINO's modules (`main_dino`, `utils`, `vision_transformer`) from the baseline folder."""
    folder = baseline_dir / "facebookresearch-dino"
    if not (folder / "main_dino.py").is_file():
        raise FileNotFoundError(f"facebookresearch/dino baseline not found at {folder} (see shared/baselines/README.md;"
                                " pass --baseline-dir)")
    sys.path.insert(0, str(folder))
    import main_dino
    import utils
    import vision_transformer

    return {"main_dino": main_dino, "utils": utils, "vits": vision_transformer}


def ensure_process_group() -> None:
    """A world-size-1 gloo group, as main_dino always has (DINOLoss.update_center all-reduces)."""
    import torch.distributed as dist

    if not dist.is_initialized():
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(29500 + os.getpid() % 20000))
        dist.init_process_group("gloo", rank=0, world_size=1)


class DinoStep:
    """facebookresearch/dino's own step (the body of `train_one_epoch`), on its own networks."""

    def __init__(self, p: dict, modules: dict, device: torch.device) -> None:
        vits, utils, main_dino = modules["vits"], modules["utils"], modules["main_dino"]
        torch.manual_seed(0)
        nets = []
        for _ in range(2):
            backbone = vits.__dict__[p["dino_arch"]](patch_size=p["patch_size"], img_size=[p["global_size"]],
                                                     drop_path_rate=0.0)
            head = vits.DINOHead(backbone.embed_dim, p["out_dim"], use_bn=False, norm_last_layer=True,
                                 hidden_dim=p["hidden_dim"], bottleneck_dim=p["bottleneck_dim"])
            nets.append(utils.MultiCropWrapper(backbone, head).to(device))
        self.student, self.teacher = nets
        self.teacher.load_state_dict(self.student.state_dict())
        for param in self.teacher.parameters():
            param.requires_grad = False
        self.loss = main_dino.DINOLoss(p["out_dim"], p["n_local"] + 2, HYPER["teacher_temp"], HYPER["teacher_temp"],
                                       0, 10, student_temp=HYPER["student_temp"]).to(device)
        self.optimizer = torch.optim.AdamW(utils.get_params_groups(self.student))
        # main_dino: GradScaler when use_fp16 (its default), with torch.cuda.amp autocast: CUDA only
        self.fp16_scaler = torch.amp.GradScaler("cuda") if device.type == "cuda" else None
        self.utils = utils

    def __call__(self, images: list[torch.Tensor]) -> float:
        for i, group in enumerate(self.optimizer.param_groups):
            group["lr"] = HYPER["lr"]
            if i == 0:
                group["weight_decay"] = HYPER["wd"]
        with torch.autocast("cuda", enabled=self.fp16_scaler is not None):
            teacher_output = self.teacher(images[:2])
            student_output = self.student(images)
            loss = self.loss(student_output, teacher_output, 0)
        if not math.isfinite(loss.item()):
            raise RuntimeError(f"DINO's step: loss is {loss.item()}")
        self.optimizer.zero_grad()
        if self.fp16_scaler is None:
            loss.backward()
            self.utils.clip_gradients(self.student, HYPER["clip"])
            self.utils.cancel_gradients_last_layer(1, self.student, 0)
            self.optimizer.step()
        else:
            self.fp16_scaler.scale(loss).backward()
            self.fp16_scaler.unscale_(self.optimizer)
            self.utils.clip_gradients(self.student, HYPER["clip"])
            self.utils.cancel_gradients_last_layer(1, self.student, 0)
            self.fp16_scaler.step(self.optimizer)
            self.fp16_scaler.update()
        with torch.no_grad():
            m = HYPER["momentum"]
            for param_q, param_k in zip(self.student.parameters(), self.teacher.parameters()):
                param_k.data.mul_(m).add_((1 - m) * param_q.detach().data)
        if images[0].device.type == "cuda":
            torch.cuda.synchronize()
        return loss.item()


class OurStep:
    """The production step, `step.DINOTrainStep`, as the training loop builds it for this device."""

    def __init__(self, p: dict, device: torch.device, precision: str, compile_model: bool,
                 attention: str = "auto") -> None:
        torch.manual_seed(0)
        nets = []
        for _ in range(2):
            backbone = create_backbone(p["arch"], p["global_size"], p["patch_size"])
            head = dino_head.DINOHead(backbone.num_features, p["out_dim"], p["hidden_dim"], p["bottleneck_dim"])
            nets.append(dino_head.MultiCropWrapper(backbone, head).to(device))
        self.student, self.teacher = nets
        self.teacher.load_state_dict(self.student.state_dict())
        self.teacher.requires_grad_(False)
        if compile_model:
            self.student.backbone.compile()
            self.teacher.backbone.compile()
        optimizer = pretrain_step.make_optimizer(self.student, fused=True)
        self.step = pretrain_step.DINOTrainStep(self.student, self.student, self.teacher, optimizer,
                                                student_temp=HYPER["student_temp"], centering="center",
                                                sinkhorn_iterations=3, clip_grad=HYPER["clip"],
                                                precision=precision)
        if attention == "fused" and self.step.attention == "math":  # the ablation: undo the step's CPU bf16 switch
            pretrain_step.set_fused_attention_(self.student, True)
            pretrain_step.set_fused_attention_(self.teacher, True)
            self.step.attention = "fused"
        self.center = torch.zeros(1, p["out_dim"], device=device)

    def __call__(self, images: list[torch.Tensor]) -> float:
        result = self.step(images, self.center, lr=HYPER["lr"], weight_decay=HYPER["wd"],
                           teacher_temp=HYPER["teacher_temp"], momentum=HYPER["momentum"], freeze_last_layer=False)
        self.center = self.step.next_center(self.center, result.teacher_out, 0.9)
        return result.loss  # a host read, as DINO's step does every step (the training loop reads every log_every)


def make_crops(p: dict, device: torch.device) -> list[torch.Tensor]:
    """Pre-made normalised crops (the step is timed, not the augmentation)."""
    gen = torch.Generator().manual_seed(0)
    sizes = [p["global_size"]] * 2 + [p["local_size"]] * p["n_local"]
    return [torch.randn(p["batch"], 3, s, s, generator=gen).to(device) for s in sizes]


def _timed(step, crops: list[torch.Tensor], device: torch.device) -> tuple[float, float]:
    """(wall seconds, CPU seconds of this process) of one step."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start, start_cpu = time.perf_counter(), time.process_time()
    loss = step(crops)  # both read the loss on the host, which waits for the device
    if not math.isfinite(loss):
        raise RuntimeError("non-finite loss in the benchmark")
    return time.perf_counter() - start, time.process_time() - start_cpu


def write_json(path: Path, result: dict) -> None:
    """Atomic JSON write (temporary file + rename)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(result, indent=2) + "\n")
    tmp.replace(path)


def main(argv: list[str] | None = None) -> dict:
    """Run the comparison and print/return the result dict."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="few steps (CI / loaded machines)")
    parser.add_argument("--config", choices=sorted(CONFIGS), default=None,
                        help="model and crops (default: quick on CPU, vitb16 on CUDA)")
    parser.add_argument("--json", type=Path, default=None, help="write the result here")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--steps", type=int, default=None, help="timed steps per method")
    parser.add_argument("--batch", type=int, default=None, help="override the configuration's batch size")
    parser.add_argument("--precision", default="auto", choices=["auto", *PRECISIONS])
    parser.add_argument("--no-compile", action="store_true", help="skip torch.compile on CUDA")
    parser.add_argument("--attention", default="auto", choices=["auto", "fused"],
                        help="auto: the step's own choice (math attention on CPU bf16); fused: keep timm's SDPA")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--baseline-dir", type=Path, default=None, help="folder holding facebookresearch-dino/")
    args = parser.parse_args(argv)

    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device("cuda" if args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
                          else "cpu")
    name = args.config or ("vitb16" if device.type == "cuda" else "quick")
    p = dict(CONFIGS[name])
    if args.batch:
        p["batch"] = args.batch
    slow = name != "quick" and device.type == "cpu"
    steps = args.steps or (2 if slow else 3 if args.quick else 10)
    warmup = 1 if device.type == "cpu" else 5  # compile/autotuning happen in warm-up
    compile_model = device.type == "cuda" and not args.no_compile
    precision = pretrain_step.resolve_precision(args.precision, device)
    try:
        modules = import_dino(args.baseline_dir or default_baseline_dir())
    except FileNotFoundError as err:
        print(f"SKIPPED: {err}")
        result = {"skipped": str(err)}
        if args.json:
            write_json(args.json, result)
        return result
    ensure_process_group()

    crops = make_crops(p, device)
    theirs, ours = DinoStep(p, modules, device), OurStep(p, device, precision, compile_model, args.attention)
    for _ in range(warmup):
        _timed(theirs, crops, device)
        _timed(ours, crops, device)
    dino_runs, our_runs = [], []
    for _ in range(steps):  # alternate so load drift affects both
        dino_runs.append(_timed(theirs, crops, device))
        our_runs.append(_timed(ours, crops, device))
    dino_times, our_times = [r[0] for r in dino_runs], [r[0] for r in our_runs]
    dino_ips = p["batch"] / statistics.median(dino_times)
    our_ips = p["batch"] / statistics.median(our_times)
    # CPU seconds per step: on a loaded shared machine wall time is mostly waiting for a core; with one thread
    # (no spinning intra-op pool) the CPU time is the work a step does
    cpu_ratio = statistics.median(r[1] for r in dino_runs) / statistics.median(r[1] for r in our_runs)
    model = (f"{p['arch']} patch{p['patch_size']} 2x{p['global_size']}+{p['n_local']}x{p['local_size']} "
             f"batch{p['batch']} out_dim{p['out_dim']}")
    result = {
        "config": name,
        "ours_img_per_s": our_ips,
        "dino_img_per_s": dino_ips,
        "ratio_vs_dino": our_ips / dino_ips,
        "ratio_vs_dino_cpu_time": cpu_ratio,
        # older readers (tools/device_check.sh) use these names
        "reference_img_per_s": dino_ips,
        "ratio": our_ips / dino_ips,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda"
        else f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)",
        "model": model,
        "steps": steps,
        "ours_step_s": our_times,
        "dino_step_s": dino_times,
        "ours_step_cpu_s": [r[1] for r in our_runs],
        "dino_step_cpu_s": [r[1] for r in dino_runs],
        "ours_precision": precision,
        "ours_attention": ours.step.attention,
        "dino_precision": "fp16 + GradScaler" if device.type == "cuda" else "fp32 (its autocast is CUDA-only)",
        "ours_features": "pretrain_step.DINOTrainStep: grouped crops, fused AdamW, foreach clipping and EMA, "
                         f"{precision} autocast (last layer and loss fp32), {ours.step.attention} attention, "
                         "no collectives in a world of one"
                         + (", torch.compile" if compile_model else ""),
        "torch": torch.__version__,
        "load_avg": list(os.getloadavg()),
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }
    if device.type == "cuda":
        result["peak_gpu_mem_mb"] = torch.cuda.max_memory_allocated(device) / 2**20
    print(f"model: {model} on {result['device']} (load {result['load_avg'][0]:.1f})")
    print(f"facebookresearch/dino step : {dino_ips:8.2f} img/s ({result['dino_precision']})")
    print(f"ours (DINOTrainStep)       : {our_ips:8.2f} img/s ({precision}, {ours.step.attention} attention)")
    print(f"ratio_vs_dino              : {result['ratio_vs_dino']:8.2f}x (CPU time per step: {cpu_ratio:.2f}x)")
    if args.json:
        write_json(args.json, result)
    return result


if __name__ == "__main__":
    main()
