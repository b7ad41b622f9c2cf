import dataclasses
import json
import re

import pytest
import torch
from transformers import ResNetConfig, ResNetForImageClassification, ViTImageProcessor

from diffusers_emcid import ConceptEdits, EMCIDConfig
from diffusers_emcid.cli import EXIT_BAD_INPUT, OWN_OPTIONS, build_parser, load_pairs, main, make_config
from diffusers_emcid.testing import tiny_sd_pipeline

from .conftest import CAPTIONS

EDIT = ["edit", "--model", "m", "--pairs", "p.csv", "--out", "o", "--preset", "sdxl-paper"]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny-model")
    tiny_sd_pipeline(seed=0).save_pretrained(folder)
    return folder


@pytest.fixture
def files(tmp_path):
    captions = tmp_path / "captions.txt"
    captions.write_text("\n".join(CAPTIONS) + "\n")
    pairs = tmp_path / "pairs.csv"
    pairs.write_text("source,destination,seed\ndog,cat,3\napple,banana,\n")
    return captions, pairs


def run(argv, capsys):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_edit_stats_and_push_end_to_end(model_dir, files, tmp_path, capsys, hub):
    captions, pairs = files
    cache = tmp_path / "cache"
    code, out, err = run(
        ["stats", "--model", model_dir, "--captions", captions, "--cache-dir", cache, "--device", "cpu"], capsys
    )
    assert code == 0, err
    assert "layers [0, 1, 2, 3]" in out
    out_dir = tmp_path / "edits"
    code, out, err = run(
        [
            "edit",
            "--model",
            model_dir,
            "--pairs",
            pairs,
            "--out",
            out_dir,
            "--num-steps",
            "3",
            "--cache-dir",
            cache,
            "--device",
            "cpu",
        ],
        capsys,
    )  # statistics come from the cache
    assert code == 0, err
    edits = ConceptEdits.from_pretrained(out_dir)
    assert [(r.source, r.destination) for r in edits.requests] == [("apple", "banana"), ("dog", "cat")]
    assert edits.requests[1].seed == 3 and edits.config.num_steps == 3
    code, out, err = run(["push", out_dir, "me/cli-edits", "--private"], capsys)
    assert code == 0, err
    assert "me/cli-edits" in out
    written = {path for commit in hub.commits("me/cli-edits") for path in commit.changed}
    assert "pytorch_lora_weights.safetensors" in written


def test_eval_writes_metrics_and_picture(model_dir, files, tmp_path, capsys):
    captions, pairs = files
    out_dir = tmp_path / "edits"
    assert (
        run(
            [
                "edit",
                "--model",
                model_dir,
                "--pairs",
                pairs,
                "--captions",
                captions,
                "--out",
                out_dir,
                "--num-steps",
                "2",
                "--cache-dir",
                tmp_path / "cache",
                "--device",
                "cpu",
            ],
            capsys,
        )[0]
        == 0
    )
    labels = {0: "dog", 1: "cat", 2: "apple", 3: "banana"}
    judge_dir = tmp_path / "judge"
    torch.manual_seed(0)
    ResNetForImageClassification(
        ResNetConfig(
            embedding_size=8,
            hidden_sizes=[8],
            depths=[1],
            num_labels=4,
            id2label=labels,
            label2id={v: k for k, v in labels.items()},
        )
    ).save_pretrained(judge_dir)
    ViTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(judge_dir)
    prompts = tmp_path / "eval.csv"
    prompts.write_text(
        "group,prompt,source,destination,seed\nefficacy,a photo of dog,dog,cat,0\nspecificity,an apple,apple,,5\n"
    )
    report = tmp_path / "report"
    code, out, err = run(
        [
            "eval",
            "--model",
            model_dir,
            "--edits",
            out_dir,
            "--judge",
            judge_dir,
            "--prompts",
            prompts,
            "--num-images",
            "2",
            "--steps",
            "2",
            "--out",
            report,
            "--device",
            "cpu",
        ],
        capsys,
    )
    assert code == 0, err
    metrics = json.loads((report / "metrics.json").read_text())
    assert set(metrics["summary"]) == {"efficacy", "specificity"}
    assert (report / "before_after.png").stat().st_size > 0
    assert "| efficacy | a photo of dog | dog |" in out


