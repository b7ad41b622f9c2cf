"""The `emcid` command: demo, edit, eval, stats, push and export.

Exit codes: 0 done; 2 bad input (a missing model or file, a bad pairs or prompts file, no captions); 3 a
numerical failure of the edit; 130 interrupted.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import os
import sys
import typing
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from diffusers import DiffusionPipeline

from .config import EMCIDConfig, LayerSpec, Stage
from .demo import DEMO_NUM_IMAGES, MASSIVE_NUM_CONCEPTS, run_demo, run_massive_demo
from .editor import EMCIDEditor
from .edits import ConceptEdits
from .errors import ConceptEditsLoadError, EMCIDNumericalError
from .evaluation import ImageClassifierJudge, evaluate_edits, load_evaluation_prompts
from .families import pipeline_family
from .key_statistics import CAPTIONS_ENV_VAR, DEFAULT_CAPTIONS, HUB_URL_PREFIX, default_captions, load_captions
from .requests import ConceptEdit
from .shapes import shapes_judge_path, shapes_model_path
from .shapes.names import names_model_path

EXIT_BAD_INPUT, EXIT_NUMERICAL, EXIT_INTERRUPTED = 2, 3, 130
SHAPES_MODEL = "shapes"
"""`--model shapes` names the small shapes pipeline the package ships (`--judge shapes` its judge)."""
BUNDLED_MODELS = {"shapes": (shapes_model_path, "shapes-demo"), "shapes-names": (names_model_path, "shapes-names")}
"""`--model` names of the pipelines the package ships: their folder and the preset of edits on them."""
OWN_OPTIONS = ("preset", "device", "dtype")
"""`EMCIDConfig` fields with options of their own: `--preset` picks the preset, `--device` and `--dtype` also load the
model. Every other field has an option derived from its type and `metadata["help"]`."""
STAGE_TITLES: dict[Stage, str] = {
    "stage1": "stage 1 (one vector per concept)",
    "stage2": "stage 2 (the closed-form update)",
    "statistics": "key statistics",
    "run": "runtime",
}


class CommandError(Exception):
    """A problem with what the user asked for; its message is printed as is."""


def load_pairs(path: str | os.PathLike) -> list[ConceptEdit]:
    """Reads concept pairs from a CSV file: `source,destination` per row, with an optional header that may add
    `templates` (joined by `|`, each containing `{}`) and `seed` columns."""
    path = Path(path)
    if not path.is_file():
        raise CommandError(
            f"the pairs file {str(path)!r} does not exist; write one 'source,destination' pair per line."
        )
    with path.open(newline="", encoding="utf-8") as file:
        rows = [row for row in csv.reader(file) if any(cell.strip() for cell in row)]
    header = [cell.strip().lower() for cell in rows[0]] if rows else []
    has_header = {"source", "destination"} <= set(header)
    columns = header if has_header else ["source", "destination"]
    requests = []
    for line, row in enumerate(rows[1:] if has_header else rows, start=2 if has_header else 1):
        if len(row) < 2 or len(row) > len(columns):
            raise CommandError(f"{path}, line {line}: expected {','.join(columns)}, got {row!r}.")
        fields = {name: cell.strip() for name, cell in zip(columns, row)}
        try:
            kwargs: dict[str, object] = {}
            if fields.get("templates"):
                kwargs["templates"] = [template.strip() for template in fields["templates"].split("|")]
            if fields.get("seed"):
                kwargs["seed"] = int(fields["seed"])
            requests.append(ConceptEdit(fields["source"], fields["destination"], **kwargs))
        except (TypeError, ValueError) as error:
            raise CommandError(f"{path}, line {line}: {error}") from error
    if not requests:
        raise CommandError(f"the pairs file {path} holds no pairs; write one 'source,destination' pair per line.")
    return requests


def load_pipeline(model: str, device: str | None, dtype: str | None) -> DiffusionPipeline:
    """The pipeline of a model id or folder (or a model the package ships), on `device` in `dtype`."""
    source = BUNDLED_MODELS[model][0]() if model in BUNDLED_MODELS else model
    # float32 is diffusers' default; only other dtypes are passed (as `torch_dtype`, which older diffusers need)
    loading = {"torch_dtype": getattr(torch, dtype)} if dtype else {}
    try:
        pipe = DiffusionPipeline.from_pretrained(source, **loading)
    except (OSError, ValueError) as error:
        raise CommandError(
            f"cannot load the model {model!r}: {str(error).splitlines()[0]}\n"
            "Give a diffusers model folder, a Hub id you "
            f"can download (or have in your cache), or one of {list(BUNDLED_MODELS)} for the models this package ships."
        ) from error
    return pipe.to(device or ("cuda" if torch.cuda.is_available() else "cpu"))


def parse_layers(value: str) -> LayerSpec:
    """A layer spec from the command line: a `start:stop` slice, or comma-separated indices."""
    if ":" in value:
        return value
    try:
        return [int(index) for index in value.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{value!r} is neither a 'start:stop' slice nor comma-separated layer indices"
        ) from None


def optional(parse: type) -> Callable[[str], Any]:
    """`parse`, but `none` (any case) gives `None`."""

    def parse_optional(value: str) -> Any:
        return None if value.lower() == "none" else parse(value)

    parse_optional.__name__ = parse.__name__  # argparse names the type in its errors
    return parse_optional


def option_kwargs(hint: Any) -> dict[str, Any]:
    """The `add_argument` keywords that parse a value of a config field's type `hint`."""
    if hint == LayerSpec:
        return {"type": parse_layers, "metavar": "LAYERS"}
    if typing.get_origin(hint) is typing.Literal:
        return {"choices": typing.get_args(hint)}
    if hint in (int, float, str):
        return {"type": hint}
    args = typing.get_args(hint)
    if len(args) == 2 and type(None) in args:
        (inner,) = set(args) - {type(None)}
        if inner in (int, float, str):
            return {"type": optional(inner)}
    raise TypeError(f"the command line cannot parse an EMCIDConfig field of type {hint!r}")


