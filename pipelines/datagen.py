"""Training-data generation: portraits (EG3D samples or aligned photos) edited by InstructPix2Pix.

Writes the original 3DPE dataset layout, so the released dataset and ours are interchangeable::

    OUT/dataset.json                 {"labels": [["<dir>/<file>.png", [25 floats]], ...]}  one per input
    OUT/<dir>/<file>.png             inputs (no '_' in <dir> or <file>)
    OUT/<dir>_<style>/<file>.png     the kept (best CLIP-scored) edit per (input, style)
    OUT/manifest.<rank>.jsonl        every variant tried, with scores and kept/filtered flags (per rank)
    OUT/labels.<rank>.jsonl          the camera label (and seed) of every input a rank wrote
    OUT/manifest.jsonl               all ranks' manifests merged (rank 0, at the end; `--merge-only`)
    OUT/latents/<dir>/<file>.npz     optional: z, ws, camera and seed to re-render an EG3D sample
    OUT/summary.json                 counts of the last run (done, skipped, filtered, failed)

Work is sharded by input (input i → rank i mod WORLD_SIZE), every file is written atomically
(temporary name + os.replace), and a unit (input, style) is finished once its manifest lines are
written, so a killed job rerun with the same config resumes without redoing or duplicating work.

    python -m pipelines.datagen --config configs/datagen.yaml source.seeds=0-9999 output_dir=data/ours
    torchrun --nproc_per_node=8 -m pipelines.datagen --config configs/datagen.yaml
    python -m pipelines.datagen --config configs/datagen.yaml --merge-only
"""
from __future__ import annotations

import datetime
import json
import logging
import os
import sys
import time
import traceback
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Literal, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from datasets.layout import EditType, load_vocabulary, read_dataset_labels, read_jsonl
from utils.atomic import atomic_write
from utils.config import load_config, parse_seeds, save_config
from utils.device import resolve_device
from utils.errors import ConfigError

log = logging.getLogger("datagen")

TINY = "tiny-random"  # model name that builds a tiny random model (tests, benchmarks)


# ----------------------------------------------------------------------------------------- config
@dataclass
class SourceConfig:
    """Where the portraits come from."""

    kind: Literal["eg3d", "photos"] = "eg3d"
    network: str = "pretrained_models/ffhqrebalanced512-128.pkl"  # EG3D checkpoint; "tiny-random" for tests
    seeds: str = "0-999"  # ranges and single seeds: "0-999", "0-9,100,200-299"
    truncation_psi: float = 0.7
    truncation_cutoff: int | None = 14
    camera: Literal["random-training", "frontal"] = "random-training"  # random-training: one draw per sample
    camera_seed: int = 0  # the camera of seed s is drawn from a generator seeded with camera_seed + s
    photos_dir: str = ""  # kind=photos: aligned portraits + dataset.json (EG3D label format)
    resolution: int = 512  # photos are resized to this when they differ
    dir_name: str = "eg3d"  # input folder name (no '_'); photos: "photos" is a good choice
    files_per_dir: int = 0  # >0: inputs go to <dir_name>00000, <dir_name>00001, ... (this many each)
    keep_latents: bool = False  # EG3D: save z, ws, camera, seed under OUT/latents/


@dataclass
class EditConfig:
    """InstructPix2Pix settings; every combination of the lists below is one variant per (input, style)."""

    vocabulary: str = "configs/edit_vocabulary.yaml"
    edit_types: list[str] = field(default_factory=lambda: ["all"])  # names from the vocabulary, or ["all"]
    instructions_per_edit: int = 1  # phrasings drawn per (input, style), without replacement
    model: str = "timbrooks/instruct-pix2pix"  # hub id or local folder; "tiny-random" for tests
    steps: int = 20
    guidance_scales: list[float] = field(default_factory=lambda: [7.5])
    image_guidance_scales: list[float] = field(default_factory=lambda: [1.5])
    seeds_per_variant: int = 1
    seed: int = 0  # base of the per-(input, style, variant) diffusion seeds
    resolution: int = 512  # InstructPix2Pix working resolution


@dataclass
class FilterConfig:
    """CLIP filtering of failed edits (the InstructPix2Pix paper's idea)."""

    enabled: bool = True
    clip_model: str = "ViT-B-16"  # open_clip name; "tiny-random" for tests
    clip_pretrained: str | None = None  # local open_clip weights file (see docs/prompts.md)
    min_directional: float = 0.15  # cos(image change, caption change)
    min_image_similarity: float = 0.7  # cos(source image, edit) — the edit must keep the identity
    on_all_filtered: Literal["skip", "keep-best"] = "skip"  # skip: no edit written; keep-best: the best one anyway


