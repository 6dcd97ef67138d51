"""DINO training-step throughput: our step against a plain step written from the paper's Algorithm 1.

Both steps train the same timm ViT + DINO head on the same pre-made crops and batch, in one process; the two are
timed in alternating rounds (so machine load drifts hit both alike) and the median step time is compared.

Reference (Algorithm 1, written straightforwardly): fp32, one backbone + head call per crop, the loss as the
double loop over (teacher view, student view) pairs, plain for-loop AdamW, a per-parameter EMA loop.
Ours: the training loop's own step, `training.DINOTrainStep` (`dino.MultiCropWrapper`: one backbone call per
resolution group; the teacher targets computed once for the loss and the logged entropies; fused AdamW;
gradient clipping; `dino.ema_update_` with foreach ops), and on CUDA bf16 autocast + torch.compile (+ TF32
for the remaining fp32 matmuls, as training sets it).

    .venv/bin/python benchmarks/dino_step.py --quick [--json out.json]
"""
from __future__ import annotations

import argparse
import json
import math
import platform
import resource
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as nnf

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from exaonepath_core import dino, training
from exaonepath_core.backbones import create_backbone

PROFILES = {
    # CPU: the smoke profile's model and crops
    "cpu": {"arch": "vit_tiny_patch16_224", "patch_size": 8, "global_size": 64, "local_size": 32, "n_local": 4,
            "batch": 32, "out_dim": 2048, "hidden_dim": 512, "bottleneck_dim": 128},
    # CUDA: the paper profile (ViT-B/16, 2 x 224 + 8 x 96 crops, out_dim 65536)
    "cuda": {"arch": "vit_base_patch16_224", "patch_size": 16, "global_size": 224, "local_size": 96, "n_local": 8,
             "batch": 64, "out_dim": 65536, "hidden_dim": 2048, "bottleneck_dim": 256},
}


def build_pair(p: dict, device: torch.device, seed: int) -> tuple[dino.MultiCropWrapper, dino.MultiCropWrapper]:
    """Student and teacher with identical weights."""
    torch.manual_seed(seed)
    nets = []
    for _ in range(2):
        backbone = create_backbone(p["arch"], p["global_size"], p["patch_size"])
        head = dino.DINOHead(backbone.num_features, p["out_dim"], p["hidden_dim"], p["bottleneck_dim"])
        nets.append(dino.MultiCropWrapper(backbone, head).to(device))
    student, teacher = nets
    teacher.load_state_dict(student.state_dict())
    teacher.requires_grad_(False)
    return student, teacher


def make_crops(p: dict, device: torch.device) -> list[torch.Tensor]:
    """Pre-made normalised crops (the step is timed, not the augmentation)."""
    gen = torch.Generator().manual_seed(0)
    sizes = [p["global_size"]] * 2 + [p["local_size"]] * p["n_local"]
    return [torch.randn(p["batch"], 3, s, s, generator=gen).to(device) for s in sizes]


class ReferenceStep:
    """DINO Algorithm 1 as pseudo-code reads: per-crop calls, fp32, plain AdamW, per-parameter EMA."""

    def __init__(self, p: dict, device: torch.device) -> None:
        self.student, self.teacher = build_pair(p, device, seed=0)
        self.optimizer = torch.optim.AdamW([q for q in self.student.parameters() if q.requires_grad], lr=1e-4,
                                           weight_decay=0.04, foreach=False, fused=False)
        self.center = torch.zeros(1, p["out_dim"], device=device)
        self.tps, self.tpt, self.m, self.l = 0.1, 0.04, 0.996, 0.9

    def _net(self, net: dino.MultiCropWrapper, x: torch.Tensor) -> torch.Tensor:
        return net.head(net.backbone(x))

    def __call__(self, crops: list[torch.Tensor]) -> float:
        torch.set_float32_matmul_precision("highest")  # PyTorch's default: plain fp32
        s_out = [self._net(self.student, x) for x in crops]
        with torch.no_grad():
            t_out = [self._net(self.teacher, x) for x in crops[:2]]
        loss = 0.0
        n_terms = 0
        for iq, t in enumerate(t_out):
            for v, s in enumerate(s_out):
                if v == iq:
                    continue
                t_p = nnf.softmax((t - self.center) / self.tpt, dim=1).detach()
                s_logp = nnf.log_softmax(s / self.tps, dim=1)
                loss = loss - (t_p * s_logp).sum(dim=1).mean()
                n_terms += 1
        loss = loss / n_terms
        self.optimizer.zero_grad()
        loss.backward()
        self.optimizer.step()
        with torch.no_grad():
            for p_t, p_s in zip(self.teacher.parameters(), self.student.parameters()):
                p_t.mul_(self.m).add_((1 - self.m) * p_s)
            self.center = self.l * self.center + (1 - self.l) * torch.cat(t_out).mean(dim=0, keepdim=True)
        return loss.detach().item()


