import json

import pytest
import torch
from transformers import ResNetConfig, ResNetForImageClassification, ViTImageProcessor

from diffusers_emcid.evaluation import (
    EvaluationPrompt,
    ImageClassifierJudge,
    concept_labels,
    concept_probability,
    draw_images,
    draw_prompt_images,
    evaluate_edits,
    load_evaluation_prompts,
)

from .conftest import assert_pipeline_unchanged, model_state

SAMPLING = {"num_inference_steps": 2}


class BrightnessJudge:
    """A judge callable: P("bright") is the mean pixel value of an image, P("dark") the rest."""

    labels = ["bright", "dark"]

    def __call__(self, images):
        bright = torch.tensor(
            [sum(image.convert("L").getdata()) / (255 * image.width * image.height) for image in images]
        )
        return torch.stack([bright, 1 - bright], dim=1)


def test_concept_labels_match_indices_aliases_and_words():
    labels = ["tabby, tabby cat", "tiger cat", "red square", "blue square", "red circle"]
    assert concept_labels(labels, "tabby cat") == [0]
    assert concept_labels(labels, "Tiger Cat") == [1]
    assert concept_labels(labels, "square") == [2, 3]
    assert concept_labels(labels, "red") == [2, 4]
    assert concept_labels(labels, 3) == [3]
    with pytest.raises(ValueError, match="no label for 'triangle'.*class index"):
        concept_labels(labels, "triangle")
    with pytest.raises(ValueError, match="out of range"):
        concept_labels(labels, 7)
    probabilities = torch.tensor([[0.1, 0.2, 0.3, 0.3, 0.1]])
    torch.testing.assert_close(concept_probability(probabilities, labels, "square"), torch.tensor([0.6]))


def test_image_classifier_judge_wraps_any_transformers_classifier(pipe):
    labels = {0: "red square", 1: "blue square", 2: "red circle"}
    torch.manual_seed(0)
    model = ResNetForImageClassification(
        ResNetConfig(
            embedding_size=8,
            hidden_sizes=[8, 16],
            depths=[1, 1],
            num_labels=3,
            id2label=labels,
            label2id={v: k for k, v in labels.items()},
        )
    )
    judge = ImageClassifierJudge(model, ViTImageProcessor(size={"height": 32, "width": 32}), batch_size=3)
    images = draw_images(pipe, "a red square", seed=0, num_images=5, **SAMPLING)
    probabilities = judge(images)
    assert judge.labels == ["red square", "blue square", "red circle"]
    assert probabilities.shape == (5, 3)
    torch.testing.assert_close(probabilities.sum(1), torch.ones(5))
    one_at_a_time = torch.cat([judge([image]) for image in images])
    torch.testing.assert_close(probabilities, one_at_a_time, rtol=1e-5, atol=1e-6)


def test_evaluate_edits_compares_the_same_seeds_before_and_after_and_restores_the_pipeline(editor, pipe, tmp_path):
    edits = editor.edit([("dog", "cat")])
    prompts = [
        EvaluationPrompt("a photo of dog", "efficacy", "dark", "bright", seed=3),
        EvaluationPrompt("a painting of dog", "generality", "dark", "bright", seed=5),
        EvaluationPrompt("a red car", "specificity", "bright", seed=7),
    ]
    state = model_state(pipe)
    result = evaluate_edits(pipe, edits, BrightnessJudge(), prompts, num_images=3, progress=False, **SAMPLING)
    assert_pipeline_unchanged(pipe, state)

    judge = BrightnessJudge()
    before = draw_images(pipe, "a photo of dog", 3, 3, **SAMPLING)
    edits.apply(pipe)
    after = draw_images(pipe, "a photo of dog", 3, 3, **SAMPLING)
    edits.remove(pipe)
    efficacy = result.rows[0]
    assert efficacy["source_before"] == pytest.approx(float(judge(before)[:, 1].mean()), abs=1e-6)
    assert efficacy["source_after"] == pytest.approx(float(judge(after)[:, 1].mean()), abs=1e-6)
    assert efficacy["source_after"] != efficacy["source_before"], "the edit changed nothing the test can see"
    summary = result.summary["efficacy"]
    assert summary["source_forget"] == pytest.approx(efficacy["source_before"] - efficacy["source_after"], abs=1e-4)
    assert summary["source_to_destination"] == pytest.approx(
        efficacy["destination_after"] - efficacy["destination_before"], abs=1e-4
    )
    specificity = result.rows[2]
    assert result.summary["specificity"]["change"] == pytest.approx(
        specificity["source_after"] - specificity["source_before"], abs=1e-4
    )
    assert specificity["destination_before"] is None

    folder = result.save(tmp_path / "report")
    saved = json.loads((folder / "metrics.json").read_text())
    assert saved["summary"] == result.summary
    assert "| efficacy | a photo of dog | dark |" in (folder / "metrics.md").read_text()
    grid = result.image_grid(cell=16)
    assert grid.height == 2 * 3 * 16 and grid.width > 3 * 16


