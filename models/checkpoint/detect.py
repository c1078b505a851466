"""Which checkpoint format a local file or folder holds, from its content (never from its name).

First the leading bytes (`sniff`: a folder, a zip `torch.save`, a legacy `torch.save`, a raw pickle,
safetensors), then the top-level keys of the object inside (`format_of`). Hub ids are resolved by the
entry points (`models.checkpoint.load`), not here.
"""
from __future__ import annotations

import pickle
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from models.checkpoint.files import CONFIG_FILE
from models.checkpoint.integrity import corrupt_error, reading
from models.checkpoint.project import project_dir, read_project_config
from models.checkpoint.registry import FORMATS
from utils.errors import UnknownCheckpointFormatError

_ZIP_MAGIC = b"PK\x03\x04"
_TORCH_LEGACY_MAGIC = b"\x80\x02\x8a\nl\xfc\x9cF\xf9 j\xa8P\x19."


def sniff(path: Path) -> str:
    """'dir', 'zip', 'torch-legacy', 'pickle', 'safetensors' from the first bytes of an existing `path`."""
    if path.is_dir():
        return "dir"
    with open(path, "rb") as f:
        head = f.read(16)
    if not head:
        raise corrupt_error(path, "the file is empty")
    if head.startswith(_ZIP_MAGIC):
        return "zip"
    if head.startswith(_TORCH_LEGACY_MAGIC):
        return "torch-legacy"
    if len(head) >= 2 and head[0] == 0x80 and head[1] <= pickle.HIGHEST_PROTOCOL:
        return "pickle"
    if len(head) >= 9 and head[8:9] == b"{":
        return "safetensors"
    raise UnknownCheckpointFormatError(
        f"'{path}' is neither a torch.save file, a pickle, nor a project checkpoint directory "
        f"(first bytes {head[:8]!r}); supported formats: {', '.join(FORMATS)}"
    )


def _encoder_kind(keys: set[str]) -> str | None:
    if any(k.startswith("Ref_encoder.") for k in keys):
        return "3dpe"
    if "Final_encoder.output_net.9.weight" in keys:
        return "live3d-lt"
    if "Final_encoder.output_net.6.weight" in keys:
        return "live3d-normal"
    return None


def format_of(obj: Any, where: str) -> str:
    """The original format of the object read from file `where` (its top-level keys), or a clear error."""
    if isinstance(obj, Mapping):
        keys = set(obj.keys())
        if "G_ema" in keys:
            return "eg3d-pkl"
        if "G_init_kwargs" in keys or ("G" in keys and "G_init_args" in keys):
            return "eg3d-pth"
        if "encoder_state_dict" in keys and isinstance(obj["encoder_state_dict"], Mapping):
            kind = _encoder_kind(set(obj["encoder_state_dict"].keys()))
            if kind is not None:
                return kind
            raise UnknownCheckpointFormatError(
                f"'{where}' has an encoder_state_dict whose keys match neither 3dpe (Ref_encoder.*) nor Live3D LT/Normal "
                f"(Final_encoder.output_net.9 / .6); first keys: {list(obj['encoder_state_dict'])[:5]}"
            )
        found = ", ".join(repr(k) for k in list(obj.keys())[:12])
        raise UnknownCheckpointFormatError(
            f"'{where}' holds a dict with keys [{found}], which matches no supported format "
            f"({', '.join(FORMATS)}): expected 'G_ema' (EG3D .pkl), 'G_init_kwargs'+'G' (converted EG3D .pth) or "
            "'encoder_state_dict'+'renderer_state_dict' (3dpe.pt / Live3D)"
        )
    raise UnknownCheckpointFormatError(
        f"'{where}' holds a {type(obj).__name__}, not a checkpoint dict; supported formats: {', '.join(FORMATS)}"
    )


def project_dir_or_error(path: Path, *, listing: bool = False) -> Path:
    """The project directory `path` names, or UnknownCheckpointFormatError (with the folder's first names)."""
    proj = project_dir(path)
    if proj is None:
        found = ""
        if listing:
            names = sorted(p.name for p in path.iterdir())[:12] if path.is_dir() else [path.name]
            found = f" (found: {names})"
        raise UnknownCheckpointFormatError(f"'{path}' is not a project checkpoint: no {CONFIG_FILE}{found}")
    return proj


def detect_local_format(path: Path) -> str:
    """The format of an existing local `path` (see FORMATS). Cheap: tensors are not read.

    UnknownCheckpointFormatError (saying what was found) for anything unsupported, UnsafePickleError for a
    pickle that asks for a global outside the allow-list, CorruptCheckpointError for a file cut short or damaged.
    """
    from models.checkpoint.safe_unpickle import load_pickle, safe_torch_load

    kind = sniff(path)
    if kind in ("dir", "safetensors"):
        read_project_config(project_dir_or_error(path, listing=True))
        return "threedpe"
    with reading(path):
        obj = load_pickle(path, peek=True) if kind == "pickle" else safe_torch_load(path, map_location="meta")
    return format_of(obj, str(path))