def add_config_options(parser: argparse.ArgumentParser) -> None:
    """Adds an option per `EMCIDConfig` field but `OWN_OPTIONS`, grouped by stage; one not given is left out of the
    namespace, so that the preset's value holds."""
    hints = typing.get_type_hints(EMCIDConfig)
    groups = {stage: parser.add_argument_group(f"{title} settings") for stage, title in STAGE_TITLES.items()}
    for config_field in dataclasses.fields(EMCIDConfig):
        if config_field.name not in OWN_OPTIONS:
            groups[config_field.metadata["stage"]].add_argument(
                f"--{config_field.name.replace('_', '-')}",
                default=argparse.SUPPRESS,
                help=config_field.metadata["help"].replace("%", "%%"),
                **option_kwargs(hints[config_field.name]),
            )


def make_config(args: argparse.Namespace, pipe) -> EMCIDConfig:
    overrides = {
        config_field.name: getattr(args, config_field.name)
        for config_field in dataclasses.fields(EMCIDConfig)
        if config_field.name not in OWN_OPTIONS and hasattr(args, config_field.name)
    }
    if getattr(args, "dtype", None) in ("float16", "bfloat16"):
        overrides["dtype"] = args.dtype
    bundled = BUNDLED_MODELS.get(args.model)
    preset = args.preset or (bundled[1] if bundled else pipeline_family(pipe).default_preset)
    return EMCIDConfig.from_preset(preset, **overrides)


def read_captions(path: str, column: str | None = None) -> list[str]:
    if not path.startswith(HUB_URL_PREFIX) and not Path(path).is_file():
        raise CommandError(
            f"the captions file {path!r} does not exist; give a .txt (one caption a line), .json, .jsonl, .csv or "
            f".parquet file, or a Hub dataset's file as {HUB_URL_PREFIX}OWNER/NAME/FILE."
        )
    try:
        return load_captions(path, column)
    except ImportError as error:
        raise CommandError(str(error)) from error


def command_stats(args: argparse.Namespace) -> None:
    if args.load and args.captions:
        raise CommandError("give --captions (to compute the statistics) or --load (to use shared ones), not both.")
    pipe = load_pipeline(args.model, args.device, args.dtype)
    editor = EMCIDEditor(pipe, make_config(args, pipe), cache_dir=args.cache_dir)
    if args.load:
        covariances = editor.load_statistics(args.load)
    else:
        covariances = editor.compute_statistics(read_captions(args.captions or default_captions(), args.column))
    for component, layers in covariances.items():
        print(f"{component}: statistics of layers {sorted(layers)} cached under {editor.cache.root / 'statistics'}")
    base_model = None if args.model in BUNDLED_MODELS or Path(args.model).exists() else args.model  # Hub ids only
    if args.save:
        print(f"saved to {editor.save_statistics(args.save, base_model)}")
    if args.push:
        url = editor.push_statistics(args.push, base_model, private=args.private)
        print(f"pushed to {url} (others load them with: emcid stats --model {args.model} --load {args.push})")


