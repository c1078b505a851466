"""Face detectors for the EG3D crop (`utils.face_alignment`): anything with `detect(image, key) -> [Face]`.

`MTCNNDetector` runs facenet-pytorch's MTCNN (offline); `FileLandmarks` reads landmarks given in files.
Landmarks are 5×2 pixel coordinates (x right, y down) in the order eyeL, eyeR, nose, mouthL, mouthR.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np
import torch
from PIL import Image

from utils.errors import NoFaceError


def as_landmarks(landmarks: Any) -> np.ndarray:
    """10 numbers or 5 pairs → float64 5×2 array; ValueError for another shape or non-finite values."""
    lm = np.asarray(landmarks, dtype=np.float64)
    if lm.shape == (10,):
        lm = lm.reshape(5, 2)
    if lm.shape != (5, 2):
        raise ValueError(f"expected 5×2 landmarks (eyeL, eyeR, nose, mouthL, mouthR), got shape {lm.shape}")
    if not np.all(np.isfinite(lm)):
        raise ValueError("landmarks contain NaN or inf")
    return lm



@dataclass
class Face:
    """One detected face. box: (x0, y0, x1, y1) pixels or None; score in [0,1]; landmarks 5×2 (x right, y down)."""

    box: tuple[float, float, float, float] | None
    score: float
    landmarks: np.ndarray

    @property
    def size(self) -> float:
        """Box width + height (EG3D picks the face with the largest), from the landmarks if there is no box."""
        if self.box is not None:
            x0, y0, x1, y1 = self.box
        else:
            (x0, y0), (x1, y1) = self.landmarks.min(axis=0), self.landmarks.max(axis=0)
        return float((x1 - x0) + (y1 - y0))


@runtime_checkable
class LandmarkDetector(Protocol):
    """Anything that finds faces: `detect(image, key)` → faces, the one to use first.

    `image` is an RGB PIL image; `key` names it (file name) for detectors that look landmarks up.
    """

    def detect(self, image: Image.Image, key: str | None = None) -> list[Face]: ...


class MTCNNDetector:
    """facenet-pytorch MTCNN (weights ship in its wheel; fully offline).

    Keeps faces with score ≥ min_confidence, sorted by box width + height, largest first (EG3D's rule).
    Images whose longer side exceeds `max_side` are detected on a BICUBIC-downscaled copy and the
    points scaled back (None: always full size).
    """

    def __init__(self, device: str | torch.device | None = None, min_confidence: float = 0.9, max_side: int | None = 2048):
        from utils.device import resolve_device

        self.device = resolve_device(device)
        self.min_confidence = float(min_confidence)
        self.max_side = max_side
        self._mtcnn = None

    def _model(self) -> Any:
        if self._mtcnn is None:
            from facenet_pytorch import MTCNN

            self._mtcnn = MTCNN(keep_all=True, device=self.device)
        return self._mtcnn

    def detect(self, image: Image.Image, key: str | None = None) -> list[Face]:
        image = image.convert("RGB") if image.mode != "RGB" else image
        scale = 1.0
        if self.max_side is not None and max(image.size) > self.max_side:
            scale = self.max_side / max(image.size)
            size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
            image = image.resize(size, resample=Image.BICUBIC)
        with torch.inference_mode():
            boxes, probs, points = self._model().detect(image, landmarks=True)
        if boxes is None or points is None:
            return []
        # Under numpy 2, facenet-pytorch returns object arrays: go through Python lists.
        boxes = np.array(np.asarray(boxes).tolist(), dtype=np.float64).reshape(-1, 4)
        probs = np.array([float(p) if p is not None else 0.0 for p in np.asarray(probs).reshape(-1).tolist()])
        points = np.array(np.asarray(points).tolist(), dtype=np.float64).reshape(-1, 5, 2)
        faces = []
        for box, p, lm in zip(boxes, probs, points):
            if p < self.min_confidence:
                continue
            if scale != 1.0:
                box, lm = box / scale, lm / scale
            faces.append(Face(tuple(float(v) for v in box), float(p), lm))
        faces.sort(key=lambda f: f.size, reverse=True)
        return faces


def _faces_from_json(obj: Any, where: str) -> list[Face]:
    """Accepts 10 numbers, 5 pairs, a list of those, {"landmarks": .., "score": .., "box": ..}, or {"faces": [...]}."""
    if isinstance(obj, dict):
        if "faces" in obj:
            return [f for item in obj["faces"] for f in _faces_from_json(item, where)]
        if "landmarks" in obj:
            lm = as_landmarks(obj["landmarks"])
            box = obj.get("box")
            return [Face(tuple(float(v) for v in box) if box is not None else None, float(obj.get("score", 1.0)), lm)]
        raise ValueError(f"{where}: a JSON object needs a 'landmarks' or 'faces' entry")
    arr = np.asarray(obj, dtype=np.float64)
    if arr.size % 10 != 0 or arr.size == 0:
        raise ValueError(f"{where}: expected 10 numbers per face (x y for eyeL, eyeR, nose, mouthL, mouthR), got {arr.size}")
    return [Face(None, 1.0, as_landmarks(lm)) for lm in arr.reshape(-1, 5, 2)]


class FileLandmarks:
    """Landmarks given in files instead of detected.

    `source` is either a folder holding, per image, `<stem>.txt` / `<stem>.json` (or `<file name>.txt`
    / `.json`), or one JSON file mapping image file names or stems to landmarks.
    TXT: 10 numbers per face (x y per line, EG3D's `batch_mtcnn` layout; commas allowed); several faces
    follow one another. JSON: see `_faces_from_json`. Faces are used in file order (the first is the
    main face); coordinates are pixels of the image as loaded (after EXIF rotation).
    """

    def __init__(self, source: str | Path):
        self.source = Path(source)
        self._mapping: dict[str, Any] | None = None
        if self.source.is_file():
            self._mapping = json.loads(self.source.read_text())
            if not isinstance(self._mapping, dict):
                raise ValueError(f"{self.source}: a landmarks file must map image names to landmarks")
        elif not self.source.is_dir():
            raise FileNotFoundError(f"landmarks source '{self.source}' is neither a folder nor a JSON file")

    def detect(self, image: Image.Image, key: str | None = None) -> list[Face]:
        if key is None:
            raise ValueError("FileLandmarks needs the image's file name (key) to find its landmarks")
        name, stem = Path(key).name, Path(key).stem
        if self._mapping is not None:
            for k in (name, stem, str(key)):
                if k in self._mapping:
                    return _faces_from_json(self._mapping[k], f"{self.source}[{k}]")
            raise NoFaceError(f"no landmarks for '{name}' in {self.source}")
        for candidate in (f"{stem}.txt", f"{stem}.json", f"{name}.txt", f"{name}.json"):
            path = self.source / candidate
            if path.is_file():
                text = path.read_text()
                if path.suffix == ".json":
                    return _faces_from_json(json.loads(text), str(path))
                numbers = [float(v) for v in text.replace(",", " ").split()]
                return _faces_from_json(numbers, str(path))
        raise NoFaceError(f"no landmarks file for '{name}': expected {self.source / (stem + '.txt')} or .json")


