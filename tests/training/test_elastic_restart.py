"""Restarts that lose nothing: torchrun's `--max-restarts` restarts the worker group when a rank dies, and the
README's command, unchanged, goes on from the newest complete checkpoint by itself.

Checked on tiny models with two gloo ranks: a rank SIGKILLed mid-run, and rank 0 SIGKILLed while writing a
checkpoint (every file written, the folder not yet renamed into place), each end with exit code 0, a restart line in the log, and weights, training state and
TensorBoard scalars bit-identical to an uninterrupted run; the half-written checkpoint is never chosen. A
restart before the first checkpoint starts from scratch and drops what the killed attempt logged. Datagen:
a rank killed after its first unit, restarted by torchrun, gives the same files, byte for byte.

The product has no kill switch: torchrun runs DRIVER below, which wraps the training step, the checkpoint's
atomic rename or datagen's unit callback from outside and SIGKILLs its own process there, on the first launch
only (the restarted group runs through), as the OOM killer or a lost node would.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
import torch

from tests.training.test_training import make_tiny_dataset, tiny_config
from utils import testing_hooks

ROOT = Path(__file__).resolve().parents[2]
TINY = ROOT / "configs" / "train_tiny.yaml"  # 4 steps, a checkpoint every 2 (keep_last 2)
DATAGEN_TINY = ROOT / "configs" / "datagen_tiny.yaml"
TIMEOUT_S = 300  # a hung restart or collective fails the test instead of hanging CI
STATE = "checkpoints/step_00000004/training_state.pt"

# train_scripts.main as torchrun would run train_scripts.py, plus the kill named in $ELASTIC_KILL (JSON):
# {"rank_at_step": [rank, k]}: that rank dies once step k (and its checkpoint) is done, as step k + 1 starts;
# {"while_saving": k}: rank 0 dies with checkpoint k complete in its temporary folder, before the rename;
# {"rank_after_units": [rank, n]}: datagen's rank dies once it has finished n units in this launch.
DRIVER = textwrap.dedent("""
    import contextlib, json, os, signal, sys
    from pathlib import Path
    sys.path.insert(0, {root!r})
    import train_scripts
    from utils.distributed import restart_count

    kill = json.loads(os.environ["ELASTIC_KILL"])

    def die():
        if restart_count() == 0:  # a first launch only: the restarted group runs through
            os.kill(os.getpid(), signal.SIGKILL)

    if "rank_at_step" in kill:
        import training.train as tt
        rank, k = kill["rank_at_step"]
        real_step = tt.train_step

        def train_step(s, cfg, batch, cams, done, *a, **kw):
            if done == k and s.info.rank == rank:
                die()
            return real_step(s, cfg, batch, cams, done, *a, **kw)
        tt.train_step = train_step
    if "while_saving" in kill:
        import training.state as st
        real_dir = st.atomic_directory

        @contextlib.contextmanager
        def atomic_directory(final, *a, **kw):
            with real_dir(final, *a, **kw) as tmp:
                yield tmp
                if Path(final).name == "step_%08d" % kill["while_saving"]:
                    die()
        st.atomic_directory = atomic_directory
    if "rank_after_units" in kill:
        import pipelines.datagen as dg
        rank, n = kill["rank_after_units"]
        real_run = dg._run

        def run(cfg, device, dist, comps, on_unit_done):
            done = []

            def unit_done(info):
                if on_unit_done is not None:
                    on_unit_done(info)
                done.append(info)
                if dist.rank == rank and len(done) == n:
                    die()
            return real_run(cfg, device, dist, comps, unit_done)
        dg._run = run
    sys.exit(train_scripts.main())
