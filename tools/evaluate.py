"""Evaluate edits: CLIP directional and image-text similarity, identity, LPIPS, multi-view consistency, runtime.

    python -m tools.evaluate --results results --data-dir test_imgs          # a folder written by test_scripts.py
    python -m tools.evaluate --checkpoint pretrained_models/3dpe.pt --data-dir test_imgs --results results

Writes `<results>/metrics.json` and `<results>/metrics.md` (atomically). A metric whose weights are missing is
reported as "unavailable" (with the reason) and the others still run; a metric that does not apply to an input (no
prompt, no reference, one view) is "not applicable". With --checkpoint, the runtime per edit is the median over
inputs of encode prompt + edit + render (no model loading, no file I/O), and a failed inference run makes the report
say "failed" and the exit status non-zero. With `--checkpoint DIR` of a local project folder, the figures
also go into `DIR/README.md` (its model card, see docs/checkpoints.md). See docs/evaluation.md.
"""
from __future__ import annotations

import argparse
import json
import re
import shlex
import statistics
import sys
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import torch

from models.checkpoint.files import CONFIG_FILE, DEFAULT_CHECKPOINT
from tools.editor_options import EditorOptions, add_editor_arguments
from utils.atomic import atomic_write_text
from utils.errors import MissingWeightsError

if TYPE_CHECKING:
    from tools.inference import InferenceOptions

DEFAULT_SOURCE_CAPTION = "a photo of a person"
NOT_APPLICABLE = "not applicable"  # the metric does not apply to this input (no prompt / reference, one view)
UNAVAILABLE = "unavailable"  # the metric's weights are missing (reason in result["unavailable"])
FAILED = "failed"

#: metric → the back-end (`Evaluator` field) it needs
METRIC_BACKENDS = {
    "clip_directional": "clip", "clip_image_text": "clip", "clip_multiview": "clip",
    "identity": "identity", "identity_multiview": "identity", "lpips": "lpips",
}
Score = float | str  # a value, NOT_APPLICABLE or UNAVAILABLE


@dataclass
class EditSample:
    """One evaluated edit: input 1×3×H×W, views V×3×H×W (index `frontal` is the input view), all in [-1,1]."""

    stem: str
    input: torch.Tensor
    views: torch.Tensor
    frontal: int = 0
    reference: torch.Tensor | None = None
    prompt: str | None = None
    source_caption: str = DEFAULT_SOURCE_CAPTION
    target_caption: str | None = None
    seconds: float | None = None  # encode prompt + edit + render of this input (see `run_timed_inference`)

    def applicable(self) -> dict[str, bool]:
        """Which metrics apply: directional needs a prompt or a reference, image-text a text, multi-view ≥ 2 views."""
        target = self.target_caption or self.prompt
        multi = self.views.shape[0] > 1
        return {"clip_directional": self.reference is not None or target is not None,
                "clip_image_text": target is not None, "clip_multiview": multi,
                "identity": True, "identity_multiview": multi, "lpips": True}


