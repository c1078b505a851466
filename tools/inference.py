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
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tools.editor_options import add_editor_arguments, editor_from_args


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
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
    add_editor_arguments(p)
    return p.parse_args(argv)


@dataclass
class InferenceReport:
    """What `run_inference` did.

    written: stems of the inputs whose outputs were written; seconds: stem → the time of that input's edit
    (see `run_inference`); failed: 'path: reason' of inputs that could not be read or edited; skipped:
    'path: reason' of inputs left out before editing (no reference and no prompt).
    """

    written: list[str] = field(default_factory=list)
    seconds: dict[str, float] = field(default_factory=dict)
    failed: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)

    @property
    def exit_code(self) -> int:
        """0 when every input was written, 1 when one failed or was skipped, or nothing was written."""
        return 1 if self.failed or self.skipped or not self.written else 0


def run_inference(args: argparse.Namespace) -> InferenceReport:
    """Edit (or reconstruct) every input of `args.data_dir` and write the outputs; `args` from `parse_args`.

    Each input's time in `InferenceReport.seconds` is its encode prompt + edit (or reconstruct) + render,
    with CUDA synchronised: model loading, reading/aligning images and writing files are not included. A
    batch's prompt encoding and edit are shared evenly by its inputs; a prompt shared by several inputs is
    encoded once (so the first input of a style carries it: take the median). Prints a line per skipped or
    failed input and a summary. Raises ThreeDPEError for a user error before any input is edited (a missing
    checkpoint or input folder); an error while writing (e.g. a full disk) propagates.
    """
    from tqdm import tqdm

    from datasets.inference_inputs import build_jobs
    from utils.cameras import orbit_cameras, original_test_cameras
    from utils.errors import ThreeDPEError

    needs_text = args.prompt is not None or args.prompts_file is not None or (
        not (Path(args.data_dir) / "ref").is_dir() and (Path(args.data_dir) / "prompts.txt").is_file())
    editor = editor_from_args(args, needs_text=needs_text)
    try:
        jobs, problems = build_jobs(args.data_dir, ref=args.ref, prompt=args.prompt,
                                    prompts_file=args.prompts_file, needs_prompt=editor.is_editing)
    except FileNotFoundError as e:
        raise ThreeDPEError(str(e)) from e
    report = InferenceReport(skipped=list(problems))
    for msg in problems:
        print(f"skipped: {msg}", file=sys.stderr)

    out_dir = Path(args.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    cameras = original_test_cameras(args.yaws, args.pitch)
    runner = _Runner(editor, args, out_dir, cameras, orbit_cameras(args.video_frames) if args.video else None)

    t0 = time.perf_counter()
    for batch in tqdm(_batches(jobs, args.batch_size), total=math.ceil(len(jobs) / max(args.batch_size, 1)),
                      desc="editing" if editor.is_editing else "reconstructing", unit="batch",
                      disable=not sys.stderr.isatty() and len(jobs) < 2):
        timed, errors = runner.run(batch)
        report.written += [stem for stem, _ in timed]
        report.seconds.update(timed)
        for msg in errors:
            print(f"failed: {msg}", file=sys.stderr)
        report.failed += errors
    dt = time.perf_counter() - t0
    done = len(report.written)
    print(f"done: {done} written to {out_dir}/, {len(report.failed) + len(report.skipped)} failed or skipped, "
          f"{dt:.1f} s" + (f" ({dt / done:.2f} s per input)" if done else ""))
    return report


def main(argv: list[str] | None = None) -> int:
    """The command (test_scripts.py): 0 when every input was written, 1 when one failed, 2 on a user error."""
    from utils.errors import ThreeDPEError, report_user_error

    args = parse_args(argv)
    try:
        return run_inference(args).exit_code
    except ThreeDPEError as e:
        return report_user_error(e)


def _batches(jobs: Iterable[Any], size: int) -> Iterator[list[Any]]:
    """Consecutive batches of jobs sharing one prompt (so one prompt embedding serves the batch)."""
    batch: list[Any] = []
    for job in jobs:
        key = (job.reference_path, job.prompt)
        if batch and ((batch[0].reference_path, batch[0].prompt) != key or len(batch) >= size):
            yield batch
            batch = []
        batch.append(job)
    if batch:
        yield batch


class _EditClock:
    """`with clock:` adds the seconds of the block to `clock.seconds`. CUDA is synchronised on entry and exit,
    so GPU work queued before the block is not counted and the block's own is."""

    def __init__(self) -> None:
        self.seconds = 0.0
        self._t0 = 0.0

    @staticmethod
    def _sync() -> None:
        import torch

        if torch.cuda.is_available() and torch.cuda.is_initialized():
            torch.cuda.synchronize()

    def __enter__(self) -> _EditClock:
        self._sync()
        self._t0 = time.perf_counter()
        return self

    def __exit__(self, *exc: object) -> None:
        self._sync()
        self.seconds += time.perf_counter() - self._t0


class _Runner:
    """Loads a batch of inputs, encodes, renders, writes every output named by the input's stem.

    Only the editor's work (prompt, edit, render) runs under `self.clock`; loading and writing do not.
    """

    def __init__(self, editor, args, out_dir: Path, cameras, orbit):
        self.editor, self.args, self.out_dir, self.cameras, self.orbit = editor, args, out_dir, cameras, orbit
        self.clock = _EditClock()
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
        """The job's prompt embedding: made for this input when it depends on it, else once per prompt."""
        if self.editor.prompt_is_per_input(job.prompt):
            with self.clock:
                return self.editor.prompt(image=image, text=job.prompt)
        key = (str(job.reference_path), job.prompt)
        if key not in self._prompt_cache:
            reference = None if job.reference_path is None else self._load(job.reference_path)
            with self.clock:
                self._prompt_cache[key] = self.editor.prompt(reference=reference, text=job.prompt)
        return self._prompt_cache[key]

    def run(self, batch) -> tuple[list[tuple[str, float]], list[str]]:
        """Edit and write a batch → ([(stem, edit seconds)] of the inputs written, ['path: reason'] of failures)."""
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
            return [], errors
        x = torch.cat(images)
        refs = [None] * len(ok_jobs)
        start = self.clock.seconds
        try:
            if not self.editor.is_editing:
                with self.clock:
                    planes = self.editor.reconstruct(x)
            elif self.editor.prompt_is_per_input(ok_jobs[0].prompt):
                planes_list = []
                for i, job in enumerate(ok_jobs):
                    emb = self._prompt(job, x[i : i + 1])
                    refs[i] = emb.reference
                    with self.clock:
                        planes_list.append(self.editor.edit(x[i : i + 1], emb))
                planes = torch.cat(planes_list)
            else:
                emb = self._prompt(ok_jobs[0], x)
                refs = [emb.reference] * len(ok_jobs)
                with self.clock:
                    planes = self.editor.edit(x, emb)
        except (ThreeDPEError, OSError, ValueError) as e:
            return [], errors + [f"{j.input_path}: {e}" for j in ok_jobs]
        shared = (self.clock.seconds - start) / len(ok_jobs)
        timed = []
        for i, job in enumerate(ok_jobs):
            before = self.clock.seconds
            self._write(job, x[i : i + 1], refs[i], planes[i : i + 1])
            timed.append((job.stem, round(shared + self.clock.seconds - before, 6)))
        return timed, errors

    def _write(self, job, image, reference, planes) -> None:
        import torch
        import torch.nn.functional as F

        from utils.image_io import save_png, tensor_to_uint8

        with self.clock:
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
                    with self.clock:
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
