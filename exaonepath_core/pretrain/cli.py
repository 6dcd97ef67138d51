"""`python -m exaonepath_core.pretrain.cli --config PRETRAIN.yaml [--resume] [--output-dir DIR] [--set k=v ...]`.

Single process as written; multi-GPU / multi-node under `torchrun --nproc_per_node=G -m exaonepath_core.pretrain.cli
...` (DDP: NCCL on GPU, gloo on CPU; every collective is guarded by `dist.is_initialized()`). Exit codes: 0 done,
2 configuration error, 3 non-finite loss, 4 output folder busy, 75 stopped by a signal after a checkpoint
(`preemption.EXIT_PREEMPTED`; rerun with --resume).
"""
from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from exaonepath_core.config import ConfigError, PretrainConfig
from exaonepath_core.pretrain.curves import plot_training_curves
from exaonepath_core.pretrain.preemption import EXIT_PREEMPTED, Preempted
from exaonepath_core.pretrain.runtime import OutputDirBusyError
from exaonepath_core.pretrain.step import NonFiniteLossError
from exaonepath_core.pretrain.train import train


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m exaonepath_core.pretrain.cli --config PRETRAIN.yaml [--resume] [--output-dir DIR] [--set k=v ...]`."""
    parser = argparse.ArgumentParser(
        prog="python -m exaonepath_core.pretrain.cli",
        description="DINO pretraining (run under torchrun for DDP: torchrun --nproc_per_node=G -m "
                    "exaonepath_core.pretrain.cli --config ...)")
    parser.add_argument("--config", required=True, help="flat YAML mapping of PretrainConfig settings")
    parser.add_argument("--resume", action="store_true", help="continue from OUTPUT_DIR/checkpoint.pth")
    parser.add_argument("--output-dir", default=None, help="overrides output_dir")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a setting")
    parser.add_argument("--plot", action="store_true", help="also write training_curves.png (rank 0)")
    args = parser.parse_args(argv)
    try:
        cfg = PretrainConfig.from_yaml(args.config)
        overrides = list(args.set) + ([f"output_dir={args.output_dir}"] if args.output_dir else [])
        cfg = cfg.with_overrides(overrides)
        summary = train(cfg, resume=args.resume)
    except ConfigError as err:
        print(f"[pretrain] configuration error: {err}", file=sys.stderr, flush=True)
        return 2
    except NonFiniteLossError as err:
        print(f"[pretrain] ERROR: {err}", file=sys.stderr, flush=True)
        return 3
    except OutputDirBusyError as err:
        print(f"[pretrain] ERROR: {err}", file=sys.stderr, flush=True)
        return 4
    except Preempted as stopped:
        print(f"[pretrain] {stopped}", file=sys.stderr, flush=True)
        return EXIT_PREEMPTED
    if args.plot and int(os.environ.get("RANK", "0")) == 0:
        plot_training_curves(summary["log"], Path(cfg.output_dir) / "training_curves.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
