"""EG3D's ImportanceRenderer with triplane sampling, pure PyTorch.

Per ray: `depth_resolution` stratified depths in [ray_start, ray_end] → decode → MipRayMarcher2 weights →
`depth_resolution_importance` importance depths (EG3D's smoothed pdf) → decode → merge + sort → final march.

Triplane sampling keeps EG3D's plane axes: the (u, v) read from planes 0, 1, 2 are (x, y), (x, z), (z, x)
(the YZ plane is never used — the known EG3D quirk every released checkpoint depends on). Points are scaled
by 2/box_warp, then `grid_sample(bilinear, zeros, align_corners=False)`; u indexes the width.

Sampling modes:
- `deterministic=True` (inference default): stratified jitter is exactly half a bin and the importance
  draws are `u = linspace(0, 1, N)` (the parity-fixture convention).
- `deterministic=False` (training): the original random draws, made up front in the original order and
  shapes (`rand` [N, M, S, 1] for the jitter, density noise if any, then `rand` [N·M, S_imp]), optionally
  from a `torch.Generator`, so a seeded run consumes the RNG like the original.

Implementation (same maths as the original, fewer passes): rays are processed in chunks; features are
summed over planes in channel-first layout and fed to the MLP without transposes; the coarse colour
compositing the original throws away is skipped; the final colour composite uses per-sample weights
v_j = (w_{j-1} + w_j)/2 scattered back to the unsorted samples, so colours are never concatenated,
gathered or averaged into midpoints, and the sigmoid's affine map is applied after compositing. The
depth clamp uses the min/max over every depth of the whole batch, as in the original.

Training (the triplane needs gradients, the decoder is frozen): the lookups and the decoder run in
`FrozenDecode` and the colour composite in `CompositeColours`, which keep only the points and the sample weights
and recompute the rest in backward; each triplane gets its own row table.

Precision: `ImportanceRenderer.forward` runs in float32 (at least) with autocast off, whatever the caller's
autocast or the triplane's dtype (bf16 planes are read into a float32 table): the decoder's density goes
through exp and cumulative products along 96 samples, and the bilinear weights, the depths and the
compositing need more than bf16's 8 mantissa bits. EG3D, too, keeps its decoder in float32 when its
super-resolution runs in fp16; and a bf16 decoder MLP (32→64→33) was no faster on a CPU with AMX (one chunk, 98k
points: 149 ms float32, 156–188 ms bf16; the element-wise Softplus dominates, not the products). Autocast applies
again to the super-resolution after it.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from models.eg3d.config import RenderingConfig
from models.eg3d.decoder import RGB_OFFSET, RGB_SCALE, OSGDecoder
from models.eg3d.ops import at_least_float32, full_precision
from models.eg3d.ray_marcher import interval_weights, sample_weights
from models.eg3d.ray_sampler import sample_rays

__all__ = [
    "generate_planes",
    "project_onto_planes",
    "sample_from_planes",
    "sample_pdf",
    "corner_rows",
    "DecodeRecompute",
    "FrozenDecode",
    "CompositeColours",
    "ImportanceRenderer",
]


#: Decode with `FrozenDecode`/`CompositeColours` (recomputation in backward) when the triplane needs gradients and
#: the decoder does not; False: plain autograd through the lookup and the MLP (the reference for tests).
RECOMPUTE_FROZEN_DECODE = True

# World-coordinate columns read by planes 0, 1, 2 as (u, v): equals `coords @ inverse(generate_planes()[k])[:, :2]`.
_PLANE_COLS = [0, 1, 0, 2, 2, 0]


def generate_planes() -> torch.Tensor:
    """EG3D's plane axes [3, 3, 3]: identity, (x, z, y) and (z, x, y) bases → projections (x,y), (x,z), (z,x)."""
    return torch.tensor([[[1, 0, 0], [0, 1, 0], [0, 0, 1]],
                         [[1, 0, 0], [0, 0, 1], [0, 1, 0]],
                         [[0, 0, 1], [1, 0, 0], [0, 1, 0]]], dtype=torch.float32)