@dataclass
class Evaluator:
    """Metric back-ends; each may be None (the metric is then reported unavailable with `reasons[name]`).

    clip: a `pipelines.clip_scores.ClipScorer`; identity: a `models.arcface.IdentityEncoder`;
    lpips: a callable (a N×3×H×W, b) → N distances, inputs in [-1,1].
    """

    clip: object | None = None
    identity: object | None = None
    lpips: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None
    reasons: dict[str, str] = field(default_factory=dict)

    @classmethod
    def from_files(cls, clip_weights: str | None = None, id_weights: str = "pretrained_models/model_ir_se50.pth",
                   lpips_dir: str = "pretrained_models", device: str | None = None) -> "Evaluator":
        """Build every back-end that has its weights; missing ones are recorded in `reasons`."""
        ev = cls()
        try:
            from pipelines.clip_scores import ClipScorer

            ev.clip = ClipScorer(pretrained=clip_weights, device=device)
        except (MissingWeightsError, FileNotFoundError, RuntimeError) as e:
            ev.reasons["clip"] = str(e).splitlines()[0]
        try:
            from models.arcface import load_ir_se50

            ev.identity = load_ir_se50(id_weights)
        except (MissingWeightsError, ValueError) as e:
            ev.reasons["identity"] = str(e).splitlines()[0]
        try:
            from training.losses import build_lpips

            net = build_lpips(weights_dir=lpips_dir).eval()
            ev.lpips = lambda a, b: net(a, b).flatten()
        except (MissingWeightsError, FileNotFoundError, ImportError) as e:
            ev.reasons["lpips"] = str(e).splitlines()[0]
        return ev

    @torch.inference_mode()
    def score(self, s: EditSample) -> dict[str, Score]:
        """Per-sample metrics: a float, NOT_APPLICABLE (the input has no prompt/reference, or one view) or
        UNAVAILABLE (the back-end's weights are missing); plus "seconds" when the edit was timed."""
        edit = s.views[s.frontal : s.frontal + 1]
        applies = s.applicable()
        target = s.target_caption or s.prompt

        def compute(name: str) -> float:
            if name == "clip_directional":
                if s.reference is not None:
                    return float(self.clip.image_directional_similarity(s.input, edit, s.reference)[0])
                return float(self.clip.directional_similarity(s.input, edit, s.source_caption, target)[0])
            if name == "clip_image_text":
                return float(self.clip.image_text_similarity(edit, target)[0])
            if name == "clip_multiview":
                return _mean_pairwise(self.clip.image_embeddings(s.views))
            if name == "identity":
                return float(self.identity.similarity(s.input, edit)[0])
            if name == "identity_multiview":
                return _mean_pairwise(self.identity(s.views))
            return float(self.lpips(s.input, edit)[0])

        m: dict[str, Score] = {}
        for name, backend in METRIC_BACKENDS.items():
            if not applies[name]:
                m[name] = NOT_APPLICABLE
            elif getattr(self, backend) is None:
                m[name] = UNAVAILABLE
            else:
                m[name] = compute(name)
        if s.seconds is not None:
            m["seconds"] = s.seconds
        return m

    def evaluate(self, samples: list[EditSample]) -> dict:
        """Per-sample and mean metrics, which metrics were unavailable and why, and (when the edits were timed)
        `runtime_seconds_per_edit`: the median over inputs of their stored edit durations.

        A mean is over the samples the metric applies to; it is NOT_APPLICABLE if it applies to none, UNAVAILABLE
        if its weights are missing.
        """
        per = {s.stem: self.score(s) for s in samples}
        summary: dict[str, Score] = {}
        for k in METRIC_BACKENDS if samples else ():
            vals = [v[k] for v in per.values()]
            nums = [x for x in vals if not isinstance(x, str)]
            if nums:
                summary[k] = round(statistics.fmean(nums), 4)
            else:
                summary[k] = UNAVAILABLE if UNAVAILABLE in vals else NOT_APPLICABLE
        unavailable = {k: self.reasons[k] for k in ("clip", "identity", "lpips") if k in self.reasons}
        result: dict[str, Any] = {"count": len(samples), "mean": summary, "per_sample": per,
                                  "unavailable": unavailable}
        seconds = [v["seconds"] for v in per.values() if "seconds" in v]
        if seconds:
            result["runtime_seconds_per_edit"] = round(statistics.median(seconds), 4)
            result["runtime_inputs_timed"] = len(seconds)
        return result


def _mean_pairwise(emb: torch.Tensor) -> float:
    """Mean cosine similarity over distinct pairs of unit embeddings V×D."""
    sim = emb @ emb.T
    v = emb.shape[0]
    return float((sim.sum() - sim.diagonal().sum()) / (v * (v - 1)))


def _cell(v: Any) -> str:
    return v if isinstance(v, str) else f"{v:.4f}"