""")


def _env(**kill: Any) -> dict[str, str]:
    # One thread on every rank: bit-identity needs the same CPU kernels in both runs. No leftover torchrun or
    # hook variables from the environment running the tests.
    drop = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "TORCHELASTIC_RESTART_COUNT",
            testing_hooks.ENV)
    env = {k: v for k, v in os.environ.items() if k not in drop}
    return {**env, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT),
            **({"ELASTIC_KILL": json.dumps(kill)} if kill else {})}


def _entry(tmp: Path, **kill: Any) -> str:
    """train_scripts.py, or with a `kill` (see DRIVER) the driver that kills from outside, written into `tmp`."""
    if not kill:
        return "train_scripts.py"
    driver = tmp / "elastic_driver.py"
    driver.write_text(DRIVER.format(root=str(ROOT)))
    return str(driver)


def _torchrun(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess:
    """`torchrun --standalone --nproc_per_node=2 --max-restarts=1 ARGS` (fast failure detection); waits."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "--max-restarts=1",
           "--monitor-interval=0.1", *args]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        out, err = proc.communicate(timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # the agent and its workers: their own session
        proc.communicate()
        pytest.fail(f"torchrun did not finish within {TIMEOUT_S} s")
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def _train(data: Path, exp: Path, **kill: Any) -> tuple[Path, str]:
    """The README's torchrun command (plus the restart flags) on the tiny config, with the `kill` (see DRIVER)
    if any; (run folder, its output)."""
    res = _torchrun([_entry(exp, **kill), "train", "--config", str(TINY), f"data.train_root={data}",
                     f"exp_dir={exp}", "name=run"], _env(**kill))
    log = res.stdout + res.stderr
    assert res.returncode == 0, log[-4000:]
    return exp / "run", log


def _leaves(obj: Any, at: str = "") -> dict[str, Any]:
    """Nested dicts/lists/tuples → {path: leaf}."""
    if isinstance(obj, dict):
        return {k: v for key, val in obj.items() for k, v in _leaves(val, f"{at}/{key}").items()}
    if isinstance(obj, (list, tuple)):
        return {k: v for i, val in enumerate(obj) for k, v in _leaves(val, f"{at}/{i}").items()}
    return {at: obj}


def _assert_same(a: Any, b: Any, skip: tuple[str, ...] = ()) -> None:
    """Every tensor torch.equal, every other leaf ==, apart from the top-level keys in `skip`."""
    la = {k: v for k, v in _leaves(a).items() if k.split("/")[1] not in skip}
    lb = {k: v for k, v in _leaves(b).items() if k.split("/")[1] not in skip}
    assert la.keys() == lb.keys()
    assert any(torch.is_tensor(v) for v in la.values())
    for k, v in la.items():
        same = torch.equal(v, lb[k]) if torch.is_tensor(v) else v == lb[k]
        assert same, f"{k} differs"


def _assert_same_run(run: Path, ref: Path) -> None:
    from safetensors.torch import load_file

    _assert_same(load_file(run / "final" / "model.safetensors"), load_file(ref / "final" / "model.safetensors"))
    # exported 3dpe.pt: `opts` names the run's folder; the training state's `config` too (exp_dir)
    _assert_same(torch.load(run / "3dpe.pt", weights_only=True), torch.load(ref / "3dpe.pt", weights_only=True),
                 skip=("opts",))
    _assert_same(torch.load(run / STATE, weights_only=True), torch.load(ref / STATE, weights_only=True),
                 skip=("config",))


def _scalars(run: Path, tag: str = "loss/total") -> list[tuple[int, float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run / "logs"))
    acc.Reload()
    return [(e.step, e.value) for e in acc.Scalars(tag)]


def _checkpoints(run: Path) -> list[str]:
    return sorted(p.name for p in (run / "checkpoints").iterdir())


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    # 6 train portraits × 2 styles = 12 pairs: 3 steps of 2 per rank and epoch, so the 4 steps cross an epoch
    return make_tiny_dataset(tmp_path_factory.mktemp("elastic") / "data", n_portraits=8)


@pytest.fixture(scope="module")
def reference(data, tmp_path_factory) -> Path:
    """The same command, uninterrupted."""
    run, log = _train(data, tmp_path_factory.mktemp("reference"))
    assert "torchrun restart" not in log
    return run


def test_killed_rank_restarts_from_the_newest_checkpoint_bit_identical(data, reference, tmp_path):
    """Rank 1 is SIGKILLed after step 3 (checkpoint 2 the newest): torchrun restarts both ranks, which go on
    from step 2 and end as the uninterrupted run, bit for bit; TensorBoard holds every step once."""
    run, log = _train(data, tmp_path, rank_at_step=[1, 3])
    assert "exitcode: -9" in log  # the kill happened (torchrun reports the signal)
    assert f"[train] torchrun restart 1: resuming from {run / 'checkpoints' / 'step_00000002'}" in log
    _assert_same_run(run, reference)
    assert _scalars(run) == _scalars(reference) and [s for s, _ in _scalars(run)] == [1, 2, 3, 4]
    assert _checkpoints(run) == ["step_00000002", "step_00000004"]


def test_checkpoint_being_written_by_a_killed_rank_is_never_chosen(data, reference, tmp_path):
    """Rank 0 dies with checkpoint 4 complete in its temporary folder but not renamed into place: the restart
    resumes from checkpoint 2, not from the half-saved 4, and the run still ends bit-identical."""
    run, log = _train(data, tmp_path, while_saving=4)
    assert "exitcode: -9" in log
    assert f"[train] torchrun restart 1: resuming from {run / 'checkpoints' / 'step_00000002'}" in log
    _assert_same_run(run, reference)
    assert _scalars(run) == _scalars(reference)
    assert _checkpoints(run) == ["step_00000002", "step_00000004"]  # the killed save's leftover is gone


def test_restart_before_the_first_checkpoint_starts_from_scratch(data, reference, tmp_path):
    """Rank 0 dies while writing the first checkpoint (step 2, its events already on disk): the restart finds no
    complete checkpoint, trains from scratch and purges what the killed attempt logged, so every step is
    logged once, and the run ends bit-identical."""
    run, log = _train(data, tmp_path, while_saving=2)
    assert "exitcode: -9" in log
    assert "[train] torchrun restart 1: no complete checkpoint yet, starting from scratch" in log
    _assert_same_run(run, reference)
    assert _scalars(run) == _scalars(reference) and [s for s, _ in _scalars(run)] == [1, 2, 3, 4]
    assert _checkpoints(run) == ["step_00000002", "step_00000004"]


def test_resume_target_on_a_restart(tmp_path, monkeypatch):
    """A restart without `resume` takes the newest complete checkpoint; a first launch of the same folder
    starts fresh as before; an explicit `resume` wins; a temporary or state-less folder is never chosen."""
    from training.setup import resume_target
    from training.state import STATE_FILE
    from utils.distributed import restart_count
    from utils.errors import ConfigError

    root = tmp_path / "exps" / "run" / "checkpoints"
    for name, complete in (("step_00000002", True), ("step_00000004", True), ("step_00000006", False),
                           (".step_00000008.abcd.tmp", True), (".step_00000004.old-1234", True)):
        (root / name).mkdir(parents=True)
        if complete:
            (root / name / STATE_FILE).write_bytes(b"")
    cfg = tiny_config(tmp_path / "data", tmp_path / "exps", "run")
    assert resume_target(cfg, root, restarts=0) is None
    assert resume_target(cfg, root, restarts=2) == root / "step_00000004"
    assert resume_target(cfg, tmp_path / "none", restarts=1) is None
    named = tiny_config(tmp_path / "data", tmp_path / "exps", "run", f"resume={root / 'step_00000002'}")
    assert resume_target(named, root, restarts=1) == root / "step_00000002"

    monkeypatch.delenv("TORCHELASTIC_RESTART_COUNT", raising=False)
    assert restart_count() == 0
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "3")
    assert restart_count() == 3
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "x")
    with pytest.raises(ConfigError, match="TORCHELASTIC_RESTART_COUNT"):
        restart_count()


