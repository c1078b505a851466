"""Deterministic recipe for the training-step parity fixture (`training_parity.pt`), and our side of the step.

The fixture holds what the ORIGINAL code's `Coach.train_ref_encoder` computes in one step (3dpe 900f7a6, torch
2.14 CPU fp32, batch 1) for the weights, batch and cameras built here: every loss term, the weighted total, and
compact summaries (`summarize`) of the student's trainable gradients and of the discriminator's gradients as its
optimiser step sees them. It is produced outside the repository by a driver that runs the original code on the
files `write_recipe` writes; nothing of the original is in this repository.

The recipe (RECIPE_VERSION 1):
- weights: closed-form hashes of (tensor index, element index), no RNG. Encoders use `hashed_state_dict` of the
  encoder fixture (student = the 327 keys; teacher = its 170 Live3D keys, so the student's non-strict load of the
  LT checkpoint, as in the original, gives the same values); renderer and discriminator use StyleGAN's stored
  (equalized-learning-rate) scales (see `_eqlr_value`), with the renderer's density row set so the volume is
  neither empty nor opaque; AlexNet, LPIPS heads and IR-SE50 use torch's init scales (`_torch_value`).
- files: `live3d_lt.pt` (Live3D checkpoint: teacher encoder, renderer, step 90000), `student_3dpe.pt` (3dpe.pt
  layout: the whole student encoder incl. MAE branch and fuser, renderer, `discriminator_state`),
  `alexnet-owt-4df8aa71.pth` (torchvision layout), `alex_lin.pth` (LPIPS heads, `lin{k}.model.1.weight`),
  `model_ir_se50.pth` (IR-SE50 state dict), `batch.pt` (tensors below).
- batch: input, 2D-edited target and reference are `pattern_image`s (1×3×512², [-1,1]); `reference_mae` is the
  reference as the MAE sees it (the original's `transform_mae_val`: bicubic 224 without antialiasing, ImageNet
  normalisation); `camera` the input camera (dataset-label focal 4.2647); `mv_params` the random camera's
  (pitch, yaw, fov, cx, cy) and `mv_camera` its 25-vector built by `utils.cameras`.
- every loss weight non-zero; rendering deterministic (jitter 0.5, det=True importance sampling); dropout off.

    python tests/training_parity.py write DIR            # the recipe files (our venv)
    python tests/training_parity.py ours DIR OUT.pt      # our step's compact result (+ comparison if a fixture exists)
"""
from __future__ import annotations

import math
import os
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from encoder_parity import _uniform, hashed_state_dict, pattern_image  # noqa: E402

RECIPE_VERSION = 1
BATCH = 1
RESOLUTION = 512
SAMPLES = 256                 # strided gradient samples kept per tensor
LT_STEP = 90000               # the Live3D checkpoint's step (the original's global_step starts there)
INPUT_POSE = {"yaw": math.pi / 2 + 0.25, "pitch": math.pi / 2 - 0.12}
MV_PARAMS = {"pitch": math.pi / 2 + 0.2, "yaw": math.pi / 2 - 0.5, "fov": 19.5, "cx": 0.53, "cy": 0.46}
LOSS_WEIGHTS = {"tri": 1.0, "l1": 1.0, "lpips": 2.0, "depth": 0.5, "feature": 0.3, "id": 0.1, "adv": 0.025}
TERM_TOL = 1e-4               # relative, per loss term
GRAD_TOL = 1e-3               # max |Δ| / max |g| per tensor
GRAD_FLOOR = 1e-12            # tensors below this on both sides count as equal

#: The original's names of the terms (its local variables in `train_ref_encoder`) → our names.
TERM_NAMES = {
    "triloss": "tri", "image_loss": "l1_image", "raw_loss": "l1_raw", "image_lpips_loss": "lpips_image",
    "raw_lpips_loss": "lpips_raw", "depth_loss": "depth", "feature_loss": "feature", "category_loss": "id",
    "mv_image_loss": "mv_l1_image", "mv_raw_loss": "mv_l1_raw", "mv_image_lpips_loss": "mv_lpips_image",
    "mv_raw_lpips_loss": "mv_lpips_raw", "mv_depth_loss": "mv_depth", "mv_feature_loss": "mv_feature",
    "mv_category_loss": "mv_id", "loss_gan": "gan", "loss_Dgt": "D_gt", "loss_Dr1": "D_r1", "loss_Dgen": "D_gen",
    "loss": "total",
}