def project_onto_planes(plane_axes: torch.Tensor, coordinates: torch.Tensor) -> torch.Tensor:
    """coordinates [N, M, 3] → 2-D plane coordinates [N·n_planes, M, 2] (reference form, via the inverse axes)."""
    n, m, _ = coordinates.shape
    n_planes = plane_axes.shape[0]
    coordinates = coordinates.unsqueeze(1).expand(-1, n_planes, -1, -1).reshape(n * n_planes, m, 3)
    inv = torch.linalg.inv(plane_axes.to(coordinates)).unsqueeze(0).expand(n, -1, -1, -1).reshape(n * n_planes, 3, 3)
    return torch.bmm(coordinates, inv)[..., :2]


def sample_from_planes(plane_axes: torch.Tensor, plane_features: torch.Tensor, coordinates: torch.Tensor,
                       box_warp: float = 1.0) -> torch.Tensor:
    """plane_features [N, 3, C, H, W], world coordinates [N, M, 3] → features [N, 3, M, C] (reference form)."""
    n, n_planes, c, h, w = plane_features.shape
    m = coordinates.shape[1]
    feats = plane_features.reshape(n * n_planes, c, h, w)
    coordinates = (2 / box_warp) * coordinates
    proj = project_onto_planes(plane_axes, coordinates).unsqueeze(1)
    out = F.grid_sample(feats, proj.float(), mode="bilinear", padding_mode="zeros", align_corners=False)
    return out.permute(0, 3, 2, 1).reshape(n, n_planes, m, c)


def sample_pdf(bins: torch.Tensor, weights: torch.Tensor, n_importance: int, u: torch.Tensor | None = None,
               eps: float = 1e-5) -> torch.Tensor:
    """Inverse-CDF sampling (EG3D's `sample_pdf`). bins [R, B+2]... precisely: bins [R, K+1 or more], weights [R, K],
    u [R, n_importance] in [0, 1] (None → linspace(0, 1), EG3D's det=True). Returns depths [R, n_importance]."""
    n_rays, k = weights.shape
    weights = weights + eps
    pdf = weights / torch.sum(weights, -1, keepdim=True)
    cdf = torch.cumsum(pdf, -1)
    cdf = torch.cat([torch.zeros_like(cdf[:, :1]), cdf], -1)
    if u is None:
        u = torch.linspace(0, 1, n_importance, device=bins.device, dtype=bins.dtype).expand(n_rays, n_importance)
    u = u.contiguous()
    inds = torch.searchsorted(cdf, u, right=True)
    below = torch.clamp_min(inds - 1, 0)
    above = torch.clamp_max(inds, k)
    inds_sampled = torch.stack([below, above], -1).view(n_rays, 2 * n_importance)
    cdf_g = torch.gather(cdf, 1, inds_sampled).view(n_rays, n_importance, 2)
    bins_g = torch.gather(bins, 1, inds_sampled).view(n_rays, n_importance, 2)
    denom = cdf_g[..., 1] - cdf_g[..., 0]
    denom = torch.where(denom < eps, torch.ones_like(denom), denom)
    return bins_g[..., 0] + (u - cdf_g[..., 0]) / denom * (bins_g[..., 1] - bins_g[..., 0])