@dataclass
class DatagenConfig:
    source: SourceConfig = field(default_factory=SourceConfig)
    edit: EditConfig = field(default_factory=EditConfig)
    filter: FilterConfig = field(default_factory=FilterConfig)
    output_dir: str = "data/3dpe_ours/train"
    batch_size: int = 4  # inputs handled per step (per model call too when batch_invariant is false)
    batch_invariant: bool = True  # model calls one sample at a time: outputs independent of batching and sharding
    threads: int = 1  # torch intra-op CPU threads per rank (torch.set_num_threads); 0 = leave the launcher's
    device: str = "auto"  # auto → cuda:LOCAL_RANK when CUDA is present, else cpu
    fp16: bool = True  # fp16 InstructPix2Pix on CUDA (ignored on CPU)
    distributed: Literal["auto", "off"] = "auto"  # auto: init a process group when WORLD_SIZE>1 and MASTER_ADDR is set
    dist_timeout_hours: float = 72.0  # how long finished ranks wait for the others at the final barrier
    progress: bool = True  # tqdm bar on rank 0


# ------------------------------------------------------------------------------------ vocabulary
def select_edit_types(vocab: dict[str, EditType], names: Sequence[str]) -> list[EditType]:
    if not names or list(names) == ["all"]:
        return list(vocab.values())
    unknown = [n for n in names if n not in vocab]
    if unknown:
        raise ConfigError(f"unknown edit types {unknown}; known: {', '.join(vocab)}")
    return [vocab[n] for n in dict.fromkeys(names)]


# ----------------------------------------------------------------------------------- small utils
def stable_seed(*parts: Any) -> int:
    """A 31-bit seed from strings/ints, identical across processes and Python versions."""
    return zlib.crc32("|".join(str(p) for p in parts).encode()) & 0x7FFFFFFF


def _atomic_write_bytes(path: Path, data: bytes) -> None:
    with atomic_write(path, "wb", fsync=True) as fh:
        fh.write(data)


def _append_lines(path: Path, records: Iterable[dict]) -> None:
    """Append JSON lines in one write; a kill can at worst leave one torn last line (dropped on reload)."""
    data = "".join(json.dumps(r, sort_keys=True) + "\n" for r in records)
    if not data:
        return
    with open(path, "a", encoding="utf-8") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())


def _repair_jsonl(path: Path) -> list[dict]:
    """Drop torn lines from this rank's own jsonl (rewritten atomically) so appends stay well-formed."""
    recs = read_jsonl(path)
    if path.is_file():
        text = "".join(json.dumps(r, sort_keys=True) + "\n" for r in recs)
        if text != path.read_text(encoding="utf-8"):
            _atomic_write_bytes(path, text.encode())
    return recs


def _is_temp_file(p: Path) -> bool:
    return p.name.startswith(".") and (p.name.endswith(".tmp") or p.name.endswith(".tmp.png"))


def _remove_temp_files(paths: Iterable[Path]) -> int:
    n = 0
    for p in paths:
        try:
            p.unlink()
            n += 1
        except OSError:
            pass
    return n


def _stale_temps_for(target: Path) -> list[Path]:
    """Leftover temporaries of `target` (save_png: .<stem>.*.tmp.png; ours: .<name>.*.tmp)."""
    if not target.parent.is_dir():
        return []
    return [p for p in target.parent.glob(f".{target.stem}.*") if _is_temp_file(p)] + [
        p for p in target.parent.glob(f".{target.name}.*") if _is_temp_file(p)
    ]


# ------------------------------------------------------------------------------------ distributed
@dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    group: bool = False  # a torch.distributed process group was initialised here


def init_distributed(mode: str = "auto", device: torch.device | None = None, timeout_hours: float = 72.0) -> DistInfo:
    """Rank info from RANK/WORLD_SIZE/LOCAL_RANK; a gloo (CPU) or NCCL (CUDA) group when launched by torchrun.

    Without MASTER_ADDR (e.g. a SLURM array setting RANK/WORLD_SIZE only) each rank works alone:
    no barrier and no merge, run `--merge-only` when all shards are finished.
    """
    rank = int(os.environ.get("RANK", "0"))
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if world < 1 or not 0 <= rank < world:
        raise ConfigError(f"bad RANK={rank} / WORLD_SIZE={world}")
    info = DistInfo(rank, world, local, False)
    if mode == "off" or world == 1 or "MASTER_ADDR" not in os.environ:
        return info
    import torch.distributed as dist

    if not dist.is_initialized():
        backend = "nccl" if device is not None and device.type == "cuda" else "gloo"
        # ranks may finish hours apart (unequal shards, resumed runs): wait long at the final barrier
        dist.init_process_group(backend=backend, init_method="env://", timeout=datetime.timedelta(hours=timeout_hours))
        info.group = True
    return info


