"""EG3D's OSGDecoder: triplane features → (sigma, 32-d color feature)."""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from models.eg3d.stylegan2 import FullyConnectedLayer

__all__ = ["OSGDecoder", "RGB_SCALE", "RGB_OFFSET"]

# rgb = sigmoid(logits) * (1 + 2*0.001) - 0.001 (EG3D's "padding" of the sigmoid range).
RGB_SCALE = 1 + 2 * 0.001
RGB_OFFSET = -0.001


class OSGDecoder(nn.Module):
    """Mean over planes → FC(n_features→hidden) → Softplus → FC(hidden→1+output_dim).

    Keys `net.0.*`, `net.2.*` as in EG3D. Ray directions are ignored (as in the original).
    """

    def __init__(self, n_features: int = 32, hidden_dim: int = 64, decoder_output_dim: int = 32,
                 decoder_lr_mul: float = 1.0):
        super().__init__()
        self.n_features = n_features
        self.hidden_dim = hidden_dim
        self.output_dim = decoder_output_dim
        self.net = nn.Sequential(
            FullyConnectedLayer(n_features, hidden_dim, lr_multiplier=decoder_lr_mul),
            nn.Softplus(),
            FullyConnectedLayer(hidden_dim, 1 + decoder_output_dim, lr_multiplier=decoder_lr_mul),
        )

    def forward(self, sampled_features: torch.Tensor, ray_directions: torch.Tensor | None = None) -> dict:
        """sampled_features [N, n_planes, M, C] → {'rgb': [N, M, output_dim] in [-0.001, 1.001], 'sigma': [N, M, 1] raw}."""
        x = sampled_features.mean(1)
        n, m, c = x.shape
        x = self.net(x.reshape(n * m, c)).view(n, m, -1)
        rgb = torch.sigmoid(x[..., 1:]) * RGB_SCALE + RGB_OFFSET
        return {"rgb": rgb, "sigma": x[..., 0:1]}

    def raw_from_plane_sum(self, plane_sum: torch.Tensor, n_planes: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
        """Fast path on summed plane features.

        plane_sum: [P, C], the SUM over the planes (the 1/n_planes of the mean is folded into the first layer).
        Returns (sigma [P] raw, color logits [P, output_dim] before the sigmoid).
        """
        fc0, fc1 = self.net[0], self.net[2]
        w0 = fc0.effective_weight(plane_sum.dtype) * (1.0 / n_planes)
        b0 = fc0.effective_bias(plane_sum.dtype)
        h = torch.addmm(b0.unsqueeze(0), plane_sum, w0.t())  # [P, hidden]
        if not (torch.is_grad_enabled() and h.requires_grad) and bool(h.max() <= 20):
            # Softplus(beta=1, threshold=20) is exactly log1p(exp(x)) below the threshold; in place saves a pass.
            h = h.exp_().log1p_()
        else:
            h = F.softplus(h)
        w1 = fc1.effective_weight(h.dtype)
        b1 = fc1.effective_bias(h.dtype)
        sigma = torch.addmv(b1[0], h, w1[0])  # [P]
        logits = torch.addmm(b1[1:].unsqueeze(0), h, w1[1:].t())  # [P, output_dim]
        return sigma, logits
