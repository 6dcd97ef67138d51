"""Pretraining ranks vs the machine: `nproc_per_node: auto`, the GPU-count check, and what a killed rank means.

Without these a paper config (`nproc_per_node: 8`) on a workstation without GPUs starts eight CPU ranks of
ViT-B/16, the kernel kills them for memory, and the run ends in torchrun's per-rank dump of signals.
"""
from __future__ import annotations

import re
import signal
from pathlib import Path

from exaonepath_core.config import ConfigError, visible_gpu_count

TORCHRUN_LOG_DIR = "torchrun_logs"  # under an arm's folder: torchrun's per-rank stdout/stderr (--log-dir)

# torchrun's failure summary: "rank      : 1 (local_rank: 1)" then "exitcode  : -9 (pid: 4836)"
_SUMMARY_ROW = re.compile(r"rank\s*:\s*(\d+)\s*\(local_rank:\s*(\d+)\)\s*\n\s*exitcode\s*:\s*(-?\d+)")
# its agent's log line, printed even when the summary is cut: "failed (exitcode: -9) local_rank: 1 (pid: ..."
_AGENT_LINE = re.compile(r"failed \(exitcode:\s*(-?\d+)\)\s*local_rank:\s*(\d+)")


def check_nproc_per_node(nproc_per_node: int, device: str, gpus: int | None = None) -> None:
    """Refuse more pretraining ranks than visible GPUs, in one line naming both; `device: cpu` allows CPU ranks.

    An explicit `device: cpu` with several ranks is a deliberate gloo run (tested in test_training); with
    `device: auto` or `cuda` extra ranks would share GPUs or, without any, train ViT-B/16 on the CPU once per rank.
    """
    if device == "cpu" or nproc_per_node <= 1:
        return
    gpus = visible_gpu_count() if gpus is None else gpus
    if nproc_per_node > gpus:
        raise ConfigError(
            f"nproc_per_node is {nproc_per_node} but this machine has {gpus} visible GPU(s) "
            f"(torch.cuda.device_count()): set --set nproc_per_node=auto (one process per visible GPU, 1 without a "
            f"GPU) or a number <= {gpus}, or device: cpu to run {nproc_per_node} CPU ranks on purpose")


def with_rank_logs(cmd: list[str], log_dir: Path) -> list[str]:
    """A torchrun command with each rank's output also written to its own file under `log_dir` (--log-dir,
    --tee 3: still on the console too), so a failed rank's log can be named; other commands unchanged."""
    if "torch.distributed.run" not in cmd or any(a.startswith("--log-dir") for a in cmd):
        return list(cmd)
    at = cmd.index("torch.distributed.run") + 1
    return [*cmd[:at], f"--log-dir={log_dir}", "--tee=3", *cmd[at:]]


def failed_ranks(log_text: str) -> dict[int, tuple[int, int]]:
    """{rank: (local rank, exit code)} of every rank torchrun's output reports as failed (negative: a signal)."""
    found = {int(rank): (int(local), int(code)) for rank, local, code in _SUMMARY_ROW.findall(log_text)}
    if not found:  # no summary (torchrun itself stopped): its agent's lines name local ranks only
        found = {int(local): (int(local), int(code)) for code, local in _AGENT_LINE.findall(log_text)}
    return found


def rank_log(log_dir: Path, local_rank: int) -> Path | None:
    """The newest per-rank log torchrun wrote under `log_dir` for `local_rank` (stderr, else stdout)."""
    candidates = sorted(Path(log_dir).glob(f"*/attempt_*/{local_rank}/std*.log"), key=lambda p: p.stat().st_mtime)
    errs = [p for p in candidates if p.name == "stderr.log" and p.stat().st_size]
    return (errs or candidates or [None])[-1]


def _signal_name(code: int) -> str:
    try:
        return signal.Signals(-code).name
    except ValueError:
        return f"signal {-code}"


def describe_failure(returncode: int, log_text: str, log_path: Path, rank_log_dir: Path | None = None) -> str:
    """The first line of a failed pretraining's error: which rank died how, and which log to read.

    A rank killed by signal 9 is named "killed (likely out of memory)": the kernel's OOM killer sends SIGKILL,
    and torchrun would only print the signal number for it and SIGTERM for the ranks it then stopped.
    """
    hint = ("lower pretrain.batch_size_per_gpu, pretrain.n_local_crops or pretrain.num_workers, or run fewer "
            "processes (nproc_per_node)")
    if returncode == -signal.SIGKILL:  # one process (no torchrun): the trainer itself was killed
        return f"pretraining rank 0 was killed (likely out of memory; SIGKILL): read {log_path}; {hint}"
    ranks = failed_ranks(log_text)
    oom = sorted(rank for rank, (_, code) in ranks.items() if code == -signal.SIGKILL)
    if oom:
        logs = []
        for rank in oom:
            per_rank = rank_log(rank_log_dir, ranks[rank][0]) if rank_log_dir is not None else None
            logs.append(f"rank {rank}: {per_rank or log_path}")
        stopped = sorted(set(ranks) - set(oom))
        also = f"; rank(s) {', '.join(map(str, stopped))} then stopped by torchrun" if stopped else ""
        return (f"pretraining rank(s) {', '.join(map(str, oom))} killed (likely out of memory; SIGKILL){also}: read "
                f"{'; '.join(logs)} and {log_path}; {hint}")
    if returncode < 0:
        return f"pretraining was stopped by {_signal_name(returncode)}: read {log_path}"
    failed = ", ".join(f"rank {r}: exit code {c}" + (f" ({_signal_name(c)})" if c < 0 else "")
                       for r, (_, c) in sorted(ranks.items()))
    return f"pretraining exited with code {returncode}" + (f" ({failed})" if failed else "") + f"; read {log_path}"
