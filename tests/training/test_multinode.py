"""Many nodes: two torchrun "nodes" on this machine (`--nnodes=2`, c10d rendezvous on 127.0.0.1, one gloo
process each) train the tiny models as two machines would.

Checked: the ranks end with identical trainable parameters, bit-identical to a one-node two-process run of
the same config (the global batch is split the same way); the sampler shards by the global rank and world
size; only global rank 0 writes (each node gets its own exp_dir, so the other node's must stay empty); a
resume where the nodes see different checkpoints fails on every rank with one line instead of training
from different states. The per-GPU device choice (LOCAL_RANK, not RANK) is checked with a mocked
`torch.cuda`: there is no GPU here.

c10d assigns the global ranks at the rendezvous (sorted by node address and agent pid), not by
`--node_rank`, so the test finds out which node holds global rank 0 instead of assuming it.
"""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import textwrap
import uuid
from pathlib import Path

import pytest
import torch

from tests.training.test_training import make_tiny_dataset

ROOT = Path(__file__).resolve().parents[2]
TINY = ROOT / "configs" / "train_tiny.yaml"
TIMEOUT_S = 240  # a hung rendezvous or collective fails the test instead of hanging CI
RUN = ["--config", str(TINY), "name=mn", "max_steps=2"]  # tiny defaults: checkpoint, images and val at step 2

# train_scripts.main as torchrun would run train_scripts.py, plus a hook that records what this rank did
# (its DistInfo, its sampler's shard and the trainable state at the end) into $MN_DUMP/rank<RANK>.pt.
DRIVER = textwrap.dedent("""
    import os, sys
    sys.path.insert(0, {root!r})
    import torch
    import train_scripts
    import training.train as tt
    from training.state import trainable_state

    seen = {{}}
    build, main = tt.build_training, tt.main

    def hooked_build(cfg, *a, **k):
        s = build(cfg, *a, **k)
        share = s.loader.sampler.order  # the DistributedSampler behind the infinite sampler
        share.set_epoch(0)
        seen.update(rank=s.info.rank, local_rank=s.info.local_rank, world=s.info.world_size,
                    device=str(s.device), shard_rank=share.rank, shard_world=share.num_replicas,
                    epoch0=list(share), n_train=len(s.loader.dataset), exp_dir=str(cfg.exp_dir))
        return s

    def hooked_main(cfg, *a, **k):
        res = main(cfg, *a, **k)
        seen.update(student=trainable_state(res.encoder), D=res.discriminator.state_dict(),
                    env={{v: os.environ[v] for v in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "GROUP_RANK")}})
        torch.save(seen, os.path.join(os.environ["MN_DUMP"], "rank" + os.environ["RANK"] + ".pt"))
        return res

    tt.build_training, tt.main = hooked_build, hooked_main
    sys.exit(train_scripts.main())
""")


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(**extra: str) -> dict[str, str]:
    # One thread everywhere: torchrun sets OMP_NUM_THREADS=1 only with several processes per node, and the
    # bit-identity with the one-node run needs the same CPU kernels on both sides.
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR",
                                                            "MASTER_PORT")}
    return {**env, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", **extra}


def _two_nodes(script: Path, argv_per_node: list[list[str]], env: dict[str, str]) -> list[tuple[int, str]]:
    """Start one torchrun per node at once (like two machines) and wait; [(exit code, stderr)] per node."""
    port, rdzv_id = _free_port(), f"mn-{uuid.uuid4().hex[:8]}"
    procs = []
    for node_rank, argv in enumerate(argv_per_node):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes=2", "--nproc_per_node=1",
               f"--node_rank={node_rank}", "--rdzv_backend=c10d", f"--rdzv_endpoint=127.0.0.1:{port}",
               f"--rdzv_id={rdzv_id}", "--max_restarts=0", str(script), *argv]
        procs.append(subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                      text=True, start_new_session=True))
    out = []
    try:
        for p in procs:
            _, err = p.communicate(timeout=TIMEOUT_S)
            out.append((p.returncode, err))
    except subprocess.TimeoutExpired:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)  # the agent and its worker: their own session
            p.communicate()
        pytest.fail(f"the two-node run did not finish within {TIMEOUT_S} s (rendezvous or a collective hung)")
    return out


