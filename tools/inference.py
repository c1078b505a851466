"""Multi-view 3D-aware portrait edits (3DPE) or reconstructions (Live3D) for a folder of portraits.

    python test_scripts.py                                   # pretrained_models/3dpe.pt on test_imgs/ → results/
    python test_scripts.py --ref style.png --video --mesh
    python test_scripts.py --prompt "make him look like a golden statue"
    python test_scripts.py --random-init                     # check an install without any weights
    torchrun --nproc_per_node=4 test_scripts.py --skip-existing   # 4 processes, continue a stopped batch

See docs/inference.md for every option and output.
"""
from __future__ import annotations

import argparse
import contextlib
import os
import sys
import time
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tools.editor_options import add_editor_arguments, editor_from_args


def _prog() -> str:
    """`test_scripts.py` when run through it, else `python -m tools.inference` (the usage line names the command typed)."""
    return "python -m tools.inference" if Path(sys.argv[0]).name == "inference.py" else "test_scripts.py"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog=_prog(), description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
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
    p.add_argument("--mesh-level", type=float, default=None,
                   help="density iso-level of the mesh (default: 10, EG3D's; when an input's density never crosses "
                        "10, Otsu's threshold of its density grid, with a note)")
    p.add_argument("--save-triplane", action="store_true", help="write <stem>_triplane.safetensors")
    p.add_argument("--align", action="store_true",
                   help="detect the face and crop it the way EG3D was trained (a reference without a face, e.g. a "
                        "sketch, is used as it is)")
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--skip-existing", action="store_true",
                   help="skip inputs whose outputs are all in --output-dir (continue a stopped batch)")
    add_editor_arguments(p)
    return p.parse_args(argv)


@dataclass
class InferenceReport:
    """What `run_inference` did.

    written: stems of the inputs whose outputs were written; seconds: stem → the time of that input's edit
    (see `run_inference`); failed: 'path: reason' of inputs that could not be read or edited; skipped:
    'path: reason' of inputs left out before editing (no reference and no prompt); complete: stems left
    out by --skip-existing because all their outputs were there. Under torchrun every rank's report holds
    the inputs of all ranks.
    """

    written: list[str] = field(default_factory=list)
    seconds: dict[str, float] = field(default_factory=dict)
    failed: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    complete: list[str] = field(default_factory=list)

    @property
    def exit_code(self) -> int:
        """0 when every input was written (or already complete), 1 when one failed or was skipped, or there
        was nothing to write."""
        return 1 if self.failed or self.skipped or not (self.written or self.complete) else 0


def run_inference(args: argparse.Namespace) -> InferenceReport:
    """Edit (or reconstruct) every input of `args.data_dir` and write the outputs; `args` from `parse_args`.

    Each input's time in `InferenceReport.seconds` is its encode prompt + edit (or reconstruct) + render,
    with CUDA synchronised: model loading, reading/aligning images and writing files are not included. A
    batch's prompt encoding and edit are shared evenly by its inputs; a prompt shared by several inputs is
    encoded once (so the first input of a style carries it: take the median). Prints a line per skipped or
    failed input and a summary. Raises ThreeDPEError for a user error before any input is edited (a missing
    checkpoint or input folder); an error while writing (e.g. a full disk) propagates.

    Under torchrun (WORLD_SIZE > 1) the batches are split across ranks (batch i → rank i mod WORLD_SIZE,
    each rank on its own device), every rank writes its own inputs' outputs, and rank 0 prints the summary
    of all ranks. `args.skip_existing`: inputs whose outputs are all there (`_output_names`) are left out.
    """
    from utils.distributed import destroy_distributed, init_ranks

    ranks = init_ranks(args.device)
    try:
        if ranks is not None:
            args = argparse.Namespace(**{**vars(args), "device": str(ranks.device)})
        return _run_inference(args, *((0, 1) if ranks is None else (ranks.rank, ranks.world_size)))
    finally:
        if ranks is not None and ranks.owns_group:
            destroy_distributed()


