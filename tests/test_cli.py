import json
import re

import pytest
import torch
from transformers import ResNetConfig, ResNetForImageClassification, ViTImageProcessor

from diffusers_emcid import ConceptEdits
from diffusers_emcid.cli import EXIT_BAD_INPUT, load_pairs, main
from diffusers_emcid.testing import tiny_sd_pipeline

from .conftest import CAPTIONS


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
    code, out, err = run(["stats", "--model", model_dir, "--captions", captions, "--cache-dir", cache, "--device", "cpu"], capsys)
    assert code == 0, err
    assert "layers [0, 1, 2, 3]" in out
    out_dir = tmp_path / "edits"
    code, out, err = run(["edit", "--model", model_dir, "--pairs", pairs, "--out", out_dir, "--num-steps", "3",
                          "--cache-dir", cache, "--device", "cpu"], capsys)  # statistics come from the cache
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
    assert run(["edit", "--model", model_dir, "--pairs", pairs, "--captions", captions, "--out", out_dir,
                "--num-steps", "2", "--cache-dir", tmp_path / "cache", "--device", "cpu"], capsys)[0] == 0
    labels = {0: "dog", 1: "cat", 2: "apple", 3: "banana"}
    judge_dir = tmp_path / "judge"
    torch.manual_seed(0)
    ResNetForImageClassification(ResNetConfig(embedding_size=8, hidden_sizes=[8], depths=[1], num_labels=4, id2label=labels,
                                              label2id={v: k for k, v in labels.items()})).save_pretrained(judge_dir)
    ViTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(judge_dir)
    prompts = tmp_path / "eval.csv"
    prompts.write_text("group,prompt,source,destination,seed\nefficacy,a photo of dog,dog,cat,0\nspecificity,an apple,apple,,5\n")
    report = tmp_path / "report"
    code, out, err = run(["eval", "--model", model_dir, "--edits", out_dir, "--judge", judge_dir, "--prompts", prompts,
                          "--num-images", "2", "--steps", "2", "--out", report, "--device", "cpu"], capsys)
    assert code == 0, err
    metrics = json.loads((report / "metrics.json").read_text())
    assert set(metrics["summary"]) == {"efficacy", "specificity"}
    assert (report / "before_after.png").stat().st_size > 0
    assert "| efficacy | a photo of dog | dog |" in out


@pytest.mark.parametrize(
    "argv, message",
    [
        (["edit", "--model", "{tmp}/nowhere", "--pairs", "{pairs}", "--out", "{tmp}/o"], "cannot load the model"),
        (["edit", "--model", "{model}", "--pairs", "{tmp}/missing.csv", "--out", "{tmp}/o"], "pairs file .* does not exist"),
        (["edit", "--model", "{model}", "--pairs", "{bad_pairs}", "--out", "{tmp}/o"], r"bad\.csv, line 2: .*dog"),
        (["edit", "--model", "{model}", "--pairs", "{pairs}", "--out", "{tmp}/o", "--cache-dir", "{tmp}/empty"],
         "no key statistics of .* pass --captions FILE"),
        (["stats", "--model", "{model}", "--captions", "{tmp}/none.txt"], "captions file .* does not exist"),
        (["push", "{tmp}/not-a-folder", "me/x"], "is not a folder"),
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
