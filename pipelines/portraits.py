"""Portrait preparation, the one way every tool turns a picture into encoder input.

    prepare = PortraitPreparer.for_editor(editor, align=True)   # the encoder's side, MTCNN on its device
    portrait = prepare("photo.jpg")              # load → EG3D crop of the main face → R×R
    portrait.tensor                              # 1×3×R×R in [-1,1]; portrait.image: the R×R RGB PIL image
    sketch = prepare("ref.png", needs_face=False)  # a style example: used as it is when it holds no face

The steps: read (a file, a PIL image, a uint8 array or a [-1,1] tensor → 8-bit RGB), align when asked
(`utils.face_alignment.align_face`: the EG3D crop at R), then centre-crop a non-square image and resize to R²
(`datasets.inference_inputs.prepare_portrait`). Nothing is printed: what a tool tells its user (a warning, a
note that a reference held no face) comes back in `Portrait`.
"""
from __future__ import annotations

import os
import warnings
from dataclasses import dataclass, field
from typing import Any

import torch
from PIL import Image


@dataclass
class Portrait:
    """A picture ready for the encoder.

    image: R×R RGB PIL image; tensor: 1×3×R×R float32 in [-1,1]; face_score: the detector's score of the
    aligned face (None: not aligned, because alignment was not asked for or the image holds no face);
    warnings: what the preparation changed that the user should know (a non-square image centre-cropped).
    """

    image: Image.Image
    tensor: torch.Tensor
    face_score: float | None = None
    warnings: list[str] = field(default_factory=list)

    @property
    def aligned(self) -> bool:
        return self.face_score is not None


def read_picture(image: Any) -> Image.Image:
    """A file path, PIL image, uint8 array (H×W×3/4) or float tensor in [-1,1] → 8-bit RGB PIL image.

    Raises BadImageError for a file that is missing or no readable image (`utils.image_io.load_image`).
    """
    from utils.image_io import load_image, to_pil, to_rgb

    if isinstance(image, (str, os.PathLike)):
        return load_image(image)
    return to_rgb(to_pil(image))


class PortraitPreparer:
    """Read, align (when `align`) and resize pictures to `size`² for the encoder.

    size: the encoder's input side (`PortraitEditor.input_resolution`, 512 for the released weights).
    align: crop the main face the way EG3D was trained. The face detector is `detector`, else an
        `MTCNNDetector` on `device` made on the first alignment.
    """

    def __init__(self, size: int, *, align: bool = False, device: str | torch.device | None = None,
                 detector: Any | None = None):
        self.size = int(size)
        self.align = align
        self.device = device
        self._detector = detector

    @classmethod
    def for_editor(cls, editor: Any, size: int | None = None, *, align: bool = False,
                   detector: Any | None = None) -> PortraitPreparer:
        """The preparation a `PortraitEditor` expects: side `portrait_side(editor, size)`, a detector on its device."""
        return cls(portrait_side(editor, size), align=align, device=editor.device, detector=detector)

    @property
    def detector(self) -> Any:
        """The landmark detector used by `align` (made on first use)."""
        if self._detector is None:
            from utils.face_alignment import MTCNNDetector

            self._detector = MTCNNDetector(device=self.device)
        return self._detector

    def __call__(self, image: Any, *, needs_face: bool = True, name: str | None = None) -> Portrait:
        """Prepare one picture (see `read_picture` for what `image` may be).

        needs_face: with `align`, a picture without a face raises NoFaceError (an input portrait); False lets it
            through unaligned (a reference is a style example: a sketch, a texture), `Portrait.aligned` False.
        name: how messages name the picture (default: its path, when it is a file).
        """
        from datasets.inference_inputs import prepare_portrait
        from utils.image_io import pil_to_tensor

        key = str(image) if isinstance(image, (str, os.PathLike)) else None
        name = name or key or "image"
        img = read_picture(image)
        score = None
        if self.align:
            img, score = self._aligned(img, key, needs_face)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            img = prepare_portrait(img, self.size, name=name, suggest_align=not self.align)
        return Portrait(img, pil_to_tensor(img), score, [str(w.message) for w in caught])

    def _aligned(self, img: Image.Image, key: str | None, needs_face: bool) -> tuple[Image.Image, float | None]:
        """The EG3D crop of the main face at `size` and its score; (img, None) for a picture without a face
        when not `needs_face`."""
        from utils.errors import NoFaceError
        from utils.face_alignment import align_face

        try:
            face = align_face(img, self.detector, key=key, output_size=self.size)[0]
        except NoFaceError:
            if needs_face:
                raise
            return img, None
        return face.image, float(face.score)


def portrait_side(editor: Any, size: int | None = None) -> int:
    """The side of the pictures given to `editor`: `size` when given (tests use small sides with tiny models),
    else the encoder's input resolution (512 for the released weights)."""
    return int(size or editor.input_resolution)
