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
(utils/atomic.py), and a unit (input, style) is finished once its manifest lines are written, so a
killed job rerun with the same config resumes without redoing or duplicating work; so does a worker group that
torchrun restarts (`--max-restarts=N`), which reruns this same command. The command is
`python -m tools.datagen` (docs/data.md). This module runs a rank and gathers the summary; the settings
are in `datagen_config`, one rank's work in `datagen_worker`, the run's files and their merge in `datagen_store`.
"""
from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from datasets.layout import load_vocabulary
from pipelines.datagen_config import TINY, DatagenConfig, EditConfig, FilterConfig, SourceConfig, select_edit_types
from pipelines.datagen_store import edit_path, merge_outputs
from pipelines.datagen_worker import (Components, InputItem, ShardWorker, enumerate_inputs, render_eg3d, shard,
                                      stable_seed, unit_key)
from utils.atomic import atomic_write_bytes
from utils.config import check_choices, load_config, save_config
from utils.distributed import DistInfo, all_gather_object, barrier, destroy_distributed, init_distributed, is_dist
from utils.errors import ConfigError

__all__ = ["Components", "DatagenConfig", "EditConfig", "FilterConfig", "InputItem", "SourceConfig", "TINY",
           "build_editor", "build_generator", "build_scorer", "edit_path", "enumerate_inputs", "main",
           "merge_outputs", "render_eg3d", "select_edit_types", "shard", "stable_seed"]

log = logging.getLogger("datagen")


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


def main(config_path: str | os.PathLike | None = None, overrides: Sequence[str] = (), *,
         components: Components | None = None, on_unit_done: Callable[[dict], None] | None = None) -> dict:
    """Run (this rank's share of) data generation; returns the summary summed over ranks.

    Summary keys: done (units kept this run), skipped (finished before), filtered (units whose variants
    all failed the CLIP filter), failed (units that raised; retried by a rerun), variants,
    variants_filtered, inputs_written, edits_per_second, world_size, merged (merge_outputs' result on
    rank 0 when a merge ran, else None). `on_unit_done(info)` is called after each finished unit.
    """
    cfg = load_config(DatagenConfig, config_path, overrides)
    mode = {"False": "off", "True": "on"}.get(cfg.distributed, cfg.distributed)  # YAML reads a bare off/on as a bool
    # Ranks may finish hours apart (unequal shards, resumed runs): finished ones wait long at the final barrier.
    dist = init_distributed(cfg.device, mode=mode, timeout_hours=cfg.dist_timeout_hours)
    try:
        return _run(cfg, dist.device, dist, components or Components(), on_unit_done)
    finally:
        if dist.owns_group:
            destroy_distributed()


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
    check_choices(cfg.filter, "filter")  # a config built in code skipped load_config's check of the Literal fields
    items = shard(enumerate_inputs(cfg.source), dist.rank, dist.world_size)
    if dist.rank == 0:
        save_config(cfg, out / "datagen_config.yaml")

    worker = ShardWorker(cfg, comps, dist, device, on_unit_done)
    worker.load_state()
    pending = [it for it in items if any(unit_key(it.rel, e.name) not in worker.finished for e in edit_types)
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
    barrier()
    per_rank = all_gather_object(mine)
    summary: dict[str, Any] = {k: sum(r[k] for r in per_rank) for k in mine}
    n_calls = summary["variants"]
    summary["edits_per_second"] = (n_calls / summary["edit_seconds"]) if summary["edit_seconds"] > 0 else None
    summary["world_size"] = dist.world_size
    summary["per_rank"] = per_rank
    summary["merged"] = None
    can_merge = dist.world_size == 1 or is_dist()
    if dist.rank == 0 and can_merge:
        summary["merged"] = merge_outputs(out)
        atomic_write_bytes(out / "summary.json", json.dumps(summary, indent=1).encode(), fsync=True)
    elif not can_merge:
        log.warning("rank %d: no process group; run `python -m tools.datagen --config ... --merge-only` "
                    "after every shard has finished", dist.rank)
    barrier()  # finished ranks wait here for the others (up to dist_timeout_hours)
    if dist.rank == 0:
        log.info("datagen summary: done %d, skipped %d, filtered %d, failed %d", summary["done"],
                 summary["skipped"], summary["filtered"], summary["failed"])
    return summary