def _run_inference(args: argparse.Namespace, rank: int, world: int) -> InferenceReport:
    from tqdm import tqdm

    from pipelines.instruct_pix2pix import bridge_from_args
    from tools.editor_options import RANDOM_INIT_WARNING, check_checkpoint_arg, describe_editor_source
    from utils.cameras import orbit_cameras, original_test_cameras
    from utils.device import resolve_device
    from utils.distributed import all_gather_object, barrier, is_dist, print_line, rank_share

    grouped = world == 1 or is_dist()  # else ranks without a process group (no MASTER_ADDR): each on its own
    status = _Status(enabled=rank == 0 or not grouped)
    # What the command line names is checked first (file-system checks, milliseconds); then the models load.
    check_checkpoint_arg(args)
    may_edit = not args.random_init or args.random_init_kind == "edit"
    jobs, problems = _jobs(args, needs_prompt=may_edit)
    needs_text = any(job.prompt is not None for job in jobs)
    if needs_text and args.random_init and may_edit and args.prompt_encoder == "mae":
        bridge_from_args(args).check()  # a MAE editor reads a text only through InstructPix2Pix
    out_dir = _output_dir(args.output_dir)
    if args.random_init:
        print(RANDOM_INIT_WARNING, file=sys.stderr)
    with status.loading(f"{describe_editor_source(args)} on {resolve_device(args.device)}"):
        editor = editor_from_args(args, needs_text=needs_text, warn_random_init=False)
    if may_edit and not editor.is_editing:  # a Live3D checkpoint reconstructs: no prompt needed
        jobs, problems = _jobs(args, needs_prompt=False)
    if any(editor.prompt_is_per_input(job.prompt) for job in jobs):
        editor.text_bridge.check()  # once, before any input (a checkpoint's prompt encoder is known only now)
    report = InferenceReport(skipped=list(problems) if rank == 0 else [])  # rank 0 reports them
    for msg in report.skipped:
        print_line(f"skipped: {msg}", file=sys.stderr)

    cameras = original_test_cameras(args.yaws, args.pitch)
    # Split whole batches (made from every input), so each batch, and so each output, is the one-process one.
    batches = rank_share(list(_batches(jobs, args.batch_size)), rank, world)
    if args.skip_existing:
        if rank == 0 and grouped:  # no rank writes yet (they wait at the barrier below)
            _remove_leftovers(out_dir)
        complete = _complete_stems(jobs, args, out_dir)
        report.complete = [job.stem for batch in batches for job in batch if job.stem in complete]
        if rank == 0 and grouped:
            print_line(f"skipped {len(complete)} of {len(jobs)} inputs (outputs complete)")
        elif not grouped:
            print_line(f"skipped {len(report.complete)} of {sum(map(len, batches))} inputs of rank {rank} "
                       "(outputs complete)")
        batches = [kept for batch in batches if (kept := [job for job in batch if job.stem not in complete])]
        barrier()  # every rank has listed the folder before any rank writes to it
    runner = _Runner(editor, args, out_dir, cameras, orbit_cameras(args.video_frames) if args.video else None,
                     batches, status)

    t0 = time.perf_counter()
    bar = tqdm(batches, total=len(batches), desc="editing" if editor.is_editing else "reconstructing",
               unit="batch", file=sys.stderr,
               disable=rank != 0 or (not sys.stderr.isatty() and len(batches) < 2))
    status.bar = None if bar.disable else bar
    for batch in bar:
        timed, errors = runner.run(batch)
        report.written += [stem for stem, _ in timed]
        report.seconds.update(timed)
        for msg in errors:
            _say(f"failed: {msg}")
        report.failed += errors
    status.bar = None
    report = _merge(all_gather_object(report), jobs)
    dt = time.perf_counter() - t0
    if rank == 0 or not grouped:
        done = len(report.written)
        print_line(f"done: {done} written to {out_dir}/, {len(report.failed) + len(report.skipped)} failed or "
                   "skipped" + (f", {len(report.complete)} already complete" if args.skip_existing else "")
                   + f", {dt:.1f} s" + (f" ({dt / done:.2f} s per input)" if done else "")
                   + ("" if world == 1 else f", {world} processes" if grouped else f", rank {rank} of {world} alone"))
        if world > 1 and grouped:  # each rank printed its own failures as they came; here are all of them at once
            for msg in report.failed:
                print_line(f"failed: {msg}")
    sys.stdout.flush()
    sys.stderr.flush()
    barrier()  # torchrun stops the other ranks when one exits non-zero: rank 0 has printed by now
    return report


def _jobs(args: argparse.Namespace, needs_prompt: bool) -> tuple[list[Any], list[str]]:
    """`build_jobs` for the command line; a missing folder or file named there → ThreeDPEError (one line)."""
    from datasets.inference_inputs import build_jobs
    from utils.errors import ThreeDPEError

    try:
        return build_jobs(args.data_dir, ref=args.ref, prompt=args.prompt, prompts_file=args.prompts_file,
                          needs_prompt=needs_prompt)
    except FileNotFoundError as e:
        raise ThreeDPEError(str(e)) from e


