"""EG3D's MipRayMarcher2: volume rendering on interval midpoints.

For samples t_0..t_{S-1} along a ray: δ_i = t_{i+1} − t_i, σ̄_i = softplus((σ_i + σ_{i+1})/2 − 1),
α_i = 1 − exp(−σ̄_i δ_i), w_i = α_i · Π_{k<i} (1 − α_k + 1e-10); colour = Σ w_i (c_i + c_{i+1})/2 mapped ×2−1;
depth = Σ w_i t̄_i / Σ w_i (an empty ray, Σ w_i = 0: inf), clamped to [min, max] of ALL depths in the batch
tensor (EG3D semantics).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["interval_weights", "sample_weights", "MipRayMarcher2"]


def interval_weights(densities: torch.Tensor, depths: torch.Tensor, clamp_mode: str = "softplus",
                     dim: int = -1) -> torch.Tensor:
    """Raw densities and depths [..., S, ...] (samples along `dim`) → interval weights [..., S-1, ...]."""
    if clamp_mode != "softplus":
        raise ValueError(f"clamp_mode must be 'softplus' (EG3D's MipRayMarcher2), got '{clamp_mode}'")
    s = depths.shape[dim]
    deltas = depths.narrow(dim, 1, s - 1) - depths.narrow(dim, 0, s - 1)
    dens_mid = (densities.narrow(dim, 0, s - 1) + densities.narrow(dim, 1, s - 1)) / 2
    dens_mid = F.softplus(dens_mid - 1)
    alpha = 1 - torch.exp(-(dens_mid * deltas))
    shifted = torch.cat([torch.ones_like(alpha.narrow(dim, 0, 1)), 1 - alpha + 1e-10], dim)
    return alpha * torch.cumprod(shifted, dim).narrow(dim, 0, s - 1)


def sample_weights(w: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """Interval weights [..., S-1] → per-sample weights [..., S] with Σ_i w_i (c_i+c_{i+1})/2 = Σ_j v_j c_j."""
    z = torch.zeros_like(w.narrow(dim, 0, 1))
    return (torch.cat([w, z], dim) + torch.cat([z, w], dim)) * 0.5


class MipRayMarcher2(torch.nn.Module):
    """Reference ray marcher on EG3D's layout: colors [N, M, S, C], densities [N, M, S, 1], depths [N, M, S, 1]."""

    def forward(self, colors: torch.Tensor, densities: torch.Tensor, depths: torch.Tensor,
                clamp_mode: str = "softplus", white_back: bool = False):
        """→ (rgb [N, M, C] in ≈[-1, 1], depth [N, M, 1], interval weights [N, M, S-1, 1])."""
        colors_mid = (colors[:, :, :-1] + colors[:, :, 1:]) / 2
        depths_mid = (depths[:, :, :-1] + depths[:, :, 1:]) / 2
        weights = interval_weights(densities, depths, clamp_mode, dim=-2)
        composite_rgb = torch.sum(weights * colors_mid, -2)
        weight_total = weights.sum(2)
        hit = weight_total > 0  # an empty ray: depth inf as EG3D's 0/0 → NaN → inf, with a zero (not NaN) gradient
        composite_depth = torch.sum(weights * depths_mid, -2) / torch.where(hit, weight_total, 1.0)
        composite_depth = torch.where(hit, composite_depth, float("inf"))
        composite_depth = torch.clamp(composite_depth, torch.min(depths), torch.max(depths))
        if white_back:
            composite_rgb = composite_rgb + 1 - weight_total
        composite_rgb = composite_rgb * 2 - 1
        return composite_rgb, composite_depth, weights
