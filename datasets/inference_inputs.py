"""Inference inputs: which portraits to edit with which prompt, and how each image is prepared.

Layout read by `test_scripts.py` (all optional except `input/`)::

    DATA_DIR/input/<stem>.png     portraits (any format PIL reads)
    DATA_DIR/ref/<stem>.png       reference image for the input of the same stem
    DATA_DIR/prompts.txt          `stem<TAB>prompt` lines; a line without a TAB applies to every input

Precedence for each input: `--prompt` > `--ref` > `ref/<stem>` > prompts file. `prompts.txt` in the data
folder is read only when named with `--prompts-file` or when there is no `ref/` folder.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from utils.errors import BadImageError
from utils.image_io import list_images, load_image

PORTRAIT_SIZE = 512


@dataclass
class EditJob:
    """One input and its prompt: a reference image path, a text, or neither (reconstruction)."""

    stem: str
    input_path: Path
    reference_path: Path | None = None
    prompt: str | None = None


def read_prompts_file(path: Path) -> tuple[dict[str, str], str | None]:
    """Parse `stem<TAB>prompt` lines → ({stem: prompt}, prompt for every input or None)."""
    per_stem: dict[str, str] = {}
    default = None
    for raw in Path(path).read_text(encoding="utf-8").splitlines():
        line = raw.strip("\n")
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        if "\t" in line:
            stem, text = line.split("\t", 1)
            per_stem[stem.strip()] = text.strip()
        else:
            default = line.strip()
    return per_stem, default


def build_jobs(
    data_dir: str | Path,
    *,
    ref: str | Path | None = None,
    prompt: str | None = None,
    prompts_file: str | Path | None = None,
    needs_prompt: bool = True,
) -> tuple[list[EditJob], list[str]]:
    """Pair every input with its prompt → (jobs, problems). Problems name the file and the fix.

    Raises FileNotFoundError for a missing input folder, prompts file or `ref` file, and BadImageError for a
    `ref` that is no readable image: files the command line names are checked before any model loads.
    """
    data_dir = Path(data_dir)
    if ref is not None:
        check_reference_file(ref)
    input_dir = data_dir / "input"
    if not input_dir.is_dir():
        raise FileNotFoundError(
            f"No input folder: '{input_dir}' does not exist. Put portraits in {input_dir}/ "
            "(or pass --data-dir pointing at a folder that has input/)."
        )
    inputs = list_images(input_dir)
    ref_dir = data_dir / "ref"
    refs = {p.stem: p for p in list_images(ref_dir)} if ref_dir.is_dir() else {}
    per_stem: dict[str, str] = {}
    default_prompt = None
    pf = Path(prompts_file) if prompts_file else None
    if pf is None and not ref_dir.is_dir() and (data_dir / "prompts.txt").is_file():
        pf = data_dir / "prompts.txt"
    if pf is not None:
        if not pf.is_file():
            raise FileNotFoundError(f"--prompts-file '{pf}' does not exist: pass an existing file of "
                                    "'stem<TAB>prompt' lines (--prompts-file FILE)")
        per_stem, default_prompt = read_prompts_file(pf)

    jobs, problems = [], []
    for path in inputs:
        job = EditJob(stem=path.stem, input_path=path)
        if not needs_prompt:
            pass
        elif prompt is not None:
            job.prompt = prompt
        elif ref is not None:
            job.reference_path = Path(ref)
        elif path.stem in refs:
            job.reference_path = refs[path.stem]
        elif path.stem in per_stem or default_prompt is not None:
            job.prompt = per_stem.get(path.stem, default_prompt)
        else:
            problems.append(
                f"{path}: no reference (expected {ref_dir / (path.stem + '.png')}) and no prompt; "
                "add one, or pass --ref FILE / --prompt TEXT / --prompts-file FILE"
            )
            continue
        jobs.append(job)
    return jobs, problems


def check_reference_file(ref: str | Path) -> None:
    """Raise FileNotFoundError unless `ref` (the --ref option) is a file, BadImageError unless it decodes."""
    path = Path(ref)
    if not path.is_file():
        what = "is a folder, not an image file" if path.is_dir() else "does not exist"
        raise FileNotFoundError(f"--ref '{path}' {what}: pass the path of a reference image (--ref FILE)")
    try:
        load_image(path)
    except BadImageError as e:
        cause = e.__cause__ or e
        raise BadImageError(f"--ref '{path}' is not a readable image ({type(cause).__name__}: {cause}): pass a "
                            "PNG or JPEG reference (--ref FILE)") from e


def prepare_portrait(img: Image.Image, size: int = PORTRAIT_SIZE, name: str = "image",
                     suggest_align: bool = True) -> Image.Image:
    """Centre-crop a non-square image to a square (with a warning) and resize to size² (PIL bicubic).

    `suggest_align`: the warning suggests --align (False for an image --align has already seen: a reference
    without a face).
    """
    w, h = img.size
    if w != h:
        hint = (" Pass --align to crop the face the way EG3D was trained (much better results on in-the-wild "
                "photos).") if suggest_align else ""
        warnings.warn(f"{name}: {w}x{h} is not square; centre-cropping.{hint}", stacklevel=2)
        side = min(w, h)
        left, top = (w - side) // 2, (h - side) // 2
        img = img.crop((left, top, left + side, top + side))
    if img.size != (size, size):
        img = img.resize((size, size), Image.BICUBIC)
    return img
