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
import functools
import os
import sys
import time
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tools.editor_options import EditorOptions, add_editor_arguments

if TYPE_CHECKING:
    from pipelines.editor import EditResult, PortraitEditor


def _prog() -> str:
    """`test_scripts.py` when run through it, else `python -m tools.inference` (the usage line names the command typed)."""
    return "python -m tools.inference" if Path(sys.argv[0]).name == "inference.py" else "test_scripts.py"


@dataclass
class InferenceOptions:
    """What `run_inference` does: the command's options, typed (a field per option, with its default).

    `editor` holds the shared editor options (tools/editor_options.py).
    """

    data_dir: str = "test_imgs"
    output_dir: str = "results"
    ref: str | None = None
    prompt: str | None = None
    prompts_file: str | None = None
    yaws: list[float] = field(default_factory=lambda: [-30.0, 0.0, 30.0])
    pitch: float = 0.0
    video: bool = False
    video_frames: int = 288
    video_fps: float = 60.0
    mesh: bool = False
    mesh_resolution: int = 256
    mesh_level: float | None = None
    save_triplane: bool = False
    align: bool = False
    batch_size: int = 1
    skip_existing: bool = False
    editor: EditorOptions = field(default_factory=EditorOptions)

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> InferenceOptions:
        own = {f.name: getattr(args, f.name) for f in fields(cls) if f.name != "editor"}
        return cls(**own, editor=EditorOptions.from_args(args))


