"""Stop signals before a time limit: SIGTERM / SIGUSR1 set a flag, the loop checkpoints at the next step and exits.

SLURM sends SIGTERM at the time limit (then SIGKILL after KillWait, 30 s by default) and, with
`#SBATCH --signal=B:USR1@120`, a chosen signal earlier. The handler only sets a flag; at each step boundary
`StopRequest.agreed()` combines the flags of every rank (an all-reduce over a CPU gloo group, so no GPU sync is
added to the step), so all ranks stop after the same step, write the checkpoint together (`_save_checkpoint` is
collective) and the process exits with `EXIT_PREEMPTED`. A rerun with `--resume` continues from that step with
the same data order.
"""
from __future__ import annotations

import os
import signal
import sys
import threading
from collections.abc import Iterable
from types import FrameType
from typing import Any

import torch
import torch.distributed as dist

# EX_TEMPFAIL of sysexits.h: "try again later"; the sbatch template requeues on it (docs: README, tools/slurm)
EXIT_PREEMPTED = 75
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class Preempted(Exception):
    """Training stopped at a step boundary on a stop signal, after writing its checkpoint."""

    def __init__(self, step: int, signal_name: str, checkpoint: str) -> None:
        super().__init__(f"stopped on {signal_name} after step {step}; checkpoint {checkpoint} written "
                         f"(rerun with --resume to continue; exit code {EXIT_PREEMPTED})")
        self.step, self.signal_name, self.checkpoint = step, signal_name, checkpoint


class StopRequest:
    """Installs handlers for `signals` in this process; `agreed()` says whether any rank received one."""

    def __init__(self, signals: Iterable[signal.Signals] = STOP_SIGNALS) -> None:
        self.signals = tuple(signals)
        self.received: str | None = None
        self._owner_pid = os.getpid()
        self._previous: dict[signal.Signals, Any] = {}
        self._group: Any = None

    def install(self) -> StopRequest:
        """Set the handlers (main thread only) and, under DDP, the CPU group the flags are reduced over.

        Collective when distributed: every rank calls it at the same point.
        """
        if threading.current_thread() is threading.main_thread():  # Python sets handlers there only
            for sig in self.signals:
                self._previous[sig] = signal.signal(sig, self._handle)
        else:
            print("[pretrain] note: training outside the main thread: stop signals keep their default action",
                  file=sys.stderr, flush=True)
        if dist.is_initialized():
            # gloo on CPU: an NCCL all-reduce would need a device tensor and a host sync every step
            self._group = (dist.group.WORLD if dist.get_backend() == "gloo"
                           else dist.new_group(backend="gloo"))
        return self

    def uninstall(self) -> None:
        """Restore the handlers found at `install`."""
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)
        self._previous.clear()

    def __enter__(self) -> StopRequest:  # noqa: PYI034 (Self needs typing_extensions on 3.10)
        return self.install()

    def __exit__(self, *exc: object) -> None:
        self.uninstall()

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        # forked DataLoader workers inherit this handler: they ignore the signal and leave when the loader
        # shuts them down (dying here would make the main process fail on a lost worker before checkpointing)
        if os.getpid() != self._owner_pid:
            return
        if self.received is None:
            self.received = signal.Signals(signum).name
            print(f"[pretrain] {self.received} received: checkpointing after the current step, then exiting "
                  f"with code {EXIT_PREEMPTED}", file=sys.stderr, flush=True)

    def agreed(self) -> bool:
        """True when this rank or any other received a stop signal (collective under DDP: call it every step)."""
        local = self.received is not None
        if self._group is None:
            return local
        flag = torch.tensor([1 if local else 0], dtype=torch.int32)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self._group)
        if flag.item() and self.received is None:
            self.received = "a stop signal on another rank"
        return bool(flag.item())
