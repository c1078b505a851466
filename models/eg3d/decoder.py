"""EG3D's OSGDecoder: triplane features → (sigma, 32-d color feature)."""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from models.eg3d.ops import full_precision
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

    def layer_weights(self, dtype: torch.dtype, n_planes: int = 3) -> tuple[torch.Tensor, ...]:
        """(w0 [hidden, C] with the 1/n_planes of the planes' mean folded in, b0 [hidden], w1 [1+out, hidden],
        b1 [1+out]): the effective (equalized-lr) weights of the two layers, for the plane-sum fast path."""
        fc0, fc1 = self.net[0], self.net[2]
        return (fc0.effective_weight(dtype) * (1.0 / n_planes), fc0.effective_bias(dtype),
                fc1.effective_weight(dtype), fc1.effective_bias(dtype))

    @staticmethod
    def hidden(plane_sum: torch.Tensor, w0: torch.Tensor, b0: torch.Tensor) -> torch.Tensor:
        """The first layer before its Softplus: plane_sum [P, C] → [P, hidden]."""
        return torch.addmm(b0.unsqueeze(0), plane_sum, w0.t())

    @staticmethod
    def density(h: torch.Tensor, w1: torch.Tensor, b1: torch.Tensor) -> torch.Tensor:
        """Raw sigma [P] from the hidden activations h [P, hidden] (after Softplus)."""
        return torch.addmv(b1[0], h, w1[0])

    @staticmethod
    def colour_logits(h: torch.Tensor, w1: torch.Tensor, b1: torch.Tensor) -> torch.Tensor:
        """Colour logits [P, output_dim] (before the sigmoid) from the hidden activations h [P, hidden]."""
        return torch.addmm(b1[1:].unsqueeze(0), h, w1[1:].t())

    def raw_from_plane_sum(self, plane_sum: torch.Tensor, n_planes: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
        """Fast path on summed plane features.

        plane_sum: [P, C], the SUM over the planes (the 1/n_planes of the mean is folded into the first layer).
        Returns (sigma [P] raw, color logits [P, output_dim] before the sigmoid), in plane_sum's dtype: the three
        products run in that one dtype with autocast off (CPU autocast would lower `addmm` to bf16 but not
        `addmv`, which then refuses the mix; the renderer keeps this decode in float32 on purpose).
        """
        with full_precision(plane_sum):
            w0, b0, w1, b1 = self.layer_weights(plane_sum.dtype, n_planes)
            h = self.hidden(plane_sum, w0, b0)  # [P, hidden]
            h = F.softplus(h)  # one fused pass (4× faster on CPU than exp, log1p and a select), no host read
            return self.density(h, w1, b1), self.colour_logits(h, w1, b1)
