"""StyleGAN2 layers as used by EG3D (generator backbone, super-resolution), pure PyTorch.

State-dict names and shapes are EG3D's. Weights are stored unscaled ("equalized learning rate"): the
gains `lr_multiplier / sqrt(fan_in)` are applied at run time. `resample_filter` buffers are used exactly
as loaded (never recomputed from [1,3,3,1]).

Fast path: when a SynthesisLayer/ToRGBLayer sees one style vector shared by the whole batch (the w-free
renderer drives its super-resolution with a learned constant), its parameters and style need no gradient and
no noise is added, the modulated+demodulated weights are input independent (the input may need a gradient:
training sends one through the frozen renderer). They are computed once, with the
activation gain folded in, cached (keyed on the parameters' and the style's storage and version counter, never on their
values: see `_fold_key`) and run
as a plain convolution with the bias fused, followed by one in-place activation pass.

Under autocast (bf16) the feature path runs in autocast's dtype (the folded weights are cached in float32 and
cast per call, as autocast casts a convolution's weight), while the 3-channel image of the skip architecture is
upsampled and accumulated in float32, as EG3D does for its fp16 blocks: the output image keeps float32 steps
instead of bf16's 2^-8 relative ones, which are as coarse as the 8-bit quantisation of the written image.
"""
from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from models.eg3d.ops import (ACTIVATIONS, at_least_float32, autocast_dtype, bias_act, conv2d_resample, frozen_conv2d,
                            full_precision, leaky_relu_compact_, setup_filter, upfirdn2d, upsample2d)

__all__ = [
    "normalize_2nd_moment",
    "FullyConnectedLayer",
    "Conv2dLayer",
    "MappingNetwork",
    "modulated_conv2d",
    "SynthesisLayer",
    "ToRGBLayer",
    "SynthesisBlock",
    "SynthesisNetwork",
    "clear_fold_caches",
]

#: The folded path also serves inputs that need gradients when the layer's own parameters and style do not (a
#: frozen renderer under a trained encoder): the same maths as the modulated path up to float rounding (the
#: gain multiplies the weights instead of the output), with one activation tensor per layer instead of four.
#: False restores the modulated path there (tests compare the two).
FOLD_WITH_INPUT_GRAD = True
#: Conv2dLayer (the discriminator's layers) folds its activation gain into the weights and its bias into the
#: convolution (same maths up to float rounding; False: the separate bias, activation, gain passes).
FOLD_CONV_GAIN = True

# Activations for which act(x) * g == act(g * x) for g > 0, so the gain can be folded into weights.
_HOMOGENEOUS = ("linear", "relu", "lrelu")


def normalize_2nd_moment(x: torch.Tensor, dim: int = 1, eps: float = 1e-8) -> torch.Tensor:
    """x * rsqrt(mean(x², dim) + eps)."""
    return x * (x.square().mean(dim=dim, keepdim=True) + eps).rsqrt()


def _needs_grad(*tensors: torch.Tensor | None) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def _foldable_dtype(x: torch.Tensor) -> bool:
    """float32 (or float64: the tests' reference evaluation), or autocast's dtype under autocast (then the
    convolution casts the folded weights itself); not the fp16 blocks (their modulated path pre-normalises the
    weights against overflow)."""
    return x.dtype in (torch.float32, torch.float64) or x.dtype == autocast_dtype(x)