def test_datagen_restarted_by_torchrun_writes_the_same_dataset(tmp_path):
    """Rank 1 is SIGKILLed after its first unit (its inputs written, its second unit not); the restarted
    group finishes the rest. Every file equals an uninterrupted run's, byte for byte, except summary.json
    (the counts of the last launch) and datagen_config.yaml (which names the output folder)."""
    one_style = "edit.edit_types=[pixar]"  # 4 inputs × 1 style: 2 units per rank
    ref, killed = tmp_path / "reference", tmp_path / "killed"
    res = _torchrun(["-m", "tools.datagen", "--config", str(DATAGEN_TINY), f"output_dir={ref}", one_style], _env())
    assert res.returncode == 0, (res.stdout + res.stderr)[-4000:]
    kill = {"rank_after_units": [1, 1]}
    res = _torchrun([_entry(tmp_path, **kill), "datagen", "--config", str(DATAGEN_TINY), f"output_dir={killed}",
                     one_style], _env(**kill))
    assert res.returncode == 0, (res.stdout + res.stderr)[-4000:]
    assert "exitcode: -9" in res.stderr

    def files(out: Path) -> dict[str, bytes]:
        return {p.relative_to(out).as_posix(): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}

    got, want = files(killed), files(ref)
    assert got.keys() == want.keys() and "manifest.jsonl" in got and "dataset.json" in got
    for name in want:
        if name == "datagen_config.yaml":
            assert got[name].replace(str(killed).encode(), str(ref).encode()) == want[name]
        elif name != "summary.json":
            assert got[name] == want[name], name
    summary = json.loads(got["summary.json"])
    assert summary["per_rank"][1]["skipped"] == 1  # the restarted rank 1 kept the unit it finished before
    assert summary["merged"] == json.loads(want["summary.json"])["merged"]