def _output_dir(path: str) -> Path:
    """--output-dir, created (with its parents) before anything slow; ThreeDPEError when it cannot be."""
    from utils.errors import ThreeDPEError

    out = Path(path)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ThreeDPEError(f"cannot create --output-dir '{out}' ({e.strerror or e}): pass a folder you can "
                            "write to") from e
    return out


def _say(msg: str) -> None:
    """One line on stderr that does not break a progress bar."""
    from tqdm import tqdm

    tqdm.write(f"{msg}\n", file=sys.stderr, end="")  # one write per line: ranks' lines never run into each other
    sys.stderr.flush()


class _Status:
    """What the command is doing, on stderr: a line per setup step (loading the models), then the current
    input's phase (encoding, rendering, writing...) as the progress bar's postfix, or as a line when there is
    no bar (stderr not a terminal and one batch). Silent when not `enabled` (ranks other than 0)."""

    def __init__(self, enabled: bool):
        self.enabled = enabled
        self.bar: Any = None

    def line(self, msg: str) -> None:
        if self.enabled:
            _say(msg)

    @contextlib.contextmanager
    def loading(self, what: str) -> Iterator[None]:
        """While the models load, 'loading the models: <what> ...' on a terminal, erased afterwards (so a
        user error stays the only line on stderr); once loaded, the line 'models loaded: <what>, N s'."""
        live = self.enabled and sys.stderr.isatty()
        if live:
            sys.stderr.write(f"loading the models: {what} ...")
            sys.stderr.flush()
        t0 = time.perf_counter()
        try:
            yield
        finally:
            if live:
                sys.stderr.write("\r\033[K")
                sys.stderr.flush()
        self.line(f"models loaded: {what}, {time.perf_counter() - t0:.1f} s")

    def phase(self, label: str, what: str) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.set_postfix_str(f"{label}: {what}", refresh=True)
        else:
            _say(f"{label}: {what}")

    def progress(self, total: int, desc: str, unit: str) -> Any:
        """A nested tqdm bar (left off the screen when done) for a long phase of one input."""
        from tqdm import tqdm

        return tqdm(total=total, desc=desc, unit=unit, leave=False, file=sys.stderr, disable=not self.enabled)


def main(argv: list[str] | None = None) -> int:
    """The command (test_scripts.py): 0 when every input was written, 1 when one failed, 2 on a user error."""
    from utils.errors import ThreeDPEError, report_user_error

    args = parse_args(argv)
    try:
        return run_inference(args).exit_code
    except ThreeDPEError as e:
        return report_user_error(e)


def _merge(reports: list[InferenceReport], jobs: list[Any]) -> InferenceReport:
    """One report of every rank's inputs (`written` and `complete` in input order)."""
    order = {job.stem: i for i, job in enumerate(jobs)}
    merged = InferenceReport()
    for r in reports:
        merged.written += r.written
        merged.seconds.update(r.seconds)
        merged.failed += r.failed
        merged.skipped += r.skipped
        merged.complete += r.complete
    merged.written.sort(key=lambda stem: order.get(stem, -1))
    merged.complete.sort(key=lambda stem: order.get(stem, -1))
    return merged


def _output_names(job: Any, args: argparse.Namespace) -> list[str]:
    """The files `_Runner` writes for `job` under these options, `<stem>_mv.png` last (it is written last)."""
    s = job.stem
    names = [f"{s}_view{i}.png" for i in range(len(args.yaws))]
    if job.prompt is not None:
        names.append(f"{s}_prompt.txt")
    if args.save_triplane:
        names.append(f"{s}_triplane.safetensors")
    if args.video:
        names.append(f"{s}_orbit.mp4")
    if args.mesh:
        names.append(f"{s}.ply")
    return names + [f"{s}_mv.png"]


def _complete_stems(jobs: list[Any], args: argparse.Namespace, out_dir: Path) -> set[str]:
    """Stems whose every output (`_output_names`) is in `out_dir`. Every output is written to a temporary
    name and renamed when whole, so a file under its final name is complete; a stopped input misses at
    least its `_mv.png`, which is written last."""
    present = set(os.listdir(out_dir))
    return {job.stem for job in jobs if all(name in present for name in _output_names(job, args))}


