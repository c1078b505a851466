"""utils.distributed: rank info from the launcher's environment and when a process group is made."""
from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from utils import distributed as du
from utils.errors import ConfigError


@pytest.fixture
def two_ranks(monkeypatch):
    """The environment of rank 1 of 2, without a rendezvous address (e.g. a SLURM array task)."""
    for k in ("MASTER_ADDR", "MASTER_PORT", "LOCAL_RANK"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")


@pytest.mark.parametrize("mode", ["auto", "off"])
def test_ranks_work_alone_without_a_group(two_ranks, monkeypatch, mode):
    if mode == "off":  # a rendezvous address is there, but groups are off
        monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
        monkeypatch.setenv("MASTER_PORT", "1")
    info = du.init_distributed("cpu", mode=mode, timeout_hours=1.0)
    assert (info.rank, info.local_rank, info.world_size) == (1, 1, 2)  # LOCAL_RANK defaults to RANK
    assert info.device == torch.device("cpu") and not info.owns_group and not dist.is_initialized()
    assert not du.is_dist() and du.all_gather_object({"a": 1}) == [{"a": 1}]
    du.barrier()  # no group: returns at once


def test_bad_environment_and_mode_are_config_errors(monkeypatch):
    monkeypatch.setenv("RANK", "2")
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ConfigError, match="RANK=2 / WORLD_SIZE=2"):
        du.init_distributed("cpu")
    monkeypatch.setenv("RANK", "0")
    with pytest.raises(ConfigError, match="one of on, auto, off, got 'sometimes'"):
        du.init_distributed("cpu", mode="sometimes")


def test_single_process_has_no_group(monkeypatch):
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR"):
        monkeypatch.delenv(k, raising=False)
    info = du.init_distributed("cpu", mode="on")
    assert (info.rank, info.world_size, info.owns_group, info.is_main, info.distributed) == (0, 1, False, True, False)


def test_gradients_keep_their_parameters_layout():
    """A depthwise (C×1×3×3) and a 1×1 (C×K×1×1) convolution over channels_last input get gradients whose strides
    differ from their weights' only in size-1 dimensions; autograd keeps them as they are, and DDP's reducer
    warns ("Grad strides do not match bucket view strides"). `keep_grad_layout` gives them the weights' strides."""
    def grads(keep: bool) -> list[torch.Tensor]:
        torch.manual_seed(0)
        net = torch.nn.Sequential(torch.nn.Conv2d(8, 8, 3, padding=1, groups=8), torch.nn.Conv2d(8, 4, 1))
        if keep:
            du.keep_grad_layout(net)
        x = torch.randn(2, 8, 5, 5).contiguous(memory_format=torch.channels_last)
        net(x).square().sum().backward()
        return [p.grad for p in net.parameters() if p.dim() == 4]

    plain, kept = grads(False), grads(True)
    weights = [(8, 1, 3, 3), (4, 8, 1, 1)]
    assert [tuple(g.shape) for g in plain] == weights
    assert any(g.stride() != torch.empty(w).stride() for g, w in zip(plain, weights))  # the cause, on this torch
    assert [g.stride() for g in kept] == [torch.empty(w).stride() for w in weights]
    assert all(torch.equal(a, b) for a, b in zip(plain, kept))  # the same values


def test_max_over_ranks_alone_is_the_value():
    assert du.max_over_ranks(15) == 15 and du.max_over_ranks(0) == 0
