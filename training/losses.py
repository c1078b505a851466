"""Training losses: teacher-student distillation terms, LPIPS (AlexNet), ArcFace identity, GAN + R1, and the
two optimisation steps built on them (`discriminator_step`, `generator_step`).

All images are N×3×H×W in [-1, 1]. Every L1 is a mean over all elements (as `nn.L1Loss`); LPIPS is
the mean over the batch of the per-sample AlexNet LPIPS (spatial average, summed over the 5 layers).

    crit = DistillationLoss(cfg.loss).to(device)        # cfg.loss: a LossConfig (training/config.py)
    total, terms = crit(student_tri, teacher_tri, student_renders, teacher_renders, n)   # renders: 2N-row dicts
"""
from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Callable, ContextManager

import torch
import torch.nn.functional as F
from torch import nn

from training.config import LossConfig
from utils.errors import MissingWeightsError

ALEXNET_FILES = ("alexnet-owt-4df8aa71.pth", "alexnet-owt-7be5be79.pth")
ALEXNET_URL = "https://download.pytorch.org/models/alexnet-owt-7be5be79.pth"
IRSE50_FILE = "model_ir_se50.pth"

#: A stage timer: `with stage("name"): ...` around each part of a step (benchmarks/profile_train_step.py).
Stage = Callable[[str], ContextManager[object]]


def no_stage(name: str) -> ContextManager[object]:
    """The default `Stage`: times nothing."""
    return contextlib.nullcontext()


# ---------------------------------------------------------------------------------------------- LPIPS
def build_lpips(weights_dir: str | Path = "pretrained_models", random_backbone: bool = False) -> nn.Module:
    """AlexNet LPIPS v0.1 from the `lpips` package, frozen and in eval mode.

    The linear heads ship with `lpips`; the AlexNet backbone is loaded from
    `weights_dir/alexnet-owt-4df8aa71.pth` or `alexnet-owt-7be5be79.pth` (torchvision's files) so nothing is
    downloaded. `random_backbone=True` keeps a random AlexNet (tests only).
    """
    import warnings

    import lpips

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = lpips.LPIPS(net="alex", pretrained=True, pnet_rand=True, verbose=False)
    if not random_backbone:
        path = next((Path(weights_dir) / f for f in ALEXNET_FILES if (Path(weights_dir) / f).is_file()), None)
        if path is None:
            raise MissingWeightsError(
                str(Path(weights_dir) / ALEXNET_FILES[1]),
                f"AlexNet weights for LPIPS (either of {', '.join(ALEXNET_FILES)}; goes in {weights_dir}/)",
                ALEXNET_URL,
            )
        sd = torch.load(path, map_location="cpu", weights_only=True)
        slices = {0: 1, 1: 1, 2: 2, 3: 2, 4: 2, 5: 3, 6: 3, 7: 3, 8: 4, 9: 4, 10: 5, 11: 5}
        mapped = {}
        for k, v in sd.items():
            if not k.startswith("features."):
                continue
            _, idx, name = k.split(".")
            mapped[f"slice{slices[int(idx)]}.{idx}.{name}"] = v
        model.net.load_state_dict(mapped, strict=True)
    return model.eval().requires_grad_(False)