def _barrier(info: DistInfo) -> None:
    if info.world_size > 1:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.barrier()


def _gather_summaries(info: DistInfo, summary: dict) -> list[dict]:
    import torch.distributed as dist

    if info.world_size > 1 and dist.is_initialized():
        out: list[Any] = [None] * info.world_size
        dist.all_gather_object(out, summary)
        return out
    return [summary]


# ------------------------------------------------------------------------------------------ inputs
@dataclass
class InputItem:
    """One portrait: where it goes (`rel` = '<dir>/<file>.png') and how to make it."""

    index: int
    rel: str
    seed: int | None = None  # EG3D
    photo: Path | None = None  # photos
    label: list[float] | None = None  # photos: the label from the source dataset.json


def _dir_for(cfg: SourceConfig, key: int) -> str:
    if cfg.files_per_dir > 0:
        return f"{cfg.dir_name}{key // cfg.files_per_dir:05d}"
    return cfg.dir_name


def enumerate_inputs(cfg: SourceConfig) -> list[InputItem]:
    """The full, ordered list of inputs (identical on every rank)."""
    if "_" in cfg.dir_name or "/" in cfg.dir_name or not cfg.dir_name:
        raise ConfigError(f"source.dir_name '{cfg.dir_name}' must be non-empty without '_' or '/'")
    if cfg.kind == "eg3d":
        seeds = parse_seeds(cfg.seeds, what="source.seeds")
        return [InputItem(i, f"{_dir_for(cfg, s)}/seed{s:07d}.png", seed=s) for i, s in enumerate(seeds)]
    # kind 'photos' (SourceConfig.kind admits no other value; checked when the config loads)
    root = Path(cfg.photos_dir)
    labels = read_dataset_labels(root / "dataset.json")
    items, seen = [], {}
    for i, rel in enumerate(sorted(labels)):
        path = root / rel
        if not path.is_file() and not path.suffix:
            path = next((q for q in sorted(path.parent.glob(path.name + ".*"))), path)
        stem = Path(rel).with_suffix("").as_posix() if Path(rel).suffix else rel
        name = stem.replace("/", "-").replace("_", "-").replace(" ", "-")
        out_rel = f"{_dir_for(cfg, i)}/{name}.png"
        if out_rel in seen:
            raise ConfigError(f"photos '{rel}' and '{seen[out_rel]}' map to the same output name '{out_rel}'")
        seen[out_rel] = rel
        items.append(InputItem(i, out_rel, photo=path, label=labels[rel]))
    return items


def shard(items: Sequence[InputItem], rank: int, world_size: int) -> list[InputItem]:
    """Input i goes to rank i mod world_size: disjoint shards whose union is everything."""
    return [it for it in items if it.index % world_size == rank]


# ------------------------------------------------------------------------------------- components
@dataclass
class Components:
    """The models a run needs; tests and benchmarks may pass prebuilt ones to `main`."""

    generator: Any = None  # TriPlaneGenerator (EG3D source)
    editor: Any = None  # InstructPix2PixEditor
    scorer: Any = None  # ClipScorer (filter.enabled)


def build_generator(cfg: SourceConfig, device: torch.device) -> torch.nn.Module:
    """EG3D generator from `cfg.network` (any format models.checkpoint reads), or a tiny random one."""
    if cfg.network == TINY:
        from models.eg3d.config import GeneratorConfig
        from models.eg3d.generator import TriPlaneGenerator

        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            gen = TriPlaneGenerator(GeneratorConfig.tiny())
    else:
        from models.checkpoint import load_eg3d_generator

        return load_eg3d_generator(cfg.network, device)
    return gen.to(device).eval().requires_grad_(False)