def corner_rows(uv: torch.Tensor, plane_hw: tuple[int, int], table_offset: int, box_warp: float, table_rows: int,
                dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Bilinear corners of points in a `plane_table`: uv [P, 6] world coordinates per plane (u0, v0, u1, v1, u2, v2)
    → (row indices [P, 12] into the table, weights [P, 12]): 3 planes × 4 corners, grid_sample(align_corners=False)'s
    unnormalisation; out-of-range corners land on the zero border."""
    h, w = plane_hw
    idt = torch.int32 if table_rows < 2**31 - 1 else torch.int64
    uv = (2 / box_warp) * uv  # [-1, 1] inside the box

    def axis(c: torch.Tensor, size: int):
        pix = ((c + 1) * size - 1) / 2
        f0 = torch.floor(pix)
        w1 = pix - f0
        i1 = (f0 + 1).clamp_(-1, size).to(idt)
        i0 = f0.clamp_(-1, size).to(idt)
        return i0, i1, 1 - w1, w1

    if h == w:  # one pass over all six columns, then split into u (even) and v (odd) columns
        a = axis(uv, w)
        u0, u1, wu0, wu1 = (t[:, 0::2] for t in a)
        v0, v1, wv0, wv1 = (t[:, 1::2] for t in a)
    else:
        u0, u1, wu0, wu1 = axis(uv[:, 0::2], w)
        v0, v1, wv0, wv1 = axis(uv[:, 1::2], h)
    stride_v = w + 2
    base = table_offset + torch.arange(3, device=uv.device, dtype=idt) * ((h + 2) * (w + 2)) + stride_v + 1
    r0 = base + v0 * stride_v
    r1 = base + v1 * stride_v
    idx = torch.stack([r0 + u0, r0 + u1, r1 + u0, r1 + u1], -1).view(-1, 12)
    wts = torch.stack([wv0 * wu0, wv0 * wu1, wv1 * wu0, wv1 * wu1], -1).view(-1, 12).to(dtype)
    return idx, wts


class DecodeRecompute:
    """What a frozen-decoder lookup needs to be recomputed in backward (the triplane table and the points), and
    the recomputation, made once and shared by `FrozenDecode` and `CompositeColours`: computed by whichever of
    the two runs backward first (the composite, for the colours), released by `FrozenDecode` (always the last).
    """

    def __init__(self, table: torch.Tensor, uv: torch.Tensor, decoder: OSGDecoder, plane_hw: tuple[int, int],
                 table_offset: int, box_warp: float):
        self.table, self.uv, self.decoder = table, uv, decoder
        self.plane_hw, self.table_offset, self.box_warp = plane_hw, table_offset, box_warp
        self._cache: dict[str, torch.Tensor] | None = None

    def hidden(self) -> tuple[torch.Tensor, ...]:
        """(corner rows [P, 12], corner weights [P, 12], effective w0 (1/3 folded) [H, C], w1 [1+C_out, H],
        b1 [1+C_out], pre-activation z [P, H])."""
        idx, wts = corner_rows(self.uv, self.plane_hw, self.table_offset, self.box_warp, self.table.shape[0],
                               self.table.dtype)
        w0, b0, w1, b1 = self.decoder.layer_weights(self.table.dtype)
        z = self.decoder.hidden(F.embedding_bag(idx, self.table, mode="sum", per_sample_weights=wts), w0, b0)
        return idx, wts, w0, w1, b1, z

    def backward_inputs(self) -> dict[str, torch.Tensor]:
        """The recomputed forward with Softplus's derivative: idx, wts, w0, w1, dh_dz, col (sigmoid(logits))."""
        if self._cache is None:
            with torch.no_grad(), full_precision(self.table):  # as in forward, also if backward runs under autocast
                idx, wts, w0, w1, b1, z = self.hidden()
                # Softplus as in forward; its derivative as autograd's (e^z / (1 + e^z) up to the threshold 20,
                # 1 above), chosen per element on the device: no host read of z.max().
                h = F.softplus(z)
                above = z > 20
                e = z.clamp_(max=20).exp_()
                dh_dz = e.div_(e + 1).masked_fill_(above, 1.0)
                col = OSGDecoder.colour_logits(h, w1, b1).sigmoid_()
                self._cache = {"idx": idx, "wts": wts, "w0": w0, "w1": w1, "dh_dz": dh_dz, "col": col}
        return self._cache

    def release(self) -> None:
        self._cache = None


class FrozenDecode(torch.autograd.Function):
    """Triplane lookup + frozen OSGDecoder with gradients for the triplane table only, recomputed in backward.

    forward(table [T, C] (`ImportanceRenderer.plane_table`), uv [P, 6], recompute (`DecodeRecompute` of the two))
    → (sigma [P] raw, colours [P, C_out] = sigmoid(logits) in (0, 1)), the autograd path's values. For backward
    only `uv` is kept (24 bytes a point instead of ~480: corner indices and weights, the hidden layer before and
    after Softplus, the colours); the lookup and the MLP are recomputed there. With `CompositeColours` for the
    colours' compositing, the student's render graph at full size is ~1.3 GB smaller. The table gradient equals
    the autograd path's up to float rounding (tests/models/eg3d/test_frozen_decode.py).
    """

    @staticmethod
    def forward(ctx, table, uv, recompute: DecodeRecompute):
        _, _, _, w1, b1, z = recompute.hidden()
        h = F.softplus(z)
        sigma = OSGDecoder.density(h, w1, b1)
        col = OSGDecoder.colour_logits(h, w1, b1).sigmoid_()
        ctx.save_for_backward(table, uv)  # version checks; the tensors themselves are the recompute's
        ctx.recompute = recompute
        return sigma, col

    @staticmethod
    def backward(ctx, g_sigma, g_col):
        table, _ = ctx.saved_tensors
        r = ctx.recompute.backward_inputs()
        ctx.recompute.release()
        with torch.no_grad(), full_precision(table):
            col, w1 = r["col"], r["w1"]
            g_logits = (1 - col).mul_(col).mul_(g_col)                                  # sigmoid'
            g_h = torch.mm(g_logits, w1[1:]).addr_(g_sigma, w1[0]).mul_(r["dh_dz"])     # [P, H]
            g_sum = torch.mm(g_h, r["w0"])                                              # [P, C]
            g_table = torch.zeros_like(table)
            rows, wts = r["idx"].long(), r["wts"]
            for k in range(rows.shape[1]):  # one corner at a time: no [P, 12, C] temporary
                g_table.index_add_(0, rows[:, k], g_sum * wts[:, k:k + 1])
        return g_table, None, None


class CompositeColours(torch.autograd.Function):
    """Σ_j v_j · col_j per ray (v [R, K] sample weights, col [R·K, C] from `FrozenDecode`) → [R, C], keeping only
    v for backward: the colours are taken from the shared recomputation instead of being saved."""

    @staticmethod
    def forward(ctx, v, col, recompute: DecodeRecompute):
        r, k = v.shape
        ctx.save_for_backward(v)
        ctx.recompute = recompute
        return torch.bmm(v.unsqueeze(1), col.view(r, k, -1))[:, 0]

    @staticmethod
    def backward(ctx, g):
        (v,) = ctx.saved_tensors
        r, k = v.shape
        col = ctx.recompute.backward_inputs()["col"].view(r, k, -1)
        with full_precision(g):
            g_v = torch.bmm(col, g.unsqueeze(2))[..., 0] if ctx.needs_input_grad[0] else None
        g_col = (v.unsqueeze(2) * g.unsqueeze(1)).view(r * k, -1) if ctx.needs_input_grad[1] else None
        return g_v, g_col, None


class ImportanceRenderer(nn.Module):
    """Volume renderer over triplanes (no parameters; `plane_axes` is a non-persistent buffer)."""

    def __init__(self, cfg: RenderingConfig | None = None):
        super().__init__()
        self.config = cfg or RenderingConfig()
        self.register_buffer("plane_axes", generate_planes(), persistent=False)

    # -- decoding -------------------------------------------------------------------------------------
    @staticmethod
    def plane_table(planes: torch.Tensor) -> torch.Tensor:
        """planes [Np, 3, C, H, W] → row table [Np·3·(H+2)·(W+2), C]: channels-last with a one-texel zero border,
        so every bilinear corner is one contiguous row and out-of-range corners read zeros (grid_sample's
        padding_mode='zeros')."""
        n, k, c, h, w = planes.shape
        t = F.pad(at_least_float32(planes).reshape(n * k, c, h, w), (1, 1, 1, 1))
        return t.permute(0, 2, 3, 1).reshape(n * k * (h + 2) * (w + 2), c)

    def _decode(self, table: torch.Tensor, plane_hw: tuple[int, int], table_offset: int, decoder: OSGDecoder,
                uv: torch.Tensor):
        """Decode points of one triplane (rows from `table_offset`) → (sigma [P], colours [P, C_out] in (0, 1),
        the `DecodeRecompute` of the `FrozenDecode` path or None).

        uv: [P, 6] world coordinates already arranged per plane as (u0, v0, u1, v1, u2, v2) = (x, y, x, z, z, x)
        (EG3D's plane axes; u → width). The colours are sigmoid(logits), before EG3D's affine map.
        When the table needs gradients and the decoder does not (the student's renders in training), the
        decode runs through `FrozenDecode`, which keeps only `uv` for backward instead of every MLP activation.
        """
        if (RECOMPUTE_FROZEN_DECODE and torch.is_grad_enabled() and table.requires_grad
                and not torch.compiler.is_compiling()  # compiled: autograd's decode, the compiler plans its memory
                and table.dtype in (torch.float32, torch.float64)
                and not any(p.requires_grad for p in decoder.parameters())):
            recompute = DecodeRecompute(table, uv, decoder, plane_hw, table_offset, self.config.box_warp)
            return (*FrozenDecode.apply(table, uv, recompute), recompute)
        idx, wts = corner_rows(uv, plane_hw, table_offset, self.config.box_warp, table.shape[0], table.dtype)
        sigma, logits = decoder.raw_from_plane_sum(F.embedding_bag(idx, table, mode="sum", per_sample_weights=wts), 3)
        grad = torch.is_grad_enabled() and logits.requires_grad
        return sigma, (torch.sigmoid(logits) if grad else logits.sigmoid_()), None

    def run_model(self, planes: torch.Tensor, decoder: OSGDecoder, coordinates: torch.Tensor) -> dict:
        """Reference decode at arbitrary points: planes [N, 3, C, H, W], coordinates [N, M, 3] → {'rgb', 'sigma'}
        (float32, autocast off, as `forward`)."""
        with full_precision(planes):
            feats = sample_from_planes(self.plane_axes, at_least_float32(planes), at_least_float32(coordinates),
                                       box_warp=self.config.box_warp)
            return decoder(feats)

    # -- sampling -------------------------------------------------------------------------------------
    def _coarse_depths(self, n_rays: int, jitter: torch.Tensor | None, device, dtype) -> torch.Tensor:
        cfg = self.config
        s = cfg.depth_resolution
        if cfg.disparity_space_sampling:
            d = torch.linspace(0, 1, s, device=device, dtype=dtype).expand(n_rays, s)
            delta = 1 / (s - 1)
            d = d + (jitter * delta if jitter is not None else 0.5 * delta)
            return 1.0 / (1.0 / cfg.ray_start * (1.0 - d) + 1.0 / cfg.ray_end * d)
        d = torch.linspace(cfg.ray_start, cfg.ray_end, s, device=device, dtype=dtype).expand(n_rays, s)
        delta = (cfg.ray_end - cfg.ray_start) / (s - 1)
        return d + (jitter * delta if jitter is not None else 0.5 * delta)

    @torch.no_grad()
    def _importance_depths(self, depths: torch.Tensor, weights: torch.Tensor, u: torch.Tensor | None) -> torch.Tensor:
        """depths [R, S], interval weights [R, S-1] → importance depths [R, S_imp]."""
        w = F.max_pool1d(weights.unsqueeze(1).float(), 2, 1, padding=1)
        w = F.avg_pool1d(w, 2, 1).squeeze(1) + 0.01
        mids = 0.5 * (depths[:, :-1] + depths[:, 1:])
        return sample_pdf(mids, w[:, 1:-1], self.config.depth_resolution_importance, u)

    # -- rendering ------------------------------------------------------------------------------------
    def _render_chunk(self, table, plane_hw, offset, decoder, o, d, jitter, u, noise_c, noise_f):
        cfg = self.config
        r = o.shape[0]
        depths_c = self._coarse_depths(r, jitter, o.device, o.dtype)
        # Ray origins/directions with their coordinates arranged per plane: (x, y), (x, z), (z, x).
        o = torch.stack([o[:, c] for c in _PLANE_COLS], dim=1)  # (no index tensor to copy from the host)
        d = torch.stack([d[:, c] for c in _PLANE_COLS], dim=1)
        pts = o[:, None, :] + depths_c[..., None] * d[:, None, :]
        sigma_c, col_c, rec_c = self._decode(table, plane_hw, offset, decoder, pts.reshape(-1, 6))
        sigma_c = sigma_c.view(r, -1)
        if noise_c is not None:
            sigma_c = sigma_c + noise_c
        if cfg.depth_resolution_importance > 0:
            with torch.no_grad():
                w_c = interval_weights(sigma_c, depths_c, cfg.clamp_mode)
            depths_f = self._importance_depths(depths_c, w_c, u)
            pts = o[:, None, :] + depths_f[..., None] * d[:, None, :]
            sigma_f, col_f, rec_f = self._decode(table, plane_hw, offset, decoder, pts.reshape(-1, 6))
            sigma_f = sigma_f.view(r, -1)
            if noise_f is not None:
                sigma_f = sigma_f + noise_f
            all_d, idx = torch.sort(torch.cat([depths_c, depths_f], -1), dim=-1)
            all_s = torch.gather(torch.cat([sigma_c, sigma_f], -1), -1, idx)
            cols = [(col_c, rec_c), (col_f, rec_f)]
        else:
            idx = None
            all_d, all_s = depths_c, sigma_c
            cols = [(col_c, rec_c)]

        w = interval_weights(all_s, all_d, cfg.clamp_mode)  # [R, S_all - 1]
        w_total = w.sum(-1)
        # An empty ray (Σw = 0) gets depth inf (then clamped), as 0/0 → NaN → inf does in EG3D; dividing by 1
        # there instead keeps its gradient 0, not the NaN that 0/0 sends back into every trained weight.
        hit = w_total > 0
        depth = (w * (0.5 * (all_d[:, :-1] + all_d[:, 1:]))).sum(-1) / torch.where(hit, w_total, 1.0)
        depth = torch.where(hit, depth, float("inf"))

        v = sample_weights(w)  # per sample, sorted order
        if idx is not None:
            v = torch.zeros_like(v).scatter(-1, idx, v)  # back to [coarse | fine] order
        acc = None
        start = 0
        for col, rec in cols:
            k = col.shape[0] // r
            vk = v[:, start:start + k]
            part = torch.bmm(vk[:, None], col.view(r, k, -1))[:, 0] if rec is None else \
                CompositeColours.apply(vk, col, rec)
            acc = part if acc is None else acc + part
            start += k
        rgb = acc * RGB_SCALE + (RGB_OFFSET * w_total)[:, None]
        if cfg.white_back:
            rgb = rgb + 1 - w_total[:, None]
        rgb = rgb * 2 - 1
        return rgb, depth, w_total, all_d.min(), all_d.max()

    def forward(
        self,
        planes: torch.Tensor,
        decoder: OSGDecoder,
        ray_origins: torch.Tensor,
        ray_directions: torch.Tensor,
        deterministic: bool = True,
        generator: torch.Generator | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Render rays through triplanes.

        planes: [Np, 3, C, H, W] with Np == N, or Np == 1 (one triplane shared by all N cameras, not copied);
        ray_origins, ray_directions: [N, M, 3]. Returns (features [N, M, C_out] ≈[-1, 1], depth [N, M, 1],
        weight totals [N, M, 1]), float32 (float64 inputs stay float64), autocast off (see the module's docstring).
        """
        with full_precision(planes):
            return self._render_rays(at_least_float32(planes), decoder, at_least_float32(ray_origins),
                                     at_least_float32(ray_directions), deterministic, generator)

    def _render_rays(self, planes: torch.Tensor, decoder: OSGDecoder, ray_origins: torch.Tensor,
                     ray_directions: torch.Tensor, deterministic: bool, generator: torch.Generator | None):
        """`forward`'s work, with autocast off and float32 (or float64) inputs."""
        cfg = self.config
        n, m, _ = ray_directions.shape
        n_planes = planes.shape[0]
        if planes.ndim != 5 or n_planes not in (1, n):
            raise ValueError(f"planes must be [1 or {n}, 3, C, H, W], got {tuple(planes.shape)}")
        dev, dt = ray_origins.device, ray_origins.dtype
        s, s2 = cfg.depth_resolution, cfg.depth_resolution_importance

        jitter = u = noise_c = noise_f = None
        if not deterministic:
            jitter = torch.rand((n, m, s, 1), device=dev, dtype=dt, generator=generator).view(n * m, s)
            if cfg.density_noise > 0:
                noise_c = torch.randn((n, m * s, 1), device=dev, dtype=dt, generator=generator).view(n * m, s)
                noise_c = noise_c * cfg.density_noise
            if s2 > 0:
                u = torch.rand((n * m, s2), device=dev, dtype=dt, generator=generator)
                if cfg.density_noise > 0:
                    noise_f = torch.randn((n, m * s2, 1), device=dev, dtype=dt,
                                          generator=generator).view(n * m, s2) * cfg.density_noise

        o_all = ray_origins.reshape(n * m, 3)
        d_all = ray_directions.reshape(n * m, 3)
        groups = [(0, 0, n * m)] if n_planes == 1 else [(i, i * m, (i + 1) * m) for i in range(n)]
        chunk = max(int(cfg.ray_chunk), 1)
        rgbs, depths, totals, mins, maxs = [], [], [], [], []
        plane_hw = (planes.shape[-2], planes.shape[-1])
        # With gradients, one table per triplane: a chunk's table gradient (zeroed, then summed by autograd)
        # then spans its own triplane's rows only, not every triplane's.
        per_triplane = torch.is_grad_enabled() and planes.requires_grad
        table = None if per_triplane else self.plane_table(planes)
        rows_per_triplane = 3 * (plane_hw[0] + 2) * (plane_hw[1] + 2)
        for p_idx, g0, g1 in groups:
            t, offset = (self.plane_table(planes[p_idx:p_idx + 1]), 0) if per_triplane \
                else (table, p_idx * rows_per_triplane)
            for a in range(g0, g1, chunk):
                b = min(a + chunk, g1)
                sl = slice(a, b)
                out = self._render_chunk(
                    t, plane_hw, offset, decoder, o_all[sl], d_all[sl],
                    None if jitter is None else jitter[sl], None if u is None else u[sl],
                    None if noise_c is None else noise_c[sl], None if noise_f is None else noise_f[sl])
                for lst, val in zip((rgbs, depths, totals, mins, maxs), out):
                    lst.append(val)
        rgb = torch.cat(rgbs).view(n, m, -1)
        depth = torch.cat(depths).view(n, m, 1)
        depth = torch.clamp(depth, torch.stack(mins).min(), torch.stack(maxs).max())
        w_total = torch.cat(totals).view(n, m, 1)
        return rgb, depth, w_total

    def render_images(self, planes: torch.Tensor, decoder: OSGDecoder, cameras: torch.Tensor, resolution: int,
                      deterministic: bool = True, generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
        """planes [Np, 3, C, H, W] (Np = V or 1), cameras [V, 25] → {'feature_image' [V, C_out, R, R],
        'image_raw' [V, 3, R, R] (first 3 features, ≈[-1, 1]), 'image_depth' [V, 1, R, R] (ray distance)}."""
        if cameras.ndim != 2 or cameras.shape[1] != 25:
            raise ValueError(f"cameras must be [V, 25], got {tuple(cameras.shape)}")
        if planes.shape[0] not in (1, cameras.shape[0]):
            raise ValueError(f"{planes.shape[0]} triplanes for {cameras.shape[0]} cameras: "
                             "pass one triplane, or one per camera")
        cameras = cameras.to(device=planes.device, dtype=torch.float32)
        with full_precision(cameras):  # bf16 directions (~2^-9 off) would miss by ~a texel
            origins, dirs = sample_rays(cameras[:, :16].view(-1, 4, 4), cameras[:, 16:25].view(-1, 3, 3), resolution)
        feats, depth, _ = self(planes, decoder, origins, dirs, deterministic=deterministic, generator=generator)
        v = cameras.shape[0]
        feature_image = feats.permute(0, 2, 1).reshape(v, feats.shape[-1], resolution, resolution).contiguous()
        depth_image = depth.permute(0, 2, 1).reshape(v, 1, resolution, resolution)
        return {"feature_image": feature_image, "image_raw": feature_image[:, :3], "image_depth": depth_image}
