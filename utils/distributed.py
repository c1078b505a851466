"""Distributed helpers: read the torchrun environment, init/destroy the process group, seed per rank.

torchrun (or `python -m torch.distributed.run`) sets RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR/PORT.
Without them everything here degrades to a single process: `all_reduce_*` are identities, rank 0 is main.

    info = init_distributed()          # NCCL on CUDA, gloo on CPU
    seed_everything(cfg.seed, info.rank)
    ...
    destroy_distributed()
"""
from __future__ import annotations

import datetime
import functools
import os
import random
import sys
from dataclasses import dataclass
from typing import Any, TextIO

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from utils.device import resolve_device
from utils.errors import ConfigError

GROUP_MODES = ("on", "auto", "off")


@dataclass
class DistInfo:
    """Where this process sits: global rank, rank on its node, number of processes, its device."""

    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")
    owns_group: bool = False  # `init_distributed` created the process group (so its caller destroys it)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def env_info() -> tuple[int, int, int]:
    """(rank, local_rank, world_size) from the torchrun environment; (0, 0, 1) without it.

    Raises ConfigError when RANK is not in [0, WORLD_SIZE)."""
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", str(rank)))
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world < 1 or not 0 <= rank < world:
        raise ConfigError(f"bad RANK={rank} / WORLD_SIZE={world} in the environment: RANK must be in [0, WORLD_SIZE)")
    return rank, local_rank, world


def launched_by_torchrun() -> bool:
    """True when this process was started by torchrun (it sets LOCAL_RANK and WORLD_SIZE)."""
    return "LOCAL_RANK" in os.environ and "WORLD_SIZE" in os.environ


def init_distributed(device: str | torch.device | None = None, *, mode: str = "on",
                     timeout_hours: float | None = None) -> DistInfo:
    """Initialise the default process group when WORLD_SIZE > 1 and pick this rank's device.

    `device` None/'auto': CUDA device LOCAL_RANK when CUDA is present, else CPU. The backend is NCCL for
    CUDA devices and gloo otherwise. Safe to call when the group already exists (`owns_group` is then False).
    `mode`: 'on' a group whenever WORLD_SIZE > 1 (torchrun also sets MASTER_ADDR/PORT); 'auto' only when
    MASTER_ADDR is set too, so ranks launched without a rendezvous (e.g. a SLURM array setting RANK and
    WORLD_SIZE only) work alone; 'off' never (every rank works alone). `timeout_hours`: how long the group's
    collectives, e.g. a barrier, wait for the slowest rank (None: torch's default).
    """
    if mode not in GROUP_MODES:
        raise ConfigError(f"distributed mode must be one of {', '.join(GROUP_MODES)}, got '{mode}'")
    rank, local_rank, world = env_info()
    dev = resolve_device(device)
    if dev.type == "cuda":
        n = torch.cuda.device_count()
        index = local_rank % max(n, 1) if dev.index is None else dev.index
        dev = torch.device(dev.type, index)
        torch.cuda.set_device(dev)
    wanted = world > 1 and (mode == "on" or (mode == "auto" and "MASTER_ADDR" in os.environ))
    owns = False
    if wanted and not dist.is_initialized():
        backend = "nccl" if dev.type == "cuda" else "gloo"
        kwargs: dict[str, Any] = {}
        if dev.type == "cuda":
            kwargs["device_id"] = dev
        if timeout_hours is not None:
            kwargs["timeout"] = datetime.timedelta(hours=timeout_hours)
        store = restart_store(world, kwargs.get("timeout"))
        kwargs.update({"store": store} if store is not None else {"init_method": "env://"})
        dist.init_process_group(backend=backend, rank=rank, world_size=world, **kwargs)
        owns = True
    return DistInfo(rank=rank, local_rank=local_rank, world_size=world, device=dev, owns_group=owns)


def destroy_distributed() -> None:
    """Tear the process group down (no-op without one)."""
    global _host_group
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
    _host_group = None