def _files(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file()) if root.exists() else []


@pytest.fixture(scope="module")
def two_nodes(tmp_path_factory):
    """A two-node run (each node its own exp_dir) and the same config on one node with two processes."""
    tmp = tmp_path_factory.mktemp("multinode")
    data = make_tiny_dataset(tmp / "data", n_portraits=8)  # 6 train portraits × 2 styles: 6 pairs per rank
    driver = tmp / "driver.py"
    driver.write_text(DRIVER.format(root=str(ROOT)))
    dump = tmp / "dump"
    dump.mkdir()
    exps = [tmp / "node0", tmp / "node1"]
    argv = [["train", *RUN, f"data.train_root={data}", f"exp_dir={e}"] for e in exps]
    nodes = _two_nodes(driver, argv, _env(MN_DUMP=str(dump)))
    for code, err in nodes:
        assert code == 0, err[-4000:]
    ranks = [torch.load(dump / f"rank{r}.pt", weights_only=False) for r in (0, 1)]

    # The user's one-node command: train_scripts.py launches torchrun with 2 processes itself.
    one = tmp / "one_node"
    proc = subprocess.run([sys.executable, str(ROOT / "train_scripts.py"), "train", *RUN, f"data.train_root={data}",
                           f"exp_dir={one}", "--nproc", "2"], cwd=ROOT, env=_env(),
                          capture_output=True, text=True, timeout=TIMEOUT_S, check=False)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return {"tmp": tmp, "data": data, "driver": driver, "exps": exps, "ranks": ranks, "one_node": one / "mn"}


def test_two_nodes_see_the_global_rank_and_world_size(two_nodes):
    r0, r1 = two_nodes["ranks"]
    for r, dumped in enumerate((r0, r1)):
        assert (dumped["rank"], dumped["world"]) == (r, 2)
        assert dumped["local_rank"] == 0 and dumped["env"]["LOCAL_RANK"] == "0"  # one process per node
        assert dumped["env"]["GROUP_RANK"] == str(r)  # the node's rank is the rank here
        assert dumped["device"] == "cpu"
        # the data is sharded by the global rank and world size, not by the rank on the node
        assert (dumped["shard_rank"], dumped["shard_world"]) == (r, 2)
    assert {r0["exp_dir"], r1["exp_dir"]} == {str(e) for e in two_nodes["exps"]}  # one rank on each node
    a, b = set(r0["epoch0"]), set(r1["epoch0"])
    assert not a & b and a | b == set(range(r0["n_train"]))  # an epoch: disjoint shares that cover the set


def test_two_nodes_stay_in_sync_and_match_one_node(two_nodes):
    from models.checkpoint import load_checkpoint

    r0, r1 = two_nodes["ranks"]
    assert r0["student"].keys() == r1["student"].keys() and r0["student"]
    assert all(torch.equal(r0["student"][k], r1["student"][k]) for k in r0["student"])
    assert all(torch.equal(r0["D"][k], r1["D"][k]) for k in r0["D"])
    # Two nodes × one process split the global batch as one node × two processes do: the same run, bit for bit.
    main_exp = Path(r0["exp_dir"]) / "mn"
    two = load_checkpoint(main_exp / "final").components["encoder"]
    one = load_checkpoint(two_nodes["one_node"] / "final").components["encoder"]
    assert two.keys() == one.keys()
    assert all(torch.equal(two[k], one[k]) for k in two)
    assert all(torch.equal(two[k], r0["student"][k].cpu()) for k in r0["student"])
    # and training moved the weights, so the equalities above are not those of untouched initial weights
    from tests.training.test_training import tiny_config
    from training.setup import build_networks

    cfg = tiny_config(two_nodes["data"], two_nodes["tmp"] / "unused", "mn")
    torch.manual_seed(cfg.seed)
    init = build_networks(cfg)["student"].state_dict()
    assert any(not torch.equal(init[k], two[k]) for k in r0["student"])
    state = torch.load(main_exp / "checkpoints" / "step_00000002" / "training_state.pt", weights_only=True)
    assert len(state["rng"]) == 2 and not torch.equal(state["rng"][0]["torch"], state["rng"][1]["torch"])