DATA = Path(__file__).resolve().parent / "data"


# ============================================================================================ weights
def read_keys(name: str) -> list[tuple[str, tuple[int, ...]]]:
    """[(key, shape)] of tests/data/<name>.tsv."""
    rows = []
    for line in (DATA / f"{name}.tsv").read_text().splitlines()[1:]:
        key, shape = line.split("\t")[:2]
        rows.append((key, tuple(int(s) for s in shape.strip("()").split(",") if s)))
    return rows


def _filter_4x4() -> np.ndarray:
    f = np.array([1.0, 3.0, 3.0, 1.0])
    f = np.outer(f, f)
    return f / f.sum()


def _eqlr_value(key: str, shape: tuple[int, ...], u: np.ndarray) -> np.ndarray:
    """StyleGAN/EG3D layers store N(0,1)/lr_mul weights (the gain is applied at run time): weights std 1 (the
    discriminator's mapping, lr_mul 0.01: std 100), modulation biases 1 ± 0.1, other biases ± 0.1, standard
    [1,3,3,1] resampling filters, zero noise strength."""
    if key.endswith("resample_filter"):
        return _filter_4x4()
    if key.endswith("noise_strength"):
        return np.zeros(shape)
    if len(shape) >= 2:
        scale = 100.0 if key.startswith("mapping.fc") else 1.0
        return u * math.sqrt(3.0) * scale
    if key.endswith("affine.bias"):
        return 1.0 + 0.1 * u
    return 0.1 * u