def build_editor(cfg: EditConfig, device: torch.device, fp16: bool, batch_size: int = 4) -> Any:
    """The InstructPix2Pix wrapper (pipelines/instruct_pix2pix.py); fp16 on CUDA when `fp16`."""
    from pipelines import instruct_pix2pix as ip2p

    dtype = "fp16" if (fp16 and device.type == "cuda") else "fp32"
    icfg = ip2p.InstructPix2PixConfig(model=cfg.model, steps=cfg.steps, resolution=cfg.resolution, dtype=dtype,
                                      seed=cfg.seed, batch_size=max(1, batch_size))
    if cfg.model == TINY:
        return ip2p.InstructPix2PixEditor.from_pipeline(ip2p.build_tiny_instruct_pix2pix(device=device), icfg)
    return ip2p.InstructPix2PixEditor(icfg, device=device)


def build_scorer(cfg: FilterConfig, device: torch.device) -> Any:
    """CLIP scorer (pipelines/clip_scores.py) from local open_clip weights, or a tiny random one."""
    from pipelines.clip_scores import ClipScorer

    if cfg.clip_model == TINY:
        from models.editing.clip_prompt import build_open_clip, tiny_open_clip_config

        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            model = build_open_clip(model_cfg=tiny_open_clip_config())
        return ClipScorer.from_model(model, device=device)
    return ClipScorer(model_name=cfg.clip_model, pretrained=cfg.clip_pretrained, device=device)


# ------------------------------------------------------------------------------------ the worker
def _one_at_a_time(fn: Callable[[slice], Any], n: int, per_sample: bool) -> Any:
    """`fn(slice(0, n))`, or, with `per_sample`, `fn` on each sample's slice and the results concatenated.

    Convolutions and matrix products pick their blocking (hence their summation order) by batch shape, so
    a sample's result can change in the last bit with what else is in its batch; one sample per call makes
    it depend on that sample alone. `fn` returns a tensor with the batch first, or a dict of such tensors.
    """
    if not per_sample or n <= 1:
        return fn(slice(0, n))
    parts = [fn(slice(i, i + 1)) for i in range(n)]
    if isinstance(parts[0], dict):
        return {k: torch.cat([p[k] for p in parts]) for k in parts[0]}
    return torch.cat(parts)


@torch.inference_mode()
def render_eg3d(gen: torch.nn.Module, items: Sequence[InputItem], cfg: SourceConfig, device: torch.device) -> dict:
    """Render the EG3D inputs of `items` → {'images': B×3×H×W [-1,1] (cpu), 'cameras': B×25, 'z', 'ws'}.

    z = RandomState(seed).randn(z_dim); the camera of each sample is its own draw (seeded by
    camera_seed + seed) from the training pose distribution, or frontal; it is both the mapping's
    pose condition and the rendering camera, so a sample's inputs do not depend on batch composition (its
    pixels can, by float rounding; `_Worker` renders one sample per call when `batch_invariant`).
    """
    from utils import cameras as cams

    z_dim = int(gen.config.z_dim)
    z = torch.from_numpy(np.stack([np.random.RandomState(it.seed).randn(z_dim) for it in items])).float()
    cs = []
    for it in items:
        if cfg.camera == "frontal":
            cs.append(cams.frontal_camera().reshape(1, 25).float())
        else:  # random-training
            g = torch.Generator().manual_seed(cfg.camera_seed + int(it.seed))
            cs.append(cams.sample_training_cameras(1, generator=g).reshape(1, 25).float())
    c = torch.cat(cs)
    ws = gen.mapping(z.to(device), c.to(device), truncation_psi=cfg.truncation_psi, truncation_cutoff=cfg.truncation_cutoff)
    out = gen.synthesis(ws, c.to(device), noise_mode="const", deterministic=True)
    return {"images": out["image"].float().clamp(-1, 1).cpu(), "cameras": c, "z": z, "ws": ws.float().cpu()}


def _load_input(path: Path, resolution: int | None) -> torch.Tensor:
    from utils.image_io import load_image, pil_to_tensor

    img = load_image(path)
    if resolution and img.size != (resolution, resolution):
        from PIL import Image

        img = img.resize((resolution, resolution), Image.Resampling.LANCZOS)
    return pil_to_tensor(img)[0]


@dataclass
class Variant:
    slot: int  # which of the per-(input, style) drawn instructions
    guidance_scale: float
    image_guidance_scale: float
    seed_index: int


def _variants(cfg: EditConfig) -> list[Variant]:
    return [
        Variant(k, float(g), float(ig), s)
        for k in range(max(1, cfg.instructions_per_edit))
        for g in cfg.guidance_scales
        for ig in cfg.image_guidance_scales
        for s in range(max(1, cfg.seeds_per_variant))
    ]


