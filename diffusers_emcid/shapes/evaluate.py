"""Measures the shipped (or another) shapes pipeline with the judge; prints and optionally saves JSON.

    python -m diffusers_emcid.shapes.evaluate [--model DIR] [--samples 50] [--templates ...] [--json out.json]

For every colour and shape it draws `--samples` images of each template given by `--templates` (by default
"a {colour} {shape}" and the first held-out template; fixed seeds, the pipeline's scheduler, `SAMPLING`), and
reports the shares the judge reads as the asked shape and colour; it also reports the judge's accuracy on fresh
rendered images.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from diffusers import StableDiffusionPipeline

from ..evaluation import ImageClassifierJudge
from . import SAMPLING, judge_images, load_shapes_judge, load_shapes_pipeline, prompt_accuracy
from .render import COLOURS, HELDOUT_TEMPLATES, SHAPES, caption, draw_batch


def judge_accuracy(judge: ImageClassifierJudge, num_images: int = 2000, seed: int = 123_456) -> float:
    """The share of fresh rendered images (held-out captions, an unused seed) whose colour and shape the judge gets."""
    batch = draw_batch(num_images, seed, HELDOUT_TEMPLATES)
    shapes, colours = judge_images(judge, batch.images)
    names = list(COLOURS)
    right = [s == SHAPES[i] and c == names[j] for s, c, i, j in zip(shapes, colours, batch.shapes, batch.colours)]
    return sum(right) / num_images


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, help="a pipeline folder; the shipped one by default")
    parser.add_argument("--samples", type=int, default=50)
    parser.add_argument("--templates", nargs="+", default=["a {colour} {shape}", HELDOUT_TEMPLATES[0]])
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    if args.model is None:
        pipe = load_shapes_pipeline()
    else:
        pipe = StableDiffusionPipeline.from_pretrained(
            args.model, local_files_only=True, safety_checker=None, requires_safety_checker=False
        )
        pipe.set_progress_bar_config(disable=True)
    judge = load_shapes_judge()
    began = time.time()
    report: dict[str, object] = {
        "sampling": SAMPLING,
        "samples_per_prompt": args.samples,
        "judge_accuracy": judge_accuracy(judge),
    }
    print(f"judge accuracy on fresh images: {report['judge_accuracy']:.4f}", flush=True)
    for template in args.templates:
        rows = {}
        for colour in COLOURS:
            for shape in SHAPES:
                prompt = caption(template, colour, shape)
                result = prompt_accuracy(pipe, judge, prompt, shape, colour, args.samples)
                rows[prompt] = {"shape": result["shape"], "colour": result["colour"]}
                print(f"{prompt!r}: shape {result['shape']:.2f} colour {result['colour']:.2f}", flush=True)
        report[template] = {
            "prompts": rows,
            "min_shape": min(r["shape"] for r in rows.values()),
            "min_colour": min(r["colour"] for r in rows.values()),
            "mean_shape": sum(r["shape"] for r in rows.values()) / len(rows),
            "mean_colour": sum(r["colour"] for r in rows.values()) / len(rows),
        }
        print(template, {k: v for k, v in report[template].items() if k != "prompts"}, flush=True)
    report["seconds"] = time.time() - began
    if args.json:
        args.json.write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
