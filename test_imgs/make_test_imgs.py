"""Regenerate the shipped test images (run from the repository root):

    python test_imgs/make_test_imgs.py

input/astronaut.png, input/hopper.png: EG3D 512x512 crops (utils.face_alignment, MTCNN landmarks, CPU)
of the portraits that scikit-image (`skimage.data.astronaut()`) and matplotlib
(`grace_hopper.jpg` sample data) ship; both are public-domain photographs.
ref/astronaut.png: a "bronze statue" made from the crop (greyscale, smoothed, posterised, sepia-toned).
ref/hopper.png: a "pencil sketch" made from the crop (greyscale colour-dodge of the inverted blur).
"""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
from PIL import Image, ImageFilter, ImageOps

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from utils.face_alignment import MTCNNDetector, align_face  # noqa: E402
from utils.image_io import load_image, save_png  # noqa: E402


def source_portraits() -> dict[str, Image.Image]:
    """The two public-domain portraits shipped by scikit-image and matplotlib, as RGB PIL images."""
    import matplotlib.cbook
    import skimage.data

    return {
        "astronaut": Image.fromarray(skimage.data.astronaut()).convert("RGB"),
        "hopper": load_image(matplotlib.cbook.get_sample_data("grace_hopper.jpg", asfileobj=False)),
    }


def statue(img: Image.Image) -> Image.Image:
    """Bronze-statue look: greyscale, median-smoothed, 6-level posterised, then a dark-bronze → gold ramp."""
    grey = ImageOps.grayscale(img).filter(ImageFilter.MedianFilter(5))
    grey = ImageOps.autocontrast(grey, cutoff=1)
    levels = 6
    g = np.asarray(grey, dtype=np.float64) / 255.0
    g = np.round(g * (levels - 1)) / (levels - 1)
    dark, light = np.array([40.0, 26.0, 12.0]), np.array([236.0, 205.0, 150.0])
    rgb = dark + g[..., None] * (light - dark)
    return Image.fromarray(np.clip(np.round(rgb), 0, 255).astype(np.uint8)).filter(ImageFilter.SMOOTH)


def sketch(img: Image.Image) -> Image.Image:
    """Pencil-sketch look: colour-dodge of the greyscale image with its inverted Gaussian blur."""
    grey = np.asarray(ImageOps.grayscale(img), dtype=np.float64)
    blur = np.asarray(ImageOps.grayscale(img).filter(ImageFilter.GaussianBlur(6)), dtype=np.float64)
    dodge = np.minimum(255.0, grey * 255.0 / np.maximum(blur, 1.0))  # grey / (1 - inverted blur)
    dodge = 255.0 - 1.6 * (255.0 - dodge)  # darker strokes
    out = np.clip(np.round(dodge), 0, 255).astype(np.uint8)
    return Image.fromarray(out, mode="L").convert("RGB")


def main() -> None:
    detector = MTCNNDetector(device="cpu")
    out = Path(__file__).resolve().parent
    styles = {"astronaut": statue, "hopper": sketch}
    for name, img in source_portraits().items():
        face = align_face(img, detector, key=name)[0]
        save_png(out / "input" / f"{name}.png", face.image, compress_level=9)
        save_png(out / "ref" / f"{name}.png", styles[name](face.image), compress_level=9)
        print(name, "landmarks in the crop:", np.round(face.crop_landmarks, 1).tolist())


if __name__ == "__main__":
    main()