def command_edit(args: argparse.Namespace) -> None:
    requests = load_pairs(args.pairs)
    pipe = load_pipeline(args.model, args.device, args.dtype)
    editor = EMCIDEditor(pipe, make_config(args, pipe), cache_dir=args.cache_dir)
    if args.captions:
        editor.compute_statistics(read_captions(args.captions))
    elif not editor.has_statistics():
        raise CommandError(
            f"no key statistics of {args.model!r} are cached under {editor.cache.root / 'statistics'}; "
            "pass --captions FILE "
            "(many captions: the paper used 100,000) once, or run `emcid stats` first."
        )
    edits = editor.edit(requests)
    folder = edits.save_pretrained(args.out)
    print(
        f"{len(requests)} concept(s) edited; the adapter is in {folder} "
        f"(load it with pipe.load_concept_edits({str(folder)!r}))."
    )


def command_eval(args: argparse.Namespace) -> None:
    prompts = load_evaluation_prompts(args.prompts)
    pipe = load_pipeline(args.model, args.device, args.dtype)
    edits = ConceptEdits.from_pretrained(args.edits)
    judge_source = shapes_judge_path() if args.judge == SHAPES_MODEL else args.judge
    try:
        judge = ImageClassifierJudge.from_pretrained(judge_source, device=pipe.device)
    except (OSError, ValueError) as error:
        raise CommandError(f"cannot load the judge {args.judge!r}: {str(error).splitlines()[0]}") from error
    sampling = {"num_inference_steps": args.steps, "guidance_scale": args.guidance_scale}
    result = evaluate_edits(pipe, edits, judge, prompts, num_images=args.num_images, **sampling)
    folder = result.save(args.out)
    print(result.table())
    print(f"\nsummary: {result.summary}\nwritten to {folder}")


def command_push(args: argparse.Namespace) -> None:
    if not Path(args.folder).is_dir():
        raise CommandError(f"{args.folder!r} is not a folder; give the folder that `emcid edit --out` wrote.")
    edits = ConceptEdits.from_pretrained(args.folder)
    url = edits.push_to_hub(args.repo_id, private=args.private, revision=args.revision)
    print(f"pushed to {url}")


def command_export(args: argparse.Namespace) -> None:
    path = ConceptEdits.from_pretrained(args.edits).export_kohya(args.out, dtype=args.dtype)
    print(
        f"wrote {path}: put it into models/Lora of AUTOMATIC1111 or Forge (<lora:{path.stem}:1> in the prompt) "
        "or models/loras of ComfyUI (a Load LoRA node with CLIP connected)."
    )