def _remove_leftovers(out_dir: Path) -> int:
    """Delete the hidden temporary files a killed run left in `out_dir` (utils/atomic.py names them
    `.<name>.<random>.tmp*`, the video writer `.<stem>…partial…`) → how many."""
    n = 0
    for entry in os.scandir(out_dir):
        if entry.name.startswith(".") and (".tmp" in entry.name or ".partial" in entry.name) and entry.is_file():
            Path(entry.path).unlink(missing_ok=True)
            n += 1
    if n:
        print(f"removed {n} temporary files left by a stopped run", file=sys.stderr)
    return n


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
    Each phase is shown by `status`.
    """

    def __init__(self, editor, args, out_dir: Path, cameras, orbit, batches: list[list[Any]],
                 status: _Status | None = None):
        self.editor, self.args, self.out_dir, self.cameras, self.orbit = editor, args, out_dir, cameras, orbit
        self.status = status or _Status(enabled=False)
        self.clock = _EditClock()
        # A prompt embedding holds its reference image (3 MB at 512²): keep one only while a later batch of
        # `batches` will use it, so memory does not grow with the number of inputs.
        self._uses = Counter(self._key(batch[0]) for batch in batches)
        self._prompt_cache: dict = {}
        self._detector = None
        self._unaligned: set[str] = set()  # references without a face, already announced

    @staticmethod
    def _key(job) -> tuple[str, str | None]:
        return str(job.reference_path), job.prompt

    def _used(self, job) -> None:
        """One batch of `job`'s prompt is done with it: forget the embedding after its last batch."""
        key = self._key(job)
        self._uses[key] -= 1
        if self._uses[key] <= 0:
            self._prompt_cache.pop(key, None)
            del self._uses[key]

    def _load(self, path: Path, reference: bool = False):
        """Image file → 1×3×R×R in [-1,1]; with --align the EG3D crop of its face (a reference without one
        is used as it is)."""
        import warnings

        from datasets.inference_inputs import prepare_portrait
        from utils.image_io import load_image, pil_to_tensor

        img = load_image(path)
        aligned = self._align(img, path, reference) if self.args.align else None
        img = img if aligned is None else aligned
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            img = prepare_portrait(img, self.editor.input_resolution, name=str(path), suggest_align=not self.args.align)
        for w in caught:
            _say(f"warning: {w.message}")
        return pil_to_tensor(img)

    def _align(self, img, path: Path, reference: bool):
        """The EG3D crop of the main face of `img`. An input without a face raises NoFaceError; a reference
        without one (a sketch, a texture: a reference is a style example) gives None, said once per file."""
        from utils.errors import NoFaceError
        from utils.face_alignment import MTCNNDetector, align_face

        if self._detector is None:
            self._detector = MTCNNDetector(device="cpu")
        try:
            return align_face(img, self._detector, key=str(path))[0].image
        except NoFaceError:
            if not reference:
                raise
        if str(path) not in self._unaligned:
            self._unaligned.add(str(path))
            side = self.editor.input_resolution
            _say(f"note: reference {path} holds no face: used as it is (resized to {side}x{side}), not aligned")
        return None

    def _prompt(self, job, image):
        """The job's prompt embedding: made for this input when it depends on it, else once per prompt."""
        if self.editor.prompt_is_per_input(job.prompt):
            self.status.phase(job.stem, f"InstructPix2Pix edits the input in 2D ({self.args.ip2p_steps} steps)")
            with self.clock:
                return self.editor.prompt(image=image, text=job.prompt)
        key = self._key(job)
        if key not in self._prompt_cache:
            reference = None if job.reference_path is None else self._load(job.reference_path, reference=True)
            self.status.phase(job.stem, "encoding the reference" if reference is not None else "encoding the text")
            with self.clock:
                self._prompt_cache[key] = self.editor.prompt(reference=reference, text=job.prompt)
        emb = self._prompt_cache[key]
        self._used(job)
        return emb

    def run(self, batch) -> tuple[list[tuple[str, float]], list[str]]:
        """Edit and write a batch → ([(stem, edit seconds)] of the inputs written, ['path: reason'] of failures).

        A missing weight file (the InstructPix2Pix bridge's) is raised: every later input would fail the same way.
        """
        import torch

        from utils.errors import MissingWeightsError, ThreeDPEError

        label = batch[0].stem if len(batch) == 1 else f"{batch[0].stem} +{len(batch) - 1}"
        self.status.phase(label, "reading" + (" and aligning" if self.args.align else ""))
        images, ok_jobs, errors = [], [], []
        for job in batch:
            try:
                images.append(self._load(job.input_path))
                ok_jobs.append(job)
            except (ThreeDPEError, OSError, ValueError) as e:
                errors.append(f"{job.input_path}: {e}")
        if not ok_jobs:
            self._used(batch[0])
            return [], errors
        x = torch.cat(images)
        refs = [None] * len(ok_jobs)
        start = self.clock.seconds
        try:
            if not self.editor.is_editing:
                self.status.phase(label, "reconstructing the triplane")
                with self.clock:
                    planes = self.editor.reconstruct(x)
            elif self.editor.prompt_is_per_input(ok_jobs[0].prompt):
                planes_list = []
                for i, job in enumerate(ok_jobs):
                    emb = self._prompt(job, x[i : i + 1])
                    refs[i] = emb.reference
                    self.status.phase(job.stem, "encoding the edited triplane")
                    with self.clock:
                        planes_list.append(self.editor.edit(x[i : i + 1], emb))
                planes = torch.cat(planes_list)
            else:
                emb = self._prompt(ok_jobs[0], x)
                refs = [emb.reference] * len(ok_jobs)
                self.status.phase(label, "encoding the edited triplane")
                with self.clock:
                    planes = self.editor.edit(x, emb)
        except MissingWeightsError:
            raise
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

        from utils.atomic import atomic_write_bytes, atomic_write_text
        from utils.image_io import save_png, tensor_to_uint8

        self.status.phase(job.stem, f"rendering {self.cameras.shape[0]} views")
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
        self.status.phase(job.stem, "writing files")
        for i, v in enumerate(views.split(1)):
            save_png(out / f"{job.stem}_view{i}.png", tensor_to_uint8(v[0]))
        if job.prompt is not None:
            atomic_write_text(out / f"{job.stem}_prompt.txt", job.prompt + "\n")
        if self.args.save_triplane:
            from safetensors.torch import save

            atomic_write_bytes(out / f"{job.stem}_triplane.safetensors",
                               save({"triplane": planes.detach().float().cpu().contiguous()}))
        if self.orbit is not None:
            self._video(job, planes)
        if self.args.mesh:
            self._mesh(job, planes)
        save_png(out / f"{job.stem}_mv.png", tensor_to_uint8(strip[0]))  # last: marks the input complete

    def _video(self, job, planes) -> None:
        """`<stem>_orbit.mp4`: the orbit cameras rendered 8 at a time, with a bar over the frames."""
        from utils.image_io import tensor_to_uint8
        from utils.video import AtomicVideoWriter

        n = self.orbit.shape[0]
        self.status.phase(job.stem, f"rendering the orbit video ({n} frames)")
        with AtomicVideoWriter(self.out_dir / f"{job.stem}_orbit.mp4", fps=self.args.video_fps) as writer, \
                self.status.progress(n, f"{job.stem} orbit", "frame") as frames_bar:
            for i in range(0, n, 8):
                with self.clock:
                    frames = self.editor.render(planes, self.orbit[i : i + 8])["image"]
                for f in frames:
                    writer.append(tensor_to_uint8(f))
                frames_bar.update(frames.shape[0])

    def _mesh(self, job, planes) -> None:
        """`<stem>.ply`: marching cubes on the density grid, at --mesh-level or the level `choose_level` picks."""
        from utils.mesh import choose_level, density_grid, marching_cubes, write_ply

        res = self.args.mesh_resolution
        border = max(1, res * 60 // 512)  # the original trims 60 of 512 voxels at each face of the box
        self.status.phase(job.stem, f"meshing (density on a {res}³ grid)")
        grid = density_grid(lambda c: self.editor.sample_density(planes, c), res, progress=self.status.enabled)
        level, note = choose_level(grid, self.args.mesh_level, border)
        try:
            verts, faces = marching_cubes(grid, level=level, border=border)
        except ValueError as e:
            _say(f"warning: {job.stem}: no mesh: {e}; pass --mesh-level LEVEL")
            return
        if note:
            _say(f"note: {job.stem}: {note}; --mesh-level LEVEL sets it")
        write_ply(self.out_dir / f"{job.stem}.ply", verts, faces)


if __name__ == "__main__":
    sys.exit(main())