# ------------------------------------------------------------------------------------ ArcFace identity
class IDLoss(nn.Module):
    """1 − cos(ArcFace(pred), ArcFace(target)), averaged over the batch (images N×3×H×W in [-1,1]).

    Uses `models.arcface` (IR-SE50 with the original's face crop). Loads `weights_dir/model_ir_se50.pth`
    unless `random_init` (tests).
    """

    def __init__(self, weights_dir: str | Path = "pretrained_models", random_init: bool = False):
        super().__init__()
        from models.arcface import IdentityEncoder, IRSE50, load_ir_se50

        self.net = IdentityEncoder(IRSE50()) if random_init else load_ir_se50(Path(weights_dir) / IRSE50_FILE)
        self.net.eval().requires_grad_(False)

    def forward(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            t = self.net(target.float())
        return (1.0 - (self.net(pred.float()) * t).sum(dim=1)).mean()


# ------------------------------------------------------------------------------------ distillation
VIEW_TERMS = ("l1_image", "l1_raw", "lpips_image", "lpips_raw", "depth", "feature", "id")


class DistillationLoss(nn.Module):
    """Teacher-student loss of 3DPE at the input camera and (optionally) a random camera per sample.

    Renders are the TriplaneRenderer dicts of a 2N batch: rows [0, N) at the input camera, [N, 2N) at the
    random camera (`image` 2N×3×R², `image_raw` 2N×3×r², `image_depth` 2N×1×r², `feature_image` 2N×32×r²).
    Returns (weighted total, {term: unweighted value}); multi-view terms carry the prefix `mv_`.
    The LPIPS net is built only when its weight is > 0, the ID net only when its weight is > 0.
    `random_nets`: a random AlexNet backbone and a random IR-SE50 instead of the weight files (tiny models, tests).
    """

    def __init__(self, cfg: LossConfig, random_nets: bool = False):
        super().__init__()
        self.config = cfg
        self.lpips = build_lpips(cfg.weights_dir, random_nets) if cfg.lpips > 0 else None
        self.id_loss = IDLoss(cfg.weights_dir, random_nets) if cfg.id > 0 else None

    def _lpips(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        if a.shape[-1] < 32:  # AlexNet's pooling needs ≥32 px; only tiny test configs render smaller
            a = F.interpolate(a.float(), size=(32, 32), mode="bilinear", align_corners=False)
            b = F.interpolate(b.float(), size=(32, 32), mode="bilinear", align_corners=False)
        return self.lpips(a.float(), b.float()).mean()

    def view_terms(self, s: dict, t: dict, rows: slice, stage: Stage = no_stage) -> dict[str, torch.Tensor]:
        """Unweighted per-view terms for the rows `rows` of the student (s) and teacher (t) renders."""
        with stage("loss/l1_depth_feature"):
            out = {
                "l1_image": F.l1_loss(s["image"][rows], t["image"][rows]),
                "l1_raw": F.l1_loss(s["image_raw"][rows], t["image_raw"][rows]),
                "depth": F.l1_loss(s["image_depth"][rows], t["image_depth"][rows]),
                "feature": F.l1_loss(s["feature_image"][rows], t["feature_image"][rows]),
            }
        if self.lpips is not None:
            with stage("loss/lpips"):
                out["lpips_image"] = self._lpips(s["image"][rows], t["image"][rows])
                out["lpips_raw"] = self._lpips(s["image_raw"][rows], t["image_raw"][rows])
        if self.id_loss is not None:
            with stage("loss/id"):
                out["id"] = self.id_loss(s["image"][rows], t["image"][rows])
        return out

    def weighted_view(self, terms: dict[str, torch.Tensor]) -> torch.Tensor:
        c = self.config
        total = c.l1 * (terms["l1_image"] + terms["l1_raw"]) + c.depth * terms["depth"]
        if c.feature > 0:
            total = total + c.feature * terms["feature"]
        if "lpips_image" in terms:
            total = total + c.lpips * (terms["lpips_image"] + terms["lpips_raw"])
        if "id" in terms:
            total = total + c.id * terms["id"]
        return total

    def forward(
        self,
        student_tri: torch.Tensor,
        teacher_tri: torch.Tensor,
        student: dict[str, torch.Tensor],
        teacher: dict[str, torch.Tensor],
        n: int,
        stage: Stage = no_stage,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        with stage("loss/tri"):
            terms: dict[str, torch.Tensor] = {"tri": F.l1_loss(student_tri.float(), teacher_tri.float())}
        total = self.config.tri * terms["tri"]
        first = self.view_terms(student, teacher, slice(0, n), stage)
        terms.update(first)
        total = total + self.weighted_view(first)
        if self.config.multiview:
            mv = self.view_terms(student, teacher, slice(n, 2 * n), stage)
            terms.update({f"mv_{k}": v for k, v in mv.items()})
            total = total + self.weighted_view(mv)
        return total, terms


# ------------------------------------------------------------------------------------------- GAN
def d_real_loss_r1(
    D: nn.Module, image: torch.Tensor, reference: torch.Tensor, camera: torch.Tensor, r1_gamma: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Non-saturating real loss + R1 on both real inputs (image and reference), as in 3DPE.

    Returns (loss = mean(softplus(−D(real)) + γ/2·‖∇‖²), r1 penalty mean, logits N×1). A compiled D runs
    eager here when R1 is on: R1's backward differentiates D's backward, which compiled graphs cannot.
    """
    image = image.detach().requires_grad_(r1_gamma > 0)
    reference = reference.detach().requires_grad_(r1_gamma > 0)
    with torch.compiler.set_stance("force_eager") if r1_gamma > 0 else contextlib.nullcontext():
        logits = D(image, reference, camera)
    loss = F.softplus(-logits).mean()
    if r1_gamma > 0:
        g_img, g_ref = torch.autograd.grad(logits.sum(), [image, reference], create_graph=True, only_inputs=True)
        penalty = g_img.square().sum([1, 2, 3]) + g_ref.square().sum([1, 2, 3])
        r1 = penalty.mean()
        loss = loss + (r1_gamma / 2) * r1
    else:
        r1 = torch.zeros((), device=logits.device)
    return loss, r1.detach(), logits.detach()


def d_fake_loss(D: nn.Module, image: torch.Tensor, reference: torch.Tensor, camera: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """mean(softplus(D(fake))) with the fake image detached; returns (loss, logits N×1)."""
    logits = D(image.detach(), reference.detach(), camera)
    return F.softplus(logits).mean(), logits.detach()


def g_adv_loss(D: nn.Module, image: torch.Tensor, reference: torch.Tensor, camera: torch.Tensor) -> torch.Tensor:
    """Generator side: mean(softplus(−D(student image))); gradients flow into `image` only when D is frozen."""
    return F.softplus(-D(image, reference.detach(), camera)).mean()


# ------------------------------------------------------------------------------------------- steps
def d_real_step(D_ddp: nn.Module, opt_d: torch.optim.Optimizer, real: torch.Tensor, reference: torch.Tensor,
                camera: torch.Tensor, r1_gamma: float, stage: Stage = no_stage) -> dict[str, torch.Tensor]:
    """The first half of a D update: zero D's gradients, real (+R1) forward and backward. Needs nothing of the
    student, so a training step runs it before the student's forward: its double-backward graph and the
    student's render graph are never alive together. Returns the (detached) real-side scalars for `d_fake_step`."""
    D = D_ddp.module if isinstance(D_ddp, nn.parallel.DistributedDataParallel) else D_ddp
    D.requires_grad_(True)
    opt_d.zero_grad(set_to_none=True)
    with stage("D/real_r1_forward"):
        loss_real, r1, logits_real = d_real_loss_r1(D_ddp, real, reference, camera, r1_gamma)
    with stage("D/real_r1_backward"):
        loss_real.backward()
    return {"loss_real": loss_real.detach(), "r1": r1, "logits_real": logits_real}


def d_fake_step(D_ddp: nn.Module, opt_d: torch.optim.Optimizer, real_side: dict[str, torch.Tensor],
                fake: torch.Tensor, reference: torch.Tensor, camera: torch.Tensor, grad_clip: float = 0.0,
                stage: Stage = no_stage) -> dict[str, torch.Tensor]:
    """The second half: fake forward and backward (gradients add to the real side's), clipping, D's step; leaves
    D frozen (requires_grad off). Returns the `D/…` scalars for logging, as 0-dim tensors on the device (read
    on logging steps only: reading them every step would make the host wait for the device)."""
    D = D_ddp.module if isinstance(D_ddp, nn.parallel.DistributedDataParallel) else D_ddp
    with stage("D/fake_forward"):
        loss_fake, logits_fake = d_fake_loss(D_ddp, fake, reference, camera)
    with stage("D/fake_backward"):
        loss_fake.backward()
    with stage("D/optimizer"):
        if grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(D.parameters(), grad_clip)
        opt_d.step()
    D.requires_grad_(False)
    return {"D/loss_real": real_side["loss_real"], "D/loss_fake": loss_fake.detach(), "D/r1": real_side["r1"],
            "D/logits_real": real_side["logits_real"].mean(), "D/logits_fake": logits_fake.mean()}


def discriminator_step(D_ddp: nn.Module, opt_d: torch.optim.Optimizer, real: torch.Tensor, fake: torch.Tensor,
                       reference: torch.Tensor, camera: torch.Tensor, r1_gamma: float,
                       grad_clip: float = 0.0, stage: Stage = no_stage) -> dict[str, torch.Tensor]:
    """One D update: real (+R1 on image and reference), then fake, each forward followed by its backward
    (`d_real_step` then `d_fake_step`).

    `D_ddp` is the discriminator or its DDP wrapper; real, fake, reference N×3×R² at D's resolution, camera
    N×25. D trains only inside this step: it leaves D frozen (requires_grad off), so a following
    `g_adv_loss` sends gradients into the fake image only. Returns the `D/…` scalars for logging (0-dim tensors).
    """
    real_side = d_real_step(D_ddp, opt_d, real, reference, camera, r1_gamma, stage)
    return d_fake_step(D_ddp, opt_d, real_side, fake, reference, camera, grad_clip, stage)


def generator_step(loss: torch.Tensor, opt_g: torch.optim.Optimizer, params: list[nn.Parameter],
                   grad_clip: float = 0.0, stage: Stage = no_stage) -> dict[str, torch.Tensor]:
    """One student update from its total loss (distillation + weighted GAN term): backward, optional clipping of
    `params` (the optimiser's parameters) to `grad_clip`, step. Returns {'grad_norm/student'} (a 0-dim tensor)
    when clipping."""
    opt_g.zero_grad(set_to_none=True)
    with stage("G/backward"):
        loss.backward()
    logs: dict[str, torch.Tensor] = {}
    with stage("G/optimizer"):
        if grad_clip > 0:
            logs["grad_norm/student"] = torch.nn.utils.clip_grad_norm_(params, grad_clip)
        opt_g.step()
    return logs