def command_demo(args: argparse.Namespace) -> None:
    if args.massive:
        run_massive_demo(
            Path(args.out or "demo-massive"),
            num_concepts=args.num_concepts,
            device=args.device,
            cache_dir=args.cache_dir,
        )
    else:
        run_demo(Path(args.out or "demo"), num_images=args.num_images, device=args.device, cache_dir=args.cache_dir)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="emcid",
        description="Edit concepts of Stable Diffusion text encoders with EMCID, evaluate and share the edits.",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def add(name: str, help: str, handler: Callable[[argparse.Namespace], None]) -> argparse.ArgumentParser:
        sub = commands.add_parser(name, help=help, description=help)
        sub.set_defaults(handler=handler)
        return sub

    def add_model(sub: argparse.ArgumentParser) -> None:
        sub.add_argument(
            "--model",
            required=True,
            help=f"a diffusers model id or folder (SD 1.x/2.x, SD-XL), or a bundled model: {', '.join(BUNDLED_MODELS)}",
        )
        sub.add_argument("--device", default=None, help="cpu, cuda, cuda:1, ... (default: cuda if available)")
        sub.add_argument(
            "--dtype",
            default=None,
            choices=["float32", "float16", "bfloat16"],
            help="precision to load the model in (stage 1 then autocasts to it)",
        )

    def add_editing(sub: argparse.ArgumentParser) -> None:
        sub.add_argument(
            "--preset",
            default=None,
            help="EMCID preset (default: the family's paper preset); the settings below override it, "
            "'none' clears an optional one, and a value that starts with '-' follows a '=' "
            "(--layers=-5:-1)",
        )
        sub.add_argument(
            "--cache-dir", default=None, help="cache of stage-1 vectors and statistics (default: $EMCID_CACHE)"
        )
        add_config_options(sub)

    demo = add(
        "demo",
        "edit 'circle' -> 'square' in the bundled shapes model, offline, and show the before/after "
        "(--massive: rebind 100 names of the bundled many-concept model at once)",
        command_demo,
    )
    demo.add_argument(
        "--out", default=None, help="folder for before_after.png and the metrics (default: demo, demo-massive)"
    )
    demo.add_argument(
        "--num-images",
        type=int,
        default=DEMO_NUM_IMAGES,
        help=f"images per evaluation prompt (default: {DEMO_NUM_IMAGES}; not with --massive)",
    )
    demo.add_argument(
        "--massive", action="store_true", help="rebind many names of the many-concept model in one edit instead"
    )
    demo.add_argument(
        "--num-concepts",
        type=int,
        default=MASSIVE_NUM_CONCEPTS,
        help=f"names to rebind with --massive (1-400, default: {MASSIVE_NUM_CONCEPTS})",
    )
    demo.add_argument("--device", default="cpu")
    demo.add_argument("--cache-dir", default=None)

    edit = add("edit", "edit concepts of a model and save the edits as a diffusers LoRA folder", command_edit)
    add_model(edit)
    edit.add_argument(
        "--pairs", required=True, help="CSV of 'source,destination' rows (header optional; may add templates, seed)"
    )
    edit.add_argument(
        "--captions",
        default=None,
        help="captions for the key statistics (.txt/.json/.jsonl); needed once per model, then cached",
    )
    edit.add_argument("--out", required=True, help="folder to write the edits to")
    add_editing(edit)

    evaluate = add(
        "eval", "measure edits with an image classifier: before/after metrics, a table and a picture", command_eval
    )
    add_model(evaluate)
    evaluate.add_argument("--edits", required=True, help="the edits' folder or Hub repo")
    evaluate.add_argument(
        "--judge", required=True, help=f"a transformers image-classification model id or folder, or '{SHAPES_MODEL}'"
    )
    evaluate.add_argument("--prompts", required=True, help="CSV with a header group,prompt,source,destination[,seed]")
    evaluate.add_argument("--num-images", type=int, default=8, help="images per prompt, before and after (default: 8)")
    evaluate.add_argument("--steps", type=int, default=50, help="denoising steps (default: 50)")
    evaluate.add_argument("--guidance-scale", type=float, default=7.5)
    evaluate.add_argument("--out", default="emcid-eval", help="folder for metrics.json, metrics.md, before_after.png")

    stats = add(
        "stats",
        "compute (or load shared) key statistics of a model once, cache them, and save or share them",
        command_stats,
    )
    add_model(stats)
    stats.add_argument(
        "--captions",
        default=None,
        help="captions: a .txt (one a line), .json, .jsonl, .csv or .parquet file, or a Hub dataset's "
        f"file as {HUB_URL_PREFIX}OWNER/NAME[@REVISION]/FILE (default: ${CAPTIONS_ENV_VAR}, else "
        f"Conceptual Captions, {DEFAULT_CAPTIONS})",
    )
    stats.add_argument(
        "--column", default=None, help="the caption column of JSON, CSV or parquet rows (default: caption)"
    )
    stats.add_argument(
        "--load",
        default=None,
        metavar="REPO_OR_DIR",
        help="instead of computing them, load statistics shared in a Hub dataset repo or a folder",
    )
    stats.add_argument("--save", default=None, metavar="DIR", help="also write the statistics to a folder")
    stats.add_argument(
        "--push",
        default=None,
        metavar="REPO_ID",
        help="also upload the statistics to a Hub dataset repo, e.g. me/sd15-emcid-statistics",
    )
    stats.add_argument("--private", action="store_true", help="create the --push repo private")
    add_editing(stats)

    push = add("push", "upload an edits folder to the Hugging Face Hub", command_push)
    push.add_argument("folder", help="the folder `emcid edit --out` wrote")
    push.add_argument("repo_id", help="e.g. me/no-van-gogh")
    push.add_argument("--private", action="store_true")
    push.add_argument("--revision", default=None, help="a branch to push to")

    export = add(
        "export", "write edits as one kohya-format LoRA file for AUTOMATIC1111, Forge and ComfyUI", command_export
    )
    export.add_argument("edits", help="the edits' folder or Hub repo")
    export.add_argument("out", help="the .safetensors file to write, e.g. no-van-gogh.safetensors")
    export.add_argument(
        "--dtype",
        default="float32",
        choices=["float32", "float16", "bfloat16"],
        help="storage precision of the factors (default: float32, exact)",
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        args.handler(args)
    except KeyboardInterrupt:
        print("emcid: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except EMCIDNumericalError as error:
        print(f"emcid {args.command}: the edit failed numerically: {error}", file=sys.stderr)
        return EXIT_NUMERICAL
    except (CommandError, ConceptEditsLoadError, ValueError, TypeError, FileNotFoundError) as error:
        print(f"emcid {args.command}: error: {error}", file=sys.stderr)
        return EXIT_BAD_INPUT
    return 0


if __name__ == "__main__":
    sys.exit(main())
