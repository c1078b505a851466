"""Align in-the-wild photos to EG3D's 512×512 portrait crop and write an EG3D `dataset.json`.

    python -m tools.preprocess --indir photos --outdir aligned [--all-faces] [--estimate-pose]
                               [--landmarks-dir DIR_OR_JSON] [--device cuda:0]
"""
from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from utils.atomic import atomic_write
from utils.errors import BadImageError, NoFaceError
from utils.face_alignment import FileLandmarks, LandmarkDetector, MTCNNDetector, align_face
from utils.image_io import IMAGE_EXTENSIONS, list_images, load_image, save_png

EXIT_OK = 0
EXIT_FAILED = 1  # nothing aligned at all, or at least one input file could not be read

_EPILOG = f"""\
outputs:
  OUTDIR/<stem>.png            the main (largest) face, 512x512
  OUTDIR/<stem>_face<k>.png    with --all-faces: the other faces, k = 1, 2, ... by decreasing size
  OUTDIR/dataset.json          {{"labels": [["<stem>.png", [25 floats]], ...]}} for the files written
                               by this run (an existing dataset.json is replaced)

images without a face are reported by name and skipped; the others go on.

exit status:
  {EXIT_OK}  at least one face was aligned and every input file could be read
     (images with no face do not make the run fail)
  {EXIT_FAILED}  nothing was aligned, or at least one input file was unreadable
     (the readable ones are still processed and written)
  2  bad command line

input formats: {' '.join(IMAGE_EXTENSIONS)}; EXIF orientation applied; transparency composited
on white; greyscale, palette and 16-bit images converted to 8-bit RGB.
"""


@dataclass
class Summary:
    """What a run did: files written, images with no face, unreadable files (name, message)."""

    written: list[str] = field(default_factory=list)
    no_face: list[str] = field(default_factory=list)
    unreadable: list[tuple[str, str]] = field(default_factory=list)
    images_done: int = 0

    @property
    def exit_code(self) -> int:
        return EXIT_FAILED if (not self.written or self.unreadable) else EXIT_OK

    def text(self) -> str:
        lines = [
            f"aligned {len(self.written)} face(s) from {self.images_done} image(s); "
            f"{len(self.no_face)} without a face; {len(self.unreadable)} unreadable"
        ]
        if self.no_face:
            lines.append("no face found (skipped): " + ", ".join(self.no_face))
        for name, msg in self.unreadable:
            lines.append(f"unreadable: {name}: {msg}")
        return "\n".join(lines)


def _write_json_atomic(path: Path, obj: object) -> None:
    with atomic_write(path, "w", prefix=".dataset.", suffix=".json.tmp") as fh:
        json.dump(obj, fh, indent=1)


def run(
    inputs: Sequence[Path],
    outdir: Path,
    detector: LandmarkDetector,
    all_faces: bool = False,
    estimate_pose: bool = False,
    progress: bool = True,
    log=print,
) -> Summary:
    """Align every image in `inputs` into `outdir` and write `outdir/dataset.json`. Returns the summary."""
    from tqdm import tqdm

    outdir.mkdir(parents=True, exist_ok=True)
    summary = Summary()
    labels: list[list] = []
    bar = tqdm(inputs, desc="aligning", unit="img", disable=not progress, file=sys.stderr)
    for path in bar:
        try:
            image = load_image(path)
        except BadImageError as err:
            summary.unreadable.append((path.name, str(err)))
            bar.write(f"unreadable: {path.name}")
            continue
        summary.images_done += 1
        try:
            faces = align_face(image, detector, all_faces=all_faces, key=path.name, estimate_pose=estimate_pose)
        except NoFaceError:
            summary.no_face.append(path.name)
            bar.write(f"no face: {path.name}")
            continue
        except ValueError as err:  # malformed or degenerate landmarks (e.g. from --landmarks-dir)
            summary.no_face.append(path.name)
            bar.write(f"no usable landmarks: {path.name}: {err}")
            continue
        for k, face in enumerate(faces):
            name = f"{path.stem}.png" if k == 0 else f"{path.stem}_face{k}.png"
            save_png(outdir / name, face.image)
            labels.append([name, face.label])
            summary.written.append(name)
    bar.close()
    _write_json_atomic(outdir / "dataset.json", {"labels": labels})
    log(summary.text())
    return summary


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m tools.preprocess",
        description="Crop portraits exactly like EG3D's in-the-wild pipeline (5 landmarks, POS fit, "
        "512x512 axis-aligned crop) and write camera labels.",
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--indir", required=True, type=Path, help="folder of photos (not recursive), or one image file")
    p.add_argument("--outdir", required=True, type=Path, help="output folder (created)")
    p.add_argument("--all-faces", action="store_true", help="also write every other face as <stem>_face<k>.png")
    p.add_argument(
        "--estimate-pose", action="store_true",
        help="rough yaw/pitch from the landmarks in the camera label (default: frontal camera)",
    )
    p.add_argument(
        "--landmarks-dir", type=Path, default=None,
        help="use landmarks from files instead of MTCNN: a folder of <stem>.txt/.json "
        "(5 lines 'x y': eyeL, eyeR, nose, mouthL, mouthR) or one JSON {file name: landmarks}",
    )
    p.add_argument("--min-confidence", type=float, default=0.9, help="MTCNN faces below this score are ignored (0.9)")
    p.add_argument("--device", default=None, help="device for MTCNN (default: CUDA if available, else CPU)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry; returns the exit status (see --help)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.landmarks_dir is not None:
        try:
            detector: LandmarkDetector = FileLandmarks(args.landmarks_dir)
        except (OSError, ValueError) as err:
            parser.error(f"--landmarks-dir: {err}")
    else:
        detector = MTCNNDetector(device=args.device, min_confidence=args.min_confidence)
    if args.indir.is_file():
        inputs = [args.indir]
    elif args.indir.is_dir():
        inputs = list_images(args.indir)
    else:
        parser.error(f"--indir '{args.indir}' does not exist")
    if not inputs:
        print(f"no images ({' '.join(IMAGE_EXTENSIONS)}) in '{args.indir}'", file=sys.stderr)
        return EXIT_FAILED
    summary = run(
        inputs, args.outdir, detector, all_faces=args.all_faces, estimate_pose=args.estimate_pose,
        progress=not args.no_progress,
    )
    return summary.exit_code


if __name__ == "__main__":
    sys.exit(main())