def test_only_global_rank_zero_writes(two_nodes):
    r0 = two_nodes["ranks"][0]
    main_exp = Path(r0["exp_dir"])
    other = next(e for e in two_nodes["exps"] if e != main_exp)
    assert _files(other) == [], "a rank other than 0 wrote into its exp_dir"
    run = main_exp / "mn"
    written = {p.relative_to(run).parts[0] for p in _files(run)}
    assert written == {"config.yaml", "logs", "checkpoints", "final", "3dpe.pt"}
    assert any(p.name.startswith("events.out.tfevents") for p in _files(run / "logs"))
    assert len(list((run / "logs").iterdir())) == 1  # one event file: one writer


def test_resume_with_different_checkpoints_per_node_fails_on_every_rank(two_nodes):
    """After the run only one node's exp_dir has checkpoints: a `--resume` there must not let one rank resume
    and the other start fresh (different weights, different step counts: a silent divergence or a hang)."""
    argv = [["train", *RUN, f"data.train_root={two_nodes['data']}", f"exp_dir={e}", "--resume"]
            for e in two_nodes["exps"]]
    nodes = _two_nodes(two_nodes["driver"], argv, _env(MN_DUMP=str(two_nodes["tmp"] / "dump")))
    err = "".join(e for _, e in nodes)
    assert all(code != 0 for code, _ in nodes), err[-4000:]
    for r in (0, 1):
        lines = [ln for ln in err.splitlines() if ln.startswith(f"[rank {r}] error: resume:")]
        assert len(lines) == 1, err[-4000:]
        assert "step_00000002" in lines[0] and "shared filesystem" in lines[0]


def test_device_is_chosen_by_local_rank_not_global_rank(monkeypatch):
    """Global rank 3 of 4 = rank 1 of 2 on the second node, which has 4 GPUs: cuda:1 (not 3), NCCL bound
    to it. Mocked `torch.cuda`: there is no GPU here. (With as many processes as GPUs per node, rank % GPUs
    equals LOCAL_RANK, so this layout is the one where the two differ.)"""
    from utils import distributed as du

    set_devices, groups = [], []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    monkeypatch.setattr(torch.cuda, "set_device", lambda d: set_devices.append(torch.device(d)))
    monkeypatch.setattr(du.dist, "is_initialized", lambda: False)
    monkeypatch.setattr(du.dist, "init_process_group", lambda **kw: groups.append(kw))
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "4")
    info = du.init_distributed()
    assert info.device == torch.device("cuda", 1) and set_devices == [torch.device("cuda", 1)]
    assert (info.rank, info.local_rank, info.world_size, info.is_main) == (3, 1, 4, False)
    assert len(groups) == 1
    assert {k: groups[0][k] for k in ("backend", "rank", "world_size", "device_id")} == \
        {"backend": "nccl", "rank": 3, "world_size": 4, "device_id": torch.device("cuda", 1)}

    monkeypatch.setenv("RANK", "2")  # the first process of the second node: cuda:0, and not the main rank
    monkeypatch.setenv("LOCAL_RANK", "0")
    info = du.init_distributed()
    assert info.device == torch.device("cuda", 0) and not info.is_main
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # no GPU: every rank on the CPU, gloo
    groups.clear()
    assert du.init_distributed().device == torch.device("cpu") and groups[0]["backend"] == "gloo"
