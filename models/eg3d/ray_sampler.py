"""Rays through pixel centres for N×25 cameras (EG3D's RaySampler conventions)."""
from __future__ import annotations

import torch

__all__ = ["RaySampler", "sample_rays"]


def sample_rays(cam2world: torch.Tensor, intrinsics: torch.Tensor, resolution: int) -> tuple[torch.Tensor, torch.Tensor]:
    """cam2world [N, 4, 4] (OpenCV), normalised intrinsics [N, 3, 3] → (origins [N, R², 3], unit directions [N, R², 3]).

    Ray m = i·R + j goes through pixel (row i, column j) at ((j+0.5)/R, (i+0.5)/R), top row first.
    """
    n = cam2world.shape[0]
    m = resolution * resolution
    dev, dt = cam2world.device, cam2world.dtype
    cam_locs = cam2world[:, :3, 3]
    fx = intrinsics[:, 0, 0].unsqueeze(-1)
    fy = intrinsics[:, 1, 1].unsqueeze(-1)
    cx = intrinsics[:, 0, 2].unsqueeze(-1)
    cy = intrinsics[:, 1, 2].unsqueeze(-1)
    sk = intrinsics[:, 0, 1].unsqueeze(-1)

    ar = torch.arange(resolution, dtype=torch.float32, device=dev)
    uv = torch.stack(torch.meshgrid(ar, ar, indexing="ij")) * (1.0 / resolution) + (0.5 / resolution)
    uv = uv.flip(0).reshape(2, -1).transpose(1, 0).to(dt)  # [M, 2] = (x_cam, y_cam)
    x_cam = uv[:, 0].unsqueeze(0)
    y_cam = uv[:, 1].unsqueeze(0)
    z_cam = torch.ones((n, m), dtype=dt, device=dev)

    x_lift = (x_cam - cx + cy * sk / fy - sk * y_cam / fy) / fx * z_cam
    y_lift = (y_cam - cy) / fy * z_cam
    cam_rel = torch.stack((x_lift, y_lift, z_cam, torch.ones_like(z_cam)), dim=-1)  # [N, M, 4]
    world = torch.bmm(cam2world, cam_rel.permute(0, 2, 1)).permute(0, 2, 1)[:, :, :3]
    dirs = torch.nn.functional.normalize(world - cam_locs[:, None, :], dim=2)
    origins = cam_locs.unsqueeze(1).expand(-1, m, -1)
    return origins, dirs


class RaySampler(torch.nn.Module):
    """Module wrapper of `sample_rays` (no parameters)."""

    def forward(self, cam2world: torch.Tensor, intrinsics: torch.Tensor, resolution: int):
        return sample_rays(cam2world, intrinsics, resolution)
