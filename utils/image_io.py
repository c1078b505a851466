"""Image files in and out, and conversion between PIL images, uint8 arrays and [-1,1] tensors.

Project convention: images are float tensors in [-1,1], N×3×H×W; they are written to disk as
`round((clamp(x,-1,1)+1)·127.5)` in uint8.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Union

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from utils.atomic import atomic_write
from utils.errors import BadImageError

IMAGE_EXTENSIONS: tuple[str, ...] = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff", ".gif")

ImageLike = Union[Image.Image, np.ndarray, torch.Tensor]


def _high_bit_depth_to_uint8(arr: np.ndarray) -> np.ndarray:
    """Map a 16-bit / 32-bit integer or float array to uint8 (H×W or H×W×C)."""
    if arr.dtype == np.uint8:
        return arr
    if np.issubdtype(arr.dtype, np.floating):
        a = arr.astype(np.float64)
        # Float images are usually in [0,1]; anything larger is taken as already 0..255.
        scale = 255.0 if np.nanmax(a) <= 1.0 else 1.0
        return np.clip(np.round(np.nan_to_num(a) * scale), 0, 255).astype(np.uint8)
    a = arr.astype(np.float64)
    peak = a.max() if a.size else 0.0
    # 16-bit data (the usual case, also when PIL hands it back as 32-bit mode "I").
    if peak <= 65535:
        return np.clip(np.round(a / 257.0), 0, 255).astype(np.uint8)
    return np.clip(np.round(a * (255.0 / peak)), 0, 255).astype(np.uint8)


def _composite_on_white(img: Image.Image) -> Image.Image:
    rgba = img.convert("RGBA")
    background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    return Image.alpha_composite(background, rgba).convert("RGB")


def to_rgb(img: Image.Image) -> Image.Image:
    """Convert any PIL image to 8-bit RGB.

    Transparency (RGBA, LA, PA, P or L/RGB with a `transparency` entry) is composited on white;
    greyscale is replicated to 3 channels; 16-bit and 32-bit integer/float modes are scaled to 8 bits
    (16-bit: value/257, rounded).
    """
    mode = img.mode
    if mode == "RGB":
        if "transparency" in img.info:
            return _composite_on_white(img)
        return img
    if mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        return _composite_on_white(img)
    if mode == "P":
        if "transparency" in img.info or img.palette is not None and img.palette.mode == "RGBA":
            return _composite_on_white(img)
        return img.convert("RGB")
    if mode == "L" and "transparency" in img.info:
        return _composite_on_white(img)
    if mode.startswith("I") or mode == "F":
        arr = _high_bit_depth_to_uint8(np.asarray(img))
        return Image.fromarray(arr, mode="L").convert("RGB")
    return img.convert("RGB")


def _array_to_pil(arr: np.ndarray) -> Image.Image:
    """A decoded H×W or H×W×C array of any dtype → RGB PIL image (alpha composited on white)."""
    arr = np.asarray(arr)
    if arr.ndim == 3 and arr.shape[2] == 1:
        arr = arr[:, :, 0]
    alpha = None
    if arr.ndim == 3 and arr.shape[2] in (2, 4):
        alpha = _high_bit_depth_to_uint8(arr[:, :, -1]).astype(np.float64) / 255.0
        arr = arr[:, :, :-1]
    arr = _high_bit_depth_to_uint8(arr)
    if arr.ndim == 2:
        arr = np.repeat(arr[:, :, None], 3, axis=2)
    if arr.ndim != 3 or arr.shape[2] != 3:
        raise ValueError(f"unsupported array shape {arr.shape}")
    if alpha is not None:
        arr = np.round(arr * alpha[:, :, None] + 255.0 * (1.0 - alpha[:, :, None])).astype(np.uint8)
    return Image.fromarray(arr, mode="RGB")


def load_image(path: str | os.PathLike) -> Image.Image:
    """Read an image file as an 8-bit RGB PIL image, upright.

    EXIF orientation is applied; transparency is composited on white; greyscale, palette,
    CMYK, 16-bit and float images are converted to 8-bit RGB.
    Animated files give their first frame.

    Raises:
        BadImageError: the file is missing, not an image, truncated or in an unsupported format.
    """
    path = Path(path)
    if not path.is_file():
        raise BadImageError(f"Cannot read image '{path}': no such file. Check the path.")
    try:
        with Image.open(path) as img:
            img.load()
            img = ImageOps.exif_transpose(img)
            try:
                return to_rgb(img)
            except (ValueError, TypeError, OSError):
                arr = np.asarray(img)
            return _array_to_pil(arr)
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError, Image.DecompressionBombError) as err:
        first_error = err
    # PIL cannot decode some layouts (e.g. 16-bit RGB TIFF); try imageio before giving up.
    try:
        import imageio.v3 as iio

        arr = iio.imread(path, index=0)
        return _array_to_pil(arr)
    except Exception:  # noqa: BLE001 - any decoder failure means the same thing to the user
        pass
    raise BadImageError(
        f"Cannot read image '{path}': {type(first_error).__name__}: {first_error}. "
        "The file is corrupt, truncated or not an image; re-export it as PNG or JPEG "
        "(or remove it from the input folder)."
    ) from first_error


def pil_to_tensor(img: Image.Image) -> torch.Tensor:
    """PIL image (any mode) → float32 tensor 1×3×H×W in [-1,1] (uint8 v → v/127.5 − 1)."""
    arr = np.asarray(to_rgb(img), dtype=np.float32)
    return torch.from_numpy(arr.copy()).permute(2, 0, 1).unsqueeze(0).div_(127.5).sub_(1.0)


def load_image_tensor(path: str | os.PathLike, resolution: int | None = None,
                      resample: Image.Resampling = Image.Resampling.BICUBIC) -> torch.Tensor:
    """Read an image file (see `load_image`) → float32 tensor 1×3×R×R in [-1,1].

    The image is resized to resolution² with `resample` when its size differs (a non-square image is
    stretched, not cropped); with `resolution` None it keeps its own size (1×3×H×W).
    """
    img = load_image(path)
    if resolution and img.size != (resolution, resolution):
        img = img.resize((resolution, resolution), resample)
    return pil_to_tensor(img)


def tensor_to_uint8(x: torch.Tensor) -> np.ndarray:
    """Float image tensor 3×H×W or 1×3×H×W in [-1,1] → H×W×3 uint8, round((clamp(x,-1,1)+1)·127.5)."""
    if x.dim() == 4:
        if x.shape[0] != 1:
            raise ValueError(f"tensor_to_uint8 takes one image; got a batch of shape {tuple(x.shape)}")
        x = x[0]
    if x.dim() != 3 or x.shape[0] not in (1, 3):
        raise ValueError(f"expected 3×H×W or 1×3×H×W, got shape {tuple(x.shape)}")
    x = x.detach().to(device="cpu", dtype=torch.float32)
    if x.shape[0] == 1:
        x = x.expand(3, -1, -1)
    out = torch.round((x.clamp(-1.0, 1.0) + 1.0) * 127.5).to(torch.uint8)
    return out.permute(1, 2, 0).contiguous().numpy()


def to_pil(image: ImageLike) -> Image.Image:
    """PIL image, uint8 array (H×W or H×W×3/4) or float tensor in [-1,1] (3×H×W, 1×3×H×W) → PIL image.

    A uint8 tensor is taken as H×W×C like a uint8 array.
    """
    if isinstance(image, Image.Image):
        return image
    if isinstance(image, torch.Tensor):
        if image.dtype == torch.uint8:
            image = image.detach().cpu().numpy()
        else:
            return Image.fromarray(tensor_to_uint8(image))
    arr = np.asarray(image)
    if arr.dtype != np.uint8:
        raise ValueError(
            f"numpy images must be uint8 H×W or H×W×C (got dtype {arr.dtype}); "
            "pass float images as torch tensors in [-1,1]"
        )
    if arr.ndim == 3 and arr.shape[2] == 1:
        arr = arr[:, :, 0]
    if arr.ndim not in (2, 3) or (arr.ndim == 3 and arr.shape[2] not in (3, 4)):
        raise ValueError(f"expected H×W or H×W×3/4 uint8, got shape {arr.shape}")
    return Image.fromarray(arr)


def save_png(path: str | os.PathLike, image: ImageLike, compress_level: int = 1) -> Path:
    """Write `image` (see `to_pil`) as PNG atomically: a temporary file in the same folder, then os.replace.

    Parent folders are created. Returns the path written.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    pil = to_pil(image)
    with atomic_write(path, "wb", prefix=f".{path.stem}.", suffix=".tmp.png") as fh:
        pil.save(fh, format="PNG", compress_level=compress_level)
    return path


def list_images(directory: str | os.PathLike) -> list[Path]:
    """Image files (by extension, case-insensitive, see IMAGE_EXTENSIONS) directly in `directory`, sorted.

    Hidden files are skipped. Raises FileNotFoundError if `directory` is not a folder.
    """
    directory = Path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(f"'{directory}' is not a folder")
    return sorted(
        p for p in directory.iterdir()
        if p.is_file() and not p.name.startswith(".") and p.suffix.lower() in IMAGE_EXTENSIONS
    )
