"""Synthetic 3D "portraits" and a parametric tone rule, rendered analytically at any camera.

A portrait is a textured ellipsoid head under a fixed light: skin colour, soft colour blobs, eyes, mouth and a
hair cap. It is ray-cast exactly (no network) at the project's N×25 cameras, so every view of one identity is
consistent. The edit rule adds θ to the head's albedo: one number per pair (a brightness transfer, lighter or
darker) or three (per colour channel). `render_portraits(ident, θ, cams)` renders the edited portrait. θ is drawn
uniformly around 0, so no constant edit fits the rule.

    g = torch.Generator().manual_seed(0)
    ident = draw_identities(g, 8)
    theta = draw_rules(g, 8, 0.3)                      # 8×1
    images = render_portraits(ident, theta, cams)      # 8×3×64×64 in [-1, 1], background −1
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from models.eg3d.ray_sampler import sample_rays
from utils.cameras import look_at_cameras

# Identity distribution: the skin tone varies little between identities, so a reference's tone shows its rule's
# shift (a rule parameter can be read off an edited portrait of a stranger, as the edit task requires).
SKIN = (0.62, 0.45, 0.36)
SKIN_JITTER = 0.08         # ± half-range per channel
BLOB_JITTER = 0.2          # colour blob amplitude, ± half-range
HAIR_RANGE = (0.25, 0.45)
LIGHT = (0.3, 0.5, 1.0)


def draw_identities(g: torch.Generator, n: int) -> dict[str, torch.Tensor]:
    """n random identities: a dict of per-identity tensors (shapes [n, ...]), see `render_portraits`."""
    def u(*shape: int) -> torch.Tensor:
        return torch.rand(*shape, generator=g)

    lo, hi = HAIR_RANGE
    return {
        "radii": torch.tensor([0.20, 0.25, 0.20]) + (u(n, 3) - 0.5) * 0.04,
        "skin": torch.tensor(SKIN) + (u(n, 3) - 0.5) * SKIN_JITTER,
        "blob_mu": F.normalize(torch.randn(n, 4, 3, generator=g) + torch.tensor([0.0, 0.0, 1.0]), dim=-1),
        "blob_col": (u(n, 4, 3) - 0.5) * BLOB_JITTER,
        "hair": lo + u(n, 3) * (hi - lo),
        "hairline": 0.35 + u(n, 1) * 0.2,
    }


def draw_rules(g: torch.Generator, n: int, theta_range: float, channels: int = 1) -> torch.Tensor:
    """n rule parameters θ ~ U[-theta_range, theta_range]^channels (zero mean): n×channels albedo shifts."""
    return (torch.rand(n, channels, generator=g) * 2 - 1) * theta_range


def draw_cameras(g: torch.Generator, n: int, yaw_deg: float = 15.0, pitch_deg: float = 8.0) -> torch.Tensor:
    """n input cameras [n, 25]: yaw π/2 ± yaw_deg, pitch π/2 ± pitch_deg (uniform), EG3D label focal."""
    u = torch.rand(n, 2, generator=g, dtype=torch.float64) * 2 - 1
    return look_at_cameras(math.pi / 2 + u[:, 0] * math.radians(yaw_deg),
                           math.pi / 2 + u[:, 1] * math.radians(pitch_deg))


def _spot(s: torch.Tensor, mu: tuple[float, float, float], sigma: tuple[float, float, float]) -> torch.Tensor:
    d = (s - torch.tensor(mu)) / torch.tensor(sigma)
    return torch.exp(-0.5 * d.square().sum(-1, keepdim=True))


def render_portraits(ident: dict[str, torch.Tensor], theta: torch.Tensor, cameras: torch.Tensor,
                     resolution: int = 64, supersample: int = 2) -> torch.Tensor:
    """Ray-cast identities (n of them) with albedo shifts theta (n×1 or n×3) at cameras (n×25) → n×3×R×R in [-1, 1].

    Albedo (in [0, 1]) = skin + blobs, darkened at the eyes, mouth-coloured at the mouth, hair above the
    hairline; then + θ, clamped to [0, 1]; shaded by ambient 0.35 + 0.65·max(0, n·light). The background
    (rays that miss) is −1, black, as the renderer's empty space. `supersample`² rays per pixel, box-filtered.
    """
    n = cameras.shape[0]
    res = resolution * supersample
    origins, dirs = sample_rays(cameras[:, :16].reshape(n, 4, 4), cameras[:, 16:].reshape(n, 3, 3), res)
    radii = ident["radii"][:, None, :]
    o, d = origins / radii, dirs / radii                     # the unit sphere in scaled coordinates
    a, b, c = d.square().sum(-1), 2 * (o * d).sum(-1), o.square().sum(-1) - 1
    disc = b * b - 4 * a * c
    hit = (disc > 0)[..., None]
    t = (-b - disc.clamp_min(0).sqrt()) / (2 * a)
    p = origins + t[..., None] * dirs
    s = F.normalize(p / radii, dim=-1)                      # position on the head, as a unit direction
    normal = F.normalize(p / radii.square(), dim=-1)

    blobs = torch.exp(-(s[:, :, None, :] - ident["blob_mu"][:, None]).square().sum(-1) / (2 * 0.35 ** 2))
    albedo = ident["skin"][:, None, :] + (blobs[..., None] * ident["blob_col"][:, None]).sum(2)
    eyes = (_spot(s, (0.33, 0.2, 0.92), (0.09, 0.07, 1.0)) + _spot(s, (-0.33, 0.2, 0.92), (0.09, 0.07, 1.0)))
    albedo = albedo * (1 - 0.75 * eyes.clamp(max=1.0))
    mouth = _spot(s, (0.0, -0.45, 0.89), (0.2, 0.06, 1.0))
    albedo = albedo * (1 - mouth) + mouth * torch.tensor([0.55, 0.15, 0.18])
    hair = torch.sigmoid((s[..., 1:2] - ident["hairline"][:, None]) * 25 + (s[..., 2:3] < -0.2).float() * 8)
    albedo = albedo * (1 - hair) + hair * ident["hair"][:, None]
    albedo = (albedo + theta[:, None, :]).clamp(0, 1)

    shade = 0.35 + 0.65 * (normal * F.normalize(torch.tensor(LIGHT), dim=0)).sum(-1, keepdim=True).clamp_min(0)
    image = torch.where(hit, albedo * shade * 2 - 1, torch.full((), -1.0))
    image = image.reshape(n, res, res, 3).permute(0, 3, 1, 2)
    return F.avg_pool2d(image, supersample) if supersample > 1 else image


def index_identities(ident: dict[str, torch.Tensor], idx: torch.Tensor | slice | int) -> dict[str, torch.Tensor]:
    """The identities at `idx` (keeps the batch dimension for an int)."""
    if isinstance(idx, int):
        idx = slice(idx, idx + 1)
    return {k: v[idx] for k, v in ident.items()}