def _instructions_for(rel: str, et: EditType, n: int, base_seed: int) -> list[str]:
    rng = np.random.RandomState(stable_seed("instr", base_seed, rel, et.name))
    order = rng.permutation(len(et.instructions))
    return [et.instructions[order[k % len(order)]] for k in range(max(1, n))]


def _unit_key(rel: str, style: str) -> tuple[str, str]:
    return (rel, style)


def edit_path(rel: str, style: str) -> str:
    """'<dir>/<file>.png' + style → '<dir>_<style>/<file>.png' (the original 3DPE naming)."""
    d, f = rel.split("/", 1)
    return f"{d}_{style}/{f}"


class _Worker:
    def __init__(self, cfg: DatagenConfig, comps: Components, dist: DistInfo, device: torch.device,
                 on_unit_done: Callable[[dict], None] | None):
        self.cfg, self.c, self.dist, self.device, self.hook = cfg, comps, dist, device, on_unit_done
        self.out = Path(cfg.output_dir)
        self.manifest_path = self.out / f"manifest.{dist.rank}.jsonl"
        self.labels_path = self.out / f"labels.{dist.rank}.jsonl"
        self.counts = {"done": 0, "skipped": 0, "filtered": 0, "failed": 0, "variants": 0,
                       "variants_filtered": 0, "inputs_written": 0}
        self.edit_seconds = 0.0

    # --- state recovered from previous runs (any rank's files, so a changed world size still resumes)
    def load_state(self) -> None:
        _repair_jsonl(self.manifest_path)
        _repair_jsonl(self.labels_path)
        status: dict[tuple[str, str], str] = {}
        kept_output: dict[tuple[str, str], str] = {}
        for p in self.out.glob("manifest.*.jsonl"):
            for r in read_jsonl(p):
                if r.get("unit_status") in ("kept", "filtered"):
                    key = _unit_key(r["input"], r["edit_type"])
                    status[key] = r["unit_status"]
                    if r.get("kept") and r.get("output"):
                        kept_output[key] = r["output"]
        # a kept unit whose edit file has gone since (deleted by hand) is redone
        self.finished: set[tuple[str, str]] = {
            k for k, s in status.items() if s == "filtered" or (k in kept_output and (self.out / kept_output[k]).is_file())}
        self.labels: dict[str, dict] = {}
        for p in self.out.glob("labels.*.jsonl"):
            for r in read_jsonl(p):
                self.labels[r["path"]] = r

    def input_done(self, rel: str) -> bool:
        return rel in self.labels and (self.out / rel).is_file()

    def run(self, items: list[InputItem], edit_types: list[EditType], bar: Any) -> None:
        bs = max(1, self.cfg.batch_size)
        for start in range(0, len(items), bs):
            batch = items[start:start + bs]
            todo = {it.rel: [et for et in edit_types if _unit_key(it.rel, et.name) not in self.finished] for it in batch}
            n_skip = sum(len(edit_types) - len(v) for v in todo.values())
            self.counts["skipped"] += n_skip
            if bar is not None and n_skip:
                bar.update(n_skip)
            need = [it for it in batch if todo[it.rel] or not self.input_done(it.rel)]
            if not need:
                continue
            try:
                images = self.prepare_inputs(need)
            except Exception:  # noqa: BLE001 - count, log and go on; a rerun retries
                n = sum(len(todo[it.rel]) for it in need)
                log.error("rank %d: inputs %s failed:\n%s", self.dist.rank, [it.rel for it in need], traceback.format_exc())
                self.counts["failed"] += n
                if bar is not None:
                    bar.update(n)
                continue
            for et in edit_types:
                sub = [i for i, it in enumerate(need) if et in todo[it.rel]]
                if sub:
                    self.edit_units([need[i] for i in sub], images[sub], et, bar)

    def prepare_inputs(self, items: list[InputItem]) -> torch.Tensor:
        """Input images B×3×H×W in [-1,1]; writes the input PNG and its label line when missing."""
        from utils.image_io import save_png

        src = self.cfg.source
        imgs: list[torch.Tensor | None] = [None] * len(items)
        for i, it in enumerate(items):  # reuse what a previous run wrote (identical bytes → identical edits)
            if self.input_done(it.rel):
                imgs[i] = _load_input(self.out / it.rel, None)
        missing = [i for i, x in enumerate(imgs) if x is None]
        if missing:
            new_labels = []
            if src.kind == "eg3d":
                todo = [items[i] for i in missing]
                r = _one_at_a_time(lambda sl: render_eg3d(self.c.generator, todo[sl], src, self.device), len(todo),
                                   self.cfg.batch_invariant)
                for j, i in enumerate(missing):
                    it = items[i]
                    for t in _stale_temps_for(self.out / it.rel):
                        t.unlink(missing_ok=True)
                    save_png(self.out / it.rel, r["images"][j])
                    imgs[i] = _load_input(self.out / it.rel, None)  # the quantised image, as a rerun would see it
                    rec = {"path": it.rel, "label": [float(v) for v in r["cameras"][j].tolist()], "seed": it.seed,
                           "source": "eg3d", "truncation_psi": src.truncation_psi}
                    if src.keep_latents:
                        lat = self.out / "latents" / Path(it.rel).with_suffix(".npz")
                        import io

                        buf = io.BytesIO()
                        np.savez(buf, z=r["z"][j].numpy(), ws=r["ws"][j].numpy(), camera=r["cameras"][j].numpy(),
                                 seed=np.int64(it.seed), truncation_psi=np.float32(src.truncation_psi),
                                 truncation_cutoff=np.int64(-1 if src.truncation_cutoff is None else src.truncation_cutoff))
                        _atomic_write_bytes(lat, buf.getvalue())
                        rec["latents"] = lat.relative_to(self.out).as_posix()
                    new_labels.append(rec)
            else:
                for i in missing:
                    it = items[i]
                    x = _load_input(it.photo, src.resolution)
                    save_png(self.out / it.rel, x)
                    imgs[i] = _load_input(self.out / it.rel, None)
                    new_labels.append({"path": it.rel, "label": it.label, "source": "photos",
                                       "photo": str(it.photo)})
            _append_lines(self.labels_path, new_labels)
            for rec in new_labels:
                self.labels[rec["path"]] = rec
            self.counts["inputs_written"] += len(new_labels)
        return torch.stack([x for x in imgs if x is not None])

    def edit_units(self, items: list[InputItem], images: torch.Tensor, et: EditType, bar: Any) -> None:
        """All variants of style `et` for `items`; score, keep the best, write the edit and manifest lines."""
        from utils.image_io import save_png

        ecfg, fcfg = self.cfg.edit, self.cfg.filter
        variants = _variants(ecfg)
        instr = {it.rel: _instructions_for(it.rel, et, ecfg.instructions_per_edit, ecfg.seed) for it in items}
        n = len(items)
        per_sample = self.cfg.batch_invariant
        try:
            edits, dscores, iscores, seeds = [], [], [], []
            for v in variants:
                vs = [stable_seed("edit", ecfg.seed, it.rel, et.name, v.slot, v.seed_index) for it in items]
                prompts = [instr[it.rel][v.slot] for it in items]

                def edit(sl: slice, v: Variant = v, vs: list[int] = vs, prompts: list[str] = prompts) -> torch.Tensor:
                    out = self.c.editor(images[sl].to(self.device), prompts[sl], seeds=vs[sl],
                                        guidance_scale=v.guidance_scale, image_guidance_scale=v.image_guidance_scale,
                                        steps=ecfg.steps)
                    out = out.float().clamp(-1, 1).cpu()
                    if out.shape[-2:] != images.shape[-2:]:
                        out = F.interpolate(out, size=images.shape[-2:], mode="bilinear", antialias=True,
                                            align_corners=False).clamp(-1, 1)
                    return out

                t0 = time.perf_counter()
                out = _one_at_a_time(edit, n, per_sample)
                self.edit_seconds += time.perf_counter() - t0
                edits.append(out)
                seeds.append(vs)
                if fcfg.enabled:
                    def scores(sl: slice, out: torch.Tensor = out) -> dict[str, torch.Tensor]:
                        k = len(range(n)[sl])
                        with torch.inference_mode():
                            d = self.c.scorer.directional_similarity(images[sl], out[sl], [et.source_caption] * k,
                                                                     [et.target_caption] * k)
                            s = self.c.scorer.image_similarity(images[sl], out[sl])
                        return {"d": torch.as_tensor(d).float().cpu().reshape(k),
                                "s": torch.as_tensor(s).float().cpu().reshape(k)}

                    sc = _one_at_a_time(scores, n, per_sample)
                    dscores.append(sc["d"])
                    iscores.append(sc["s"])
        except Exception:  # noqa: BLE001 - count, log and go on; a rerun retries these units
            log.error("rank %d: %s on %s failed:\n%s", self.dist.rank, et.name, [it.rel for it in items], traceback.format_exc())
            self.counts["failed"] += n
            if bar is not None:
                bar.update(n)
            return
        for i, it in enumerate(items):
            recs = []
            for k, v in enumerate(variants):
                d = float(dscores[k][i]) if fcfg.enabled else None
                s = float(iscores[k][i]) if fcfg.enabled else None
                passed = (not fcfg.enabled) or (d >= fcfg.min_directional and s >= fcfg.min_image_similarity)
                recs.append({"input": it.rel, "edit_type": et.name, "instruction": instr[it.rel][v.slot],
                             "variant": k, "num_variants": len(variants), "seed": seeds[k][i],
                             "guidance_scale": v.guidance_scale, "image_guidance_scale": v.image_guidance_scale,
                             "steps": ecfg.steps, "clip_directional": d, "clip_image": s, "passed": passed,
                             "kept": False, "output": None, "rank": self.dist.rank})
            passing = [k for k, r in enumerate(recs) if r["passed"]]
            pool = passing or (list(range(len(recs))) if fcfg.on_all_filtered == "keep-best" else [])
            best = max(pool, key=lambda k: (recs[k]["clip_directional"] or 0.0, -k)) if pool else None
            out_rel = edit_path(it.rel, et.name)
            for t in _stale_temps_for(self.out / out_rel):
                t.unlink(missing_ok=True)
            if best is not None:
                save_png(self.out / out_rel, edits[best][i])
                recs[best]["kept"] = True
                recs[best]["output"] = out_rel
            status = "kept" if best is not None else "filtered"
            for r in recs:
                r["unit_status"] = status
            _append_lines(self.manifest_path, recs)
            self.finished.add(_unit_key(it.rel, et.name))
            self.counts["variants"] += len(recs)
            self.counts["variants_filtered"] += sum(not r["passed"] for r in recs)
            self.counts["done" if best is not None else "filtered"] += 1
            if bar is not None:
                bar.update(1)
            if self.hook is not None:
                self.hook({"input": it.rel, "edit_type": et.name, "status": status, "rank": self.dist.rank})


