"""Feature-extraction throughput: `extract_features` (batched, streamed to disk) vs a one-image-at-a-time loop.

Same backbone, same preprocessing, same real PCam patches, in one process. Prints images/s of both and their
ratio; `--json PATH` writes ours_img_per_s, baseline_img_per_s, ratio, peak_rss_mb and the settings.

    .venv/bin/python benchmarks/features.py --quick
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

from exaonepath_core.backbones import load_backbone, make_transform
from exaonepath_core.downstream import get_dataset
from exaonepath_core.features import extract_features, load_features


def one_at_a_time(model: torch.nn.Module, transform, dataset) -> np.ndarray:
    """The baseline: decode, preprocess and embed every patch on its own."""
    rows = []
    with torch.inference_mode():
        for i in range(len(dataset)):
            image = torch.from_numpy(np.array(dataset[i][0]))[None]
            rows.append(model(transform(image)).float().numpy()[0])
    return np.stack(rows)


def main() -> int:
    """Run both paths on the same patches and report images/s."""
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
    args = parser.parse_args()
    torch.set_num_threads(min(2, os.cpu_count() or 1))
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
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
