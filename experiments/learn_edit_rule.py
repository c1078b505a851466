"""Does the training recipe learn? A CPU experiment with tiny models, the real loss stack and the real loop.

    torchrun --nproc_per_node=2 experiments/learn_edit_rule.py --out exps/learn_edit_rule

The data are synthetic portraits (experiments/portraits.py). The 2D edit is an albedo shift θ (lighter or
darker), drawn per pair uniformly in [-r, r] (r = 0.5): zero-mean, so no constant edit fits it. The reference
shows the same θ on a different identity seen from a different camera: it is never the input or the target.
The experiment runs in four stages:

1. Teacher. The tiny random Live3D teacher (and the renderer) would erase the colour. So the experiment first
   fits teacher + renderer as a multi-view autoencoder on the same kind of images: image at camera c →
   triplane → renders at c and at a random training camera ≈ the analytic renders there, plus a small L1 on
   the triplane (it keeps the features the renders do not need near zero). Then it freezes
   both and saves them as a `live3d` checkpoint. `model.init_checkpoint` points at it, so `build_networks`
   loads the teacher, the renderer and the student's Live3D part from it, exactly as the real recipe does
   with the Live3D LT checkpoint.
2. Student. `training.train.main` runs on pairs made on the fly (configs/train_tiny.yaml, the full loss stack at
   its released weights except the triplane L1 at 4×; lr 1e-3, 50 warm-up steps, cosine schedule, 600 steps):
   the loop lifts each target with the frozen teacher itself.
3. Baseline (b). The same recipe runs again with shuffled references, each showing a different rule.
4. Evaluation on held-out identities, rule parameters and cameras: the input view, and two side cameras at
   yaw ±30°, outside the training inputs' ±15°. It reports the L1 error against the target (the teacher's
   lift of the edited image), measured on the triplane and on the renders. The trained student is compared
   with (a), the teacher's lift of the unedited input, and with (b). It also reports the correlation between
   the output's mean colour change (output − input) and the reference's θ.

Writes `result.json` (numbers, the criteria, pass/fail), `grid.png` and `loss_curves.png` into --out. The
process exits 0 whether or not the criteria pass; read `result.json["passed"]`.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from experiments.portraits import (draw_cameras, draw_identities, draw_rules, index_identities,  # noqa: E402
                                   render_portraits)
from utils import distributed as du  # noqa: E402
from utils.atomic import atomic_write  # noqa: E402
from utils.cameras import look_at_cameras, sample_training_cameras  # noqa: E402

TINY_CONFIG = ROOT / "configs" / "train_tiny.yaml"
SIDE_YAW_DEG = 30.0


@dataclass
class ExperimentConfig:
    """Everything that sets the experiment (the defaults are the documented full run on a 2-core CPU).

    Batch sizes are per rank. The `train_overrides` keys go to `configs/train_tiny.yaml` for both student
    runs. The criteria are those of the issue: trained error ≤ max_ratio_a × (a) and ≤ max_ratio_b × (b),
    on the triplane and on the renders at every evaluated camera; r ≥ min_corr for the trained student; and
    r ≤ max_corr_shuffled for the shuffled-reference student.
    """

    out: str = "exps/learn_edit_rule"
    seed: int = 0
    resolution: int = 64
    theta_range: float = 0.5
    epoch_pairs: int = 512                 # pairs per epoch (each epoch draws new ones)
    eval_pairs: int = 48
    teacher_steps: int = 400
    teacher_batch: int = 4
    teacher_lr: float = 1e-3
    renderer_lr: float = 3e-3
    teacher_triplane_l1: float = 0.05      # keeps the teacher's triplane small where the renders do not need it
    student_steps: int = 600
    student_batch: int = 2
    student_lr: float = 1e-3
    student_schedule: str = "cosine"      # optim.schedule of the student runs
    student_triplane_weight: float = 4.0   # loss.tri: 4× the released weight (see docs/training.md)
    student_warmup: int = 50               # optim.warmup_steps (full-lr first AdamW steps can blow it up)
    train_overrides: list[str] = field(default_factory=list)
    max_ratio_a: float = 0.5
    max_ratio_b: float = 0.7
    min_corr: float = 0.9
    max_corr_shuffled: float = 0.3
    skip_shuffled: bool = False            # the shortened test run: baseline (a) only
    teacher_dir: str = ""                  # a teacher fitted by an earlier run (its out/teacher): skip stage 1


# ============================================================================================ data
def _item_seed(seed: int, split: int, epoch: int, index: int) -> int:
    return (((seed * 1_000_003 + split) * 1_000_033 + epoch) * 10_000_019 + index) % (2 ** 62)


SPLITS = {"train": 1, "eval": 2, "teacher": 3}


class RulePairs(Dataset):
    """Edit pairs drawn on the fly: item i of epoch e depends only on (seed, split, e, i).

    Item: input (the identity, unedited), target (the same identity and camera, rule θ applied), reference (a
    different identity at a different camera, rule θ applied; with `shuffled`, another rule θ'), all 3×R×R in
    [-1, 1]; camera (25,) the input's; theta (1,) the target's rule; ref_theta (1,) the reference's.
    """

    def __init__(self, length: int, seed: int, theta_range: float, shuffled: bool = False, resolution: int = 64):
        self.length, self.seed, self.theta_range = length, seed, theta_range
        self.shuffled, self.resolution = shuffled, resolution
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> dict[str, Any]:
        g = torch.Generator().manual_seed(_item_seed(self.seed, SPLITS["train"], self.epoch, index))
        ident = draw_identities(g, 2)
        theta = draw_rules(g, 2, self.theta_range)
        cams = draw_cameras(g, 2)
        ref_theta = theta[1] if self.shuffled else theta[0]
        images = render_portraits(index_identities(ident, torch.tensor([0, 0, 1])),
                                  torch.stack([torch.zeros(1), theta[0], ref_theta]),
                                  cams[[0, 0, 1]], self.resolution)
        return {"input": images[0], "target": images[1], "reference": images[2], "camera": cams[0],
                "theta": theta[0], "ref_theta": ref_theta}


def eval_pairs(n: int, seed: int, theta_range: float, resolution: int = 64) -> dict[str, torch.Tensor]:
    """The held-out set: n pairs from their own random stream, and for each its input camera and two side cameras.

    Returns input/target/reference/reference_other (n×3×R×R), theta/theta_other (n×1), cameras (3×n×25: input,
    side yaw −30°, side yaw +30°), angles_deg (2×n: each side camera's angle from the input camera, seen from the
    pivot). reference_other shows a different rule θ' on the reference identity, for the mismatched-reference check.
    """
    g = torch.Generator().manual_seed(_item_seed(seed, SPLITS["eval"], 0, 0))
    ident, ref_ident = draw_identities(g, n), draw_identities(g, n)
    theta, theta_other = draw_rules(g, n, theta_range), draw_rules(g, n, theta_range)
    u = torch.rand(n, 2, generator=g, dtype=torch.float64) * 2 - 1
    yaw, pitch = math.pi / 2 + u[:, 0] * math.radians(15.0), math.pi / 2 + u[:, 1] * math.radians(8.0)
    side = math.radians(SIDE_YAW_DEG)
    cams = torch.stack([look_at_cameras(yaw, pitch), look_at_cameras(yaw - side, pitch),
                        look_at_cameras(yaw + side, pitch)])
    ref_cams = draw_cameras(g, n)
    zero = torch.zeros(n, 1)
    out = {
        "input": render_portraits(ident, zero, cams[0], resolution),
        "target": render_portraits(ident, theta, cams[0], resolution),
        "reference": render_portraits(ref_ident, theta, ref_cams, resolution),
        "reference_other": render_portraits(ref_ident, theta_other, ref_cams, resolution),
        "theta": theta, "theta_other": theta_other, "cameras": cams,
    }
    pivot = torch.tensor([0.0, 0.0, 0.2])
    dirs = F.normalize(cams[:, :, [3, 7, 11]] - pivot, dim=-1)
    out["angles_deg"] = torch.rad2deg(torch.acos((dirs[1:] * dirs[:1]).sum(-1).clamp(-1, 1)))
    return out


# ============================================================================================ teacher
class _Autoencoder(nn.Module):
    """Teacher + renderer as one module (so DDP averages both): image → triplane → renders at V·N cameras."""

    def __init__(self, teacher: nn.Module, renderer: nn.Module):
        super().__init__()
        self.teacher, self.renderer = teacher, renderer

    def forward(self, image: torch.Tensor, cameras: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        tri = self.teacher(image)
        return tri, self.renderer(tri.repeat(cameras.shape[0] // tri.shape[0], 1, 1, 1), cameras,
                                  deterministic=False)


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    """PSNR in dB of images in [-1, 1] (peak-to-peak 2), over the whole batch."""
    mse = (a.float().clamp(-1, 1) - b.float()).square().mean().item()
    return 10 * math.log10(4.0 / max(mse, 1e-12))


@torch.no_grad()
def teacher_psnr(teacher: nn.Module, renderer: nn.Module, ev: dict[str, torch.Tensor]) -> dict[str, float]:
    """How well the teacher lifts the held-out EDITED images, rendered at their own camera.

    psnr_edited_db: the lift of the edited image against that image. psnr_edit_difference_db: the edit itself,
    lift(target) − lift(input) against target − input; edit_difference_zero_db is what "no change" scores there,
    so an erased edit shows. edit_carried: the regression slope of the lift's tone change on the image's (1 = the
    whole edit survives the lift, 0 = erased). r_lift_edit_vs_rule: the lift's tone change against θ."""
    teacher.eval()
    renderer.eval()
    cams = ev["cameras"][0]
    lift_t = renderer(teacher(ev["target"]), cams)["image"]
    lift_i = renderer(teacher(ev["input"]), cams)["image"]
    edit = ev["target"] - ev["input"]
    true_prop, lift_prop = edit_property(ev["target"], ev["input"]), edit_property(lift_t, lift_i)
    return {"psnr_edited_db": psnr(lift_t, ev["target"]),
            "psnr_edit_difference_db": psnr(lift_t - lift_i, edit),
            "edit_difference_zero_db": psnr(torch.zeros_like(edit), edit),
            "edit_carried": float((lift_prop * true_prop).sum() / true_prop.square().sum()),
            "r_lift_edit_vs_rule": pearson(lift_prop, ev["theta"])}


def prepare_teacher_fit(teacher: nn.Module, resolution: int) -> None:
    """Settings of the autoencoder fit that the frozen teacher does not see.

    The raw coordinate channels (0..R-1) enter the first convolutions at 60× the colour's scale. At random init
    they swamp the image, and the fit then learns a mean head that ignores its input. So their first-layer weights
    start divided by the image side (`resolution`). ASPP dropout is off during the fit: the loop runs the teacher in
    eval mode, so the fit need not learn to survive it.
    """
    with torch.no_grad():
        teacher.encoder.conv1.weight[:, 3:] /= resolution
        teacher.EHigh_encoder.net[0].weight[:, 3:] /= resolution
    for m in teacher.modules():
        if isinstance(m, nn.Dropout):
            m.p = 0.0


def fit_teacher(cfg: ExperimentConfig, base_overrides: list[str], dst: Path, ev: dict[str, torch.Tensor],
                info: du.DistInfo) -> dict[str, Any]:
    """Fit the tiny random teacher + renderer as a multi-view autoencoder, save them to `dst` (a `live3d`
    project checkpoint), and report the teacher's lift quality before and after (on the held-out edited images).

    Per step and rank: `teacher_batch` identities, 3 in 4 edited with a random θ, rendered at an input camera
    and at a random training camera (the loop's multi-view distribution). The loss is the L1 of both renders
    (`image` and `image_raw`) against the analytic images, plus `teacher_triplane_l1` × mean |triplane|.
    """
    from models.checkpoint import save_pretrained
    from training.setup import build_networks
    from training.config import TrainConfig
    from utils.config import load_config, to_dict

    tcfg = load_config(TrainConfig, TINY_CONFIG, [*base_overrides, "model.init_checkpoint="])
    torch.manual_seed(cfg.seed)
    nets = build_networks(tcfg)
    teacher, renderer = nets["teacher"], nets["renderer"]
    before = teacher_psnr(teacher, renderer, ev)
    prepare_teacher_fit(teacher, cfg.resolution)
    ae = _Autoencoder(teacher, renderer).train()
    # find_unused: ResNet layer3/4 exist only so original checkpoints load; they never run.
    model = du.wrap_ddp(ae, info.device, find_unused_parameters=True) if info.distributed else ae
    opt = torch.optim.Adam([{"params": list(teacher.parameters()), "lr": cfg.teacher_lr},
                            {"params": list(renderer.parameters()), "lr": cfg.renderer_lr}])
    g = torch.Generator().manual_seed(_item_seed(cfg.seed, SPLITS["teacher"], info.rank, 0))
    curve = []
    n = cfg.teacher_batch
    for step in range(cfg.teacher_steps):
        ident = draw_identities(g, n)
        theta = draw_rules(g, n, cfg.theta_range) * (torch.rand(n, 1, generator=g) < 0.75)
        cams = torch.cat([draw_cameras(g, n), sample_training_cameras(n, generator=g)])
        images = render_portraits(index_identities(ident, torch.arange(n).repeat(2)), theta.repeat(2, 1), cams,
                                  cfg.resolution)
        tri, out = model(images[:n], cams)
        raw_t = F.interpolate(images, size=out["image_raw"].shape[-1], mode="area")
        loss = (F.l1_loss(out["image"], images) + F.l1_loss(out["image_raw"], raw_t)
                + cfg.teacher_triplane_l1 * tri.abs().mean())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        curve.append(du.all_reduce_mean({"loss": loss.item()}, info.device)["loss"])
        if info.is_main and (step + 1) % 50 == 0:
            print(f"[teacher] step {step + 1}/{cfg.teacher_steps} L1 {sum(curve[-50:]) / 50:.4f}", flush=True)
    teacher.eval().requires_grad_(False)
    renderer.eval().requires_grad_(False)
    after = teacher_psnr(teacher, renderer, ev)
    if info.is_main:
        save_pretrained(dst, {"encoder": teacher.state_dict(), "renderer": renderer.state_dict()}, "live3d",
                        {"encoder": to_dict(nets["configs"]["encoder"].live3d),
                         "renderer": to_dict(nets["configs"]["renderer"])},
                        {"trained_by": "experiments/learn_edit_rule.py (autoencoder fit)",
                         "steps": cfg.teacher_steps})
    du.barrier()
    return {"random_init": before, "fitted": after, "steps": cfg.teacher_steps, "curve": curve}


# ============================================================================================ student
def train_overrides(cfg: ExperimentConfig, out: Path, name: str, teacher_dir: Path) -> list[str]:
    """The `configs/train_tiny.yaml` overrides of one student run."""
    n = cfg.student_steps
    return [f"exp_dir={out}", f"name={name}", f"seed={cfg.seed}", f"max_steps={n}", "export_3dpe=false",
            f"model.init_checkpoint={teacher_dir}", f"data.resolution={cfg.resolution}",
            f"data.batch_size={cfg.student_batch}", f"optim.lr={cfg.student_lr}",
            f"optim.schedule={cfg.student_schedule}", f"optim.warmup_steps={cfg.student_warmup}",
            f"loss.tri={cfg.student_triplane_weight}",
            "log.log_interval=5", f"log.image_interval={n}", f"log.val_interval={10 * n}",
            f"log.save_interval={n}", "log.keep_last=1", *cfg.train_overrides]


def train_student(cfg: ExperimentConfig, out: Path, name: str, teacher_dir: Path, shuffled: bool):
    """One run of the real loop (`training.train.main`) on RulePairs; returns its TrainResult."""
    from training.train import TrainConfig, main
    from utils.config import load_config

    tcfg = load_config(TrainConfig, TINY_CONFIG, train_overrides(cfg, out, name, teacher_dir))
    data = RulePairs(cfg.epoch_pairs, cfg.seed, cfg.theta_range, shuffled=shuffled, resolution=cfg.resolution)
    return main(tcfg, data, None)


def read_curves(run_dir: Path, tags: tuple[str, ...] = ("loss/total", "loss/tri", "loss/l1_image")) -> dict:
    """Scalars of a run's TensorBoard log: tag → [(step, value)]."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir / "logs"), size_guidance={"scalars": 0})
    acc.Reload()
    have = set(acc.Tags()["scalars"])
    return {t: [(e.step, e.value) for e in acc.Scalars(t)] for t in tags if t in have}


# ============================================================================================ evaluation
@torch.no_grad()
def lift_views(lift: nn.Module | None, renderer: nn.Module, image: torch.Tensor, reference: torch.Tensor | None,
               cameras: torch.Tensor, batch: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    """Triplanes (n×96×P×P) and renders (V×n×3×R×R, deterministic) at cameras V×n×25.

    `lift` is a Live3D teacher (called on the image alone, as the loop calls it) or an editing encoder (called
    with the reference's prompt tokens, as the loop's Student does)."""
    tris, views = [], []
    for s in range(0, image.shape[0], batch):
        x = image[s:s + batch]
        if reference is None:
            tri = lift(x)
        else:
            tokens, bias = lift.encode_prompt(reference=reference[s:s + batch])
            tri = lift(x, tokens, bias)
        cams = cameras[:, s:s + batch]
        v = cams.shape[0]
        img = renderer(tri.repeat(v, 1, 1, 1), cams.reshape(-1, cams.shape[-1]), deterministic=True)["image"]
        tris.append(tri)
        views.append(img.reshape(v, x.shape[0], *img.shape[1:]))
    return torch.cat(tris), torch.cat(views, dim=1)


def pearson(x: torch.Tensor, y: torch.Tensor) -> float:
    """Pearson correlation of two same-shaped tensors, flattened."""
    x, y = x.flatten().double(), y.flatten().double()
    x, y = x - x.mean(), y - y.mean()
    return float((x * y).sum() / (x.norm() * y.norm()).clamp_min(1e-12))


def edit_property(output_view: torch.Tensor, input_image: torch.Tensor) -> torch.Tensor:
    """The output's tone change: the mean of (output − input) over pixels and channels at the input view → n×1."""
    return (output_view.float().clamp(-1, 1) - input_image).mean(dim=(1, 2, 3))[:, None]


def errors(tri: torch.Tensor, views: torch.Tensor, t_tri: torch.Tensor, t_views: torch.Tensor) -> dict[str, float]:
    """L1 against the target: triplane, and renders per camera (input, side_a, side_b)."""
    out = {"triplane": F.l1_loss(tri, t_tri).item()}
    for i, name in enumerate(("render_input_view", "render_side_a", "render_side_b")):
        out[name] = F.l1_loss(views[i].clamp(-1, 1), t_views[i].clamp(-1, 1)).item()
    return out


def evaluate(teacher: nn.Module, renderer: nn.Module, students: dict[str, nn.Module], ev: dict[str, torch.Tensor],
             cfg: ExperimentConfig) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """Errors of baseline (a) and of every student against the target, the ratios, correlations and verdicts.

    Returns (metrics, renders for the figure)."""
    teacher.eval()
    renderer.eval()
    cams = ev["cameras"]
    t_tri, t_views = lift_views(teacher, renderer, ev["target"], None, cams)
    a_tri, a_views = lift_views(teacher, renderer, ev["input"], None, cams)
    err = {"baseline_a": errors(a_tri, a_views, t_tri, t_views)}
    views = {"target": t_views, "baseline_a": a_views}
    corr: dict[str, float] = {}
    for name, enc in students.items():
        enc.eval()
        s_tri, s_views = lift_views(enc, renderer, ev["input"], ev["reference"], cams)
        err[name] = errors(s_tri, s_views, t_tri, t_views)
        views[name] = s_views
        prop = edit_property(s_views[0], ev["input"])
        corr[f"{name}_vs_reference_rule"] = pearson(prop, ev["theta"])
        if name == "trained":  # the same student, fed a reference that shows another rule θ'
            _, m_views = lift_views(enc, renderer, ev["input"], ev["reference_other"], cams[:1])
            prop = edit_property(m_views[0], ev["input"])
            corr["trained_mismatched_reference_vs_given_rule"] = pearson(prop, ev["theta_other"])
            corr["trained_mismatched_reference_vs_target_rule"] = pearson(prop, ev["theta"])
    corr["target_vs_rule"] = pearson(edit_property(t_views[0], ev["input"]), ev["theta"])

    metrics: dict[str, Any] = {"errors_l1": err, "correlation": corr, "ratios": {}, "criteria": {}}
    for k in err["baseline_a"]:
        metrics["ratios"][f"trained/baseline_a/{k}"] = err["trained"][k] / err["baseline_a"][k]
        metrics["criteria"][f"trained <= {cfg.max_ratio_a} x baseline_a ({k})"] = \
            err["trained"][k] <= cfg.max_ratio_a * err["baseline_a"][k]
        if "shuffled" in err:
            metrics["ratios"][f"trained/baseline_b/{k}"] = err["trained"][k] / err["shuffled"][k]
            metrics["criteria"][f"trained <= {cfg.max_ratio_b} x baseline_b ({k})"] = \
                err["trained"][k] <= cfg.max_ratio_b * err["shuffled"][k]
    metrics["criteria"][f"r(trained) >= {cfg.min_corr}"] = corr["trained_vs_reference_rule"] >= cfg.min_corr
    if "shuffled" in err:
        metrics["criteria"][f"r(shuffled) <= {cfg.max_corr_shuffled}"] = \
            abs(corr["shuffled_vs_reference_rule"]) <= cfg.max_corr_shuffled
    metrics["criteria"][f"held-out pairs >= 32 ({ev['input'].shape[0]})"] = ev["input"].shape[0] >= 32
    min_angle = float(ev["angles_deg"].min())
    metrics["side_camera_min_angle_deg"] = min_angle
    metrics["criteria"]["side cameras >= 20 deg from the input view"] = min_angle >= 20.0
    metrics["passed"] = all(metrics["criteria"].values())
    return metrics, views


# ============================================================================================ figures
def save_grid(path: Path, ev: dict[str, torch.Tensor], views: dict[str, torch.Tensor], rows: int = 4) -> None:
    """input | reference | target | baseline (a) | trained, for `rows` held-out pairs at the input view, then the
    same pairs at the side camera (yaw +30°), as one labelled PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    k = min(rows, ev["input"].shape[0])
    titles = ["input", "reference (rule θ,\nanother identity)", "target (teacher's\nlift of the 2D edit)",
              "baseline (a): lift\nof the input", "trained student"]
    fig, axes = plt.subplots(2 * k, 5, figsize=(7.5, 3.1 * k), gridspec_kw={"hspace": 0.08, "wspace": 0.04})
    for half, (view, label) in enumerate(((0, "input view"), (2, "yaw +30°"))):
        cols = [ev["input"], ev["reference"], views["target"][view], views["baseline_a"][view],
                views["trained"][view]]
        for i in range(k):
            row = half * k + i
            for j, col in enumerate(cols):
                ax = axes[row, j]
                ax.imshow(((col[i].clamp(-1, 1) + 1) / 2).permute(1, 2, 0).numpy())
                ax.set_xticks([])
                ax.set_yticks([])
                if row == 0:
                    ax.set_title(titles[j], fontsize=8)
            axes[row, 0].set_ylabel(f"{label}\nθ = {ev['theta'][i, 0]:+.2f}", fontsize=8)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_write(path, "wb", suffix=".tmp.png") as fh:
        fig.savefig(fh, format="png", dpi=72, bbox_inches="tight")
    plt.close(fig)


def save_curves(path: Path, curves: dict[str, dict], teacher_curve: list[float]) -> None:
    """The loss curves (student runs: total and triplane L1; the teacher's autoencoder fit) as one PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(12, 3.4))
    for name, c in curves.items():
        for ax, tag in zip(axes[:2], ("loss/total", "loss/tri")):
            if tag in c:
                steps, vals = zip(*c[tag])
                ax.plot(steps, vals, label=name)
    for ax, title in zip(axes[:2], ("student: total loss", "student: triplane L1")):
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.set_yscale("log")
        ax.legend()
    axes[2].plot(range(1, len(teacher_curve) + 1), teacher_curve)
    axes[2].set_title("teacher autoencoder fit: L1")
    axes[2].set_xlabel("step")
    axes[2].set_yscale("log")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_write(path, "wb", suffix=".tmp.png") as fh:
        fig.savefig(fh, format="png", dpi=80)
    plt.close(fig)


# ============================================================================================ the experiment
def run_experiment(cfg: ExperimentConfig) -> dict[str, Any] | None:
    """All four stages. Every rank calls it; rank 0 evaluates, writes the outputs and returns the result."""
    from training.setup import build_networks
    from training.config import TrainConfig
    from utils.config import load_config

    t_start = time.perf_counter()
    info = du.init_distributed("cpu")
    if info.distributed:
        torch.set_num_threads(1)  # one core per rank on a small CPU
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    ev = eval_pairs(cfg.eval_pairs, cfg.seed, cfg.theta_range, cfg.resolution)
    timings: dict[str, float] = {}

    t0 = time.perf_counter()
    if cfg.teacher_dir:
        teacher_dir = Path(cfg.teacher_dir)
        teacher_info = json.loads((teacher_dir / "fit.json").read_text())
    else:
        teacher_dir = out / "teacher"
        teacher_info = fit_teacher(cfg, [f"data.resolution={cfg.resolution}", *cfg.train_overrides], teacher_dir,
                                   ev, info)
        if info.is_main:
            with atomic_write(teacher_dir / "fit.json", "w") as fh:
                json.dump(teacher_info, fh)
    timings["teacher_fit_s"] = time.perf_counter() - t0

    results: dict[str, Any] = {}
    curves: dict[str, dict] = {}
    runs = [("trained", False)] + ([] if cfg.skip_shuffled else [("shuffled", True)])
    for name, shuffled in runs:
        t0 = time.perf_counter()
        results[name] = train_student(cfg, out, name, teacher_dir, shuffled)
        timings[f"student_{name}_s"] = time.perf_counter() - t0
        if info.is_main:
            curves[name] = read_curves(results[name].run_dir)

    metrics = None
    if info.is_main:
        t0 = time.perf_counter()
        # The teacher exactly as the loop builds it: build_networks from the same config.
        tcfg = load_config(TrainConfig, TINY_CONFIG, train_overrides(cfg, out, "eval", teacher_dir))
        torch.manual_seed(tcfg.seed)
        nets = build_networks(tcfg)
        teacher, renderer = nets["teacher"], nets["renderer"]
        students = {name: r.encoder for name, r in results.items()}
        metrics, views = evaluate(teacher, renderer, students, ev, cfg)
        timings["evaluation_s"] = time.perf_counter() - t0
        timings["total_s"] = time.perf_counter() - t_start
        teacher_info.pop("curve_tail", None)
        t_curve = teacher_info.pop("curve")
        metrics = {
            "passed": metrics.pop("passed"),
            **metrics,
            "teacher": {**teacher_info, "final_loss": t_curve[-1]},
            "world_size": info.world_size,
            "timings_s": timings,
            "config": dataclasses.asdict(cfg),
            "machine": _machine(),
        }
        with atomic_write(out / "result.json", "w") as fh:
            json.dump(metrics, fh, indent=2)
        save_grid(out / "grid.png", ev, views)
        save_curves(out / "loss_curves.png", curves, t_curve)
    du.barrier()
    return metrics


def _machine() -> dict[str, Any]:
    from utils.device import cpu_name

    return {"cpu": cpu_name(), "cores": os.cpu_count(), "torch": torch.__version__,
            "threads_per_rank": torch.get_num_threads()}


def quick_config(out: str, seed: int = 0) -> ExperimentConfig:
    """The shortened run of the test suite: one process, fewer steps, no shuffled-reference run."""
    return ExperimentConfig(out=out, seed=seed, teacher_steps=110, teacher_batch=4, student_steps=100,
                            student_batch=4, eval_pairs=32, skip_shuffled=True)


def parse_args(argv: list[str] | None = None) -> ExperimentConfig:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=ExperimentConfig.out, help="output folder (result.json, grid.png, ...)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--teacher-steps", type=int, default=ExperimentConfig.teacher_steps)
    p.add_argument("--student-steps", type=int, default=ExperimentConfig.student_steps)
    p.add_argument("--eval-pairs", type=int, default=ExperimentConfig.eval_pairs)
    p.add_argument("--student-lr", type=float, default=ExperimentConfig.student_lr)
    p.add_argument("--theta-range", type=float, default=ExperimentConfig.theta_range,
                   help="rule parameters θ ~ U[-r, r] (albedo shift)")
    p.add_argument("--teacher", default="", help="reuse the teacher of an earlier run (its OUT/teacher folder)")
    p.add_argument("--skip-shuffled", action="store_true", help="no baseline (b) run")
    p.add_argument("overrides", nargs="*", help="extra configs/train_tiny.yaml overrides for both student runs, "
                                                "e.g. loss.adv=0")
    a = p.parse_args(argv)
    return ExperimentConfig(out=a.out, seed=a.seed, teacher_steps=a.teacher_steps, student_steps=a.student_steps,
                            eval_pairs=a.eval_pairs, train_overrides=list(a.overrides),
                            teacher_dir=a.teacher, skip_shuffled=a.skip_shuffled,
                            theta_range=a.theta_range, student_lr=a.student_lr)


def main(argv: list[str] | None = None) -> int:
    from utils.errors import ThreeDPEError

    cfg = parse_args(argv)
    try:
        result = run_experiment(cfg)
    except ThreeDPEError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    finally:
        du.destroy_distributed()
    if result is not None:
        print(json.dumps({"passed": result["passed"], "criteria": result["criteria"],
                          "ratios": result["ratios"], "correlation": result["correlation"],
                          "teacher_psnr_edited_db": result["teacher"]["fitted"]["psnr_edited_db"],
                          "timings_s": result["timings_s"]}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
