"""The recipe learns: a shortened `experiments/learn_edit_rule.py` (see docs/training.md, "A recipe shown to learn").

The learning criteria need a few hundred steps (15–40 minutes on 2 busy CPU cores), so they are marked `slow` and
left out of the default run (`python -m pytest tests -m slow` runs them). One process, the same stages as the
documented experiment: the teacher's autoencoder fit, the real loop (`training.train.main`, the full loss stack) on
edit pairs made on the fly, and the evaluation on held-out identities, rules and cameras, with fewer steps and without
the shuffled-reference run. A change that stops the student from learning (a zero learning rate, a loss that ignores
the teacher, a reference that never reaches the editing module, a wrong camera) leaves the trained error near
baseline (a), the teacher's lift of the unedited input, and the test fails.

The default run keeps a short version: the same experiment end to end with a handful of steps (every stage runs and
writes its outputs; whether it learns is the slow tests' question, and tests/training/test_training.py checks that the loss
falls).
"""
from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest

VIEWS = ("render_input_view", "render_side_a", "render_side_b")


@pytest.fixture(scope="module")
def short_run(tmp_path_factory):
    from experiments.learn_edit_rule import quick_config, run_experiment

    cfg = quick_config(str(tmp_path_factory.mktemp("learn") / "out"))
    return cfg, run_experiment(cfg)


@pytest.mark.slow
def test_trained_error_is_at_least_25_percent_below_the_unedited_lift(short_run):
    _, result = short_run
    err = result["errors_l1"]
    for key in VIEWS:
        assert err["trained"][key] <= 0.75 * err["baseline_a"][key], (key, err)


@pytest.mark.slow
def test_the_output_follows_the_reference_rule(short_run):
    _, result = short_run
    assert result["correlation"]["trained_vs_reference_rule"] >= 0.8, result["correlation"]


@pytest.mark.slow
def test_the_fitted_teacher_carries_the_edit(short_run):
    _, result = short_run
    random_init, fitted = result["teacher"]["random_init"], result["teacher"]["fitted"]
    # The lift of an edited image shows the edit: lift(target) − lift(input) is much closer to the 2D edit than
    # "no change" is, and its tone change follows θ; the random teacher does neither.
    assert fitted["psnr_edit_difference_db"] > fitted["edit_difference_zero_db"] + 3.0, fitted
    assert fitted["r_lift_edit_vs_rule"] >= 0.9, fitted
    assert fitted["psnr_edited_db"] > random_init["psnr_edited_db"] + 5.0, (random_init, fitted)


def _assert_outputs_written(out: Path, result: dict) -> None:
    for name in ("result.json", "grid.png", "loss_curves.png"):
        assert (out / name).stat().st_size > 0, name
    saved = json.loads((out / "result.json").read_text())
    assert saved["errors_l1"] == result["errors_l1"]
    assert set(result["errors_l1"]) == {"baseline_a", "trained"}
    assert set(VIEWS) <= set(result["errors_l1"]["trained"])
    assert saved["criteria"] and all(isinstance(v, bool) for v in saved["criteria"].values())


@pytest.mark.slow
def test_outputs_are_written(short_run):
    cfg, result = short_run
    _assert_outputs_written(Path(cfg.out), result)


def test_the_experiment_runs_end_to_end_in_a_few_steps(tmp_path):
    """The short version for the default run: every stage with 2 teacher and 2 student steps, 4 evaluation pairs."""
    from experiments.learn_edit_rule import quick_config, run_experiment

    cfg = replace(quick_config(str(tmp_path / "out")), teacher_steps=2, student_steps=2, eval_pairs=4,
                  student_warmup=1)
    result = run_experiment(cfg)
    _assert_outputs_written(tmp_path / "out", result)
    assert result["teacher"]["fitted"] and result["correlation"]