def _fold_key(*tensors: torch.Tensor | None) -> tuple | None:
    """Identity of the tensors' values read without the values themselves (no device→host sync): per tensor its
    address, version counter, device, dtype, shape and strides; None when one is an inference tensor (it has no
    version counter, so its in-place changes cannot be seen: nothing is cached then) or while torch.compile traces.

    The cache rule: a hit means each tensor is the same memory, not written in place since it was cached. Every
    in-place op through the tensor or any of its views bumps the version counter they share (`optimizer.step()`,
    `load_state_dict`, `copy_` under `no_grad` or `inference_mode`); re-assigning `.data`, `.to()`, or a new
    Parameter changes the address. The cache keeps the tensors alive (`_cache_entry`), so their memory cannot be
    freed and reused by another tensor at the same address. Writes the counter does not see (through `.data`,
    or a NumPy/DLPack view of the memory) must be followed by `clear_fold_caches(module)`.
    """
    if torch.compiler.is_compiling():  # a compiled graph folds in the graph: no Python-side cache to guard on
        return None
    key = []
    for t in tensors:
        if t is None:
            key.append(None)
        elif t.is_inference():
            return None
        else:
            key.append((t.data_ptr(), t._version, t.device, t.dtype, tuple(t.shape), t.stride()))
    return tuple(key)


def _cache_lookup(entry: tuple | None, tensors: tuple, extra: tuple = ()) -> Any | None:
    """The value of a `_cache_entry` if it was made from the same `tensors` (by `_fold_key`) and `extra`, else None."""
    key = _fold_key(*tensors)
    if key is None or entry is None or entry[0] != (key, extra):
        return None
    return entry[2]


def _cache_entry(tensors: tuple, value: Any, extra: tuple = ()) -> tuple | None:
    """(key, the tensors (kept alive so their memory is not reused), value), or None if they cannot be keyed."""
    key = _fold_key(*tensors)
    return None if key is None else ((key, extra), tuple(None if t is None else t.detach() for t in tensors), value)


def clear_fold_caches(module: nn.Module) -> None:
    """Drop the folded-weight caches of every SynthesisLayer/ToRGBLayer in `module` (after writing parameters
    in a way their version counter does not see, e.g. through `.data`)."""
    for m in module.modules():
        if isinstance(m, (SynthesisLayer, ToRGBLayer)):
            m._cache = None


class FullyConnectedLayer(nn.Module):
    """y = act(x @ (weight·lr_mul/√in)ᵀ + bias·lr_mul). x: [..., in] (2-D for the addmm fast path)."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        activation: str = "linear",
        lr_multiplier: float = 1.0,
        bias_init: float = 0.0,
    ):
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.activation = activation
        self.weight = nn.Parameter(torch.randn([out_features, in_features]) / lr_multiplier)
        self.bias = nn.Parameter(torch.full([out_features], float(bias_init))) if bias else None
        self.weight_gain = lr_multiplier / math.sqrt(in_features)
        self.bias_gain = lr_multiplier

    def effective_weight(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        w = self.weight if dtype is None else self.weight.to(dtype)
        return w * self.weight_gain

    def effective_bias(self, dtype: torch.dtype | None = None) -> torch.Tensor | None:
        b = self.bias
        if b is None:
            return None
        b = b if dtype is None else b.to(dtype)
        return b * self.bias_gain if self.bias_gain != 1 else b

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.effective_weight(x.dtype)
        b = self.effective_bias(x.dtype)
        if self.activation == "linear" and b is not None and x.ndim == 2:
            return torch.addmm(b.unsqueeze(0), x, w.t())
        x = x.matmul(w.t())
        return bias_act(x, b, dim=x.ndim - 1, act=self.activation)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, activation={self.activation}"


class Conv2dLayer(nn.Module):
    """Equalized-LR conv with optional FIR up/down-sampling, bias and activation (discriminator building block).

    x: [N, in, H, W] → [N, out, H*up/down, W*up/down].
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int,
        bias: bool = True,
        activation: str = "linear",
        up: int = 1,
        down: int = 1,
        resample_filter: Any = (1, 3, 3, 1),
        conv_clamp: float | None = None,
        channels_last: bool = False,
        trainable: bool = True,
    ):
        super().__init__()
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.activation = activation
        self.up = up
        self.down = down
        self.conv_clamp = conv_clamp
        self.register_buffer("resample_filter", setup_filter(resample_filter))
        self.padding = kernel_size // 2
        self.weight_gain = 1 / math.sqrt(in_channels * (kernel_size**2))
        self.act_gain = ACTIVATIONS[activation].def_gain
        memory_format = torch.channels_last if channels_last else torch.contiguous_format
        weight = torch.randn([out_channels, in_channels, kernel_size, kernel_size]).to(memory_format=memory_format)
        b = torch.zeros([out_channels]) if bias else None
        if trainable:
            self.weight = nn.Parameter(weight)
            self.bias = nn.Parameter(b) if b is not None else None
        else:
            self.register_buffer("weight", weight)
            if b is not None:
                self.register_buffer("bias", b)
            else:
                self.bias = None

    def forward(self, x: torch.Tensor, gain: float = 1.0) -> torch.Tensor:
        act_gain = self.act_gain * gain
        act_clamp = self.conv_clamp * gain if self.conv_clamp is not None else None
        if FOLD_CONV_GAIN and self.activation in _HOMOGENEOUS and act_gain > 0:
            # act(conv(x, w) + b)·g == act(conv(x, g·w) + g·b): the gain goes into the (small) weights and the bias
            # into the convolution, so the activation-sized tensor sees one activation (+ clamp) pass, not four.
            w = self.weight * (self.weight_gain * act_gain)
            b = (self.bias * act_gain).to(x.dtype) if self.bias is not None else None
            x = conv2d_resample(x, w.to(x.dtype), f=self.resample_filter, up=self.up, down=self.down,
                                padding=self.padding, flip_weight=(self.up == 1), bias=b)
            if self.activation == "lrelu" and not _needs_grad(self.weight, self.bias):
                # Frozen (the generator-side D pass): a byte per element kept for backward, not the float output.
                return leaky_relu_compact_(x, ACTIVATIONS["lrelu"].def_alpha, act_clamp)
            return bias_act(x, None, act=self.activation, gain=1.0, clamp=act_clamp)
        w = self.weight * self.weight_gain
        b = self.bias.to(x.dtype) if self.bias is not None else None
        x = conv2d_resample(x, w.to(x.dtype), f=self.resample_filter, up=self.up, down=self.down,
                            padding=self.padding, flip_weight=(self.up == 1))
        return bias_act(x, b, act=self.activation, gain=act_gain, clamp=act_clamp)


