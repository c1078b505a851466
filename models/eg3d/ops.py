"""StyleGAN2/EG3D low-level ops in pure PyTorch.

Numerically these follow NVIDIA's reference (`_ref`) code paths op for op (same op order, same padding
arithmetic, same filter flipping), so outputs match the original renders to float32 rounding:

- `bias_act`: add bias → activation → multiply by gain → clamp.
- `upfirdn2d`: zero-insertion upsampling → pad/crop → 2-D FIR filter (true convolution unless
  `flip_filter`) → keep every `down`-th sample.
- `conv2d_resample`: convolution fused with FIR up/down-sampling (transposed strided conv + FIR for up=2).

Filters are 2-D `[fh, fw]` (or separable 1-D `[fw]`) float32 tensors, normally `setup_filter([1,3,3,1])`.
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
import torch.nn.functional as F

__all__ = [
    "ACTIVATIONS",
    "bias_act",
    "setup_filter",
    "upfirdn2d",
    "upsample2d",
    "downsample2d",
    "filter2d",
    "conv2d_resample",
    "frozen_conv2d",
    "leaky_relu_compact_",
    "full_precision",
    "autocast_dtype",
    "at_least_float32",
]


@dataclass(frozen=True)
class _Activation:
    func: Callable[[torch.Tensor, float], torch.Tensor]
    def_alpha: float
    def_gain: float


ACTIVATIONS: dict[str, _Activation] = {
    "linear": _Activation(lambda x, a: x, 0.0, 1.0),
    "relu": _Activation(lambda x, a: F.relu(x), 0.0, math.sqrt(2)),
    "lrelu": _Activation(lambda x, a: F.leaky_relu(x, a), 0.2, math.sqrt(2)),
    "tanh": _Activation(lambda x, a: torch.tanh(x), 0.0, 1.0),
    "sigmoid": _Activation(lambda x, a: torch.sigmoid(x), 0.0, 1.0),
    "elu": _Activation(lambda x, a: F.elu(x), 0.0, 1.0),
    "selu": _Activation(lambda x, a: F.selu(x), 0.0, 1.0),
    "softplus": _Activation(lambda x, a: F.softplus(x), 0.0, 1.0),
    "swish": _Activation(lambda x, a: torch.sigmoid(x) * x, 0.0, math.sqrt(2)),
}


def bias_act(
    x: torch.Tensor,
    b: torch.Tensor | None = None,
    dim: int = 1,
    act: str = "linear",
    alpha: float | None = None,
    gain: float | None = None,
    clamp: float | None = None,
) -> torch.Tensor:
    """Add `b` (broadcast along `dim`), apply `act`, scale by `gain` (default: the activation's), clamp to ±`clamp`.

    x: any shape; b: [x.shape[dim]] or None. Returns a tensor of x's shape and dtype.
    """
    if act not in ACTIVATIONS:
        raise ValueError(f"unknown activation '{act}' (valid: {', '.join(ACTIVATIONS)})")
    if clamp is not None and clamp < 0:
        raise ValueError("clamp must be None or >= 0")
    spec = ACTIVATIONS[act]
    alpha = float(alpha if alpha is not None else spec.def_alpha)
    gain = float(gain if gain is not None else spec.def_gain)
    if b is not None:
        if b.ndim != 1 or b.shape[0] != x.shape[dim]:
            raise ValueError(f"bias of shape {tuple(b.shape)} does not match x.shape[{dim}]={x.shape[dim]}")
        x = x + b.reshape([-1 if i == dim % x.ndim else 1 for i in range(x.ndim)])
    x = spec.func(x, alpha)
    if gain != 1:
        x = x * gain
    if clamp is not None:
        x = x.clamp(-clamp, clamp)
    return x


def setup_filter(
    f: Sequence[float] | torch.Tensor | None,
    device: torch.device | str | None = None,
    normalize: bool = True,
    flip_filter: bool = False,
    gain: float = 1.0,
    separable: bool | None = None,
) -> torch.Tensor:
    """Build a float32 FIR filter: 1-D taps → outer product (2-D) unless `separable`; normalised to sum 1.

    The default `[1,3,3,1]` gives the 4×4 `outer([1,3,3,1],[1,3,3,1])/64` stored in the checkpoints.
    """
    if f is None:
        f = 1
    f = torch.as_tensor(f, dtype=torch.float32)
    if f.ndim == 0:
        f = f[None]
    if f.ndim not in (1, 2) or f.numel() == 0:
        raise ValueError("filter must be 1-D or 2-D and non-empty")
    if separable is None:
        separable = f.ndim == 1 and f.numel() >= 8
    if f.ndim == 1 and not separable:
        f = torch.outer(f, f)
    if normalize:
        f = f / f.sum()
    if flip_filter:
        f = f.flip(list(range(f.ndim)))
    f = f * (gain ** (f.ndim / 2))
    return f.to(device=device) if device is not None else f


def _parse_scaling(s: int | Sequence[int]) -> tuple[int, int]:
    if isinstance(s, int):
        return s, s
    sx, sy = s
    return int(sx), int(sy)


def _parse_padding(p: int | Sequence[int]) -> tuple[int, int, int, int]:
    """→ (padx0, padx1, pady0, pady1). Accepts an int, [px, py] or [px0, px1, py0, py1]."""
    if isinstance(p, int):
        return p, p, p, p
    p = [int(v) for v in p]
    if len(p) == 2:
        return p[0], p[0], p[1], p[1]
    if len(p) == 4:
        return p[0], p[1], p[2], p[3]
    raise ValueError(f"bad padding {p}")


def _filter_size(f: torch.Tensor | None) -> tuple[int, int]:
    """(fw, fh) of a filter; (1, 1) for None."""
    if f is None:
        return 1, 1
    return int(f.shape[-1]), int(f.shape[0])


def upfirdn2d(
    x: torch.Tensor,
    f: torch.Tensor | None,
    up: int | Sequence[int] = 1,
    down: int | Sequence[int] = 1,
    padding: int | Sequence[int] = 0,
    flip_filter: bool = False,
    gain: float = 1.0,
) -> torch.Tensor:
    """Upsample (zero insertion), pad, FIR-filter and downsample a batch of images.

    x: [N, C, H, W]; f: [fh, fw] (2-D), [fw] (separable, applied along W then H) or None (identity 1×1).
    The filter is multiplied by gain**(f.ndim/2) and flipped unless `flip_filter` (so the default is a true
    convolution). Output: [N, C, (H*upy + pady0 + pady1 - fh)//downy + 1, ...W likewise].
    """
    if x.ndim != 4:
        raise ValueError(f"upfirdn2d expects [N, C, H, W], got {tuple(x.shape)}")
    if f is None:
        f = torch.ones([1, 1], dtype=torch.float32, device=x.device)
    batch, channels, in_h, in_w = x.shape
    upx, upy = _parse_scaling(up)
    downx, downy = _parse_scaling(down)
    padx0, padx1, pady0, pady1 = _parse_padding(padding)

    if upx > 1 or upy > 1:
        x = x.reshape(batch, channels, in_h, 1, in_w, 1)
        x = F.pad(x, [0, upx - 1, 0, 0, 0, upy - 1])
        x = x.reshape(batch, channels, in_h * upy, in_w * upx)

    x = F.pad(x, [max(padx0, 0), max(padx1, 0), max(pady0, 0), max(pady1, 0)])
    x = x[:, :, max(-pady0, 0): x.shape[2] - max(-pady1, 0), max(-padx0, 0): x.shape[3] - max(-padx1, 0)]

    f = f * (gain ** (f.ndim / 2))
    f = f.to(x.dtype)
    if not flip_filter:
        f = f.flip(list(range(f.ndim)))
    f = f[None, None].repeat([channels, 1] + [1] * f.ndim)
    # Downsampling keeps every down-th output: a strided convolution computes only those.
    if f.ndim == 4:
        return frozen_conv2d(x, f, stride=(downy, downx), groups=channels)
    x = frozen_conv2d(x, f.unsqueeze(2), stride=(1, downx), groups=channels)
    return frozen_conv2d(x, f.unsqueeze(3), stride=(downy, 1), groups=channels)


def upsample2d(
    x: torch.Tensor,
    f: torch.Tensor | None,
    up: int | Sequence[int] = 2,
    padding: int | Sequence[int] = 0,
    flip_filter: bool = False,
    gain: float = 1.0,
) -> torch.Tensor:
    """FIR upsampling: [N, C, H, W] → [N, C, H*up, W*up] (with padding 0), DC gain preserved."""
    upx, upy = _parse_scaling(up)
    padx0, padx1, pady0, pady1 = _parse_padding(padding)
    fw, fh = _filter_size(f)
    p = [
        padx0 + (fw + upx - 1) // 2,
        padx1 + (fw - upx) // 2,
        pady0 + (fh + upy - 1) // 2,
        pady1 + (fh - upy) // 2,
    ]
    return upfirdn2d(x, f, up=(upx, upy), padding=p, flip_filter=flip_filter, gain=gain * upx * upy)


def downsample2d(
    x: torch.Tensor,
    f: torch.Tensor | None,
    down: int | Sequence[int] = 2,
    padding: int | Sequence[int] = 0,
    flip_filter: bool = False,
    gain: float = 1.0,
) -> torch.Tensor:
    """FIR downsampling: [N, C, H, W] → [N, C, H/down, W/down] (with padding 0)."""
    downx, downy = _parse_scaling(down)
    padx0, padx1, pady0, pady1 = _parse_padding(padding)
    fw, fh = _filter_size(f)
    p = [
        padx0 + (fw - downx + 1) // 2,
        padx1 + (fw - downx) // 2,
        pady0 + (fh - downy + 1) // 2,
        pady1 + (fh - downy) // 2,
    ]
    return upfirdn2d(x, f, down=(downx, downy), padding=p, flip_filter=flip_filter, gain=gain)


def filter2d(
    x: torch.Tensor,
    f: torch.Tensor | None,
    padding: int | Sequence[int] = 0,
    flip_filter: bool = False,
    gain: float = 1.0,
) -> torch.Tensor:
    """FIR filtering at the same resolution (centred padding)."""
    padx0, padx1, pady0, pady1 = _parse_padding(padding)
    fw, fh = _filter_size(f)
    p = [padx0 + fw // 2, padx1 + (fw - 1) // 2, pady0 + fh // 2, pady1 + (fh - 1) // 2]
    return upfirdn2d(x, f, padding=p, flip_filter=flip_filter, gain=gain)


def _conv2d_wrapper(
    x: torch.Tensor,
    w: torch.Tensor,
    stride: int = 1,
    padding: int | Sequence[int] = 0,
    groups: int = 1,
    transpose: bool = False,
    flip_weight: bool = True,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """conv2d / conv_transpose2d; `flip_weight=False` flips the kernel (true convolution instead of correlation).
    A constant weight (a FIR filter, a frozen network's) keeps no input for backward (`frozen_conv2d`)."""
    kh, kw = w.shape[2], w.shape[3]
    if not flip_weight and (kw > 1 or kh > 1):
        w = w.flip([2, 3])
    if transpose:
        return _add_bias(frozen_conv2d(x, w, stride=stride, padding=padding, groups=groups, transposed=True), bias)
    return frozen_conv2d(x, w, bias, stride=stride, padding=padding, groups=groups)


def conv2d_resample(
    x: torch.Tensor,
    w: torch.Tensor,
    f: torch.Tensor | None = None,
    up: int = 1,
    down: int = 1,
    padding: int | Sequence[int] = 0,
    groups: int = 1,
    flip_weight: bool = True,
    flip_filter: bool = False,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """2-D convolution with optional FIR up/down-sampling, plus an optional per-channel `bias` [C_out] (fused into
    the convolution when that is the last operation, else added at the end).

    x: [N, C_in, H, W]; w: [C_out, C_in/groups, kh, kw]; f: FIR filter (required when up or down > 1).
    Output: [N, C_out, H*up/down, W*up/down] for the usual `padding = k//2`.
    One function on purpose: its cases (1×1, down then conv, up by transposed conv, conv then down) share the
    padding arithmetic, and they follow StyleGAN2's own case order, which a reader checks them against.
    """
    if not (isinstance(up, int) and up >= 1 and isinstance(down, int) and down >= 1):
        raise ValueError("up and down must be positive ints")
    if (up > 1 or down > 1) and f is None:
        raise ValueError("a resampling filter is required when up or down > 1")
    out_channels, in_channels_per_group, kh, kw = w.shape
    fw, fh = _filter_size(f)
    px0, px1, py0, py1 = _parse_padding(padding)

    if up > 1:
        px0 += (fw + up - 1) // 2
        px1 += (fw - up) // 2
        py0 += (fh + up - 1) // 2
        py1 += (fh - up) // 2
    if down > 1:
        px0 += (fw - down + 1) // 2
        px1 += (fw - down) // 2
        py0 += (fh - down + 1) // 2
        py1 += (fh - down) // 2

    # 1×1 kernel, downsampling only: filter+downsample first, then the cheap 1×1 conv.
    if kw == 1 and kh == 1 and (down > 1 and up == 1):
        x = upfirdn2d(x, f, down=down, padding=[px0, px1, py0, py1], flip_filter=flip_filter)
        return _conv2d_wrapper(x, w, groups=groups, flip_weight=flip_weight, bias=bias)

    # 1×1 kernel, upsampling only: conv first, then upsample.
    if kw == 1 and kh == 1 and (up > 1 and down == 1):
        x = _conv2d_wrapper(x, w, groups=groups, flip_weight=flip_weight)
        return _add_bias(upfirdn2d(x, f, up=up, padding=[px0, px1, py0, py1], gain=up**2, flip_filter=flip_filter),
                         bias)

    # Downsampling only: FIR filter, then strided conv.
    if down > 1 and up == 1:
        x = upfirdn2d(x, f, padding=[px0, px1, py0, py1], flip_filter=flip_filter)
        return _conv2d_wrapper(x, w, stride=down, groups=groups, flip_weight=flip_weight, bias=bias)

    # Upsampling: transposed strided conv, then FIR filter (and optional downsampling).
    if up > 1:
        if groups == 1:
            w = w.transpose(0, 1)
        else:
            w = w.reshape(groups, out_channels // groups, in_channels_per_group, kh, kw)
            w = w.transpose(1, 2)
            w = w.reshape(groups * in_channels_per_group, out_channels // groups, kh, kw)
        px0 -= kw - 1
        px1 -= kw - up
        py0 -= kh - 1
        py1 -= kh - up
        pxt = max(min(-px0, -px1), 0)
        pyt = max(min(-py0, -py1), 0)
        x = _conv2d_wrapper(x, w, stride=up, padding=[pyt, pxt], groups=groups, transpose=True,
                            flip_weight=not flip_weight)
        x = upfirdn2d(x, f, padding=[px0 + pxt, px1 + pxt, py0 + pyt, py1 + pyt], gain=up**2,
                      flip_filter=flip_filter)
        if down > 1:
            x = upfirdn2d(x, f, down=down, flip_filter=flip_filter)
        return _add_bias(x, bias)

    # No resampling, symmetric non-negative padding: plain conv2d.
    if px0 == px1 and py0 == py1 and px0 >= 0 and py0 >= 0:
        return _conv2d_wrapper(x, w, padding=[py0, px0], groups=groups, flip_weight=flip_weight, bias=bias)

    # Generic fallback.
    x = upfirdn2d(x, (f if up > 1 else None), up=up, padding=[px0, px1, py0, py1], gain=up**2,
                  flip_filter=flip_filter)
    x = _conv2d_wrapper(x, w, groups=groups, flip_weight=flip_weight)
    if down > 1:
        x = upfirdn2d(x, f, down=down, flip_filter=flip_filter)
    return _add_bias(x, bias)


def _add_bias(x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return x if bias is None else x + bias.to(x.dtype).reshape(1, -1, 1, 1)


# ------------------------------------------------------------------- mixed precision (autocast)
def _autocast_on(dev: str) -> bool:
    """Autocast is on for device type `dev` (a device type without autocast, such as "meta", has it off)."""
    return torch.amp.is_autocast_available(dev) and torch.is_autocast_enabled(dev)


def autocast_dtype(x: torch.Tensor) -> torch.dtype | None:
    """The lower precision autocast runs matrix products and convolutions in on x's device, None outside autocast."""
    dev = x.device.type
    return torch.get_autocast_dtype(dev) if _autocast_on(dev) else None


def at_least_float32(x: torch.Tensor) -> torch.Tensor:
    """x in float32, or as it is when float64 (bf16/fp16 tensors are read as float32)."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def full_precision(x: torch.Tensor):
    """A context with autocast off on x's device (no-op outside autocast): the code inside runs in its tensors'
    own dtypes, for maths whose precision matters (ray marching, the image skip path) or that casts explicitly."""
    dev = x.device.type
    return torch.autocast(dev, enabled=False) if _autocast_on(dev) else contextlib.nullcontext()


# ------------------------------------------------------------------- constant-weight layers under input gradients
_DEPTHWISE_CHUNK_BYTES = 8 * 520 * 520 * 4  # ≈ 8 planes of 512²: well inside L2+L3 on the machines measured


def _by_channel_chunks(op, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                       out_shape: Sequence[int]) -> torch.Tensor:
    """Run a depthwise (groups = channels) `op(x, weight, bias)` a few channels at a time into one output.

    oneDNN's NCHW depthwise kernels slow down two- to fourfold once a plane stack leaves the cache (a 4×4 FIR
    over 64×516² runs at ~80 ms whole, ~40 ms in chunks of 8 channels); every output channel depends on its
    own input channel only, so the chunks give the same values bit for bit."""
    n, c = x.shape[:2]
    step = max(1, _DEPTHWISE_CHUNK_BYTES // max(1, x[:1, :1].numel() * x.element_size() * n))
    if step >= c:
        return op(x, weight, bias)
    out = None
    for i in range(0, c, step):
        y = op(x[:, i:i + step], weight[i:i + step], None if bias is None else bias[i:i + step])
        if out is None:  # the op's dtype (autocast may change it)
            out = y.new_empty(out_shape)
        out[:, i:i + step] = y
    return out


def _memory_format(x: torch.Tensor) -> torch.memory_format:
    """channels_last for a 4-D tensor stored channels-last (and not also plain contiguous), else contiguous."""
    cl = x.ndim == 4 and x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()
    return torch.channels_last if cl else torch.contiguous_format


def _is_depthwise(in_channels: int, weight: torch.Tensor, groups: int, transposed: bool) -> bool:
    return not transposed and groups > 1 and groups == in_channels == weight.shape[0] and weight.shape[1] == 1


def _polyphase_taps(phase: int, stride: int, padding: int, k: int) -> tuple[int, int, int]:
    """Along one axis of a transposed convolution, the outputs o ≡ phase (mod stride) take the kernel taps
    first, first + stride, ...: → (first tap, tap count, input offset of that phase's first output)."""
    first = (phase + padding) % stride
    taps = len(range(first, k, stride))
    return first, taps, (phase + padding - first) // stride - taps + 1


def conv_transpose2d_polyphase(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                               stride: Sequence[int], padding: Sequence[int]) -> torch.Tensor:
    """`F.conv_transpose2d(x, weight, bias, stride, padding)` (groups 1, no output padding) as stride_y·stride_x
    ordinary convolutions, one per output phase, interleaved into the output.

    x: [N, C_in, H, W]; weight: [C_in, C_out, kh, kw] (conv_transpose2d's layout), each kernel side ≥ its stride.
    The same sums as the transposed convolution in another order (≈1e-7 relative). On CPU-2 (oneDNN, AVX2) the
    gain depends on the shape: 2× for 32 → 256 channels at 128², ~1.1× for 512 → 256 at 64², none for 128 → 128
    at 256², 0.8× for 256 → 128 at 256² (docs/benchmarks.md)."""
    n, _, h, w = x.shape
    _, cout, kh, kw = weight.shape
    (sy, sx), (py, px) = stride, padding
    oh, ow = (h - 1) * sy + kh - 2 * py, (w - 1) * sx + kw - 2 * px
    out = None
    wt = weight.transpose(0, 1)  # [C_out, C_in, kh, kw]
    for ry in range(sy):
        my = -(-(oh - ry) // sy)
        ky, ny, offy = _polyphase_taps(ry, sy, py, kh)
        for rx in range(sx):
            mx = -(-(ow - rx) // sx)
            kx, nx, offx = _polyphase_taps(rx, sx, px, kw)
            wr = wt[:, :, ky::sy, kx::sx].flip([2, 3]).contiguous()
            # The phase reads input rows offy .. offy+my+ny-2 (zeros outside): pad (or crop) to exactly those.
            pad = [-offx, offx + mx + nx - 1 - w, -offy, offy + my + ny - 1 - h]
            if pad[0] == pad[1] >= 0 and pad[2] == pad[3] >= 0:  # the convolution pads (the SR's phases: no copy)
                y = F.conv2d(x, wr, bias, padding=(pad[2], pad[0]))
            else:
                y = F.conv2d(F.pad(x, pad), wr, bias)
            if out is None:  # the convolution's dtype (autocast may change it) and memory format
                out = torch.empty((n, cout, oh, ow), dtype=y.dtype, device=y.device,
                                  memory_format=_memory_format(y))
            out[:, :, ry::sy, rx::sx] = y
    return out


#: Output pixels from which AVX2 oneDNN's transposed kernel beats the phases (docs/benchmarks.md, "CPU paths").
_PHASES_AVX2_MAX_OUTPUT = 512 * 512
#: The instruction set ATen's CPU kernels use here ("AVX512", "AVX2", ...; ATEN_CPU_CAPABILITY can lower it).
_CPU_CAPABILITY = torch.backends.cpu.get_cpu_capability()


def _by_phases(x: torch.Tensor, weight: torch.Tensor, stride, padding, groups: int) -> bool:
    """Whether a strided transposed convolution runs by phases (`conv_transpose2d_polyphase`): a rule by device and
    instruction set, the same every run on a given machine (the two paths differ in the last bits, so a timed choice
    would make the outputs depend on the moment). On CUDA never (cuDNN's own kernel). On CPU, measured on the
    super-resolution's shapes: AVX-512 oneDNN, faster by phases at every shape (the 512² up-convolution 506 → 432
    ms); AVX2 oneDNN, faster up to 256² outputs (2× for 32 → 256 channels at 128²), slower at 512² (0.69 → 0.83 s).
    Read once at import (`_CPU_CAPABILITY`): a compiled graph sees a constant."""
    if x.device.type != "cpu" or groups != 1 or max(stride) < 2 or weight.shape[2] < stride[0] \
            or weight.shape[3] < stride[1]:
        return False
    if _CPU_CAPABILITY.startswith("AVX512"):
        return True
    oh = (x.shape[2] - 1) * stride[0] + weight.shape[2] - 2 * padding[0]
    ow = (x.shape[3] - 1) * stride[1] + weight.shape[3] - 2 * padding[1]
    return oh * ow < _PHASES_AVX2_MAX_OUTPUT


def _in_chunks(x: torch.Tensor, depthwise: bool) -> bool:
    """Whether a depthwise convolution runs a few channels at a time: on CPU (a cache effect of oneDNN's NCHW
    depthwise kernel), once its input is larger than `_DEPTHWISE_CHUNK_BYTES`. Never channels-last input: the
    channels-last kernel has no such slowdown (4×4 FIR over 128×513², 2-core AVX-512 Xeon: 21 ms whole, against
    38 ms NCHW whole), and a channel slice of it would be a strided copy."""
    return depthwise and x.device.type == "cpu" and x.numel() * x.element_size() > _DEPTHWISE_CHUNK_BYTES \
        and _memory_format(x) == torch.contiguous_format


def _conv_values(x, weight, bias, stride, padding, groups, transposed):
    """conv2d / conv_transpose2d (dilation 1, no output padding); on CPU strided transposed ones by phases where
    that is faster (`_by_phases`) and large depthwise ones in channel chunks (`_in_chunks`)."""
    if transposed and _by_phases(x, weight, stride, padding, groups):
        return conv_transpose2d_polyphase(x, weight, bias, stride, padding)
    conv = F.conv_transpose2d if transposed else F.conv2d

    def op(xc, wc, bc):
        return conv(xc, wc, bc, stride=stride, padding=padding, groups=xc.shape[1])

    if not _in_chunks(x, _is_depthwise(x.shape[1], weight, groups, transposed)):
        return conv(x, weight, bias, stride=stride, padding=padding, groups=groups)
    n, c, h, w = x.shape
    kh, kw = weight.shape[2:]
    out_shape = (n, c, (h + 2 * padding[0] - kh) // stride[0] + 1, (w + 2 * padding[1] - kw) // stride[1] + 1)
    return _by_channel_chunks(op, x, weight, bias, out_shape)


def _conv_input_grad(g, shape, strides, weight, stride, padding, groups, transposed):
    """The input gradient of `_conv_values` for an input of `shape`/`strides`: `aten.convolution_backward`'s, as
    autograd computes it (depthwise ones in channel chunks)."""

    def op(gc, wc, _):
        # Only the input's shape and layout matter for the input gradient: an unfilled tensor stands in for it.
        like = gc.new_empty((shape[0], gc.shape[1], *shape[2:])) if depthwise else gc.new_empty_strided(shape, strides)
        return torch.ops.aten.convolution_backward(gc, like, wc, None, stride, padding, [1, 1], transposed, [0, 0],
                                                   gc.shape[1] if depthwise else groups, [True, False, False])[0]

    depthwise = _is_depthwise(shape[1], weight, groups, transposed)
    if not _in_chunks(g, depthwise):
        return op(g, weight, None)
    return _by_channel_chunks(op, g.contiguous(), weight, None, shape)


class _FrozenConv(torch.autograd.Function):
    """conv2d / conv_transpose2d with a constant weight and bias: keeps no activation for backward (autograd's
    convolution keeps its input even when only the input gradient is wanted). Its backward is `_FrozenConvAdjoint`,
    whose own backward is this convolution again (without bias), so a double backward (R1) computes only
    what flows to the input; autograd's would also compute the constant filter's gradient, group by group."""

    @staticmethod
    def forward(ctx, x, weight, bias, stride, padding, groups, transposed):
        ctx.weight = weight
        ctx.conf = (tuple(x.shape), x.stride(), stride, padding, groups, transposed)
        return _conv_values(x, weight, bias, stride, padding, groups, transposed)

    @staticmethod
    def backward(ctx, g):
        return _FrozenConvAdjoint.apply(g, ctx.weight, ctx.conf), None, None, None, None, None, None


class _FrozenConvAdjoint(torch.autograd.Function):
    """The input gradient of `_FrozenConv` as a function of its output gradient (linear; its adjoint is the
    convolution itself)."""

    @staticmethod
    def forward(ctx, g, weight, conf):
        ctx.weight, ctx.conf = weight, conf
        shape, strides, stride, padding, groups, transposed = conf
        return _conv_input_grad(g, shape, strides, weight, stride, padding, groups, transposed)

    @staticmethod
    def backward(ctx, gg):
        _, _, stride, padding, groups, transposed = ctx.conf
        return _FrozenConv.apply(gg, ctx.weight, None, stride, padding, groups, transposed), None, None


def frozen_conv2d(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, stride: int = 1,
                  padding: int | Sequence[int] = 0, groups: int = 1, transposed: bool = False) -> torch.Tensor:
    """`F.conv2d` (or `F.conv_transpose2d`) for a weight and bias that never need gradients. When `x` needs one,
    the input is not kept for backward (see `_FrozenConv`); the input gradient is autograd's. Under autocast the
    three are cast to autocast's dtype first (its rule for convolutions), so bf16 training keeps no input either.
    The values are `F.conv2d`'s bit for bit, except strided transposed convolutions, which run by phases
    (`conv_transpose2d_polyphase`: the same sums in another order, within 2e-6)."""
    s, p = list(_parse_scaling(stride)), list(_parse_scaling(padding))
    if torch.is_grad_enabled() and x.requires_grad and not weight.requires_grad \
            and (bias is None or not bias.requires_grad):
        low = autocast_dtype(x) if x.dtype != torch.float64 else None  # autocast leaves float64 as it is
        if low is None:
            return _FrozenConv.apply(x, weight, bias, s, p, groups, transposed)
        # Under autocast: cast as autocast casts a convolution's operands, then run with autocast off, so that the
        # backward (outside autocast) pairs the low-precision gradient with a weight of the same dtype.
        with full_precision(x):
            return _FrozenConv.apply(x.to(low), weight.to(low), None if bias is None else bias.to(low), s, p, groups,
                                     transposed)
    return _conv_values(x, weight, bias, s, p, groups, transposed)


class _LeakyReLUCompact(torch.autograd.Function):
    """In-place leaky ReLU (+ clamp to [-c, c]) that keeps one byte per element for backward (where the output
    is positive, and where it was clamped) instead of the float output: autograd's gradient, bit for bit."""

    @staticmethod
    def forward(ctx, x, alpha, clamp):
        y = F.leaky_relu_(x, alpha)
        positive = y > 0  # leaky_relu's backward: slope 1 where the output is > 0, else alpha
        clamped = None
        if clamp is not None:
            clamped = y.abs() >= clamp  # clamp's gradient passes strictly inside (-c, c), as autograd's does
            y.clamp_(-clamp, clamp)
        ctx.mark_dirty(x)
        ctx.save_for_backward(positive, clamped)
        ctx.alpha = alpha
        return y

    @staticmethod
    def backward(ctx, g):
        positive, clamped = ctx.saved_tensors
        gx = torch.where(positive, g, g * ctx.alpha)
        return (gx if clamped is None else gx.masked_fill_(clamped, 0.0)), None, None


def leaky_relu_compact_(x: torch.Tensor, alpha: float, clamp: float | None = None) -> torch.Tensor:
    """In-place `leaky_relu(x, alpha)` then clamp to [-clamp, clamp] (None: no clamp); when `x` needs a gradient,
    backward keeps a byte per element instead of a float (see `_LeakyReLUCompact`). Inside torch.compile, plain
    autograd ops (the compiler plans the saved tensors itself; the values are the same)."""
    if torch.is_grad_enabled() and x.requires_grad:
        if torch.compiler.is_compiling():
            x = F.leaky_relu(x, alpha)
            return x if clamp is None else x.clamp(-clamp, clamp)
        return _LeakyReLUCompact.apply(x, alpha, clamp)
    x = F.leaky_relu_(x, alpha)
    return x if clamp is None else x.clamp_(-clamp, clamp)
