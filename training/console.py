"""What a training run tells its user (rank 0 only): where it writes, how far it is, how it ended.

stdout gets `[train] ...` lines: the run folder, the TensorBoard command, the checkpoint a resumed run goes on
from, the plan (steps, batch, ranks, device), and the end (the final snapshot, or where it stopped and the
command that resumes it). stderr gets the progress: a tqdm bar with the loss on a terminal, otherwise (a log
file, a pipe, a cluster job) one line every `log.log_interval` steps, the first and the last.
"""
from __future__ import annotations

import sys
import time
from datetime import timedelta
from pathlib import Path
from typing import TextIO

import torch

from utils.distributed import print_line


def say(text: str) -> None:
    """One `[train]` line on stdout."""
    print_line(f"[train] {text}")


def start_lines(run_dir: Path, resume_dir: Path | None, step: int, total: int, steps_per_epoch: int,
                batch_size: int, world_size: int, device: torch.device) -> list[str]:
    """The lines a run starts with: run folder, TensorBoard command, resume point (when resuming), plan."""
    lines = [f"run folder: {run_dir} (config.yaml, checkpoints/, logs/)",
             f"TensorBoard: tensorboard --logdir {run_dir / 'logs'}"]
    if resume_dir is not None:
        lines.append(f"resuming from step {step}: {resume_dir}")
    ranks = f"{world_size} rank{'s' if world_size > 1 else ''}"
    lines.append(f"steps {step} -> {total} ({steps_per_epoch} per epoch), batch {batch_size} per rank x {ranks}, "
                 f"on {device.type}")
    return lines


def is_logging_step(step: int, start: int, total: int, every: int) -> bool:
    """The steps whose values are read from the device, logged and shown: every `every` steps, the run's first
    (`start` + 1, also after a resume) and its last (`total`)."""
    return step % max(int(every), 1) == 0 or step == start + 1 or step == total


class Progress:
    """Steps `start` → `total` on `stream`: a tqdm bar when it is a terminal, else a line every `every` steps.

    `update` takes the loss read on the logging steps (`due`: every `every` steps, the run's first and its
    last) and None on the others, so the step's loss never has to be read from the device just for the bar.
    """

    def __init__(self, total: int, start: int, desc: str, every: int, stream: TextIO | None = None):
        self.total, self.start, self.every = total, start, max(int(every), 1)
        self.stream = sys.stderr if stream is None else stream
        self.t0 = time.perf_counter()
        self.bar = None
        if self.stream.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=start, desc=desc, dynamic_ncols=True, file=self.stream)

    def due(self, step: int) -> bool:
        """Whether `step` is a logging step (`is_logging_step`): the steps whose line is printed."""
        return is_logging_step(step, self.start, self.total, self.every)

    def update(self, step: int, epoch: int, loss: float | None) -> None:
        if self.bar is not None:
            if loss is not None:
                self.bar.set_postfix(loss=f"{loss:.4f}", epoch=epoch, refresh=False)
            self.bar.update(1)
            return
        if not self.due(step):
            return
        per_step = (time.perf_counter() - self.t0) / (step - self.start)
        eta = timedelta(seconds=round(per_step * (self.total - step)))
        shown = "" if loss is None else f" loss {loss:.4f},"
        print_line(f"[train] step {step}/{self.total} (epoch {epoch}){shown} {per_step:.2f} s/step, eta {eta}",
                   file=self.stream)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
