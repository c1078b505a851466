"""Training as a user sees it: what it prints, and Ctrl-C/SIGTERM, which stop it cleanly after a checkpoint.

The subprocess tests run `train_scripts.py train` on tiny models: one process stopped by SIGINT and resumed
with the command it printed (bit-identical to an uninterrupted run), and two gloo ranks under `--nproc 2`
where only rank 1 gets the signal (both stop at the same step, no DDP warning).
"""
from __future__ import annotations

import io
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tests.training.test_training import TINY, make_tiny_dataset, tiny_config

ROOT = Path(__file__).resolve().parents[2]
#: small and fast: 2 pairs (1 step per epoch), no validation, grids or periodic checkpoints in the way
QUICK = ["data.val_fraction=0", "loss.multiview=false", "log.val_interval=1000", "log.image_interval=1000",
         "log.save_interval=1000", "export_3dpe=false"]
DDP_WARNINGS = ("broadcast_buffers", "Grad strides do not match bucket view strides")


def _start(*argv: str) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    return subprocess.Popen([sys.executable, str(ROOT / "train_scripts.py"), *argv], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _signal_after_first_step(proc: subprocess.Popen, send) -> tuple[str, str]:
    """Read stderr until rank 0's progress line of step 1, call `send()`, then wait; (stdout, stderr)."""
    seen = []
    for line in proc.stderr:
        seen.append(line)
        if line.startswith("[train] step 1/"):
            send()
            break
    out, err = proc.communicate(timeout=600)
    return out, "".join(seen) + err


def _stop_line(out: str) -> str:
    lines = [ln for ln in out.splitlines() if "stopped at step" in ln]
    assert len(lines) == 1, out
    return lines[0]


def _stopped_step(line: str) -> int:
    return int(line.split("stopped at step ")[1].split()[0])


@pytest.fixture(scope="module")
def interrupted(tmp_path_factory):
    """A run stopped by SIGINT after its first step, then resumed one step further with the printed command."""
    tmp = tmp_path_factory.mktemp("interrupt")
    data = make_tiny_dataset(tmp / "data", n_portraits=2, styles=("anime",))
    args = ["train", "--config", str(TINY), f"data.train_root={data}", f"exp_dir={tmp / 'exps'}", "name=sig",
            "max_steps=50", *QUICK]
    proc = _start(*args)
    out, err = _signal_after_first_step(proc, lambda: proc.send_signal(signal.SIGINT))
    run_dir = tmp / "exps" / "sig"
    stopped = {"rc": proc.returncode, "out": out, "err": err, "final": (run_dir / "final").exists(),
               "checkpoints": sorted(p.name for p in (run_dir / "checkpoints").iterdir())}
    line = _stop_line(out)
    step = _stopped_step(line)
    resume = shlex.split(line.split("resume with: ")[1])
    assert resume[:2] == ["python", "train_scripts.py"], line
    res = subprocess.run([sys.executable, *resume[1:], f"max_steps={step + 1}"], cwd=ROOT, capture_output=True,
                         text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    return {"tmp": tmp, "data": data, "stopped": stopped, "step": step, "line": line,
            "resumed": {"rc": res.returncode, "out": res.stdout, "err": res.stderr},
            "run_dir": run_dir}


def test_sigint_stops_after_a_checkpoint_with_one_line(interrupted):
    s, step, run_dir = interrupted["stopped"], interrupted["step"], interrupted["run_dir"]
    assert s["rc"] == 130, s["err"][-3000:]
    assert "Traceback" not in s["out"] + s["err"], s["err"][-3000:]
    assert step >= 1
    line = interrupted["line"]
    ckpt = run_dir / "checkpoints" / f"step_{step:08d}"
    assert line == (f"[train] stopped at step {step} by SIGINT (Ctrl-C); checkpoint {ckpt}; resume with: "
                    f"python train_scripts.py train --config {TINY} data.train_root={interrupted['data']} "
                    f"exp_dir={interrupted['tmp'] / 'exps'} name=sig max_steps=50 {' '.join(QUICK)} --resume")
    assert (ckpt / "training_state.pt").is_file() and (ckpt / "model.safetensors").is_file()
    assert s["checkpoints"] == [ckpt.name]  # nothing half-written, no other step
    assert not s["final"]  # not finished: no final snapshot
    # the signal was acknowledged at once, on stderr
    assert sum("SIGINT (Ctrl-C): finishing this step" in ln for ln in s["err"].splitlines()) == 1


def test_training_prints_where_it_writes_and_its_progress(interrupted):
    out, err, run_dir = interrupted["stopped"]["out"], interrupted["stopped"]["err"], interrupted["run_dir"]
    assert f"[train] run folder: {run_dir} (config.yaml, checkpoints/, logs/)" in out.splitlines()
    assert f"[train] TensorBoard: tensorboard --logdir {run_dir / 'logs'}" in out.splitlines()
    assert "[train] steps 0 -> 50 (1 per epoch), batch 2 per rank x 1 rank, on cpu" in out.splitlines()
    progress = [ln for ln in err.splitlines() if ln.startswith("[train] step ")]
    assert progress[0].startswith("[train] step 1/50 (epoch 0) loss ") and "s/step, eta" in progress[0]


def test_the_printed_command_resumes_from_the_stop_bit_identically(interrupted):
    from models.checkpoint import load_checkpoint
    from training.train import main

    r, step, run_dir = interrupted["resumed"], interrupted["step"], interrupted["run_dir"]
    assert r["rc"] == 0, r["err"][-3000:]
    ckpt = run_dir / "checkpoints" / f"step_{step:08d}"
    assert f"[train] resuming from step {step}: {ckpt}" in r["out"].splitlines()
    assert f"[train] done at step {step + 1}: {run_dir / 'final'}" in r["out"].splitlines()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the subprocesses (OMP_NUM_THREADS=1): the same float sums
    try:
        full = main(tiny_config(interrupted["data"], interrupted["tmp"] / "exps", "full", *QUICK,
                                f"max_steps={step + 1}"))
    finally:
        torch.set_num_threads(threads)
    resumed = load_checkpoint(run_dir / "final").components["encoder"]
    want = full.encoder.state_dict()
    assert all(torch.equal(resumed[k], want[k].cpu()) for k in want), "the resumed run differs"


def _rank_pid(launcher: int, rank: int, timeout: float = 60) -> int:
    """The pid of torchrun rank `rank` started by process `launcher` (Linux: /proc)."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        for pid in filter(str.isdigit, os.listdir("/proc")):
            try:
                ppid = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
                env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
            except (OSError, IndexError, ValueError):
                continue
            if ppid == launcher and f"RANK={rank}".encode() in env:
                return int(pid)
        time.sleep(0.2)
    raise AssertionError(f"no rank {rank} under {launcher}")


@pytest.mark.skipif(not Path("/proc/self/environ").exists(), reason="finds the rank's process in /proc")
def test_a_signal_to_one_rank_stops_every_rank_at_the_same_step(tmp_path):
    """`--nproc 2` (gloo): SIGINT to rank 1 only; both ranks save the same step, rank 0 prints the one line,
    the launcher exits 130 without a traceback, and DDP prints neither of its warnings."""
    data = make_tiny_dataset(tmp_path / "data", n_portraits=4, styles=("anime",))
    proc = _start("train", "--config", str(TINY), f"data.train_root={data}", f"exp_dir={tmp_path / 'exps'}",
                  "name=ddp", "max_steps=50", *QUICK, "--nproc", "2")
    out, err = _signal_after_first_step(proc, lambda: os.kill(_rank_pid(proc.pid, 1), signal.SIGINT))
    assert proc.returncode == 130, err[-3000:]
    assert "Traceback" not in out + err and "error:" not in err, err[-3000:]
    for warning in DDP_WARNINGS:
        assert warning not in out + err, err[-3000:]
    line = _stop_line(out)
    step = _stopped_step(line)
    assert line.endswith(f"{' '.join(QUICK)} --nproc 2 --resume"), line
    state = torch.load(tmp_path / "exps" / "ddp" / "checkpoints" / f"step_{step:08d}" / "training_state.pt",
                       weights_only=True)
    assert state["step"] == step and len(state["rng"]) == 2  # saved by both ranks (RNG states gathered)


# ------------------------------------------------------------------------------------------ the pieces
def test_stop_on_signal_sets_a_flag_ignores_copies_and_quits_on_a_second_signal(monkeypatch):
    from training import interrupt

    before = signal.getsignal(signal.SIGINT)
    with interrupt.StopOnSignal(announce=False) as stop:
        os.kill(os.getpid(), signal.SIGTERM)
        os.kill(os.getpid(), signal.SIGINT)  # a copy within REPEAT_SECONDS (torchrun forwarding): ignored
        assert stop.signum == signal.SIGTERM and stop.agreed() == signal.SIGTERM
        monkeypatch.setattr(interrupt, "REPEAT_SECONDS", 0.0)
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
    assert signal.getsignal(signal.SIGINT) is before


def test_resume_command_follows_the_launch(monkeypatch):
    from training.interrupt import resume_command

    for k in ("LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "THREEDPE_LAUNCHED_NPROC"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setattr(sys, "argv", ["train_scripts.py", "train"])
    args = ("configs/train.yaml", ["name=run 1", "resume=exps/x/checkpoints/step_00000002"])
    assert resume_command(*args) == "python train_scripts.py train --config configs/train.yaml 'name=run 1' --resume"
    monkeypatch.setenv("LOCAL_RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "16")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "8")
    assert resume_command(*args).startswith("torchrun --nnodes=2 --nproc_per_node=8 train_scripts.py train ")
    monkeypatch.setenv("THREEDPE_LAUNCHED_NPROC", "8")
    assert resume_command(*args).startswith("python train_scripts.py train ")
    assert resume_command(*args).endswith("'name=run 1' --nproc 8 --resume")


def test_progress_lines_when_stderr_is_not_a_terminal():
    from training.console import Progress

    stream = io.StringIO()
    p = Progress(total=7, start=2, desc="x", every=2, stream=stream)
    for step in range(3, 8):
        p.update(step, 0, 0.5 if p.due(step) else None)
    p.close()
    steps = [ln.split()[2] for ln in stream.getvalue().splitlines()]
    assert steps == ["3/7", "4/7", "6/7", "7/7"]  # the first, every 2nd, the last


def test_launcher_exit_code_after_a_signal():
    import train_scripts

    assert train_scripts._stop_code([130, 130]) == 130
    assert train_scripts._stop_code([130, -15]) == 130  # torchrun ended the other rank after the first left
    assert train_scripts._stop_code([143, 1]) == 0  # a real failure
    assert train_scripts._stop_code([-9]) == 0