class OurStep:
    """The production step, `training.DINOTrainStep`: grouped crops, fused AdamW, foreach EMA, gradient clipping
    (which the reference does not even do); bf16 autocast and torch.compile on CUDA."""

    def __init__(self, p: dict, device: torch.device, compile_model: bool) -> None:
        self.student, self.teacher = build_pair(p, device, seed=0)
        if compile_model:
            self.student.backbone.compile()
            self.teacher.backbone.compile()
        optimizer = training.make_optimizer(self.student, fused=True)
        self.step = training.DINOTrainStep(self.student, self.student, self.teacher, optimizer, student_temp=0.1,
                                           centering="center", sinkhorn_iterations=3, clip_grad=3.0,
                                           use_amp=device.type == "cuda")
        self.center = torch.zeros(1, p["out_dim"], device=device)
        self.cuda = device.type == "cuda"

    def __call__(self, crops: list[torch.Tensor]) -> float:
        if self.cuda:
            torch.set_float32_matmul_precision("high")  # as training.py sets it on CUDA
        result = self.step(crops, self.center, lr=1e-4, weight_decay=0.04, teacher_temp=0.04, momentum=0.996,
                           freeze_last_layer=False)
        self.center = dino.update_center(self.center, result.teacher_out, 0.9)
        return result.loss


def _timed(step, crops: list[torch.Tensor], device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    loss = step(crops)  # float(loss) inside syncs with the device
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    if not math.isfinite(loss):
        raise RuntimeError("non-finite loss in the benchmark")
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> dict:
    """Run the comparison and print/return the result dict."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="few steps, batch 16 on CPU (CI / loaded machines)")
    parser.add_argument("--json", type=Path, default=None, help="write the result here")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--steps", type=int, default=None, help="timed steps per method (default 4 quick, 12)")
    parser.add_argument("--batch", type=int, default=None, help="override the profile's batch size")
    parser.add_argument("--no-compile", action="store_true", help="skip torch.compile on CUDA")
    args = parser.parse_args(argv)

    device = torch.device("cuda" if args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
                          else "cpu")
    p = dict(PROFILES[device.type])
    if args.batch:
        p["batch"] = args.batch
    if args.quick and device.type == "cpu" and not args.batch:
        p["batch"] = 16
    steps = args.steps or (3 if args.quick else 12)
    warmup = (1 if args.quick else 2) if device.type == "cpu" else 5  # compile/autotuning happen in warm-up
    compile_model = device.type == "cuda" and not args.no_compile

    crops = make_crops(p, device)
    reference, ours = ReferenceStep(p, device), OurStep(p, device, compile_model)
    for _ in range(warmup):
        _timed(reference, crops, device)
        _timed(ours, crops, device)
    ref_times, our_times = [], []
    for _ in range(steps):  # alternate so load drift affects both
        ref_times.append(_timed(reference, crops, device))
        our_times.append(_timed(ours, crops, device))
    ref_ips = p["batch"] / statistics.median(ref_times)
    our_ips = p["batch"] / statistics.median(our_times)
    model = (f"{p['arch']} patch{p['patch_size']} 2x{p['global_size']}+{p['n_local']}x{p['local_size']} "
             f"batch{p['batch']} out_dim{p['out_dim']}")
    result = {
        "ours_img_per_s": our_ips,
        "reference_img_per_s": ref_ips,
        "ratio": our_ips / ref_ips,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda"
        else f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)",
        "model": model,
        "steps": steps,
        "ours_step_s": our_times,
        "reference_step_s": ref_times,
        "ours_features": "training.DINOTrainStep: grouped crops, fused AdamW, foreach EMA, grad clipping" + (
            ", bf16 autocast, TF32" + (", torch.compile" if compile_model else "") if device.type == "cuda" else ""),
        "torch": torch.__version__,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }
    if device.type == "cuda":
        result["peak_gpu_mem_mb"] = torch.cuda.max_memory_allocated(device) / 2**20
    print(f"model: {model} on {result['device']}")
    print(f"reference (Algorithm 1): {ref_ips:8.2f} img/s")
    print(f"ours                   : {our_ips:8.2f} img/s")
    print(f"ratio                  : {result['ratio']:8.2f}x")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        tmp = args.json.with_name(f".{args.json.name}.tmp")
        tmp.write_text(json.dumps(result, indent=2) + "\n")
        tmp.replace(args.json)
    return result


if __name__ == "__main__":
    main()