class MappingNetwork(nn.Module):
    """z [N, z_dim] (+ c [N, c_dim]) → ws [N, num_ws, w_dim] (or [N, w_dim] when num_ws is None)."""

    def __init__(
        self,
        z_dim: int,
        c_dim: int,
        w_dim: int,
        num_ws: int | None,
        num_layers: int = 8,
        embed_features: int | None = None,
        layer_features: int | None = None,
        activation: str = "lrelu",
        lr_multiplier: float = 0.01,
        w_avg_beta: float | None = 0.998,
    ):
        super().__init__()
        self.z_dim = z_dim
        self.c_dim = c_dim
        self.w_dim = w_dim
        self.num_ws = num_ws
        self.num_layers = num_layers
        self.w_avg_beta = w_avg_beta
        if embed_features is None:
            embed_features = w_dim
        if c_dim == 0:
            embed_features = 0
        if layer_features is None:
            layer_features = w_dim
        features = [z_dim + embed_features] + [layer_features] * (num_layers - 1) + [w_dim]
        if c_dim > 0:
            self.embed = FullyConnectedLayer(c_dim, embed_features)
        for idx in range(num_layers):
            setattr(self, f"fc{idx}", FullyConnectedLayer(features[idx], features[idx + 1], activation=activation,
                                                          lr_multiplier=lr_multiplier))
        if num_ws is not None and w_avg_beta is not None:
            self.register_buffer("w_avg", torch.zeros([w_dim]))

    def forward(
        self,
        z: torch.Tensor | None,
        c: torch.Tensor | None,
        truncation_psi: float = 1.0,
        truncation_cutoff: int | None = None,
        update_emas: bool = False,
    ) -> torch.Tensor:
        x = None
        if self.z_dim > 0:
            x = normalize_2nd_moment(z.to(torch.float32))
        if self.c_dim > 0:
            y = normalize_2nd_moment(self.embed(c.to(torch.float32)))
            x = torch.cat([x, y], dim=1) if x is not None else y
        for idx in range(self.num_layers):
            x = getattr(self, f"fc{idx}")(x)
        if update_emas and self.w_avg_beta is not None:
            with torch.no_grad():
                self.w_avg.copy_(x.detach().mean(dim=0).lerp(self.w_avg, self.w_avg_beta))
        if self.num_ws is not None:
            x = x.unsqueeze(1).repeat([1, self.num_ws, 1])
        if truncation_psi != 1:
            if self.num_ws is None or truncation_cutoff is None:
                x = self.w_avg.lerp(x, truncation_psi)
            else:
                x = x.clone()
                x[:, :truncation_cutoff] = self.w_avg.lerp(x[:, :truncation_cutoff], truncation_psi)
        return x


