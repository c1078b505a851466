"""The file names every reader and writer of checkpoints agrees on, defined here only.

A project-format folder holds CONFIG_FILE (architecture + provenance) and WEIGHTS_FILE (the tensors);
DEFAULT_CHECKPOINT is what the editing tools and `customize` start from when given no checkpoint. This module
imports nothing, so the tools' early argument checks read it without loading torch.
"""
from __future__ import annotations

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
#: What a project-format folder needs, the config first (it tells the folder is one).
PROJECT_FILES = (CONFIG_FILE, WEIGHTS_FILE)
#: The original release's editing weights, where the README says to put them.
DEFAULT_CHECKPOINT = "pretrained_models/3dpe.pt"
#: The exact-resume state in every training checkpoint folder (`exps/<run>/checkpoints/step_*`; training/state.py).
TRAINING_STATE_FILE = "training_state.pt"