def to_markdown(result: dict) -> str:
    """The report as Markdown: inference status, mean and per-sample tables, runtime, unavailable metrics."""
    lines = []
    inf = result.get("inference")
    if inf is not None and inf["status"] == FAILED:
        lines += [f"**Inference failed** (exit status {inf['exit_code']}): {inf['error']}", ""]
        lines += [f"- {msg}" for msg in inf.get("errors", [])]
        lines += [""] if inf.get("errors") else []
    names = list(result["mean"])
    lines += ["| metric | mean |", "|---|---|"]
    lines += [f"| {k} | {_cell(result['mean'][k])} |" for k in names]
    if result["per_sample"]:
        cols = names + (["seconds"] if "runtime_seconds_per_edit" in result else [])
        lines += ["", "| input | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
        for stem, m in result["per_sample"].items():
            lines.append(f"| {stem} | " + " | ".join(_cell(m.get(k, "—")) for k in cols) + " |")
    if "runtime_seconds_per_edit" in result:
        runtime = (f"Runtime per edit: {result['runtime_seconds_per_edit']} s (median over "
                   f"{result['runtime_inputs_timed']} inputs of encode prompt + edit + render; model loading and "
                   "file I/O excluded).")
        lines += ["", runtime]
    lines.append("")
    for k, why in result["unavailable"].items():
        lines.append(f"- **{k}** {UNAVAILABLE}: {why}")
    lines.append(f"- *{NOT_APPLICABLE}*: the metric does not apply to the input (no text prompt or reference image, "
                 f"or a single view); *{UNAVAILABLE}*: its weights are missing.")
    return "\n".join(lines) + f"\n\n{result['count']} edits.\n"


@dataclass
class InferenceRun:
    """Outcome of `run_timed_inference`: exit status of the inference run, per-input edit seconds (stem → s) and
    the failure (None on success) with the per-input messages (failed or skipped inputs)."""

    exit_code: int
    seconds: dict[str, float] = field(default_factory=dict)
    error: str | None = None
    errors: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.exit_code == 0

    def to_dict(self) -> dict:
        d = {"status": "ok" if self.ok else FAILED, "exit_code": self.exit_code}
        if not self.ok:
            d.update(error=self.error, errors=self.errors)
        return d


def inference_options(args: argparse.Namespace) -> InferenceOptions:
    """The inference run `main` times: its own data and results folders and editor options (typed: no argv round
    trip; no --checkpoint means test_scripts.py's default), with the words of --inference-args over them, parsed
    as test_scripts.py parses its command line (argparse exits on words it rejects)."""
    from tools.inference import InferenceOptions, parse_args

    editor = replace(EditorOptions.from_args(args), checkpoint=args.checkpoint or DEFAULT_CHECKPOINT)
    defaults = InferenceOptions(data_dir=str(Path(args.data_dir)), output_dir=str(Path(args.results)), editor=editor)
    return parse_args(shlex.split(args.inference_args or ""), defaults=defaults)


def run_timed_inference(options: InferenceOptions) -> InferenceRun:
    """Run the inference command (tools/inference.py, what test_scripts.py runs) with `options` in this process.

    Each input's time is the one `tools.inference.run_inference` records: its encode prompt + edit (or
    reconstruct) + render, CUDA synchronised, without model loading, image reading/aligning or file writing. A
    non-zero exit status, a user error (missing checkpoint or inputs) or an exception is a failed run.
    """
    from tools import inference
    from utils.errors import ThreeDPEError

    try:
        report = inference.run_inference(options)
    except ThreeDPEError as e:  # a user error: its message, on one line
        return InferenceRun(exit_code=2, error=" ".join(ln.strip() for ln in str(e).splitlines() if ln.strip()))
    except Exception as e:  # a crash is a failed run, reported as such
        return InferenceRun(exit_code=1, error=f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
    run = InferenceRun(exit_code=report.exit_code, seconds=dict(report.seconds),
                       errors=report.failed + [f"skipped: {msg}" for msg in report.skipped])
    if not run.ok:
        run.error = (f"inference exited with status {run.exit_code}"
                     + (f"; {len(run.errors)} input(s) failed or skipped" if run.errors else ""))
    return run


def _timed_run(args: argparse.Namespace) -> InferenceRun:
    """`run_timed_inference` of `inference_options(args)`; words of --inference-args that argparse rejects (its
    message is already printed) make a failed run."""
    try:
        options = inference_options(args)
    except SystemExit as e:
        return InferenceRun(exit_code=e.code if isinstance(e.code, int) and e.code else 2,
                            error="bad inference arguments")
    return run_timed_inference(options)


def load_results_folder(results: Path, data_dir: Path, source_caption: str = DEFAULT_SOURCE_CAPTION,
                        target_caption: str | None = None, frontal_view: int | None = None) -> list[EditSample]:
    """Pair `<stem>_view{i}.png` files of a test_scripts.py output folder with their inputs and prompts."""
    from utils.image_io import list_images, load_image, pil_to_tensor

    inputs = {p.stem: p for p in list_images(data_dir / "input")}
    refs = {p.stem: p for p in list_images(data_dir / "ref")} if (data_dir / "ref").is_dir() else {}
    stems = sorted({re.sub(r"_view\d+$", "", p.stem) for p in results.glob("*_view*.png")})
    samples = []
    for stem in stems:
        views = sorted(results.glob(f"{stem}_view*.png"), key=lambda p: int(p.stem.rsplit("view", 1)[1]))
        if stem not in inputs:
            print(f"skipped: {stem}: no input image in {data_dir / 'input'}", file=sys.stderr)
            continue
        v = torch.cat([pil_to_tensor(load_image(p)) for p in views])
        x = pil_to_tensor(load_image(inputs[stem]).resize(tuple(v.shape[-2:][::-1])))
        prompt_file = results / f"{stem}_prompt.txt"
        prompt = prompt_file.read_text().strip() if prompt_file.exists() else None
        ref = pil_to_tensor(load_image(refs[stem]).resize(tuple(v.shape[-2:][::-1]))) if (prompt is None and stem in refs) else None
        samples.append(EditSample(stem, x, v, frontal=len(views) // 2 if frontal_view is None else frontal_view,
                                  reference=ref, prompt=prompt, source_caption=source_caption,
                                  target_caption=target_caption))
    return samples


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m tools.evaluate", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--results", required=True, help="output folder of test_scripts.py (written first with --checkpoint)")
    ap.add_argument("--data-dir", default="test_imgs", help="the inputs (input/, ref/) the results were made from")
    ap.add_argument("--inference-args", default=None,
                    help="more test_scripts.py options for that run, as one string; runs it even without --checkpoint "
                         "(write it with '=': --inference-args='--align --batch-size 2')")
    ap.add_argument("--source-caption", default=DEFAULT_SOURCE_CAPTION)
    ap.add_argument("--target-caption", default=None, help="caption of the edited style (text directional score)")
    ap.add_argument("--frontal-view", type=int, default=None, help="index of the input-view render (default: middle)")
    ap.add_argument("--clip-weights", default=None, help="open_clip checkpoint (default pretrained_models/open_clip_vit_b16.bin)")
    ap.add_argument("--id-weights", default="pretrained_models/model_ir_se50.pth")
    ap.add_argument("--lpips-dir", default="pretrained_models")
    add_editor_arguments(ap, defaults=EditorOptions(checkpoint=None),
                         checkpoint_help="run test_scripts.py with this checkpoint (or --random-init) first and time "
                                         "it; the other editor options below are passed on to that run")
    args = ap.parse_args(argv)
    results, data_dir = Path(args.results), Path(args.data_dir)
    run: InferenceRun | None = None
    if args.checkpoint or args.random_init or args.inference_args is not None:
        run = _timed_run(args)
        if not run.ok:
            print(f"error: inference failed: {run.error}", file=sys.stderr)
    samples = load_results_folder(results, data_dir, args.source_caption, args.target_caption, args.frontal_view) \
        if results.is_dir() else []
    if not samples and run is None:
        print(f"error: no '<stem>_view<i>.png' files in {results}", file=sys.stderr)
        return 2
    if run is not None:
        for s in samples:
            s.seconds = run.seconds.get(s.stem)
    ev = Evaluator.from_files(args.clip_weights, args.id_weights, args.lpips_dir, args.device) if samples else Evaluator()
    result = ev.evaluate(samples)
    if run is not None:
        result["inference"] = run.to_dict()
    report = to_markdown(result)
    try:
        atomic_write_text(results / "metrics.json", json.dumps(result, indent=2) + "\n")
        atomic_write_text(results / "metrics.md", report)
    except OSError as e:
        print(f"error: cannot write the report in '{results}': {e.strerror or e}", file=sys.stderr)
        return 1
    if args.checkpoint and (Path(args.checkpoint) / CONFIG_FILE).is_file():  # a local project folder: its card
        from models.checkpoint.model_card import update_evaluation

        measured = {k: v for k, v in result["mean"].items() if not isinstance(v, str)}  # not N/A or unavailable
        card = update_evaluation(args.checkpoint, {**result, "mean": measured, "data": str(data_dir),
                                                   "device": args.device})
        print(f"model card updated: {card}")
    print(report)
    if run is not None and not run.ok:
        return run.exit_code if run.exit_code in (1, 2) else 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
