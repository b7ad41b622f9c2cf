import contextlib

import pytest
import torch
from diffusers import DDPMScheduler

from diffusers_emcid import ConceptEdit, EMCIDEditor
from diffusers_emcid.images import training_images
from diffusers_emcid.stage1 import optimize_concept_vectors
from diffusers_emcid.testing import tiny_sd_pipeline

from .conftest import CAPTIONS


@contextlib.contextmanager
def count_calls(module):
    calls = []
    handle = module.register_forward_pre_hook(lambda *args: calls.append(1))
    try:
        yield calls
    finally:
        handle.remove()


def run_stage1(editor, request):
    pipe = editor.pipe
    with editor._base_model() as device:
        (result,) = optimize_concept_vectors(
            pipe, editor.encoders, [request], editor.config, DDPMScheduler.from_config(pipe.scheduler.config), device
        )
    return result


def test_stage1_lowers_its_loss_and_respects_the_clamp(editor):
    editor.config.num_steps = 40
    editor.config.learning_rate = 0.05
    result = run_stage1(editor, ConceptEdit("dog", "cat", seed=3))
    first, last = result.losses[:5].mean().item(), result.losses[-5:].mean().item()
    assert last < 0.9 * first, f"stage-1 loss went from {first:.5f} to {last:.5f}"
    assert (
        result.vectors["text_encoder"] - result.h0["text_encoder"]
    ).norm() <= editor.config.clamp_norm_factor * result.h0["text_encoder"].norm() * (1 + 1e-6)
    assert (result.vectors["text_encoder"] - result.h0["text_encoder"]).norm() > 0


def test_clamp_binds_with_a_large_learning_rate(editor):
    editor.config.learning_rate = 50.0
    editor.config.clamp_norm_factor = 0.1
    result = run_stage1(editor, ConceptEdit("dog", "cat", seed=3))
    ratio = (
        (result.vectors["text_encoder"] - result.h0["text_encoder"]).norm() / result.h0["text_encoder"].norm()
    ).item()
    assert ratio == pytest.approx(0.1, rel=1e-5)


def test_same_request_same_vector_other_seed_other_vector(editor):
    request = ConceptEdit("dog", "cat", seed=11)
    a, b = run_stage1(editor, request), run_stage1(editor, request)
    assert torch.equal(a.vectors["text_encoder"], b.vectors["text_encoder"])
    c = run_stage1(editor, ConceptEdit("dog", "cat", seed=12))
    assert not torch.allclose(a.vectors["text_encoder"], c.vectors["text_encoder"])


def test_h0_is_the_clean_state_of_prompt_zero(editor, pipe):
    request = ConceptEdit("dog", "cat", templates=["a photo of {}", "{}"])
    result = run_stage1(editor, request)
    ids = pipe.tokenizer("a photo of dog", return_tensors="pt").input_ids
    with torch.no_grad():
        states = pipe.text_encoder(ids, output_hidden_states=True).hidden_states
    # hidden_states[0] is the embedding output, so layer l's output is hidden_states[l + 1]
    torch.testing.assert_close(result.h0["text_encoder"], states[editor.z_layer + 1][0, 4], rtol=0, atol=1e-6)


def test_generated_training_images_come_from_the_source_prompts(editor, pipe):
    request = ConceptEdit("dog", "cat", templates=["a photo of {}", "{}"], seed=5)
    editor.config.samples_per_prompt = 2
    (images,) = training_images(pipe, [request], editor.config)
    assert images.shape == (2, 2, 3, 16, 16)
    generator = torch.Generator().manual_seed(5)
    expected = pipe(
        ["a photo of dog", "dog"], num_inference_steps=2, generator=[generator, generator], output_type="pt"
    ).images
    torch.testing.assert_close(images[:, 0], expected)


def test_given_images_are_used_sample_major(editor, pipe):
    images = [torch.full((3, 20, 24), value) for value in (0.1, 0.2, 0.3, 0.4)]
    request = ConceptEdit("dog", "cat", templates=["a photo of {}", "{}"], images=images)
    (prepared,) = training_images(pipe, [request], editor.config)
    assert prepared.shape == (2, 2, 3, 16, 16)
    means = prepared.mean(dim=(2, 3, 4))
    torch.testing.assert_close(means, torch.tensor([[0.1, 0.3], [0.2, 0.4]]))


def test_second_edit_hits_the_cache_and_a_changed_template_misses(editor, pipe):
    with count_calls(pipe.unet) as calls:
        editor.edit([("dog", "cat")])
    first = len(calls)
    assert first > 0
    with count_calls(pipe.unet) as calls:
        editor.edit([("dog", "cat")])
    assert len(calls) == 0
    with count_calls(pipe.unet) as calls:
        editor.edit([ConceptEdit("dog", "cat", templates=["An image of {}", "A photo of {}", "a picture of {}"])])
    assert len(calls) == first
    editor.config.num_steps += 1  # a stage-1 setting is part of the key too
    with count_calls(pipe.unet) as calls:
        editor.edit([("dog", "cat")])
    assert len(calls) > first


def test_cache_is_shared_across_editors_and_vectors_do_not_depend_on_batch_company(fast_config, tmp_path):
    pipe = tiny_sd_pipeline(seed=0).to(torch.float64)  # float64: batching changes only the rounding, far below 1e-9
    editor = EMCIDEditor(pipe, fast_config, cache_dir=tmp_path / "cache", progress=False)
    editor.compute_statistics(CAPTIONS)
    alone = editor.edit([("dog", "cat")])
    fresh = EMCIDEditor(pipe, editor.config, cache_dir=tmp_path / "other", progress=False)
    fresh.compute_statistics(CAPTIONS)
    together = fresh.edit([("apple", "banana"), ("dog", "cat")])
    a, b = alone.vectors["text_encoder"][0], together.vectors["text_encoder"][1]
    assert (a - b).norm() / a.norm() < 1e-9


def test_training_images_can_use_another_scheduler_and_the_pipelines_is_restored(editor, pipe):
    from diffusers import DPMSolverMultistepScheduler

    request = ConceptEdit("dog", "cat", templates=["a photo of {}", "{}"], seed=5)
    editor.config.image_scheduler = "DPMSolverMultistepScheduler"
    (images,) = training_images(pipe, [request], editor.config)
    assert type(pipe.scheduler).__name__ == "PNDMScheduler"
    generator = torch.Generator().manual_seed(5)
    pipe.scheduler = DPMSolverMultistepScheduler.from_config(pipe.scheduler.config)
    expected = pipe(
        ["a photo of dog", "dog"], num_inference_steps=2, generator=[generator, generator], output_type="pt"
    ).images
    torch.testing.assert_close(images[:, 0], expected)