# ------------------------------------------------------------------------------------------ merge
def merge_outputs(output_dir: str | os.PathLike) -> dict:
    """Merge `manifest.*.jsonl` → `manifest.jsonl` and `labels.*.jsonl` → `dataset.json`; remove stray temporaries.

    Idempotent: it can run any number of times, also while nothing else writes, e.g. after a SLURM array.
    Returns {'inputs', 'variants', 'kept', 'filtered_units', 'temp_removed'}.
    """
    out = Path(output_dir)
    variants: dict[tuple, dict] = {}
    for p in sorted(out.glob("manifest.*.jsonl")):
        for r in read_jsonl(p):
            variants[(r["input"], r["edit_type"], r.get("variant", 0))] = r
    rows = [variants[k] for k in sorted(variants)]
    _atomic_write_bytes(out / "manifest.jsonl", "".join(json.dumps(r, sort_keys=True) + "\n" for r in rows).encode())
    labels: dict[str, list[float]] = {}
    for p in sorted(out.glob("labels.*.jsonl")):
        for r in read_jsonl(p):
            if (out / r["path"]).is_file():
                labels[r["path"]] = r["label"]
    ds = {"labels": [[k, labels[k]] for k in sorted(labels)]}
    _atomic_write_bytes(out / "dataset.json", json.dumps(ds).encode())
    temps = [p for p in out.rglob(".*") if p.is_file() and _is_temp_file(p)]
    units = {(r["input"], r["edit_type"]): r.get("unit_status") for r in rows}
    return {"inputs": len(labels), "variants": len(rows), "kept": sum(bool(r.get("kept")) for r in rows),
            "filtered_units": sum(s == "filtered" for s in units.values()), "temp_removed": _remove_temp_files(temps)}


