"""Pipelines: orchestration over models (load weights, run encoders/renderers/diffusion, batch, write nothing)."""