def is_dist() -> bool:
    """A process group of more than one rank exists."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def get_world_size() -> int:
    """Ranks in the process group (1 without one)."""
    return dist.get_world_size() if is_dist() else 1


def barrier() -> None:
    if is_dist():
        dist.barrier()


def rank_seed(seed: int, rank: int) -> int:
    """The seed a rank uses: distinct per rank, reproducible per (seed, rank)."""
    return int(seed) + 1_000_003 * int(rank)


def seed_everything(seed: int, rank: int = 0) -> int:
    """Seed python, numpy and torch (CPU and all CUDA devices) with `rank_seed(seed, rank)`; returns it."""
    s = rank_seed(seed, rank)
    random.seed(s)
    np.random.seed(s % (2**32))
    torch.manual_seed(s)
    return s


def all_reduce_mean(values: dict[str, float | torch.Tensor], device: torch.device) -> dict[str, float]:
    """Average a dict of scalars (floats or 0-dim tensors, on any device) over ranks (every rank must call it with
    the same keys, same order). The values travel as one float64 tensor and come back to the host in one copy:
    one device→host transfer however many scalars (a `.item()` each would wait for the device once each)."""
    if not values:
        return {}
    keys = list(values)
    t = torch.stack([torch.as_tensor(values[k]).detach().to(device, torch.float64).reshape(()) for k in keys])
    if is_dist():
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        t /= get_world_size()
    return dict(zip(keys, t.cpu().tolist()))


_host_group: Any = None


def host_group() -> Any:
    """A process group whose collectives run on host (CPU) tensors: the default group under gloo, otherwise a gloo
    group beside NCCL, made on first use (every rank must make that first call at the same point)."""
    global _host_group
    if dist.get_backend() == "gloo":
        return None  # the default group
    if _host_group is None:
        _host_group = dist.new_group(backend="gloo")
    return _host_group


def max_over_ranks(value: int) -> int:
    """The largest `value` of all ranks (call on every rank; `value` itself in a single process).

    E.g. a stop request (a signal number, 0 = none) that reached only some ranks becomes every rank's:
    one all-reduce of one integer, on the host (`host_group`), so it never waits for a GPU's queue.
    """
    if not is_dist():
        return int(value)
    t = torch.tensor([int(value)], dtype=torch.int64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=host_group())
    return int(t.item())


def wrap_ddp(module: nn.Module, device: torch.device, find_unused_parameters: bool = False) -> nn.Module:
    """`module` in DistributedDataParallel on `device`, without per-forward buffer syncs or stride mismatches.

    - Buffers are not broadcast before each forward. torch >= 2.13 spells this `forward_sync_buffers=False`
      (`broadcast_buffers=False` is deprecated: a FutureWarning per rank). Unlike the old flag, DDP still
      broadcasts the buffers once when it is built; every rank built them from the same seed or checkpoint,
      so that changes nothing.
    - Gradients take their parameter's strides (`keep_grad_layout`), so DDP's reducer does not warn
      "Grad strides do not match bucket view strides".
    """
    import inspect

    from torch.nn.parallel import DistributedDataParallel as DDP

    kwargs: dict[str, Any] = {"find_unused_parameters": find_unused_parameters}
    if "forward_sync_buffers" in inspect.signature(DDP.__init__).parameters:
        kwargs["forward_sync_buffers"] = False
    else:  # torch < 2.13
        kwargs["broadcast_buffers"] = False
    if device.type == "cuda":
        kwargs["device_ids"] = [device.index]
    keep_grad_layout(module)
    return DDP(module, **kwargs)


def keep_grad_layout(module: nn.Module) -> None:
    """Make the gradient of every trainable parameter with a size-1 dimension take the parameter's strides.

    Autograd keeps a new gradient as it comes when its strides differ from the parameter's only in size-1
    dimensions, e.g. a depthwise convolution over channels_last input gives its C×1×3×3 weight a gradient with
    strides (9, 1, 3, 1) against the weight's (9, 9, 3, 1), and a 1×1 convolution's C×K×1×1 weight (K, 1, K, K)
    against (K, 1, 1, 1). DDP's reducer compares every stride and warns once per process. A hook copies such a
    gradient into the parameter's layout before it is accumulated (small tensors; the values are unchanged).
    Parameters without a size-1 dimension need nothing: autograd already copies theirs into the parameter's layout.
    """
    for p in module.parameters():
        if p.requires_grad and p.dim() > 1 and 1 in p.shape:
            p.register_hook(functools.partial(_in_layout_of, p))


def _in_layout_of(param: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    if grad.stride() == param.stride():
        return grad
    return torch.empty_strided(param.shape, param.stride(), dtype=grad.dtype, device=grad.device).copy_(grad)


def all_gather_object(obj: Any) -> list[Any]:
    """Every rank's `obj`, in rank order ([obj] in a single process)."""
    if not is_dist():
        return [obj]
    out: list[Any] = [None] * get_world_size()
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Rank `src`'s `obj` on every rank."""
    if not is_dist():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def print_line(text: str = "", *, file: TextIO | None = None) -> None:
    """Print `text` as one whole line (default stdout): a single write of the text with its newline, then a flush.

    torchrun's ranks share the terminal or pipe, and `print` writes the text and the newline separately when
    the stream is unbuffered (PYTHONUNBUFFERED, `python -u`), so another rank's line could land in between
    (two lines run into one). One write of a line up to PIPE_BUF bytes (4 KiB on Linux) to a pipe is atomic;
    every line a rank prints goes through here.
    """
    stream = sys.stdout if file is None else file
    stream.write(f"{text}\n")
    stream.flush()


