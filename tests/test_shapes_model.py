"""The shipped shapes pipeline and judge: they load offline, the judge is right, the encoder is editable."""

import pytest
import torch
from diffusers import StableDiffusionPipeline

from diffusers_emcid.shapes import (
    COLOURS,
    EDITABLE_LAYERS,
    SHAPES,
    conditioning_gap_closed,
    draw_batch,
    end_of_text_separation,
    judge_images,
    load_shapes_judge,
    load_shapes_pipeline,
)
from diffusers_emcid.shapes.render import HELDOUT_TEMPLATES


@pytest.fixture(scope="module")
def pipe() -> StableDiffusionPipeline:
    return load_shapes_pipeline()


@pytest.fixture(scope="module")
def judge():
    return load_shapes_judge()


def test_tokenizer_is_sd1_clip(pipe):
    assert len(pipe.tokenizer) == 49408
    assert pipe.tokenizer("a photo of a cat").input_ids == [49406, 320, 1125, 539, 320, 2368, 49407]
    for word in (*SHAPES, *COLOURS):
        assert len(pipe.tokenizer(word).input_ids) == 3, word


def test_pipeline_draws_32px_images(pipe):
    image = pipe(
        "a red circle", num_inference_steps=2, generator=torch.Generator().manual_seed(0), output_type="pt"
    ).images
    assert image.shape == (1, 3, 32, 32)
    assert torch.isfinite(image).all()


def test_judge_labels_and_accuracy_on_fresh_images(judge):
    assert set(judge.labels) == {f"{c} {s}" for c in COLOURS for s in SHAPES}
    batch = draw_batch(300, seed=20_240_601, templates=HELDOUT_TEMPLATES)
    shapes, colours = judge_images(judge, batch.images)
    colour_names = list(COLOURS)
    right = sum(
        s == SHAPES[i] and c == colour_names[j] for s, c, i, j in zip(shapes, colours, batch.shapes, batch.colours)
    )
    assert right / len(shapes) >= 0.95


def test_encoder_is_not_degenerate(pipe):
    prompts = [f"a {colour} {shape}" for colour in COLOURS for shape in SHAPES]
    assert end_of_text_separation(pipe, prompts) >= 0.5


@pytest.mark.parametrize("layer", EDITABLE_LAYERS)
def test_encoder_is_editable_at_the_demo_layers(pipe, layer):
    for source, destination in [
        ("a red circle", "a red square"),
        ("a drawing of a blue star", "a drawing of a blue heart"),
    ]:
        subject, word = source.split()[-1], destination.split()[-1]
        assert conditioning_gap_closed(pipe, source, destination, subject, word, layer) >= 0.9


def test_shipped_folders_carry_model_cards_that_say_how_they_were_made():
    from diffusers_emcid.shapes import shapes_judge_path, shapes_model_path

    for folder in (shapes_model_path(), shapes_judge_path()):
        card = (folder / "README.md").read_text()
        assert card.startswith("---\n") and "scripts/train_shapes.py" in card, folder
    total = sum(
        p.stat().st_size
        for folder in (shapes_model_path(), shapes_judge_path())
        for p in folder.rglob("*")
        if p.is_file()
    )
    assert total < 20 * 2**20, f"the shipped model and judge take {total / 2**20:.1f} MB"