# ------------------------------------------------------------------------------------------- main
def main(config_path: str | os.PathLike | None = None, overrides: Sequence[str] = (), *,
         components: Components | None = None, on_unit_done: Callable[[dict], None] | None = None) -> dict:
    """Run (this rank's share of) data generation; returns the summary summed over ranks.

    Summary keys: done (units kept this run), skipped (finished before), filtered (units whose variants
    all failed the CLIP filter), failed (units that raised; retried by a rerun), variants,
    variants_filtered, inputs_written, edits_per_second, world_size, merged (merge_outputs' result on
    rank 0 when a merge ran, else None). `on_unit_done(info)` is called after each finished unit.
    """
    cfg = load_config(DatagenConfig, config_path, overrides)
    device = resolve_device(None if cfg.device == "auto" else cfg.device)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if device.type == "cuda" and cfg.device == "auto" and world > 1:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")) % max(1, torch.cuda.device_count()))
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist = init_distributed(cfg.distributed, device, cfg.dist_timeout_hours)
    try:
        return _run(cfg, device, dist, components or Components(), on_unit_done)
    finally:
        if dist.group:
            import torch.distributed as tdist

            tdist.destroy_process_group()


def _run(cfg: DatagenConfig, device: torch.device, dist: DistInfo, comps: Components,
         on_unit_done: Callable[[dict], None] | None) -> dict:
    """`_generate` with torch's intra-op thread count set to `cfg.threads` (restored afterwards).

    The thread count changes how CPU kernels split their sums, so it is part of what makes a run
    reproducible; it is set here rather than left to the launcher (torchrun sets OMP_NUM_THREADS=1).
    """
    if cfg.threads < 0:
        raise ConfigError(f"threads must be >= 0 (0 keeps torch's own setting), got {cfg.threads}")
    before = torch.get_num_threads()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    try:
        return _generate(cfg, device, dist, comps, on_unit_done)
    finally:
        torch.set_num_threads(before)