def parse_args(argv: list[str] | None = None, defaults: InferenceOptions | None = None) -> InferenceOptions:
    """The command line → `InferenceOptions`. `defaults`: what an option left out means (tools/evaluate.py
    passes its own data folder and editor options, which words in `argv` still override)."""
    d = defaults or InferenceOptions()
    p = argparse.ArgumentParser(prog=_prog(), description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-dir", default=d.data_dir, help="folder with input/ (and ref/, prompts.txt)")
    p.add_argument("--output-dir", default=d.output_dir)
    p.add_argument("--ref", default=d.ref, help="one reference image applied to every input")
    p.add_argument("--prompt", default=d.prompt, help="one text prompt applied to every input")
    p.add_argument("--prompts-file", default=d.prompts_file,
                   help="lines 'stem<TAB>prompt' (a line without TAB applies to all)")
    p.add_argument("--yaws", type=float, nargs="+", default=d.yaws, help="view yaws in degrees from frontal")
    p.add_argument("--pitch", type=float, default=d.pitch, help="view pitch in degrees from level")
    p.add_argument("--video", action="store_true", default=d.video, help="write <stem>_orbit.mp4")
    p.add_argument("--video-frames", type=int, default=d.video_frames)
    p.add_argument("--video-fps", type=float, default=d.video_fps)
    p.add_argument("--mesh", action="store_true", default=d.mesh,
                   help="write <stem>.ply (marching cubes on the density grid)")
    p.add_argument("--mesh-resolution", type=int, default=d.mesh_resolution)
    p.add_argument("--mesh-level", type=float, default=d.mesh_level,
                   help="density iso-level of the mesh (default: 10, EG3D's; when an input's density never crosses "
                        "10, Otsu's threshold of its density grid, with a note)")
    p.add_argument("--save-triplane", action="store_true", default=d.save_triplane,
                   help="write <stem>_triplane.safetensors")
    p.add_argument("--align", action="store_true", default=d.align,
                   help="detect the face and crop it the way EG3D was trained (a reference without a face, e.g. a "
                        "sketch, is used as it is)")
    p.add_argument("--batch-size", type=int, default=d.batch_size)
    p.add_argument("--skip-existing", action="store_true", default=d.skip_existing,
                   help="skip inputs whose outputs are all in --output-dir (continue a stopped batch)")
    add_editor_arguments(p, defaults=d.editor)
    return InferenceOptions.from_args(p.parse_args(argv))


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


def run_inference(options: InferenceOptions) -> InferenceReport:
    """Edit (or reconstruct) every input of `options.data_dir` and write the outputs (options: `parse_args`).

    Each input's time in `InferenceReport.seconds` is its encode prompt + edit (or reconstruct) + render,
    with CUDA synchronised: model loading, reading/aligning images and writing files are not included. A
    batch's editor call (prompt, edit, views) is shared evenly by its inputs; a prompt shared by several inputs
    is encoded once (so the first input of a style carries it: take the median). Prints a line per skipped or
    failed input and a summary. Raises ThreeDPEError for a user error before any input is edited (a missing
    checkpoint or input folder); an error while writing (e.g. a full disk) propagates.

    Under torchrun (WORLD_SIZE > 1) the batches are split across ranks (batch i → rank i mod WORLD_SIZE,
    each rank on its own device), every rank writes its own inputs' outputs, and rank 0 prints the summary
    of all ranks. `options.skip_existing`: inputs whose outputs are all there (`_output_names`) are left out.
    """
    from utils.distributed import destroy_distributed, init_ranks

    ranks = init_ranks(options.editor.device)
    try:
        if ranks is not None:
            options = replace(options, editor=replace(options.editor, device=str(ranks.device)))
        return _run_inference(options, *((0, 1) if ranks is None else (ranks.rank, ranks.world_size)))
    finally:
        if ranks is not None and ranks.owns_group:
            destroy_distributed()


def _run_inference(o: InferenceOptions, rank: int, world: int) -> InferenceReport:
    from utils.distributed import all_gather_object, barrier, is_dist, print_line, rank_share

    grouped = world == 1 or is_dist()  # else ranks without a process group (no MASTER_ADDR): each on its own
    status = _Status(enabled=rank == 0 or not grouped)
    editor, jobs, problems, out_dir = _setup(o, status)
    report = InferenceReport(skipped=list(problems) if rank == 0 else [])  # rank 0 reports them
    for msg in report.skipped:
        print_line(f"skipped: {msg}", file=sys.stderr)
    # Split whole batches (made from every input), so each batch, and so each output, is the one-process one.
    batches = rank_share(list(_batches(jobs, o.batch_size)), rank, world)
    if o.skip_existing:
        batches = _leave_out_complete(o, jobs, batches, out_dir, report, rank, grouped)
    runner = _Runner(editor, o, out_dir, batches, status)
    t0 = time.perf_counter()
    _run_batches(runner, batches, report, status, rank)
    report = _merge(all_gather_object(report), jobs)
    if rank == 0 or not grouped:
        _print_summary(report, o, out_dir, time.perf_counter() - t0, rank, world, grouped)
    sys.stdout.flush()
    sys.stderr.flush()
    barrier()  # torchrun stops the other ranks when one exits non-zero: rank 0 has printed by now
    return report


def _setup(o: InferenceOptions, status: _Status) -> tuple[PortraitEditor, list[Any], list[str], Path]:
    """What the command line names is checked first (file-system checks, milliseconds); then the models load.
    → (editor, jobs, problems: inputs left out, the output folder)."""
    from tools.editor_options import RANDOM_INIT_WARNING
    from utils.device import resolve_device

    e = o.editor
    e.check_checkpoint()
    may_edit = not e.random_init or e.random_init_kind == "edit"
    jobs, problems = _jobs(o, needs_prompt=may_edit)
    needs_text = any(job.prompt is not None for job in jobs)
    if needs_text and e.random_init and may_edit and e.prompt_encoder == "mae":
        e.text_bridge().check()  # a MAE editor reads a text only through InstructPix2Pix
    out_dir = _output_dir(o.output_dir)
    if e.random_init:
        print(RANDOM_INIT_WARNING, file=sys.stderr)
    with status.loading(f"{e.describe()} on {resolve_device(e.device)}"):
        editor = e.build(needs_text=needs_text, warn_random_init=False)
    if may_edit and not editor.is_editing:  # a Live3D checkpoint reconstructs: no prompt needed
        jobs, problems = _jobs(o, needs_prompt=False)
    if any(editor.prompt_is_per_input(job.prompt) for job in jobs):
        editor.text_bridge.check()  # once, before any input (a checkpoint's prompt encoder is known only now)
    return editor, jobs, problems, out_dir


def _leave_out_complete(o: InferenceOptions, jobs: list[Any], batches: list[list[Any]], out_dir: Path,
                        report: InferenceReport, rank: int, grouped: bool) -> list[list[Any]]:
    """--skip-existing: the batches without the inputs whose outputs are all there (listed in `report.complete`)."""
    from utils.distributed import barrier, print_line

    if rank == 0 and grouped:  # no rank writes yet (they wait at the barrier below)
        _remove_leftovers(out_dir)
    complete = _complete_stems(jobs, o, out_dir)
    report.complete = [job.stem for batch in batches for job in batch if job.stem in complete]
    if rank == 0 and grouped:
        print_line(f"skipped {len(complete)} of {len(jobs)} inputs (outputs complete)")
    elif not grouped:
        print_line(f"skipped {len(report.complete)} of {sum(map(len, batches))} inputs of rank {rank} "
                   "(outputs complete)")
    batches = [kept for batch in batches if (kept := [job for job in batch if job.stem not in complete])]
    barrier()  # every rank has listed the folder before any rank writes to it
    return batches


def _run_batches(runner: _Runner, batches: list[list[Any]], report: InferenceReport, status: _Status,
                 rank: int) -> None:
    """Every batch through `runner`, under a progress bar (rank 0, when there is more than a line to show)."""
    from tqdm import tqdm

    bar = tqdm(batches, total=len(batches), desc="editing" if runner.editor.is_editing else "reconstructing",
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


def _print_summary(report: InferenceReport, o: InferenceOptions, out_dir: Path, dt: float, rank: int, world: int,
                   grouped: bool) -> None:
    """The `done:` line (and, under torchrun, every rank's failures after it)."""
    from utils.distributed import print_line

    done = len(report.written)
    print_line(f"done: {done} written to {out_dir}/, {len(report.failed) + len(report.skipped)} failed or "
               "skipped" + (f", {len(report.complete)} already complete" if o.skip_existing else "")
               + f", {dt:.1f} s" + (f" ({dt / done:.2f} s per input)" if done else "")
               + ("" if world == 1 else f", {world} processes" if grouped else f", rank {rank} of {world} alone"))
    if world > 1 and grouped:  # each rank printed its own failures as they came; here are all of them at once
        for msg in report.failed:
            print_line(f"failed: {msg}")


def _jobs(o: InferenceOptions, needs_prompt: bool) -> tuple[list[Any], list[str]]:
    """`build_jobs` for the command line; a missing folder or file named there → ThreeDPEError (one line)."""
    from datasets.inference_inputs import build_jobs
    from utils.errors import ThreeDPEError

    try:
        return build_jobs(o.data_dir, ref=o.ref, prompt=o.prompt, prompts_file=o.prompts_file,
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

    options = parse_args(argv)
    try:
        return run_inference(options).exit_code
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


def _output_names(job: Any, o: InferenceOptions) -> list[str]:
    """The files `_Runner` writes for `job` under these options, `<stem>_mv.png` last (it is written last)."""
    s = job.stem
    names = [f"{s}_view{i}.png" for i in range(len(o.yaws))]
    if job.prompt is not None:
        names.append(f"{s}_prompt.txt")
    if o.save_triplane:
        names.append(f"{s}_triplane.safetensors")
    if o.video:
        names.append(f"{s}_orbit.mp4")
    if o.mesh:
        names.append(f"{s}.ply")
    return names + [f"{s}_mv.png"]


def _complete_stems(jobs: list[Any], o: InferenceOptions, out_dir: Path) -> set[str]:
    """Stems whose every output (`_output_names`) is in `out_dir`. Every output is written to a temporary
    name and renamed when whole, so a file under its final name is complete; a stopped input misses at
    least its `_mv.png`, which is written last."""
    present = set(os.listdir(out_dir))
    return {job.stem for job in jobs if all(name in present for name in _output_names(job, o))}


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
    """Reads a batch of inputs, makes the editor's call (prompt, edit, views), writes every output named by the
    input's stem.

    Only the editor's work runs under `self.clock`; reading and writing do not. Each phase is shown by `status`.
    The editor decides whether a prompt can serve other inputs (`EditResult.reusable_prompt`); the runner keeps
    such a prompt while a later batch of `batches` has the same reference or text, so memory does not grow with
    the number of inputs (an embedding holds its reference image, 3 MB at 512²).
    """

    def __init__(self, editor: PortraitEditor, o: InferenceOptions, out_dir: Path, batches: list[list[Any]],
                 status: _Status | None = None):
        from pipelines.portraits import PortraitPreparer
        from utils.cameras import orbit_cameras, original_test_cameras

        self.editor, self.o, self.out_dir = editor, o, out_dir
        self.cameras = original_test_cameras(o.yaws, o.pitch)
        self.orbit = orbit_cameras(o.video_frames) if o.video else None
        self.status = status or _Status(enabled=False)
        self.clock = _EditClock()
        self.prepare = PortraitPreparer.for_editor(editor, align=o.align)
        self._uses = Counter(self._key(batch[0]) for batch in batches)
        self._prompts: dict = {}  # reusable prompt embeddings by (reference path, text)
        self._unaligned: set[str] = set()  # references without a face, already announced

    @staticmethod
    def _key(job) -> tuple[str, str | None]:
        return str(job.reference_path), job.prompt

    def _used(self, job) -> None:
        """One batch of `job`'s prompt is done with it: forget the embedding after its last batch."""
        key = self._key(job)
        self._uses[key] -= 1
        if self._uses[key] <= 0:
            self._prompts.pop(key, None)
            del self._uses[key]

    def _load(self, path: Path, reference: bool = False):
        """Image file → 1×3×R×R in [-1,1] (`PortraitPreparer`); with --align a reference without a face is used
        as it is, said once per file."""
        portrait = self.prepare(path, needs_face=not reference)
        if reference and self.o.align and not portrait.aligned and str(path) not in self._unaligned:
            self._unaligned.add(str(path))
            side = self.prepare.size
            _say(f"note: reference {path} holds no face: used as it is (resized to {side}x{side}), not aligned")
        for msg in portrait.warnings:
            _say(f"warning: {msg}")
        return portrait.tensor

    def _read(self, batch) -> tuple[list[Any], list[Any], list[str]]:
        """The batch's input images → (1×3×R×R tensors, their jobs, ['path: reason'] of those unread)."""
        from utils.errors import ThreeDPEError

        images, ok_jobs, errors = [], [], []
        for job in batch:
            try:
                images.append(self._load(job.input_path))
                ok_jobs.append(job)
            except (ThreeDPEError, OSError, ValueError) as e:
                errors.append(f"{job.input_path}: {e}")
        return images, ok_jobs, errors

    def run(self, batch) -> tuple[list[tuple[str, float]], list[str]]:
        """Edit and write a batch → ([(stem, edit seconds)] of the inputs written, ['path: reason'] of failures).

        A missing weight file (the InstructPix2Pix bridge's) is raised: every later input would fail the same way.
        """
        from utils.errors import MissingWeightsError, ThreeDPEError

        label = batch[0].stem if len(batch) == 1 else f"{batch[0].stem} +{len(batch) - 1}"
        self.status.phase(label, "reading" + (" and aligning" if self.o.align else ""))
        images, ok_jobs, errors = self._read(batch)
        if not ok_jobs:
            self._used(batch[0])
            return [], errors
        start = self.clock.seconds
        try:
            result = self._edit(images, ok_jobs, label)
        except MissingWeightsError:
            raise
        except (ThreeDPEError, OSError, ValueError) as e:
            return [], errors + [f"{j.input_path}: {e}" for j in ok_jobs]
        shared = (self.clock.seconds - start) / len(ok_jobs)
        timed = []
        for i, job in enumerate(ok_jobs):
            before = self.clock.seconds
            self._write(job, images[i], result, i)
            timed.append((job.stem, round(shared + self.clock.seconds - before, 6)))
        return timed, errors

    def _edit(self, images: list[Any], jobs: list[Any], label: str) -> EditResult:
        """The editor's call for a batch of jobs sharing one prompt: a prompt kept from an earlier batch, else
        the job's reference (read here) or text."""
        import torch

        job = jobs[0]
        prompt, reference = self._prompts.get(self._key(job)), None
        try:
            if prompt is None and job.reference_path is not None:
                reference = self._load(job.reference_path, reference=True)
            show = functools.partial(self._show, jobs, label, reference is not None)
            with self.clock:
                result = self.editor(torch.cat(images), reference=reference, text=job.prompt, prompt=prompt,
                                     cameras=self.cameras, on_step=show)
            if result.reusable_prompt is not None:
                self._prompts[self._key(job)] = result.reusable_prompt
        finally:
            self._used(job)
        return result

    def _show(self, jobs: list[Any], label: str, has_reference: bool, step: str, index: int | None) -> None:
        """The phase `status` shows before each step of the editor's call (`PortraitEditor.__call__`'s on_step)."""
        who = label if index is None else jobs[index].stem
        if step == "prompt" and index is None:
            self.status.phase(jobs[0].stem, "encoding the reference" if has_reference else "encoding the text")
        elif step == "prompt":
            self.status.phase(who, f"InstructPix2Pix edits the input in 2D ({self.o.editor.ip2p_steps} steps)")
        elif step == "edit":
            self.status.phase(who, "encoding the edited triplane")
        elif step == "reconstruct":
            self.status.phase(who, "reconstructing the triplane")
        else:
            self.status.phase(who, f"rendering {self.cameras.shape[0]} views")

    def _write(self, job, image, result: EditResult, i: int) -> None:
        """Every output of input `i` of `result`, `<stem>_mv.png` last (it marks the input complete)."""
        from utils.atomic import atomic_write_bytes, atomic_write_text
        from utils.image_io import save_png, tensor_to_uint8

        out, views, planes = self.out_dir, result.views["image"][i], result.triplanes[i : i + 1]
        strip = _strip(image, result.reference(i), views)
        self.status.phase(job.stem, "writing files")
        for v, view in enumerate(views):
            save_png(out / f"{job.stem}_view{v}.png", tensor_to_uint8(view))
        if job.prompt is not None:
            atomic_write_text(out / f"{job.stem}_prompt.txt", job.prompt + "\n")
        if self.o.save_triplane:
            from safetensors.torch import save

            atomic_write_bytes(out / f"{job.stem}_triplane.safetensors",
                               save({"triplane": planes.detach().float().cpu().contiguous()}))
        if self.orbit is not None:
            self._video(job, planes)
        if self.o.mesh:
            self._mesh(job, planes)
        save_png(out / f"{job.stem}_mv.png", tensor_to_uint8(strip))

    def _video(self, job, planes) -> None:
        """`<stem>_orbit.mp4`: the orbit cameras rendered 8 at a time, with a bar over the frames."""
        from utils.image_io import tensor_to_uint8
        from utils.video import AtomicVideoWriter

        n = self.orbit.shape[0]
        self.status.phase(job.stem, f"rendering the orbit video ({n} frames)")
        with AtomicVideoWriter(self.out_dir / f"{job.stem}_orbit.mp4", fps=self.o.video_fps) as writer, \
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

        res = self.o.mesh_resolution
        border = max(1, res * 60 // 512)  # the original trims 60 of 512 voxels at each face of the box
        self.status.phase(job.stem, f"meshing (density on a {res}³ grid)")
        grid = density_grid(lambda c: self.editor.sample_density(planes, c), res, progress=self.status.enabled)
        level, note = choose_level(grid, self.o.mesh_level, border)
        try:
            verts, faces = marching_cubes(grid, level=level, border=border)
        except ValueError as e:
            _say(f"warning: {job.stem}: no mesh: {e}; pass --mesh-level LEVEL")
            return
        if note:
            _say(f"note: {job.stem}: {note}; --mesh-level LEVEL sets it")
        write_ply(self.out_dir / f"{job.stem}.ply", verts, faces)


def _strip(image, reference, views):
    """The `<stem>_mv.png` picture 3×H×(k·H): input | reference (when there is one) | views V×3×H×H, each tile
    resized to the views' side."""
    import torch

    tiles = [_tile(image, views)] + ([_tile(reference, views)] if reference is not None else []) + list(views.split(1))
    return torch.cat(tiles, dim=-1)[0]


def _tile(t, views):
    """An image 1×3×h×h as a tile of the strip: on the views' device and dtype, at their side (bicubic)."""
    import torch.nn.functional as F

    side = views.shape[-1]
    t = t.to(views.device, views.dtype)
    if t.shape[-1] != side:
        t = F.interpolate(t, size=(side, side), mode="bicubic", align_corners=False, antialias=True)
    return t


if __name__ == "__main__":
    sys.exit(main())