def test_a_baseline_evaluation_gives_the_before_figures_without_drawing_them_again(editor, pipe, monkeypatch):
    from diffusers_emcid.evaluation import metrics

    first, second = editor.edit([("dog", "cat")]), editor.edit([("dog", "car")])
    prompts = [
        EvaluationPrompt("a photo of dog", "efficacy", "dark", "bright", seed=3),
        EvaluationPrompt("a red car", "specificity", "bright", seed=7),
    ]
    baseline = evaluate_edits(pipe, first, BrightnessJudge(), prompts, num_images=2, progress=False, **SAMPLING)
    full = evaluate_edits(pipe, second, BrightnessJudge(), prompts, num_images=2, progress=False, **SAMPLING)
    drawn = []
    original = metrics.draw_prompt_images
    monkeypatch.setattr(metrics, "draw_prompt_images", lambda *a, **k: drawn.append(a[1]) or original(*a, **k))
    reused = evaluate_edits(
        pipe, second, BrightnessJudge(), prompts, num_images=2, progress=False, baseline=baseline, **SAMPLING
    )
    assert len(drawn) == 1, "only the images after the edit are drawn"
    assert reused.rows == full.rows and reused.summary == full.summary
    assert [before for before, _ in reused.images.values()] == [before for before, _ in full.images.values()]
    with pytest.raises(ValueError, match="no figures of 'a photo of dog'.*num_images=3"):
        evaluate_edits(
            pipe, second, BrightnessJudge(), prompts, num_images=3, progress=False, baseline=baseline, **SAMPLING
        )


def test_images_drawn_together_equal_images_drawn_one_prompt_at_a_time(pipe):
    import numpy as np

    together = draw_prompt_images(pipe, [("a photo of dog", 3), ("a red car", 10)], 3, images_per_call=4, **SAMPLING)
    alone = [draw_images(pipe, "a photo of dog", 3, 3, **SAMPLING), draw_images(pipe, "a red car", 10, 3, **SAMPLING)]
    assert [len(images) for images in together] == [3, 3]
    for batch, single in zip(together, alone):
        for a, b in zip(batch, single):  # 8-bit pixels: batched kernels may round a value to its neighbour
            assert np.abs(np.asarray(a, dtype=int) - np.asarray(b, dtype=int)).max() <= 1
    assert np.abs(np.asarray(together[0][0], dtype=int) - np.asarray(together[0][1], dtype=int)).max() > 1


def test_evaluate_edits_checks_concepts_first_and_removes_the_edits_when_drawing_fails(editor, pipe, monkeypatch):
    import diffusers_emcid.evaluation.metrics as metrics_module

    edits = editor.edit([("dog", "cat")])
    state = model_state(pipe)
    draws = []
    real_draw = metrics_module.draw_prompt_images
    monkeypatch.setattr(metrics_module, "draw_prompt_images", lambda *a, **k: draws.append(1) or real_draw(*a, **k))
    with pytest.raises(ValueError, match="no label for 'purple'"):
        evaluate_edits(
            pipe,
            edits,
            BrightnessJudge(),
            [EvaluationPrompt("dog", "efficacy", "purple", "bright")],
            num_images=1,
            progress=False,
            **SAMPLING,
        )
    assert not draws, "images were drawn before the concepts were checked"

    def failing_after_the_first(*args, **kwargs):
        if draws:
            raise RuntimeError("out of memory")
        draws.append(1)
        return real_draw(*args, **kwargs)

    monkeypatch.setattr(metrics_module, "draw_prompt_images", failing_after_the_first)
    with pytest.raises(RuntimeError, match="out of memory"):
        evaluate_edits(
            pipe,
            edits,
            BrightnessJudge(),
            [EvaluationPrompt("dog", "efficacy", "dark", "bright")],
            num_images=1,
            progress=False,
            **SAMPLING,
        )
    assert_pipeline_unchanged(pipe, state)


def test_evaluation_prompts_from_csv(tmp_path):
    path = tmp_path / "eval.csv"
    path.write_text("group,prompt,source,destination,seed\nefficacy,a dog,dog,cat,4\nspecificity,a car,car,,\n")
    prompts = load_evaluation_prompts(path)
    assert prompts == [
        EvaluationPrompt("a dog", "efficacy", "dog", "cat", 4),
        EvaluationPrompt("a car", "specificity", "car"),
    ]
    path.write_text("group,prompt,source,destination\nefficacy,a dog,dog,\n")
    with pytest.raises(ValueError, match=r"eval.csv, line 2: .*needs a destination"):
        load_evaluation_prompts(path)
    path.write_text("prompt,source\na dog,dog\n")
    with pytest.raises(ValueError, match=r"\['group'\] missing"):
        load_evaluation_prompts(path)