def rank_share(items: list[Any], rank: int, world_size: int) -> list[Any]:
    """This rank's items: item i goes to rank i mod `world_size` (disjoint shares whose union is `items`)."""
    return [item for i, item in enumerate(items) if i % world_size == rank]


def init_ranks(device: str | torch.device | None) -> DistInfo | None:
    """For a command that splits its inputs across ranks: None when not launched with WORLD_SIZE > 1 (the
    caller runs as one process, as without torchrun), else `init_distributed(device, mode='auto')` (this
    rank's device: CUDA device LOCAL_RANK when CUDA is present, else CPU with gloo). The caller destroys
    the group when `owns_group`."""
    if env_info()[2] <= 1:
        return None
    return init_distributed(device, mode="auto")


def restart_count() -> int:
    """How often torchrun has restarted this worker group (`TORCHELASTIC_RESTART_COUNT`; 0 on a first
    launch or without torchrun). With `--max-restarts=N`, torchrun restarts every rank when one dies."""
    raw = os.environ.get("TORCHELASTIC_RESTART_COUNT", "").strip() or "0"
    try:
        return max(int(raw), 0)
    except ValueError as e:
        raise ConfigError(f"bad TORCHELASTIC_RESTART_COUNT={raw!r} in the environment: it must be a whole number "
                          "(torchrun sets it; unset it when not running under torchrun)") from e


def restart_store(world_size: int, timeout: datetime.timedelta | None = None) -> dist.Store | None:
    """A key space of its own in torchrun's store for a worker group that torchrun restarted on one node, else None.

    torchrun shares its rendezvous store with the workers and keeps it across restarts, so a restarted group
    that used it as is could read the address a killed worker published and fail to connect
    (pytorch/pytorch#135712). On one node every rank has the same restart count, so the count names the key
    space; across nodes it does not (a node restarted for another node's failure keeps its count), and torch's
    own behaviour stays: there, TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 on every torchrun avoids the problem.
    """
    if (restart_count() == 0 or os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True"
            or os.environ.get("GROUP_WORLD_SIZE", "1") != "1"):
        return None
    from torch.distributed.constants import default_pg_timeout

    store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world_size, is_master=False,
                          timeout=timeout or default_pg_timeout)
    return dist.PrefixStore(f"threedpe/restart{restart_count()}/", store)
