"""Stop a training run cleanly on SIGINT (Ctrl-C) or SIGTERM (what a cluster sends before it kills a job).

    with StopOnSignal(announce=info.is_main) as stop:
        for batch in loader:
            ...                                   # one step
            signum = stop.agreed()                # every rank, every step: the same answer on all ranks
            if signum: save the checkpoint of this step (every rank), then leave the loop
    exit code 128 + signum (130 for Ctrl-C, 143 for SIGTERM)

The first signal only sets a flag: the step in progress finishes, every rank saves that step's checkpoint
through the usual path, and the run ends with one line naming the command that resumes it. A signal may
reach only some ranks (a `kill` of one process), so the ranks agree after every step with one all-reduce of
one integer (`utils.distributed.max_over_ranks`). A second signal a second or more after the first quits at
once, without saving (KeyboardInterrupt); copies of the same signal within that second are ignored, such as
the SIGINT that torchrun forwards to its workers right after the terminal's own Ctrl-C has reached them.
"""
from __future__ import annotations

import os
import shlex
import signal
import sys
import threading
import time
from pathlib import Path
from types import FrameType
from typing import Any, Sequence

import torch

from utils import distributed as du

SIGNALS = (signal.SIGINT, signal.SIGTERM)
REPEAT_SECONDS = 1.0  # a second signal sooner than this is a copy of the first, not a second request


def signal_name(signum: int) -> str:
    """The signal's name, e.g. 'SIGTERM', and for SIGINT how it comes: 'SIGINT (Ctrl-C)'."""
    return "SIGINT (Ctrl-C)" if signum == signal.SIGINT else signal.Signals(signum).name


class StopOnSignal:
    """Within the block, SIGINT and SIGTERM set `signum` instead of ending the process (main thread only).

    `announce`: write one line to stderr when the first signal arrives (rank 0), so a long step is not
    mistaken for a hang. The previous handlers come back when the block ends.
    """

    def __init__(self, announce: bool = True):
        self.signum = 0
        self.announce = announce
        self._first_at = 0.0
        self._pid = os.getpid()
        self._previous: dict[int, Any] = {}
        self._lead = "\n" if sys.stderr.isatty() else ""  # off a progress bar's line

    def __enter__(self) -> "StopOnSignal":
        if threading.current_thread() is threading.main_thread():
            for s in SIGNALS:
                self._previous[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc: Any) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        self._previous.clear()

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if os.getpid() != self._pid:  # a forked DataLoader worker: the training process decides
            return
        now = time.monotonic()
        if not self.signum:
            self.signum, self._first_at = signum, now
            if self.announce:  # os.write: a handler may interrupt a print to the same stream
                os.write(2, f"{self._lead}[train] {signal_name(signum)}: finishing this step, then saving a checkpoint "
                            f"(press Ctrl-C again to quit without saving)\n".encode())
            return
        if now - self._first_at >= REPEAT_SECONDS:
            raise KeyboardInterrupt

    def agreed(self) -> int:
        """The signal any rank received so far (0: none); call on every rank at the same point of each step.
        A host-side all-reduce (`du.max_over_ranks`): it never waits for the GPU."""
        return du.max_over_ranks(self.signum)


def resume_command(config_path: str | None, overrides: Sequence[str]) -> str:
    """The command that goes on from this run's newest checkpoint: `train_scripts.py train` with this run's
    config and overrides, `--resume` instead of any `resume=`, launched as this run was (`python`, `--nproc N`,
    or torchrun with as many processes per node)."""
    script = sys.argv[0] if Path(sys.argv[0]).name == "train_scripts.py" else "train_scripts.py"
    if Path(script).is_absolute():
        try:
            script = str(Path(script).relative_to(Path.cwd()))
        except ValueError:
            pass
    launcher, tail = ["python"], []
    nproc = os.environ.get("THREEDPE_LAUNCHED_NPROC", "")  # set by train_scripts.py's `--nproc N` launcher
    if du.launched_by_torchrun() and nproc:
        tail = ["--nproc", nproc]
    elif du.launched_by_torchrun():
        per_node = int(os.environ.get("LOCAL_WORLD_SIZE", os.environ["WORLD_SIZE"]))
        nodes = int(os.environ["WORLD_SIZE"]) // max(per_node, 1)
        launcher = ["torchrun", *([f"--nnodes={nodes}"] if nodes > 1 else []), f"--nproc_per_node={per_node}"]
    kept = [o for o in overrides if o.split("=", 1)[0].strip() != "resume"]
    config = ["--config", str(config_path)] if config_path is not None else []
    return shlex.join([*launcher, script, "train", *config, *kept, *tail, "--resume"])
