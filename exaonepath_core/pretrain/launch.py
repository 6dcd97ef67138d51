"""Launch stage 03's trainer on one node or several: the torchrun command line, and a per-node entry for SLURM.

One node: `python -m exaonepath_core.pretrain.cli` (one process) or `torchrun --standalone --nproc_per_node=G`.
Several nodes: every node runs the same command,

    python -m exaonepath_core.pretrain.launch --config PRETRAIN.yaml --nnodes N --nproc-per-node G \\
        --rdzv-endpoint HOST:29500 --rdzv-id JOB

which replaces itself (exec) with torchrun's c10d rendezvous at HOST:PORT (the first node; torchrun assigns
node ranks), so a signal sent to the node's processes reaches torchrun, which forwards SIGTERM and SIGUSR1 to
its trainers (`--signals-to-handle`) and gives them `--shutdown-timeout` seconds to checkpoint
(exaonepath_core.pretrain.preemption). `tools/slurm/pretrain.sbatch` calls it with one srun task per node.
"""
from __future__ import annotations

import argparse
import os
import re
import sys
from collections.abc import Sequence
from pathlib import Path

TRAINER_MODULE = "exaonepath_core.pretrain.cli"
# torchrun's own default list plus SIGUSR1, the early warning `#SBATCH --signal=B:USR1@120` arranges
SIGNALS_TO_FORWARD = "SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1"
# seconds torchrun waits for its trainers after forwarding a stop signal before SIGKILL: a step plus a checkpoint
SHUTDOWN_TIMEOUT_S = 90
_ENDPOINT = re.compile(r"(?P<host>[A-Za-z0-9_.\-]+|\[[0-9A-Fa-f:]+\]):(?P<port>\d{1,5})")


class LaunchError(ValueError):
    """A launch setting (node count, rendezvous endpoint) is missing or malformed."""


def check_endpoint(endpoint: str) -> tuple[str, int]:
    """`HOST:PORT` of a c10d rendezvous as (host, port); LaunchError names the value otherwise."""
    match = _ENDPOINT.fullmatch(endpoint.strip())
    if match is None or not 0 < int(match["port"]) < 65536:
        raise LaunchError(f"rdzv_endpoint must be HOST:PORT (e.g. node001:29500), got {endpoint!r}")
    return match["host"], int(match["port"])


def torchrun_command(
    train_args: Sequence[str],
    *,
    nproc_per_node: int = 1,
    nnodes: int = 1,
    rdzv_endpoint: str = "",
    rdzv_id: str = "exaonepath",
    python: str = sys.executable,
    entry: Sequence[str] = ("-m", TRAINER_MODULE),
) -> list[str]:
    """The command that runs the trainer with `train_args` on this node (same for every node of a job).

    `entry` is what the processes run (`-m module` or a script path; the trainer by default).

    Without a rendezvous endpoint (one node): the trainer itself, or `torchrun --standalone` for several
    processes (what stage 03 always ran). With one: torchrun's c10d rendezvous, for `nnodes` nodes.
    """
    if nproc_per_node < 1 or nnodes < 1:
        raise LaunchError(f"nproc_per_node ({nproc_per_node}) and nnodes ({nnodes}) must be >= 1")
    if nnodes > 1 and not rdzv_endpoint:
        raise LaunchError(f"nnodes is {nnodes}: set rdzv_endpoint to HOST:PORT of the first node "
                          "(e.g. $(scontrol show hostnames $SLURM_JOB_NODELIST | head -1):29500)")
    trainer = [*entry, *train_args]
    if not rdzv_endpoint:
        if nproc_per_node == 1:
            return [python, *trainer]
        return [python, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc_per_node}",
                *trainer]
    check_endpoint(rdzv_endpoint)
    if not re.fullmatch(r"[A-Za-z0-9_.\-]+", rdzv_id):
        raise LaunchError(f"rdzv_id must be letters, digits, '.', '_' or '-', got {rdzv_id!r}")
    return [python, "-m", "torch.distributed.run", f"--nnodes={nnodes}", f"--nproc_per_node={nproc_per_node}",
            "--rdzv_backend=c10d", f"--rdzv_endpoint={rdzv_endpoint}", f"--rdzv_id={rdzv_id}",
            f"--signals_to_handle={SIGNALS_TO_FORWARD}", f"--shutdown_timeout={SHUTDOWN_TIMEOUT_S}", *trainer]


def main(argv: Sequence[str] | None = None) -> int:
    """Per-node entry: exec torchrun (or the trainer) on PRETRAIN.yaml, always with --resume."""
    parser = argparse.ArgumentParser(prog="python -m exaonepath_core.pretrain.launch", description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True, help="the stage's resolved pretrain.yaml (03_pretrain/<arm>/)")
    parser.add_argument("--nnodes", type=int, default=int(os.environ.get("SLURM_NNODES", "1")))
    parser.add_argument("--nproc-per-node", type=int, default=1, help="trainer processes (GPUs) per node")
    parser.add_argument("--rdzv-endpoint", default="", help="HOST:PORT of the c10d rendezvous (the first node)")
    parser.add_argument("--rdzv-id", default=os.environ.get("SLURM_JOB_ID", "exaonepath"),
                        help="the same on every node of one job (default: $SLURM_JOB_ID)")
    parser.add_argument("--dry-run", action="store_true", help="print the command instead of running it")
    parser.add_argument("train_args", nargs="*", help="more trainer arguments, after --, e.g. -- --set max_steps=9")
    args = parser.parse_args(argv)
    if not Path(args.config).is_file():
        print(f"[launch] pretraining config not found: {args.config}", file=sys.stderr)
        return 2
    # --resume always: a first start finds no checkpoint and trains from step 0; a requeued job continues
    train_args = ["--config", str(args.config), "--resume", *args.train_args]
    try:
        cmd = torchrun_command(train_args, nproc_per_node=args.nproc_per_node, nnodes=args.nnodes,
                               rdzv_endpoint=args.rdzv_endpoint, rdzv_id=args.rdzv_id)
    except LaunchError as err:
        print(f"[launch] {err}", file=sys.stderr)
        return 2
    print("[launch] " + " ".join(cmd), flush=True)
    if args.dry_run:
        return 0
    os.execv(cmd[0], cmd)  # replaced: signals sent to this node's job step reach torchrun itself
    return 0  # not reached


if __name__ == "__main__":
    sys.exit(main())