def modulated_conv2d(
    x: torch.Tensor,
    weight: torch.Tensor,
    styles: torch.Tensor,
    noise: torch.Tensor | None = None,
    up: int = 1,
    down: int = 1,
    padding: int = 0,
    resample_filter: torch.Tensor | None = None,
    demodulate: bool = True,
    flip_weight: bool = True,
    fused_modconv: bool = True,
) -> torch.Tensor:
    """StyleGAN2 modulated convolution.

    x: [N, I, H, W]; weight: [O, I, kh, kw]; styles: [N, I] or [1, I] (one style shared by the batch:
    one weight, one ordinary conv — identical per sample to the fused path); noise broadcastable to the
    output. Returns [N, O, H', W'].
    """
    batch_size = x.shape[0]
    out_channels, in_channels, kh, kw = weight.shape
    shared = styles.shape[0] == 1 and batch_size != 1
    if styles.shape[0] != batch_size and not shared:
        raise ValueError(f"styles batch {styles.shape[0]} does not match x batch {batch_size}")

    if x.dtype == torch.float16 and demodulate:
        # Pre-normalise to avoid fp16 overflow (the original's fp16 path).
        weight = weight * (1 / math.sqrt(in_channels * kh * kw) / weight.norm(float("inf"), dim=[1, 2, 3], keepdim=True))
        styles = styles / styles.norm(float("inf"), dim=1, keepdim=True)

    sb = styles.shape[0]
    w = None
    dcoefs = None
    if demodulate or fused_modconv or shared:
        w = weight.unsqueeze(0) * styles.reshape(sb, 1, -1, 1, 1)  # [B, O, I, kh, kw]
    if demodulate:
        dcoefs = (w.square().sum(dim=[2, 3, 4]) + 1e-8).rsqrt()  # [B, O]
    if shared:
        if demodulate:
            w = w * dcoefs.reshape(1, -1, 1, 1, 1)
        x = conv2d_resample(x, w[0].to(x.dtype), f=resample_filter, up=up, down=down, padding=padding,
                            flip_weight=flip_weight)
        if noise is not None:
            x = x + noise.to(x.dtype)
        return x

    if not fused_modconv:
        x = x * styles.to(x.dtype).reshape(batch_size, -1, 1, 1)
        x = conv2d_resample(x, weight.to(x.dtype), f=resample_filter, up=up, down=down, padding=padding,
                            flip_weight=flip_weight)
        if demodulate and noise is not None:
            x = torch.addcmul(noise.to(x.dtype), x, dcoefs.to(x.dtype).reshape(batch_size, -1, 1, 1))
        elif demodulate:
            x = x * dcoefs.to(x.dtype).reshape(batch_size, -1, 1, 1)
        elif noise is not None:
            x = x + noise.to(x.dtype)
        return x

    if demodulate:
        w = w * dcoefs.reshape(batch_size, -1, 1, 1, 1)
    x = x.reshape(1, -1, *x.shape[2:])
    w = w.reshape(-1, in_channels, kh, kw)
    x = conv2d_resample(x, w.to(x.dtype), f=resample_filter, up=up, down=down, padding=padding,
                        groups=batch_size, flip_weight=flip_weight)
    x = x.reshape(batch_size, -1, *x.shape[2:])
    if noise is not None:
        x = x + noise
    return x