def _generate(cfg: DatagenConfig, device: torch.device, dist: DistInfo, comps: Components,
              on_unit_done: Callable[[dict], None] | None) -> dict:
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    vocab = load_vocabulary(cfg.edit.vocabulary)
    edit_types = select_edit_types(vocab, cfg.edit.edit_types)
    items = shard(enumerate_inputs(cfg.source), dist.rank, dist.world_size)
    if dist.rank == 0:
        save_config(cfg, out / "datagen_config.yaml.tmp")
        os.replace(out / "datagen_config.yaml.tmp", out / "datagen_config.yaml")

    worker = _Worker(cfg, comps, dist, device, on_unit_done)
    worker.load_state()
    pending = [it for it in items if any(_unit_key(it.rel, e.name) not in worker.finished for e in edit_types)
               or not worker.input_done(it.rel)]
    if pending:  # build models only when there is work (a finished rerun is instant)
        if cfg.source.kind == "eg3d" and comps.generator is None and any(not worker.input_done(it.rel) for it in pending):
            comps.generator = build_generator(cfg.source, device)
        if comps.editor is None:
            comps.editor = build_editor(cfg.edit, device, cfg.fp16, cfg.batch_size)
        if cfg.filter.enabled and comps.scorer is None:
            comps.scorer = build_scorer(cfg.filter, device)

    bar = None
    if dist.rank == 0 and cfg.progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(items) * len(edit_types), desc=f"datagen (rank 0 of {dist.world_size})", unit="edit",
                   file=sys.stderr, dynamic_ncols=True)
    try:
        worker.run(items, edit_types, bar)
    finally:
        if bar is not None:
            bar.close()

    mine = dict(worker.counts)
    mine["edit_seconds"] = worker.edit_seconds
    _barrier(dist)
    per_rank = _gather_summaries(dist, mine)
    summary: dict[str, Any] = {k: sum(r[k] for r in per_rank) for k in mine}
    n_calls = summary["variants"]
    summary["edits_per_second"] = (n_calls / summary["edit_seconds"]) if summary["edit_seconds"] > 0 else None
    summary["world_size"] = dist.world_size
    summary["per_rank"] = per_rank
    summary["merged"] = None
    can_merge = dist.world_size == 1 or _group_ready()
    if dist.rank == 0 and can_merge:
        summary["merged"] = merge_outputs(out)
        _atomic_write_bytes(out / "summary.json", json.dumps(summary, indent=1).encode())
    elif not can_merge:
        log.warning("rank %d: no process group; run `python -m pipelines.datagen --config ... --merge-only` "
                    "after every shard has finished", dist.rank)
    _barrier(dist)
    if dist.rank == 0:
        log.info("datagen summary: done %d, skipped %d, filtered %d, failed %d", summary["done"],
                 summary["skipped"], summary["filtered"], summary["failed"])
    return summary


def _group_ready() -> bool:
    import torch.distributed as tdist

    return tdist.is_available() and tdist.is_initialized()
