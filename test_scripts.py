#!/usr/bin/env python
"""Multi-view 3D-aware portrait edits (3DPE) or reconstructions (Live3D) for a folder of portraits.

    python test_scripts.py                                   # pretrained_models/3dpe.pt on test_imgs/ → results/
    python test_scripts.py --ref style.png --video --mesh
    python test_scripts.py --prompt "make him look like a golden statue"
    python test_scripts.py --random-init                     # check an install without any weights

See docs/inference.md for every option and output.
"""
from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

DEFAULT_CHECKPOINT = "pretrained_models/3dpe.pt"
CHECKPOINT_HELP = (
    "Download 3dpe.pt from the original authors' release (see README 'Pretrained models': "
    "https://github.com/EzioBy/3dpe) and place it in pretrained_models/, or pass --checkpoint PATH "
    "(a Live3D encoder_render_*.pt, a project checkpoint folder or a Hugging Face Hub id ORG/NAME also works). "
    "Use --random-init to test the install without weights."
)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", default=DEFAULT_CHECKPOINT,
                   help="3dpe.pt, a Live3D .pt, a project checkpoint dir, or a Hub id ORG/NAME[@REV][/FILE]")
    p.add_argument("--data-dir", default="test_imgs", help="folder with input/ (and ref/, prompts.txt)")
    p.add_argument("--output-dir", default="results")
    p.add_argument("--ref", default=None, help="one reference image applied to every input")
    p.add_argument("--prompt", default=None, help="one text prompt applied to every input")
    p.add_argument("--prompts-file", default=None, help="lines 'stem<TAB>prompt' (a line without TAB applies to all)")
    p.add_argument("--yaws", type=float, nargs="+", default=[-30.0, 0.0, 30.0], help="view yaws in degrees from frontal")
    p.add_argument("--pitch", type=float, default=0.0, help="view pitch in degrees from level")
    p.add_argument("--video", action="store_true", help="write <stem>_orbit.mp4")
    p.add_argument("--video-frames", type=int, default=288)
    p.add_argument("--video-fps", type=float, default=60.0)
    p.add_argument("--mesh", action="store_true", help="write <stem>.ply (marching cubes on the density grid)")
    p.add_argument("--mesh-resolution", type=int, default=256)
    p.add_argument("--save-triplane", action="store_true", help="write <stem>_triplane.safetensors")
    p.add_argument("--align", action="store_true", help="detect the face and crop it the way EG3D was trained")
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: CUDA when present)")
    p.add_argument("--seed", type=int, default=0, help="seed for anything random (InstructPix2Pix, random init)")
    p.add_argument("--precision", choices=["fp32", "bf16"], default="fp32", help="bf16: opt-in speed mode")
    p.add_argument("--channels-last", action="store_true")
    p.add_argument("--random-init", action="store_true", help="random weights: checks the pipeline, outputs are noise")
    p.add_argument("--random-init-kind", choices=["edit", "reconstruct"], default="edit")
    p.add_argument("--prompt-encoder", choices=["mae", "clip"], default="mae", help="with --random-init")
    p.add_argument("--tiny", action="store_true", help="with --random-init: tiny models (smoke tests)")
    g = p.add_argument_group("InstructPix2Pix bridge (text prompts with a MAE checkpoint such as 3dpe.pt)")
    g.add_argument("--ip2p-model", default="timbrooks/instruct-pix2pix", help="model id or local folder")
    g.add_argument("--ip2p-steps", type=int, default=20)
    g.add_argument("--ip2p-guidance", type=float, default=7.5)
    g.add_argument("--ip2p-image-guidance", type=float, default=1.5)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import torch
    from tqdm import tqdm

    from datasets.inference_inputs import build_jobs
    from models.hub import is_local_or_hub
    from pipelines.instruct_pix2pix import bridge_from_args
    from pipelines.editor import PortraitEditor
    from utils.cameras import orbit_cameras, original_test_cameras
    from utils.device import resolve_device
    from utils.errors import ThreeDPEError

    device = resolve_device(args.device)
    torch.manual_seed(args.seed)
    needs_text = args.prompt is not None or args.prompts_file is not None or (
        not (Path(args.data_dir) / "ref").is_dir() and (Path(args.data_dir) / "prompts.txt").is_file())
    bridge = bridge_from_args(args, device) if needs_text else None

    if args.random_init:
        editor = PortraitEditor.random_init(kind=args.random_init_kind, tiny=args.tiny, seed=args.seed,
                                            prompt_encoder=args.prompt_encoder, device=device,
                                            precision=args.precision, text_bridge=bridge)
        print("WARNING: --random-init: random weights, the pictures are noise (this only checks the install).")
    else:
        ckpt = Path(args.checkpoint)
        if not is_local_or_hub(ckpt):  # a Hub id is looked up (and reported) by from_pretrained
            print(f"error: checkpoint '{ckpt}' not found.\n  {CHECKPOINT_HELP}", file=sys.stderr)
            return 2
        try:
            editor = PortraitEditor.from_pretrained(ckpt, device=device, precision=args.precision,
                                                    channels_last=args.channels_last, text_bridge=bridge)
        except ThreeDPEError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2

    try:
        jobs, problems = build_jobs(args.data_dir, ref=args.ref, prompt=args.prompt,
                                    prompts_file=args.prompts_file, needs_prompt=editor.is_editing)
    except FileNotFoundError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for msg in problems:
        print(f"skipped: {msg}", file=sys.stderr)

    out_dir = Path(args.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    cameras = original_test_cameras(args.yaws, args.pitch)
    runner = _Runner(editor, args, out_dir, cameras, orbit_cameras(args.video_frames) if args.video else None)

    failed = list(problems)
    done = 0
    t0 = time.perf_counter()
    for batch in tqdm(_batches(jobs, args.batch_size), total=math.ceil(len(jobs) / max(args.batch_size, 1)),
                      desc="editing" if editor.is_editing else "reconstructing", unit="batch",
                      disable=not sys.stderr.isatty() and len(jobs) < 2):
        ok, errors = runner.run(batch)
        done += ok
        for msg in errors:
            print(f"failed: {msg}", file=sys.stderr)
        failed.extend(errors)
    dt = time.perf_counter() - t0
    print(f"done: {done} written to {out_dir}/, {len(failed)} failed or skipped, {dt:.1f} s"
          + (f" ({dt / done:.2f} s per input)" if done else ""))
    return 1 if failed or done == 0 else 0


def _batches(jobs, size):
    """Consecutive batches of jobs sharing one prompt (so one prompt embedding serves the batch)."""
    batch = []
    for job in jobs:
        key = (job.reference_path, job.prompt)
        if batch and ((batch[0].reference_path, batch[0].prompt) != key or len(batch) >= size):
            yield batch
            batch = []
        batch.append(job)
    if batch:
        yield batch


class _Runner:
    """Loads a batch of inputs, encodes, renders, writes every output named by the input's stem."""

    def __init__(self, editor, args, out_dir: Path, cameras, orbit):
        self.editor, self.args, self.out_dir, self.cameras, self.orbit = editor, args, out_dir, cameras, orbit
        self._prompt_cache: dict = {}
        self._aligner = None

    def _load(self, path: Path):
        import warnings

        from datasets.inference_inputs import prepare_portrait
        from utils.image_io import load_image, pil_to_tensor

        img = load_image(path)
        if self.args.align:
            if self._aligner is None:
                from utils.face_alignment import MTCNNDetector

                self._aligner = MTCNNDetector(device="cpu")
            from utils.face_alignment import align_face

            img = align_face(img, self._aligner)[0].image
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            img = prepare_portrait(img, self.editor.input_resolution, name=str(path))
        for w in caught:
            print(f"warning: {w.message}", file=sys.stderr)
        return pil_to_tensor(img)

    def _prompt(self, job, image):
        key = (str(job.reference_path), job.prompt)
        if job.prompt is not None and self.editor.prompt_encoder_kind != "clip":
            return self.editor.encode_prompt(text=job.prompt, image=image)  # per-input 2D edit
        if key not in self._prompt_cache:
            if job.prompt is not None:
                self._prompt_cache[key] = self.editor.encode_prompt(text=job.prompt)
            else:
                self._prompt_cache[key] = self.editor.encode_prompt(reference=self._load(job.reference_path))
        return self._prompt_cache[key]

    def run(self, batch) -> tuple[int, list[str]]:
        import torch

        from utils.errors import ThreeDPEError

        images, ok_jobs, errors = [], [], []
        for job in batch:
            try:
                images.append(self._load(job.input_path))
                ok_jobs.append(job)
            except (ThreeDPEError, OSError, ValueError) as e:
                errors.append(f"{job.input_path}: {e}")
        if not ok_jobs:
            return 0, errors
        x = torch.cat(images)
        refs = [None] * len(ok_jobs)
        try:
            if self.editor.is_editing:
                if ok_jobs[0].prompt is not None and self.editor.prompt_encoder_kind != "clip":
                    planes_list = []
                    for i, job in enumerate(ok_jobs):
                        emb = self._prompt(job, x[i : i + 1])
                        refs[i] = emb.reference
                        planes_list.append(self.editor.edit(x[i : i + 1], emb))
                    planes = torch.cat(planes_list)
                else:
                    emb = self._prompt(ok_jobs[0], x)
                    refs = [emb.reference] * len(ok_jobs)
                    planes = self.editor.edit(x, emb)
            else:
                planes = self.editor.reconstruct(x)
        except (ThreeDPEError, OSError, ValueError) as e:
            return 0, errors + [f"{j.input_path}: {e}" for j in ok_jobs]
        for i, job in enumerate(ok_jobs):
            self._write(job, x[i : i + 1], refs[i], planes[i : i + 1])
        return len(ok_jobs), errors

    def _write(self, job, image, reference, planes) -> None:
        import torch
        import torch.nn.functional as F

        from utils.image_io import save_png, tensor_to_uint8

        views = self.editor.render(planes, self.cameras)["image"]
        side = views.shape[-1]

        def tile(t):
            t = t.to(views.device, views.dtype)
            if t.shape[-1] != side:
                t = F.interpolate(t, size=(side, side), mode="bicubic", align_corners=False, antialias=True)
            return t

        tiles = [tile(image)]
        if reference is not None:
            tiles.append(tile(reference[:1]))
        tiles.extend(views.split(1))
        strip = torch.cat(tiles, dim=-1)
        out = self.out_dir
        save_png(out / f"{job.stem}_mv.png", tensor_to_uint8(strip[0]))
        for i, v in enumerate(views.split(1)):
            save_png(out / f"{job.stem}_view{i}.png", tensor_to_uint8(v[0]))
        if job.prompt is not None:
            from utils.atomic import atomic_write_text

            atomic_write_text(out / f"{job.stem}_prompt.txt", job.prompt + "\n")
        if self.args.save_triplane:
            from safetensors.torch import save_file

            tmp = out / f".{job.stem}_triplane.partial"
            save_file({"triplane": planes.detach().float().cpu().contiguous()}, str(tmp))
            tmp.replace(out / f"{job.stem}_triplane.safetensors")
        if self.orbit is not None:
            from utils.video import AtomicVideoWriter

            with AtomicVideoWriter(out / f"{job.stem}_orbit.mp4", fps=self.args.video_fps) as writer:
                for i in range(0, self.orbit.shape[0], 8):
                    frames = self.editor.render(planes, self.orbit[i : i + 8])["image"]
                    for f in frames:
                        writer.append(tensor_to_uint8(f))
        if self.args.mesh:
            from utils.mesh import density_grid, marching_cubes, write_ply

            grid = density_grid(lambda c: self.editor.sample_density(planes, c), self.args.mesh_resolution)
            try:
                verts, faces = marching_cubes(grid, level=10.0, border=max(1, self.args.mesh_resolution * 60 // 512))
                write_ply(out / f"{job.stem}.ply", verts, faces)
            except ValueError as e:
                print(f"warning: {job.stem}: no mesh ({e})", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
