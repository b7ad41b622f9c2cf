"""The fast stage 1 (concept batches, cached text-encoder prefix) against the reference path."""

import dataclasses

import pytest
import torch
from diffusers import DDPMScheduler

from diffusers_emcid import ConceptEdit, EMCIDConfig, EMCIDEditor
from diffusers_emcid.conditioning import encode_prompts, tokenize_alike
from diffusers_emcid.hooks import captured_outputs, run_until_stopped
from diffusers_emcid.stage1 import optimize_concept_vectors
from diffusers_emcid.testing import tiny_sd2_pipeline, tiny_sd_pipeline, tiny_sdxl_pipeline
from diffusers_emcid.tokens import subject_token_positions

# Concepts of different prompt lengths and template counts, one trained on the true noise.
REQUESTS = [
    ConceptEdit("dog", "cat", seed=1),
    ConceptEdit("red apple", "green tree", templates=["a photo of {}", "{} on a street by a house"], seed=2),
    ConceptEdit("car", "banana", seed=3, use_real_noise=True),
    ConceptEdit(
        "house", "circle", templates=["{}", "a painting of a {} in the park", "an image of {}", "{} art"], seed=4
    ),
]
RELATIVE_TOLERANCE = 1e-9
"""Batched and one-at-a-time runs differ only by rounding (batched kernels sum in other orders, and the thread count
changes the order too). The runs are compared in float64 (machine epsilon 1.1e-16): ten Adam steps amplify a rounding
difference about 1e3-fold (float32 runs of the same tests measure 1e-6 to 1.9e-4 against epsilon 6e-8), so float64
runs agree to about 1e-13 (measured: 4e-15 at most), while a change of seed moves a vector by more than 1e-2."""


def float64_pipeline(make_pipe):
    return make_pipe(seed=0).to(torch.float64)


def run(pipe, requests, **overrides):
    config = EMCIDConfig.from_preset("sd1-paper", **{"num_steps": 10, "image_num_inference_steps": 2, **overrides})
    editor = EMCIDEditor(pipe, config, progress=False)
    with editor._base_model() as device:
        return optimize_concept_vectors(
            pipe, editor.encoders, requests, config, DDPMScheduler.from_config(pipe.scheduler.config), device
        )


def relative_difference(a, b):
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("make_pipe", [tiny_sd_pipeline, tiny_sd2_pipeline, tiny_sdxl_pipeline])
def test_batched_fast_stage1_equals_one_at_a_time_reference_concept_by_concept(make_pipe):
    pipe = float64_pipeline(make_pipe)
    reference = [run(pipe, [request], stage1_mode="reference")[0] for request in REQUESTS]
    batched = run(pipe, REQUESTS, stage1_mode="fast")
    for request, ref, fast in zip(REQUESTS, reference, batched):
        assert len(fast.losses) == len(ref.losses) == 10
        torch.testing.assert_close(fast.losses, ref.losses, rtol=RELATIVE_TOLERANCE, atol=0)
        for component, vector in ref.vectors.items():
            assert relative_difference(fast.vectors[component], vector) < RELATIVE_TOLERANCE, request
            assert not torch.allclose(vector, ref.h0[component]), "stage 1 moved nothing"


def test_a_concepts_result_does_not_depend_on_batch_company_or_order():
    pipe = float64_pipeline(tiny_sd_pipeline)
    forward = run(pipe, REQUESTS)
    backward = run(pipe, REQUESTS[::-1])[::-1]
    pairs = run(pipe, REQUESTS[1:3])
    for index, (a, b) in enumerate(zip(forward, backward)):
        assert relative_difference(a.vectors["text_encoder"], b.vectors["text_encoder"]) < RELATIVE_TOLERANCE
    for a, b in zip(forward[1:3], pairs):
        assert relative_difference(a.vectors["text_encoder"], b.vectors["text_encoder"]) < RELATIVE_TOLERANCE
    # while different seeds give clearly different vectors: the tolerance is far below what a change would cause
    other = run(pipe, [dataclasses.replace(REQUESTS[0], seed=99)])[0]
    assert (
        relative_difference(other.vectors["text_encoder"], forward[0].vectors["text_encoder"])
        > 1e6 * RELATIVE_TOLERANCE
    )


