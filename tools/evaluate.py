"""Evaluate edits: CLIP directional and image-text similarity, identity, LPIPS, multi-view consistency, runtime.

    python -m tools.evaluate --results results --data-dir test_imgs          # a folder written by test_scripts.py
    python -m tools.evaluate --checkpoint pretrained_models/3dpe.pt --data-dir test_imgs --results results

Writes `<results>/metrics.json` and `<results>/metrics.md`; with `--checkpoint DIR` of a local project folder,
the figures also go into `DIR/README.md` (its model card, see docs/checkpoints.md). A metric whose weights are
missing is reported as unavailable (with the reason) and the others still run. See docs/evaluation.md.
"""
from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from utils.errors import MissingWeightsError

DEFAULT_SOURCE_CAPTION = "a photo of a person"


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
    seconds: float | None = None


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
    def score(self, s: EditSample) -> dict[str, float | None]:
        """Per-sample metrics (None where unavailable or not applicable)."""
        edit = s.views[s.frontal : s.frontal + 1]
        m: dict[str, float | None] = {}
        m["clip_directional"] = m["clip_image_text"] = m["clip_multiview"] = None
        if self.clip is not None:
            if s.reference is not None:
                m["clip_directional"] = float(self.clip.image_directional_similarity(s.input, edit, s.reference)[0])
            target = s.target_caption or s.prompt
            if target is not None:
                if s.reference is None:
                    m["clip_directional"] = float(
                        self.clip.directional_similarity(s.input, edit, s.source_caption, target)[0])
                m["clip_image_text"] = float(self.clip.image_text_similarity(edit, target)[0])
            if s.views.shape[0] > 1:
                m["clip_multiview"] = _mean_pairwise(self.clip.image_embeddings(s.views))
        m["identity"] = m["identity_multiview"] = None
        if self.identity is not None:
            m["identity"] = float(self.identity.similarity(s.input, edit)[0])
            if s.views.shape[0] > 1:
                m["identity_multiview"] = _mean_pairwise(self.identity(s.views))
        m["lpips"] = float(self.lpips(s.input, edit)[0]) if self.lpips is not None else None
        m["seconds"] = s.seconds
        return m

    def evaluate(self, samples: list[EditSample]) -> dict:
        """Per-sample and mean metrics, plus which metrics were unavailable and why."""
        per = {s.stem: self.score(s) for s in samples}
        names = sorted({k for v in per.values() for k in v})
        summary = {}
        for k in names:
            vals = [v[k] for v in per.values() if v.get(k) is not None]
            summary[k] = round(statistics.fmean(vals), 4) if vals else None
        unavailable = {k: self.reasons[k] for k in ("clip", "identity", "lpips") if k in self.reasons}
        return {"count": len(samples), "mean": summary, "per_sample": per, "unavailable": unavailable}


def _mean_pairwise(emb: torch.Tensor) -> float:
    """Mean cosine similarity over distinct pairs of unit embeddings V×D."""
    sim = emb @ emb.T
    v = emb.shape[0]
    return float((sim.sum() - sim.diagonal().sum()) / (v * (v - 1)))


def to_markdown(result: dict) -> str:
    """A Markdown table of the mean metrics (and unavailable ones)."""
    lines = ["| metric | mean |", "|---|---|"]
    for k, v in result["mean"].items():
        lines.append(f"| {k} | {'unavailable' if v is None else v} |")
    for k, why in result["unavailable"].items():
        lines.append(f"\n- **{k}** unavailable: {why}")
    return "\n".join(lines) + f"\n\n{result['count']} edits.\n"


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
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--results", required=True, help="output folder of test_scripts.py (written first with --checkpoint)")
    ap.add_argument("--data-dir", default="test_imgs", help="the inputs (input/, ref/) the results were made from")
    ap.add_argument("--checkpoint", default=None, help="run test_scripts.py with this checkpoint first and time it")
    ap.add_argument("--source-caption", default=DEFAULT_SOURCE_CAPTION)
    ap.add_argument("--target-caption", default=None, help="caption of the edited style (text directional score)")
    ap.add_argument("--frontal-view", type=int, default=None, help="index of the input-view render (default: middle)")
    ap.add_argument("--clip-weights", default=None, help="open_clip checkpoint (default pretrained_models/open_clip_vit_b16.bin)")
    ap.add_argument("--id-weights", default="pretrained_models/model_ir_se50.pth")
    ap.add_argument("--lpips-dir", default="pretrained_models")
    ap.add_argument("--device", default=None)
    args = ap.parse_args(argv)
    results, data_dir = Path(args.results), Path(args.data_dir)
    seconds = None
    if args.checkpoint:
        import test_scripts

        t0 = time.perf_counter()
        rc = test_scripts.main(["--checkpoint", args.checkpoint, "--data-dir", str(data_dir),
                                "--output-dir", str(results)] + (["--device", args.device] if args.device else []))
        seconds = time.perf_counter() - t0
        if rc == 2:
            return rc
    samples = load_results_folder(results, data_dir, args.source_caption, args.target_caption, args.frontal_view)
    if not samples:
        print(f"error: no '<stem>_view<i>.png' files in {results}", file=sys.stderr)
        return 2
    ev = Evaluator.from_files(args.clip_weights, args.id_weights, args.lpips_dir, args.device)
    result = ev.evaluate(samples)
    if seconds is not None:
        result["runtime_seconds_total"] = round(seconds, 3)
        result["runtime_seconds_per_edit"] = round(seconds / len(samples), 3)
    (results / "metrics.json").write_text(json.dumps(result, indent=2) + "\n")
    (results / "metrics.md").write_text(to_markdown(result))
    if args.checkpoint and (Path(args.checkpoint) / "config.json").is_file():  # a local project folder: its card
        from models.model_card import update_evaluation

        card = update_evaluation(args.checkpoint, {**result, "data": str(data_dir), "device": args.device})
        print(f"model card updated: {card}")
    print(to_markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
