"""Feature-extraction throughput: `extract_features` (batched, streamed to disk) vs a one-image-at-a-time loop.

Same backbone, same preprocessing, same real PCam patches, in one process. Prints images/s of both and their
ratio; `--json PATH` writes ours_img_per_s, baseline_img_per_s, ratio, peak_rss_mb and the settings.

    .venv/bin/python benchmarks/features.py --quick

`--peers` instead reports, per registered peer architecture (`exaonepath_core.models.peers.PEERS`, random weights of
the real architecture, its authors' preprocessing), images/s at batch 64 on real PCam patches and the memory it
needs (fp32 weights, and the process's peak RSS after it ran: models run smallest first, so each step up is that
model's cost), so a user knows what a six-task evaluation of each costs before starting it. `--quick` picks the
small ones (ResNet50, Lunit ViT-S/16, CTransPath).

    .venv/bin/python benchmarks/features.py --peers --quick --json /tmp/peers.json
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from exaonepath_core.data.downstream.datasets import get_dataset
from exaonepath_core.evaluation.features import extract_features, load_features
from exaonepath_core.io import atomic
from exaonepath_core.models.backbones import load_backbone, make_transform


def one_at_a_time(model: torch.nn.Module, transform, dataset) -> np.ndarray:
    """The baseline: decode, preprocess and embed every patch on its own."""
    rows = []
    with torch.inference_mode():
        for i in range(len(dataset)):
            image = torch.from_numpy(np.array(dataset[i][0]))[None]
            rows.append(model(transform(image)).float().numpy()[0])
    return np.stack(rows)


QUICK_PEERS = ("lunit_vits16", "ctranspath", "resnet50")


def rss_mb() -> float:
    """Peak resident memory of this process so far, MB."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def peer_throughput(args: argparse.Namespace) -> int:
    """Images/s at `--batch-size` and memory per registered peer architecture (random weights, CPU)."""
    from exaonepath_core.models import peers

    names = list(args.models or (QUICK_PEERS if args.quick else peers.PEERS))
    names.sort(key=peers.count_parameters)  # smallest first: the peak RSS then steps up model by model
    n = args.batch_size * (1 if args.quick else 2)
    dataset = get_dataset("pcam_subset", args.data / "patches" / "pcam_subset", "train").subset(n, seed=0)
    images = torch.from_numpy(np.stack([np.asarray(dataset[i][0]) for i in range(n)]))
    rows = []
    for name in names:
        peer = peers.get_peer(name)
        torch.manual_seed(0)
        model = peer.new_model().eval()
        transform = make_transform(peer.preprocess)
        n_params = sum(p.numel() for p in model.parameters())
        with torch.inference_mode():
            model(transform(images[:2]))  # warm-up
            t0 = time.perf_counter()
            for start in range(0, n, args.batch_size):
                out = model(transform(images[start:start + args.batch_size]))
            seconds = time.perf_counter() - t0
        rows.append({"model": name, "title": peer.title, "n_parameters": n_params,
                     "weights_fp32_mb": round(n_params * 4 / 2**20, 1), "embed_dim": int(out.shape[1]),
                     "img_per_s": round(n / seconds, 2), "n_images": n, "batch_size": args.batch_size,
                     "peak_rss_mb_after": round(rss_mb(), 1)})
        print(f"{peer.title:32s} {n_params / 1e6:8.1f} M params  {rows[-1]['weights_fp32_mb']:8.0f} MB fp32  "
              f"{rows[-1]['img_per_s']:7.2f} img/s (batch {args.batch_size}, {n} images)  "
              f"peak RSS {rows[-1]['peak_rss_mb_after']:.0f} MB", flush=True)
        del model
    result = {"peers": rows, "peak_rss_mb": rss_mb(), "device": "cpu", "torch_threads": torch.get_num_threads(),
              "quick": args.quick}
    if args.json:
        atomic.write_text(args.json, json.dumps(result, indent=2) + "\n")
    return 0


def main() -> int:
    """Run both paths on the same patches and report images/s (or, with --peers, per peer architecture)."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="few images (CI / loaded machines)")
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--backbone", default="timm:vit_tiny_patch16_224")
    parser.add_argument("--input-size", type=int, default=96)
    parser.add_argument("--n", type=int, default=None, help="number of patches (default 64 quick, 512 full)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--num-workers", type=int, default=0)
    parser.add_argument("--data", type=Path,
                        default=Path(os.environ.get("EXAONEPATH_TEST_DATA", REPO_ROOT.parent / "shared" / "data")))
    parser.add_argument("--peers", action="store_true",
                        help="img/s and memory per registered peer architecture instead (CPU, batch 64)")
    parser.add_argument("--models", nargs="*", default=None, help="with --peers: these registry names only")
    args = parser.parse_args()
    torch.set_num_threads(min(2, os.cpu_count() or 1))
    if args.peers:
        return peer_throughput(args)
    n = args.n or (64 if args.quick else 512)

    dataset = get_dataset("pcam_subset", args.data / "patches" / "pcam_subset", "train").subset(n, seed=0)
    kind, name = args.backbone.split(":", 1)
    spec = {"kind": kind, "model_name": name, "input_size": args.input_size, "seed": 0} if kind == "timm" \
        else args.backbone
    model, info = load_backbone(spec)
    transform = make_transform(info)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = model.to(device)

    # warm-up both paths once (allocator, thread pools)
    with torch.inference_mode():
        model(transform(torch.from_numpy(np.stack([dataset[i][0] for i in range(2)])).to(device)))

    baseline_model = model.cpu()
    t0 = time.perf_counter()
    baseline = one_at_a_time(baseline_model, transform, dataset)
    baseline_s = time.perf_counter() - t0

    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        out = extract_features(model, transform, dataset, Path(tmp) / "feats", batch_size=args.batch_size,
                               num_workers=args.num_workers, device=device, progress=False, backbone_info=info)
        ours_s = time.perf_counter() - t0
        ours, _, _, _ = load_features(out)
        max_abs_diff = float(np.abs(np.asarray(ours) - baseline).max())

    result = {
        "ours_img_per_s": n / ours_s,
        "baseline_img_per_s": n / baseline_s,
        "ratio": baseline_s / ours_s,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "n_images": n, "backbone": info.name, "input_size": info.input_size, "batch_size": args.batch_size,
        "num_workers": args.num_workers, "device": device, "max_abs_feature_diff": max_abs_diff,
        "quick": args.quick, "torch_threads": torch.get_num_threads(),
    }
    print(f"{info.name} @ {info.input_size}px, {n} real PCam patches, device {device}")
    print(f"  baseline (one image at a time): {result['baseline_img_per_s']:8.1f} img/s")
    print(f"  extract_features (batch {args.batch_size}):   {result['ours_img_per_s']:8.1f} img/s")
    print(f"  ratio: {result['ratio']:.2f}x   max |feature diff| {max_abs_diff:.2e}   "
          f"peak RSS {result['peak_rss_mb']:.0f} MB")
    if args.json:
        atomic.write_text(args.json, json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