@pytest.mark.parametrize(
    "argv, message",
    [
        (["edit", "--model", "{tmp}/nowhere", "--pairs", "{pairs}", "--out", "{tmp}/o"], "cannot load the model"),
        (
            ["edit", "--model", "{model}", "--pairs", "{tmp}/missing.csv", "--out", "{tmp}/o"],
            "pairs file .* does not exist",
        ),
        (["edit", "--model", "{model}", "--pairs", "{bad_pairs}", "--out", "{tmp}/o"], r"bad\.csv, line 2: .*dog"),
        (
            ["edit", "--model", "{model}", "--pairs", "{pairs}", "--out", "{tmp}/o", "--cache-dir", "{tmp}/empty"],
            "no key statistics of .* pass --captions FILE",
        ),
        (["stats", "--model", "{model}", "--captions", "{tmp}/none.txt"], "captions file .* does not exist"),
        (["push", "{tmp}/not-a-folder", "me/x"], "is not a folder"),
        (["demo", "--massive", "--num-concepts", "401", "--out", "{tmp}/o"], "num_concepts=401: choose 1 to 400"),
    ],
)
def test_bad_input_exits_2_with_a_message_that_names_it(argv, message, model_dir, files, tmp_path, capsys):
    captions, pairs = files
    bad_pairs = tmp_path / "bad.csv"
    bad_pairs.write_text("source,destination\ndog,cat,extra\n")
    values = {"tmp": tmp_path, "pairs": pairs, "model": model_dir, "bad_pairs": bad_pairs}
    code, out, err = run([a.format(**values) for a in argv] + ["--device", "cpu"] * (argv[0] != "push"), capsys)
    assert code == EXIT_BAD_INPUT
    (line,) = [line for line in err.splitlines() if line.startswith(f"emcid {argv[0]}: error: ")]
    assert re.search(message, line), err
    assert not (tmp_path / "o").exists(), "a failed edit left an output folder"


def test_pairs_without_header_and_with_templates(tmp_path):
    path = tmp_path / "p.csv"
    path.write_text("dog,cat\n\nVan Gogh,art\n")
    assert [(r.source, r.destination) for r in load_pairs(path)] == [("dog", "cat"), ("Van Gogh", "art")]
    path.write_text("source,destination,templates\ndog,cat,a photo of {}|{} in a park\n")
    assert load_pairs(path)[0].templates == ("a photo of {}", "{} in a park")
    path.write_text("source,destination,templates\ndog,cat,a photo of a dog\n")
    with pytest.raises(Exception, match=r"line 2: .*\{\}"):
        load_pairs(path)


@pytest.mark.parametrize("command", ["edit", "stats"])
def test_every_config_field_has_an_option_with_its_help(command, capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args([command, "--help"])
    out = capsys.readouterr().out
    for config_field in dataclasses.fields(EMCIDConfig):
        option = f"--{config_field.name.replace('_', '-')}"
        assert re.search(rf"^ +{option} ", out, re.MULTILINE), option
        if config_field.name not in OWN_OPTIONS:  # argparse rewraps the help text
            assert "".join(config_field.metadata["help"].split()) in "".join(out.split()), option


def test_config_options_override_the_preset():
    parser = build_parser()
    assert make_config(parser.parse_args(EDIT), pipe=None) == EMCIDConfig.from_preset("sdxl-paper")
    args = parser.parse_args(
        EDIT
        + [
            "--num-steps",
            "3",
            "--learning-rate",
            "0.05",
            "--layers=-3:-1",
            "--layers-2",
            "0,2",
            "--z-layer",
            "-1",
            "--preservation-weight-2",
            "None",
            "--image-scheduler",
            "DDIMScheduler",
            "--residual",
            "memit",
            "--concept-batch-size",
            "2",
            "--statistics-num-samples",
            "10",
            "--dtype",
            "bfloat16",
        ]
    )
    assert make_config(args, pipe=None) == EMCIDConfig.from_preset(
        "sdxl-paper",
        num_steps=3,
        learning_rate=0.05,
        layers="-3:-1",
        layers_2=[0, 2],
        z_layer=-1,
        preservation_weight_2=None,
        image_scheduler="DDIMScheduler",
        residual="memit",
        concept_batch_size=2,
        statistics_num_samples=10,
        dtype="bfloat16",
    )


@pytest.mark.parametrize(
    "option, message",
    [
        (["--num-steps", "many"], "--num-steps: invalid int value: 'many'"),
        (["--z-layer", "last"], "--z-layer: invalid int value: 'last'"),
        (["--residual", "other"], "--residual: invalid choice: 'other'"),
        (["--layers", "all"], "--layers: 'all' is neither a 'start:stop' slice nor comma-separated layer indices"),
    ],
)
def test_bad_config_options_are_refused(option, message, capsys):
    with pytest.raises(SystemExit) as raised:
        build_parser().parse_args(EDIT + option)
    assert raised.value.code == 2 and message in capsys.readouterr().err
