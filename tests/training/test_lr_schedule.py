"""The student's learning-rate schedule: constant or cosine, with an optional linear warm-up."""
from __future__ import annotations

import math

import pytest

from training.setup import lr_lambda


@pytest.mark.parametrize("schedule", ["constant", "cosine"])
def test_no_warmup_is_the_plain_schedule(schedule):
    f = lr_lambda(schedule, 100)
    assert f(0) == 1.0
    assert f(50) == pytest.approx(1.0 if schedule == "constant" else 0.5)
    assert f(100) == pytest.approx(1.0 if schedule == "constant" else 0.0, abs=1e-12)


def test_warmup_ramps_linearly_then_follows_the_schedule():
    f, plain = lr_lambda("cosine", 100, warmup=10), lr_lambda("cosine", 100)
    assert [f(s) for s in range(3)] == pytest.approx([plain(s) * (s + 1) / 10 for s in range(3)])
    assert f(9) == pytest.approx(plain(9))
    assert all(f(s) == plain(s) for s in range(10, 101))
    assert f(0) < f(4) < f(8)
    assert f(50) == pytest.approx(0.5 * (1 + math.cos(math.pi / 2)))


def test_warmup_reaches_the_optimiser(tmp_path):
    from training.train import TrainConfig
    from training.setup import build_training
    from utils.config import load_config

    cfg = load_config(TrainConfig, "configs/train_tiny.yaml",
                      [f"exp_dir={tmp_path}", "optim.lr=1e-3", "optim.warmup_steps=4", "data.train_root="])
    s = build_training(cfg, train_set=_Empty())
    assert s.opt_g.param_groups[0]["lr"] == pytest.approx(1e-3 / 4)


class _Empty:
    def __len__(self) -> int:
        return 4

    def __getitem__(self, i):  # never read: the test only builds the setup
        raise AssertionError