@pytest.mark.parametrize("make_pipe", [tiny_sd_pipeline, tiny_sdxl_pipeline])
def test_cached_prefix_gives_the_full_forwards_outputs_and_gradients(make_pipe):
    pipe = float64_pipeline(make_pipe)
    editor = EMCIDEditor(pipe, EMCIDConfig(layers=[1, 2]), progress=False)  # z layer 2: layers 3.. run per step
    prompts = ["a photo of dog", "dog on a street by a house", "an image of dog"]
    encoders = editor.encoders
    batches = tokenize_alike(encoders, prompts)
    positions = [torch.tensor(subject_token_positions(e.tokenizer, prompts, "dog")) for e in encoders]
    generator = torch.Generator().manual_seed(0)
    probes = None

    def loss_and_gradients(use_prefix):
        nonlocal probes
        deltas = [
            torch.randn(
                e.layout.hidden_size, generator=torch.Generator().manual_seed(1), dtype=torch.float64
            ).requires_grad_()
            for e in encoders
        ]
        rows = torch.arange(len(prompts))
        if use_prefix:
            states = []
            for encoder, batch, position, delta in zip(encoders, batches, positions, deltas):
                z_module = encoder.layout.layers[encoder.z_layer]
                with torch.no_grad(), captured_outputs({"z": z_module}, stop_at=z_module) as captured:
                    run_until_stopped(
                        encoder.layout.model, input_ids=batch.input_ids, attention_mask=batch.attention_mask
                    )
                states.append(
                    captured["z"].index_put((rows, position), delta.expand(len(prompts), -1), accumulate=True)
                )
            conditioning = encode_prompts(encoders, batches, states=states)
        else:
            conditioning = encode_prompts(
                encoders, batches, deltas=[d.expand(len(prompts), -1) for d in deltas], positions=positions
            )
        outputs = [conditioning.hidden, *conditioning.pooled]
        if probes is None:
            probes = [torch.randn(o.shape, generator=generator, dtype=o.dtype) for o in outputs]
        loss = sum((o * p).sum() for o, p in zip(outputs, probes))
        return outputs, torch.autograd.grad(loss, deltas)

    with editor._base_model():
        full_outputs, full_gradients = loss_and_gradients(use_prefix=False)
        prefix_outputs, prefix_gradients = loss_and_gradients(use_prefix=True)
    for full, prefix in zip(full_outputs + list(full_gradients), prefix_outputs + list(prefix_gradients)):
        torch.testing.assert_close(prefix, full, rtol=RELATIVE_TOLERANCE, atol=RELATIVE_TOLERANCE)
        assert full.abs().max() > 0
    assert len(editor.layout.encoder.layers) == editor.layout.num_layers, "the skipped layers were not put back"


def test_stopping_ends_each_concept_at_its_first_check_where_delta_moved_less_than_the_tolerance():
    pipe = float64_pipeline(tiny_sd_pipeline)
    interval, tolerance = 5, 0.32  # on this pipeline delta moves by 0.17-0.55 of ||h0|| per 5 steps
    stopped = run(pipe, REQUESTS[:2], num_steps=40, stopping_interval=interval, stopping_tolerance=tolerance)
    for request, result in zip(REQUESTS[:2], stopped):
        steps = len(result.losses)
        assert 10 <= steps < 40 and steps % interval == 0, steps
        # a run of n steps is the first n steps of a longer one, so runs of n steps give the vectors at each check
        at = {n: run(pipe, [request], num_steps=n)[0] for n in range(interval, steps + 1, interval)}
        torch.testing.assert_close(result.losses, at[steps].losses, rtol=RELATIVE_TOLERANCE, atol=0)
        for component, vector in result.vectors.items():
            assert relative_difference(vector, at[steps].vectors[component]) < RELATIVE_TOLERANCE
        moved = [
            max(float((at[n].vectors[c] - at[n - interval].vectors[c]).norm() / result.h0[c].norm()) for c in at[n].h0)
            for n in range(2 * interval, steps + 1, interval)
        ]
        assert moved[-1] < tolerance <= min(moved[:-1], default=tolerance), moved


@pytest.mark.parametrize("make_pipe", [tiny_sd_pipeline, tiny_sdxl_pipeline])
def test_pipeline_padding_conditions_the_unet_on_every_position_in_both_paths(make_pipe):
    pipe = float64_pipeline(make_pipe)
    lengths = []
    handle = pipe.unet.register_forward_pre_hook(
        lambda module, args, kwargs: lengths.append(kwargs["encoder_hidden_states"].shape[1]), with_kwargs=True
    )
    try:
        reference = [
            run(pipe, [request], stage1_mode="reference", stage1_padding="pipeline")[0] for request in REQUESTS
        ]
        assert set(lengths) == {77}, "stage 1 gave the UNet other than the pipeline's 77 positions"
        batched = run(pipe, REQUESTS, stage1_mode="fast", stage1_padding="pipeline")
    finally:
        handle.remove()
    longest = run(pipe, REQUESTS[:1], stage1_mode="fast")[0]
    for ref, fast in zip(reference, batched):
        torch.testing.assert_close(fast.losses, ref.losses, rtol=RELATIVE_TOLERANCE, atol=0)
        for component, vector in ref.vectors.items():
            assert relative_difference(fast.vectors[component], vector) < RELATIVE_TOLERANCE
    assert relative_difference(longest.vectors["text_encoder"], batched[0].vectors["text_encoder"]) > 1e-3
