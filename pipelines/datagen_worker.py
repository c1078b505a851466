"""The work of one rank in data generation (`pipelines/datagen.py`): the inputs (EG3D renders or photos),
their shard, the variants of each (input, style) unit, and `ShardWorker`, which edits, scores, keeps the best
variant and logs every unit so a rerun resumes where a killed one stopped.
"""
from __future__ import annotations

import io
import logging
import time
import traceback
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from datasets.layout import EditType, read_dataset_labels, read_jsonl
from pipelines.datagen_config import DatagenConfig, EditConfig, SourceConfig
from pipelines.datagen_store import append_jsonl, edit_path, repair_jsonl, stale_temps_for
from utils.atomic import atomic_write_bytes
from utils.config import parse_seeds
from utils.distributed import DistInfo
from utils.errors import ConfigError
from utils.image_io import load_image_tensor, save_png

log = logging.getLogger("datagen")


def stable_seed(*parts: Any) -> int:
    """A 31-bit seed from strings/ints, identical across processes and Python versions."""
    return zlib.crc32("|".join(str(p) for p in parts).encode()) & 0x7FFFFFFF


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
    if cfg.kind == "photos":
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
    raise ConfigError(f"source.kind must be 'eg3d' or 'photos', got '{cfg.kind}'")


def shard(items: Sequence[InputItem], rank: int, world_size: int) -> list[InputItem]:
    """Input i goes to rank i mod world_size: disjoint shards whose union is everything."""
    return [it for it in items if it.index % world_size == rank]