class SynthesisLayer(nn.Module):
    """Modulated 3×3 conv (optionally up=2) + noise + bias + lrelu·√2 (+ clamp).

    x: [N, in, R/up, R/up], w: [N, w_dim] or [1, w_dim] → [N, out, R, R].
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        w_dim: int,
        resolution: int,
        kernel_size: int = 3,
        up: int = 1,
        use_noise: bool = True,
        activation: str = "lrelu",
        resample_filter: Any = (1, 3, 3, 1),
        conv_clamp: float | None = None,
        channels_last: bool = False,
    ):
        super().__init__()
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.w_dim = w_dim
        self.resolution = resolution
        self.up = up
        self.use_noise = use_noise
        self.activation = activation
        self.conv_clamp = conv_clamp
        self.affine = FullyConnectedLayer(w_dim, in_channels, bias_init=1)
        self.register_buffer("resample_filter", setup_filter(resample_filter))
        self.padding = kernel_size // 2
        self.act_gain = ACTIVATIONS[activation].def_gain
        memory_format = torch.channels_last if channels_last else torch.contiguous_format
        self.weight = nn.Parameter(
            torch.randn([out_channels, in_channels, kernel_size, kernel_size]).to(memory_format=memory_format))
        if use_noise:
            self.register_buffer("noise_const", torch.randn([resolution, resolution]))
            self.noise_strength = nn.Parameter(torch.zeros([]))
        self.bias = nn.Parameter(torch.zeros([out_channels]))
        self._cache: tuple | None = None  # see _cache_entry

    def _can_fold(self, x: torch.Tensor, w: torch.Tensor, noise_mode: str, gain: float) -> bool:
        return (
            not self.training
            and w.shape[0] == 1
            and (noise_mode == "none" or not self.use_noise)
            and self.activation in _HOMOGENEOUS
            and gain > 0
            and _foldable_dtype(x)
            and (FOLD_WITH_INPUT_GRAD or not _needs_grad(x))
            and not _needs_grad(w, self.weight, self.bias, self.affine.weight, self.affine.bias)
        )

    def _folded(self, w: torch.Tensor, gain: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """(conv weight with style, demodulation and act gain folded in, folded bias, FIR kernel for up>1)."""
        tensors = (w, self.weight, self.bias, self.affine.weight, self.affine.bias, self.resample_filter)
        hit = _cache_lookup(self._cache, tensors, (float(gain),))
        if hit is not None:
            return hit
        g = self.act_gain * gain
        with full_precision(w):  # the cache serves float32 and autocast calls alike: computed in float32
            styles = self.affine(w)  # [1, I]
        wm = self.weight.unsqueeze(0) * styles.reshape(1, 1, -1, 1, 1)
        dcoefs = (wm.square().sum(dim=[2, 3, 4]) + 1e-8).rsqrt()
        wm = (wm * dcoefs.reshape(1, -1, 1, 1, 1))[0]
        fir = None
        if self.up > 1:
            # conv2d_resample's transposed path (flip_weight=False there → no kernel flip), FIR with gain up².
            wm = (wm * g).transpose(0, 1).contiguous()
            f = self.resample_filter * float(self.up**2)
            fir = f.flip([0, 1])[None, None].repeat(self.out_channels, 1, 1, 1).contiguous()
        else:
            wm = (wm * g).contiguous()
        b = (self.bias * g).contiguous()
        value = (wm, b, fir)
        self._cache = _cache_entry(tensors, value, (float(gain),))
        return value

    def _forward_folded(self, x: torch.Tensor, w: torch.Tensor, gain: float) -> torch.Tensor:
        wm, b, fir = self._folded(w, gain)
        if self.up > 1:
            fh, fw = self.resample_filter.shape[0], self.resample_filter.shape[-1]
            kh, kw = wm.shape[2], wm.shape[3]
            up = self.up
            px0 = self.padding + (fw + up - 1) // 2 - (kw - 1)
            px1 = self.padding + (fw - up) // 2 - (kw - up)
            py0 = self.padding + (fh + up - 1) // 2 - (kh - 1)
            py1 = self.padding + (fh - up) // 2 - (kh - up)
            pxt = max(min(-px0, -px1), 0)
            pyt = max(min(-py0, -py1), 0)
            # Constant weights: under input gradients no activation is kept for the convolutions' backward.
            x = frozen_conv2d(x, wm, stride=up, padding=[pyt, pxt], transposed=True)
            p = [px0 + pxt, px1 + pxt, py0 + pyt, py1 + pyt]
            if p[0] == p[1] == p[2] == p[3] and p[0] >= 0:
                x = frozen_conv2d(x, fir, b, padding=p[0], groups=self.out_channels)
            else:
                x = upfirdn2d(x, self.resample_filter, padding=p, gain=up**2)
                x = x.add_(b.reshape(1, -1, 1, 1))
        else:
            x = frozen_conv2d(x, wm, b, padding=self.padding)
        c = self.conv_clamp * gain if self.conv_clamp is not None else None
        if self.activation == "lrelu":  # a byte per element kept for backward, not the float output
            return leaky_relu_compact_(x, ACTIVATIONS["lrelu"].def_alpha, c)
        if self.activation == "relu":
            x = F.relu_(x)
        if c is not None:
            x = x.clamp(-c, c) if x.requires_grad else x.clamp_(-c, c)
        return x

    def forward(
        self,
        x: torch.Tensor,
        w: torch.Tensor,
        noise_mode: str = "random",
        fused_modconv: bool = True,
        gain: float = 1.0,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        if noise_mode not in ("random", "const", "none"):
            raise ValueError(f"noise_mode must be 'random', 'const' or 'none', got '{noise_mode}'")
        if self._can_fold(x, w, noise_mode, gain):
            return self._forward_folded(x, w, gain)
        styles = self.affine(w)
        noise = None
        if self.use_noise and noise_mode == "random":
            noise = torch.randn([x.shape[0], 1, self.resolution, self.resolution], device=x.device,
                                generator=generator) * self.noise_strength
        if self.use_noise and noise_mode == "const":
            noise = self.noise_const * self.noise_strength
        x = modulated_conv2d(x, self.weight, styles, noise=noise, up=self.up, padding=self.padding,
                             resample_filter=self.resample_filter, flip_weight=(self.up == 1),
                             fused_modconv=fused_modconv)
        act_gain = self.act_gain * gain
        act_clamp = self.conv_clamp * gain if self.conv_clamp is not None else None
        return bias_act(x, self.bias.to(x.dtype), act=self.activation, gain=act_gain, clamp=act_clamp)

    def extra_repr(self) -> str:
        return (f"in_channels={self.in_channels}, out_channels={self.out_channels}, resolution={self.resolution}, "
                f"up={self.up}, activation={self.activation}")


class ToRGBLayer(nn.Module):
    """1×1 modulated conv without demodulation + bias (+ clamp). x: [N, in, R, R] → [N, out, R, R]."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        w_dim: int,
        kernel_size: int = 1,
        conv_clamp: float | None = None,
        channels_last: bool = False,
    ):
        super().__init__()
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.w_dim = w_dim
        self.conv_clamp = conv_clamp
        self.affine = FullyConnectedLayer(w_dim, in_channels, bias_init=1)
        memory_format = torch.channels_last if channels_last else torch.contiguous_format
        self.weight = nn.Parameter(
            torch.randn([out_channels, in_channels, kernel_size, kernel_size]).to(memory_format=memory_format))
        self.bias = nn.Parameter(torch.zeros([out_channels]))
        self.weight_gain = 1 / math.sqrt(in_channels * (kernel_size**2))
        self.padding = kernel_size // 2
        self._cache: tuple | None = None  # see _cache_entry

    def _folded(self, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        tensors = (w, self.weight, self.bias, self.affine.weight, self.affine.bias)
        hit = _cache_lookup(self._cache, tensors)
        if hit is not None:
            return hit
        with full_precision(w):  # as SynthesisLayer._folded
            styles = self.affine(w) * self.weight_gain
        wm = (self.weight.unsqueeze(0) * styles.reshape(1, 1, -1, 1, 1))[0].contiguous()
        value = (wm, self.bias.contiguous())
        self._cache = _cache_entry(tensors, value)
        return value

    def forward(self, x: torch.Tensor, w: torch.Tensor, fused_modconv: bool = True) -> torch.Tensor:
        if (not self.training and w.shape[0] == 1 and _foldable_dtype(x)
                and (FOLD_WITH_INPUT_GRAD or not _needs_grad(x))
                and not _needs_grad(w, self.weight, self.bias, self.affine.weight, self.affine.bias)):
            wm, b = self._folded(w)
            x = frozen_conv2d(x, wm, b, padding=self.padding)
            if self.conv_clamp is None:
                return x
            return x.clamp(-self.conv_clamp, self.conv_clamp) if x.requires_grad else \
                x.clamp_(-self.conv_clamp, self.conv_clamp)
        styles = self.affine(w) * self.weight_gain
        x = modulated_conv2d(x, self.weight, styles, demodulate=False, fused_modconv=fused_modconv)
        return bias_act(x, self.bias.to(x.dtype), clamp=self.conv_clamp)


class SynthesisBlock(nn.Module):
    """One resolution of the 'skip' synthesis network.

    forward(x [N, in, R/2, R/2] or None, img [N, img_channels, R/2, R/2] or None, ws [N or 1, num_conv+num_torgb, w_dim])
    → (x [N, out, R, R], img [N, img_channels, R, R]).
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        w_dim: int,
        resolution: int,
        img_channels: int,
        is_last: bool,
        architecture: str = "skip",
        resample_filter: Any = (1, 3, 3, 1),
        conv_clamp: float | None = 256,
        use_fp16: bool = False,
        fp16_channels_last: bool = False,
        fused_modconv_default: bool | str = True,
        **layer_kwargs: Any,
    ):
        super().__init__()
        if architecture != "skip":
            raise NotImplementedError("only the 'skip' architecture (EG3D's) is implemented")
        self.in_channels = in_channels
        self.w_dim = w_dim
        self.resolution = resolution
        self.img_channels = img_channels
        self.is_last = is_last
        self.architecture = architecture
        self.use_fp16 = use_fp16
        self.channels_last = use_fp16 and fp16_channels_last
        self.fused_modconv_default = fused_modconv_default
        self.register_buffer("resample_filter", setup_filter(resample_filter))
        self.num_conv = 0
        self.num_torgb = 0
        if in_channels == 0:
            self.const = nn.Parameter(torch.randn([out_channels, resolution, resolution]))
        if in_channels != 0:
            self.conv0 = SynthesisLayer(in_channels, out_channels, w_dim=w_dim, resolution=resolution, up=2,
                                        resample_filter=resample_filter, conv_clamp=conv_clamp,
                                        channels_last=self.channels_last, **layer_kwargs)
            self.num_conv += 1
        self.conv1 = SynthesisLayer(out_channels, out_channels, w_dim=w_dim, resolution=resolution,
                                    conv_clamp=conv_clamp, channels_last=self.channels_last, **layer_kwargs)
        self.num_conv += 1
        self.torgb = ToRGBLayer(out_channels, img_channels, w_dim=w_dim, conv_clamp=conv_clamp,
                                channels_last=self.channels_last)
        self.num_torgb += 1

    def forward(
        self,
        x: torch.Tensor | None,
        img: torch.Tensor | None,
        ws: torch.Tensor,
        force_fp32: bool = False,
        fused_modconv: bool | str | None = None,
        update_emas: bool = False,
        **layer_kwargs: Any,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        w_iter = iter(ws.unbind(dim=1))
        if ws.device.type != "cuda":
            force_fp32 = True
        dtype = torch.float16 if self.use_fp16 and not force_fp32 else torch.float32
        memory_format = torch.channels_last if self.channels_last and not force_fp32 else torch.contiguous_format
        if fused_modconv is None:
            fused_modconv = self.fused_modconv_default
        if fused_modconv == "inference_only":
            fused_modconv = not self.training

        if self.in_channels == 0:
            batch = ws.shape[0] if x is None else x.shape[0]
            x = self.const.to(dtype=dtype, memory_format=memory_format).unsqueeze(0).repeat([batch, 1, 1, 1])
            x = self.conv1(x, next(w_iter), fused_modconv=fused_modconv, **layer_kwargs)
        else:
            # Keep the caller's memory format (channels_last inputs stay channels_last; numerically the same conv).
            x = x.to(dtype=dtype) if not self.channels_last or force_fp32 else x.to(dtype=dtype, memory_format=memory_format)
            x = self.conv0(x, next(w_iter), fused_modconv=fused_modconv, **layer_kwargs)
            x = self.conv1(x, next(w_iter), fused_modconv=fused_modconv, **layer_kwargs)

        if img is not None:
            with full_precision(img):  # the skip image stays float32 under autocast
                img = upsample2d(at_least_float32(img), self.resample_filter)
        y = self.torgb(x, next(w_iter), fused_modconv=fused_modconv)
        y = y.to(dtype=torch.float32, memory_format=torch.contiguous_format)
        if img is None:
            img = y
        elif img.requires_grad or y.requires_grad:
            img = img + y
        else:
            img = img.add_(y)
        return x, img


class SynthesisNetwork(nn.Module):
    """ws [N, num_ws, w_dim] → img [N, img_channels, R, R]; blocks b4 … b{R}, channels min(channel_base/res, channel_max)."""

    def __init__(
        self,
        w_dim: int,
        img_resolution: int,
        img_channels: int,
        channel_base: int = 32768,
        channel_max: int = 512,
        num_fp16_res: int = 4,
        **block_kwargs: Any,
    ):
        super().__init__()
        if img_resolution < 4 or img_resolution & (img_resolution - 1) != 0:
            raise ValueError("img_resolution must be a power of two >= 4")
        self.w_dim = w_dim
        self.img_resolution = img_resolution
        self.img_resolution_log2 = int(math.log2(img_resolution))
        self.img_channels = img_channels
        self.num_fp16_res = num_fp16_res
        self.block_resolutions = [2**i for i in range(2, self.img_resolution_log2 + 1)]
        channels = {res: min(channel_base // res, channel_max) for res in self.block_resolutions}
        fp16_resolution = max(2 ** (self.img_resolution_log2 + 1 - num_fp16_res), 8)
        self.num_ws = 0
        for res in self.block_resolutions:
            in_channels = channels[res // 2] if res > 4 else 0
            block = SynthesisBlock(in_channels, channels[res], w_dim=w_dim, resolution=res, img_channels=img_channels,
                                   is_last=(res == img_resolution), use_fp16=(res >= fp16_resolution), **block_kwargs)
            self.num_ws += block.num_conv
            if res == img_resolution:
                self.num_ws += block.num_torgb
            setattr(self, f"b{res}", block)

    def forward(self, ws: torch.Tensor, **block_kwargs: Any) -> torch.Tensor:
        ws = ws.to(torch.float32)
        if ws.ndim != 3 or ws.shape[1] != self.num_ws:
            raise ValueError(f"ws must be [N, {self.num_ws}, {self.w_dim}], got {tuple(ws.shape)}")
        block_ws = []
        w_idx = 0
        for res in self.block_resolutions:
            block = getattr(self, f"b{res}")
            block_ws.append(ws.narrow(1, w_idx, block.num_conv + block.num_torgb))
            w_idx += block.num_conv
        x = img = None
        for res, cur_ws in zip(self.block_resolutions, block_ws):
            x, img = getattr(self, f"b{res}")(x, img, cur_ws, **block_kwargs)
        return img