def _torch_value(kind: str, key: str, shape: tuple[int, ...], u: np.ndarray) -> np.ndarray:
    """torch-init scales by module kind: conv/linear weights variance 1/fan_in, biases ± 0.1, BatchNorm
    weight 1 ± 0.1 (0.2 ± 0.02 on the last BatchNorm of an IR-SE residual branch, which keeps the 24 residual
    blocks from blowing up), running mean ± 0.1, running var 1 ± 0.1, PReLU 0.25 ± 0.05, LPIPS heads in [0, 0.2]."""
    if kind == "lpips_lin":
        return 0.1 * (1.0 + u)
    if kind == "bn":
        if key.endswith("running_var"):
            return 1.0 + 0.1 * u
        if key.endswith("weight"):
            return (0.2 + 0.02 * u) if ".res_layer.4." in key else 1.0 + 0.1 * u
        return 0.1 * u
    if kind == "prelu":
        return 0.25 + 0.05 * u
    if len(shape) >= 2:
        return u * math.sqrt(3.0 / (math.prod(shape) // shape[0]))
    return 0.1 * u


def _hashed(keys_shapes: list[tuple[str, tuple[int, ...]]], salt: int, value) -> dict[str, torch.Tensor]:
    out = {}
    for idx, (key, shape) in enumerate(keys_shapes):
        if key.endswith("num_batches_tracked"):
            out[key] = torch.tensor(0, dtype=torch.long)
            continue
        u = _uniform(math.prod(shape), salt + idx + 1).reshape(shape)
        out[key] = torch.from_numpy(np.asarray(value(key, shape, u), dtype=np.float32).reshape(shape).copy())
    return out


def encoder_dicts() -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(student 327 keys, teacher = the student's 170 Live3D keys)."""
    student = hashed_state_dict(read_keys("3dpe_encoder_state_dict"))
    teacher = {k: student[k] for k, _ in read_keys("live3d_LT_encoder_state_dict")}
    return student, teacher


FEATURE_STD = 0.14     # std of the plane-averaged triplane features of the recipe's encoders (triplane std ≈ 0.24)
DECODER_GAIN = 10.0    # the decoder's first layer, scaled so its hidden units respond to such features
SIGMA_INSIDE = 1.0     # mean raw density inside the volume (−4 where the planes are zero)
TORGB_GAIN = 0.3       # SR toRGB weights, so the 512² image stays near the raw image's range


def renderer_dict() -> dict[str, torch.Tensor]:
    """Renderer weights. The decoder's density row gets, on top of its hash, the component along E[hidden] −
    hidden(0) (Gauss-Hermite over features of std FEATURE_STD) that puts the mean raw sigma at SIGMA_INSIDE
    inside the volume, and its bias puts sigma at −4 where the features are zero: a volume neither empty nor
    opaque, and renders with structure."""
    sd = _hashed(read_keys("renderer_state_dict"), 10_000, _eqlr_value)
    w1, b1 = sd["decoder.net.0.weight"].double() * DECODER_GAIN, sd["decoder.net.0.bias"].double()
    w2, b2 = sd["decoder.net.2.weight"].double().clone(), sd["decoder.net.2.bias"].double().clone()
    hidden = w1.shape[0]
    s = FEATURE_STD * w1.norm(dim=1) / math.sqrt(w1.shape[1])
    x, wq = np.polynomial.hermite_e.hermegauss(40)
    x, wq = torch.from_numpy(x), torch.from_numpy(wq) / math.sqrt(2 * math.pi)
    mean_hidden = (torch.nn.functional.softplus(b1[:, None] + s[:, None] * x[None]) * wq).sum(1)
    hidden0 = torch.nn.functional.softplus(b1)
    d = mean_hidden - hidden0
    w2[0] = w2[0] + ((SIGMA_INSIDE + 4.0) * math.sqrt(hidden) - float(w2[0] @ d)) / float(d @ d) * d
    b2[0] = -4.0 - float(w2[0] @ hidden0) / math.sqrt(hidden)
    sd["decoder.net.0.weight"], sd["decoder.net.2.weight"], sd["decoder.net.2.bias"] = w1.float(), w2.float(), b2.float()
    for k in sd:
        if k.endswith("torgb.weight"):
            sd[k] = sd[k] * TORGB_GAIN
    return sd


def discriminator_dict() -> dict[str, torch.Tensor]:
    return _hashed(read_keys("dual_discriminator_editing_state_dict"), 20_000, _eqlr_value)


ALEXNET_FEATURES = [(0, 64, 3, 11), (3, 192, 64, 5), (6, 384, 192, 3), (8, 256, 384, 3), (10, 256, 256, 3)]
ALEXNET_CLASSIFIER = [(1, 4096, 9216), (4, 4096, 4096), (6, 1000, 4096)]
LPIPS_CHANNELS = [64, 192, 384, 256, 256]


def alexnet_dict() -> dict[str, torch.Tensor]:
    """torchvision AlexNet layout; the classifier (unused by LPIPS) is zero."""
    keys = []
    for i, o, c, k in ALEXNET_FEATURES:
        keys += [(f"features.{i}.weight", (o, c, k, k)), (f"features.{i}.bias", (o,))]
    sd = _hashed(keys, 30_000, lambda key, shape, u: _torch_value("conv", key, shape, u))
    for i, o, c in ALEXNET_CLASSIFIER:
        sd[f"classifier.{i}.weight"], sd[f"classifier.{i}.bias"] = torch.zeros(o, c), torch.zeros(o)
    return sd


def lpips_lin_dict() -> dict[str, torch.Tensor]:
    """The LPIPS linear heads in the PerceptualSimilarity v0.1 file layout (`alex_lin.pth`, lpips' `alex.pth`)."""
    keys = [(f"lin{k}.model.1.weight", (1, c, 1, 1)) for k, c in enumerate(LPIPS_CHANNELS)]
    return _hashed(keys, 40_000, lambda key, shape, u: _torch_value("lpips_lin", key, shape, u))


def ir_se50_dict() -> dict[str, torch.Tensor]:
    """IR-SE50 (`model_ir_se50.pth` layout: input_layer / body / output_layer), keys from models.arcface."""
    from models.arcface import IRSE50

    net = IRSE50()
    kinds = {}
    for name, mod in net.named_modules():
        kind = ("bn" if isinstance(mod, torch.nn.modules.batchnorm._BatchNorm)
                else "prelu" if isinstance(mod, torch.nn.PReLU) else "conv")
        for key in list(mod.state_dict(keep_vars=True)):
            if "." not in key:
                kinds[f"{name}.{key}" if name else key] = kind
    keys = [(k, tuple(v.shape)) for k, v in net.state_dict().items()]
    return _hashed(keys, 50_000, lambda key, shape, u: _torch_value(kinds[key], key, shape, u))


# ============================================================================================ batch
def mae_view(reference: torch.Tensor) -> torch.Tensor:
    """The reference as the original's MAE sees it: bicubic 224 (no antialiasing, as torchvision 0.14 on
    tensors), ImageNet-normalised. reference N×3×H×W in [-1,1] → N×3×224×224."""
    x = torch.nn.functional.interpolate((reference + 1) / 2, size=(224, 224), mode="bicubic", align_corners=False,
                                        antialias=False)
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    return (x - mean) / std


def recipe_batch() -> dict[str, Any]:
    """The batch and both cameras (tensors, float32)."""
    from utils.cameras import FOCAL_EG3D_LABEL, fov_to_focal_3dpe, look_at_cameras

    reference = pattern_image(BATCH, RESOLUTION, phase=1.0)
    p = MV_PARAMS
    mv = {k: torch.tensor([v], dtype=torch.float32) for k, v in p.items()}
    mv_camera = look_at_cameras(mv["yaw"], mv["pitch"], focal=fov_to_focal_3dpe(mv["fov"]), cx=mv["cx"], cy=mv["cy"])
    camera = look_at_cameras(INPUT_POSE["yaw"], INPUT_POSE["pitch"], focal=FOCAL_EG3D_LABEL)
    return {
        "input": pattern_image(BATCH, RESOLUTION, phase=0.3),
        "target": pattern_image(BATCH, RESOLUTION, phase=1.7),
        "reference": reference,
        "reference_mae": mae_view(reference),
        "camera": camera.expand(BATCH, 25).contiguous(),
        "mv_camera": mv_camera.expand(BATCH, 25).contiguous(),
        "mv_params": mv,
        "loss_weights": dict(LOSS_WEIGHTS),
        "recipe_version": RECIPE_VERSION,
    }


def write_recipe(directory: str | os.PathLike) -> Path:
    """Write every recipe file into `directory` (created); returns it."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    student, teacher = encoder_dicts()
    renderer = renderer_dict()
    torch.save({"encoder_state_dict": teacher, "renderer_state_dict": renderer, "step": LT_STEP}, d / "live3d_lt.pt")
    torch.save({"encoder_state_dict": student, "renderer_state_dict": renderer,
                "discriminator_state": discriminator_dict(), "step": 0}, d / "student_3dpe.pt")
    del student, teacher
    torch.save(alexnet_dict(), d / "alexnet-owt-4df8aa71.pth")
    torch.save(lpips_lin_dict(), d / "alex_lin.pth")
    torch.save(ir_se50_dict(), d / "model_ir_se50.pth")
    torch.save(recipe_batch(), d / "batch.pt")
    return d


# ============================================================================================ summaries
def summarize(t: torch.Tensor) -> dict[str, Any]:
    """A gradient, compactly: numel, max |g|, sum, sum |g| (float64) and SAMPLES values at a fixed stride."""
    flat = t.detach().reshape(-1).double()
    n = flat.numel()
    stride = max(1, n // SAMPLES)
    return {"numel": n, "max_abs": float(flat.abs().max()) if n else 0.0, "sum": float(flat.sum()),
            "abs_sum": float(flat.abs().sum()), "sample": flat[::stride][:SAMPLES].float().clone()}


def grad_agreement(ours: dict[str, dict], ref: dict[str, dict]) -> dict[str, Any]:
    """Per tensor: max |Δ| over the samples / max |g| of the reference (0 when both are below GRAD_FLOOR), and
    |Δ sum| / sum |g|. Returns {'per_tensor': {name: (sample_rel, sum_rel, max_rel)}, 'worst': ..., 'missing': ...}."""
    per = {}
    for name, r in ref.items():
        o = ours.get(name)
        if o is None:
            continue
        if r["max_abs"] < GRAD_FLOOR and o["max_abs"] < GRAD_FLOOR:
            per[name] = (0.0, 0.0, 0.0)
            continue
        denom = max(r["max_abs"], GRAD_FLOOR)
        d = float((o["sample"].double() - r["sample"].double()).abs().max()) / denom
        s = abs(o["sum"] - r["sum"]) / max(r["abs_sum"], GRAD_FLOOR)
        m = abs(o["max_abs"] - r["max_abs"]) / denom
        per[name] = (d, s, m)
    worst = max(per.items(), key=lambda kv: max(kv[1]))[0] if per else None
    return {"per_tensor": per, "worst": worst,
            "missing": sorted(set(ref) ^ set(ours))}


def relative(a: float, b: float) -> float:
    """|a − b| / |b| (|a − b| when b is 0)."""
    return abs(a - b) / abs(b) if b != 0 else abs(a - b)


def load_parity_reference() -> dict | None:
    """The original code's values for this recipe, or None: `$THREEDPE_TRAINING_PARITY`, else
    `<reference>/fixtures/training_parity.pt` (`$THREEDPE_REFERENCE`, default ../shared/reference)."""
    env = os.environ.get("THREEDPE_TRAINING_PARITY")
    ref = Path(os.environ.get("THREEDPE_REFERENCE",
                              str(Path(__file__).resolve().parents[2] / "shared" / "reference")))
    for path in ([Path(env)] if env else []) + [ref / "fixtures" / "training_parity.pt"]:
        if path.is_file():
            return torch.load(path, map_location="cpu", weights_only=True)
    return None


# ============================================================================================ our step
def parity_config(directory: str | os.PathLike, exp_dir: str | os.PathLike, device: str = "cpu") -> Any:
    """Our TrainConfig for the recipe on `device`, with the keys that select the original's behaviour."""
    from training.config import TrainConfig
    from utils.config import load_config

    d = Path(directory)
    w = LOSS_WEIGHTS
    overrides = [
        f"exp_dir={exp_dir}", "name=parity", f"device={device}", "seed=42", "bf16=false", "export_3dpe=false",
        f"model.init_checkpoint={d / 'live3d_lt.pt'}", f"model.student_checkpoint={d / 'student_3dpe.pt'}",
        "model.mae_pretrain=", "model.frozen_dropout=false", "model.render_chunk=0",
        *[f"loss.{k}={v}" for k, v in w.items()], "loss.r1_gamma=1.0", "loss.multiview=true",
        "loss.one_camera_per_batch=true", f"loss.weights_dir={d}",
        "optim.lr=1e-4", "optim.weight_decay=0.01", "optim.lr_d=1e-5", "optim.grad_clip=0.0",
        "gan.enabled=true", "gan.start_step=0",
        f"data.batch_size={BATCH}", "data.workers=0", "data.val_root=", "data.val_fraction=0.0",
        "log.tqdm=false",
    ]
    return load_config(TrainConfig, None, overrides)


class _OneBatch(torch.utils.data.Dataset):
    def __init__(self, batch: dict[str, Any]):
        self.items = [{"input": batch["input"][i], "target": batch["target"][i], "reference": batch["reference"][i],
                       "camera": batch["camera"][i], "instruction": ""} for i in range(batch["input"].shape[0])]

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return self.items[i]


def our_training_step(directory: str | os.PathLike, exp_dir: str | os.PathLike,
                      device: str | torch.device = "cpu") -> dict[str, Any]:
    """Run one step of OUR training code (build_training, then training.train.train_step) on the recipe written
    in `directory`, on `device` (benchmarks/gpu_check.py compares CUDA with CPU). Returns {'terms': {name: float}, 'student_grads': {param: summary},
    'discriminator_grads': {param: summary}, 'mv_camera': tensor} in the fixture's layout."""
    import contextlib

    from training.setup import build_training, set_modes
    from training.train import train_step

    d = Path(directory)
    batch = torch.load(d / "batch.pt", weights_only=True)
    cfg = parity_config(d, exp_dir, str(device))
    s = build_training(cfg, train_set=_OneBatch(batch))
    lins = torch.load(d / "alex_lin.pth", weights_only=True)   # our LPIPS heads ship with `lpips`: set them
    for k in range(len(LPIPS_CHANNELS)):
        getattr(s.loss_fn.lpips, f"lin{k}").model[1].weight.data.copy_(lins[f"lin{k}.model.1.weight"].to(s.device))
    set_modes(s.encoder, list(cfg.model.trainable), cfg.model.frozen_dropout, teacher=s.teacher)
    s.D.train()

    captured: dict[str, dict] = {}
    names_g = {id(p): n for n, p in s.encoder.named_parameters()}

    def grab_g(opt, args, kwargs):
        captured["student_grads"] = {names_g[id(p)]: summarize(p.grad.cpu()) for p in s.trainable if p.grad is not None}

    def grab_d(opt, args, kwargs):
        captured["discriminator_grads"] = {n: summarize(p.grad.cpu()) for n, p in s.D.named_parameters()
                                           if p.grad is not None}

    def grab_real_logits(module, args, output):  # D's first call in the step is on the real pair
        captured.setdefault("real_logits", output.detach())

    hooks = [s.opt_g.register_step_pre_hook(grab_g), s.opt_d.register_step_pre_hook(grab_d),
             s.D.register_forward_hook(grab_real_logits)]
    b = {k: batch[k].to(s.device) for k in ("input", "target", "reference", "camera")}
    cams = torch.cat([batch["camera"], batch["mv_camera"]]).to(s.device)
    out = train_step(s, cfg, b, cams, 0, contextlib.nullcontext, deterministic=True)
    for h in hooks:
        h.remove()
    terms = {k: float(v.detach()) for k, v in out.terms.items()}
    terms["total"] = float(out.loss.detach())
    gamma = cfg.loss.r1_gamma
    terms["D_gt"] = float(torch.nn.functional.softplus(-captured.pop("real_logits")).mean())
    terms["D_r1"] = gamma / 2 * float(out.logs["D/r1"])
    terms["D_gen"] = float(out.logs["D/loss_fake"])
    return {"terms": terms, **captured, "mv_camera": batch["mv_camera"]}


def compare(ours: dict[str, Any], ref: dict[str, Any]) -> dict[str, Any]:
    """Per-term (ours, original, relative difference) and the gradient agreement of both groups."""
    terms = {our: (ours["terms"][our], ref["terms"][orig], relative(ours["terms"][our], ref["terms"][orig]))
             for orig, our in TERM_NAMES.items() if orig in ref["terms"] and our in ours["terms"]}
    return {"terms": terms,
            "student_grads": grad_agreement(ours["student_grads"], ref["student_grads"]),
            "discriminator_grads": grad_agreement(ours["discriminator_grads"], ref["discriminator_grads"])}


def format_report(rep: dict[str, Any]) -> str:
    lines = [f"{'term':16s} {'ours':>16s} {'original':>16s} {'rel diff':>10s}"]
    for k, (o, r, rel) in rep["terms"].items():
        lines.append(f"{k:16s} {o:16.9g} {r:16.9g} {rel:10.2e}")
    for group in ("student_grads", "discriminator_grads"):
        g = rep[group]
        per = g["per_tensor"]
        if per:
            worst = g["worst"]
            lines.append(f"{group}: {len(per)} tensors, worst {worst} sample {per[worst][0]:.2e} "
                         f"sum {per[worst][1]:.2e} max {per[worst][2]:.2e}; "
                         f"max over tensors {max(max(v) for v in per.values()):.2e}; missing {g['missing'][:5]}")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    if sys.argv[1:2] == ["write"]:
        print(write_recipe(sys.argv[2]))
    elif sys.argv[1:2] == ["ours"]:
        import tempfile

        with tempfile.TemporaryDirectory() as tmp:
            res = our_training_step(sys.argv[2], tmp)
        torch.save(res, sys.argv[3])
        for k, v in res["terms"].items():
            print(f"{k:16s} {v:.9g}")
        ref = load_parity_reference() if len(sys.argv) < 5 else torch.load(sys.argv[4], weights_only=True)
        if ref is not None:
            print(format_report(compare(res, ref)))
    else:
        sys.exit("usage: training_parity.py write DIR | ours DIR OUT.pt [REFERENCE.pt]")