@dataclass
class Components:
    """The models a run needs; tests and benchmarks may pass prebuilt ones to `main`."""

    generator: Any = None  # TriPlaneGenerator (EG3D source)
    editor: Any = None  # InstructPix2PixEditor
    scorer: Any = None  # ClipScorer (filter.enabled)


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
    pixels can, by float rounding; `ShardWorker` renders one sample per call when `batch_invariant`).
    """
    from utils import cameras as cams

    z_dim = int(gen.config.z_dim)
    z = torch.from_numpy(np.stack([np.random.RandomState(it.seed).randn(z_dim) for it in items])).float()
    cs = []
    for it in items:
        if cfg.camera == "frontal":
            cs.append(cams.frontal_camera().reshape(1, 25).float())
        elif cfg.camera == "random-training":
            g = torch.Generator().manual_seed(cfg.camera_seed + int(it.seed))
            cs.append(cams.sample_training_cameras(1, generator=g).reshape(1, 25).float())
        else:
            raise ConfigError(f"source.camera must be 'random-training' or 'frontal', got '{cfg.camera}'")
    c = torch.cat(cs)
    ws = gen.mapping(z.to(device), c.to(device), truncation_psi=cfg.truncation_psi, truncation_cutoff=cfg.truncation_cutoff)
    out = gen.synthesis(ws, c.to(device), noise_mode="const", deterministic=True)
    return {"images": out["image"].float().clamp(-1, 1).cpu(), "cameras": c, "z": z, "ws": ws.float().cpu()}


def _load_input(path: Path, resolution: int | None = None) -> torch.Tensor:
    """Image file → 3×R×R in [-1,1]; photos are LANCZOS-resized to `resolution` (None: as stored)."""
    return load_image_tensor(path, resolution, Image.Resampling.LANCZOS)[0]


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


def unit_key(rel: str, style: str) -> tuple[str, str]:
    """The key of a unit (input, style) in `ShardWorker.finished`."""
    return (rel, style)


class ShardWorker:
    """One rank's share of a run: recovers what earlier runs finished (`load_state`), then makes the missing
    inputs and edits (`run`), appending every finished unit to `manifest.<rank>.jsonl`; `counts` and
    `edit_seconds` feed the summary."""

    def __init__(self, cfg: DatagenConfig, comps: Components, dist: DistInfo, device: torch.device,
                 on_unit_done: Callable[[dict], None] | None):
        self.cfg, self.c, self.dist, self.device, self.hook = cfg, comps, dist, device, on_unit_done
        self.out = Path(cfg.output_dir)
        self.manifest_path = self.out / f"manifest.{dist.rank}.jsonl"
        self.labels_path = self.out / f"labels.{dist.rank}.jsonl"
        self.counts = {"done": 0, "skipped": 0, "filtered": 0, "failed": 0, "variants": 0,
                       "variants_filtered": 0, "inputs_written": 0}
        self.edit_seconds = 0.0

    def load_state(self) -> None:
        """The finished units and written inputs of earlier runs (any rank's files, so a changed world size
        still resumes); this rank's own logs lose a torn last line first."""
        repair_jsonl(self.manifest_path)
        repair_jsonl(self.labels_path)
        status: dict[tuple[str, str], str] = {}
        kept_output: dict[tuple[str, str], str] = {}
        for p in self.out.glob("manifest.*.jsonl"):
            for r in read_jsonl(p):
                if r.get("unit_status") in ("kept", "filtered"):
                    key = unit_key(r["input"], r["edit_type"])
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
        """Input `rel` was written and labelled by an earlier batch or run."""
        return rel in self.labels and (self.out / rel).is_file()

    def run(self, items: list[InputItem], edit_types: list[EditType], bar: Any) -> None:
        """Every unfinished (input, style) of `items`, `batch_size` inputs at a time; failures are counted."""
        bs = max(1, self.cfg.batch_size)
        for start in range(0, len(items), bs):
            batch = items[start:start + bs]
            todo = {it.rel: [et for et in edit_types if unit_key(it.rel, et.name) not in self.finished] for it in batch}
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
                self._failed("the inputs", need, sum(len(todo[it.rel]) for it in need), bar)
                continue
            for et in edit_types:
                sub = [i for i, it in enumerate(need) if et in todo[it.rel]]
                if sub:
                    self.edit_units([need[i] for i in sub], images[sub], et, bar)

    def _failed(self, what: str, items: list[InputItem], n_units: int, bar: Any) -> None:
        """Log the exception being handled and count its units as failed (a rerun retries them)."""
        log.error("rank %d: %s of %s failed:\n%s", self.dist.rank, what, [it.rel for it in items],
                  traceback.format_exc())
        self.counts["failed"] += n_units
        if bar is not None:
            bar.update(n_units)

    def prepare_inputs(self, items: list[InputItem]) -> torch.Tensor:
        """Input images B×3×H×W in [-1,1]; writes the input PNG and its label line when missing."""
        src = self.cfg.source
        imgs: list[torch.Tensor | None] = [None] * len(items)
        for i, it in enumerate(items):  # reuse what a previous run wrote (identical bytes → identical edits)
            if self.input_done(it.rel):
                imgs[i] = _load_input(self.out / it.rel)
        missing = [i for i, x in enumerate(imgs) if x is None]
        if missing:
            new_labels = []
            if src.kind == "eg3d":
                todo = [items[i] for i in missing]
                r = _one_at_a_time(lambda sl: render_eg3d(self.c.generator, todo[sl], src, self.device), len(todo),
                                   self.cfg.batch_invariant)
                for j, i in enumerate(missing):
                    it = items[i]
                    imgs[i] = self._write_input(it.rel, r["images"][j])
                    rec = {"path": it.rel, "label": [float(v) for v in r["cameras"][j].tolist()], "seed": it.seed,
                           "source": "eg3d", "truncation_psi": src.truncation_psi}
                    if src.keep_latents:
                        lat = self.out / "latents" / Path(it.rel).with_suffix(".npz")
                        buf = io.BytesIO()
                        np.savez(buf, z=r["z"][j].numpy(), ws=r["ws"][j].numpy(), camera=r["cameras"][j].numpy(),
                                 seed=np.int64(it.seed), truncation_psi=np.float32(src.truncation_psi),
                                 truncation_cutoff=np.int64(-1 if src.truncation_cutoff is None else src.truncation_cutoff))
                        atomic_write_bytes(lat, buf.getvalue(), fsync=True)
                        rec["latents"] = lat.relative_to(self.out).as_posix()
                    new_labels.append(rec)
            else:
                for i in missing:
                    it = items[i]
                    imgs[i] = self._write_input(it.rel, _load_input(it.photo, src.resolution))
                    new_labels.append({"path": it.rel, "label": it.label, "source": "photos",
                                       "photo": str(it.photo)})
            append_jsonl(self.labels_path, new_labels)
            for rec in new_labels:
                self.labels[rec["path"]] = rec
            self.counts["inputs_written"] += len(new_labels)
        return torch.stack([x for x in imgs if x is not None])

    def _write_input(self, rel: str, image: torch.Tensor) -> torch.Tensor:
        """Write the input PNG (over a killed run's temporaries); return it read back, quantised as a rerun sees it."""
        for t in stale_temps_for(self.out / rel):
            t.unlink(missing_ok=True)
        save_png(self.out / rel, image)
        return _load_input(self.out / rel)

    def edit_units(self, items: list[InputItem], images: torch.Tensor, et: EditType, bar: Any) -> None:
        """All variants of style `et` for `items`; score, keep the best, write the edit and manifest lines."""
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
            self._failed(et.name, items, n, bar)
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
            for t in stale_temps_for(self.out / out_rel):
                t.unlink(missing_ok=True)
            if best is not None:
                save_png(self.out / out_rel, edits[best][i])
                recs[best]["kept"] = True
                recs[best]["output"] = out_rel
            status = "kept" if best is not None else "filtered"
            for r in recs:
                r["unit_status"] = status
            append_jsonl(self.manifest_path, recs)
            self.finished.add(unit_key(it.rel, et.name))
            self.counts["variants"] += len(recs)
            self.counts["variants_filtered"] += sum(not r["passed"] for r in recs)
            self.counts["done" if best is not None else "filtered"] += 1
            if bar is not None:
                bar.update(1)
            if self.hook is not None:
                self.hook({"input": it.rel, "edit_type": et.name, "status": status, "rank": self.dist.rank})

