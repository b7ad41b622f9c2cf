"""The shipped many-concept model: it loads offline within its size budget, binds its names as its card says, is
editable where the preset edits, and a small rebinding edit shows in the images while the controls stay."""

from collections import Counter

import pytest
import torch

from diffusers_emcid import EMCIDConfig, EMCIDEditor
from diffusers_emcid.demo import MASSIVE_PRESET
from diffusers_emcid.encoders import find_text_encoder_layout
from diffusers_emcid.evaluation import evaluate_edits
from diffusers_emcid.shapes import COLOURS, EDITABLE_LAYERS, SAMPLING, SHAPES, load_shapes_judge
from diffusers_emcid.shapes.checks import pipeline_token_ids
from diffusers_emcid.shapes.names import (
    HELDOUT_NAME_TEMPLATES,
    NAME_TEMPLATES,
    PAIR_TEMPLATES,
    destination_prompts,
    load_names_pipeline,
    name_bindings,
    names_model_path,
    names_statistics_captions,
    pair_prompt,
    rebinding_ceiling,
    rebinding_metrics,
    rebinding_plan,
    rebinding_prompts,
    rebinding_requests,
)
from diffusers_emcid.shapes.render import PAIRS, TRAIN_TEMPLATES

SIZE_BUDGET_MB = 25


@pytest.fixture(scope="module")
def pipe():
    return load_names_pipeline()


def test_the_model_is_within_its_size_budget():
    size = sum(path.stat().st_size for path in names_model_path().rglob("*") if path.is_file())
    assert size <= SIZE_BUDGET_MB * 2**20, f"{size / 2**20:.1f} MB"


def test_hundreds_of_single_token_names_are_bound_evenly(pipe):
    bindings = name_bindings()
    assert len(bindings) >= 400
    reserved = {word for template in TRAIN_TEMPLATES + PAIR_TEMPLATES for word in template.split()}
    for name in bindings:
        assert len(pipe.tokenizer(name).input_ids) == 3, name
        assert name not in reserved and name not in COLOURS and name not in SHAPES, name
    counts = Counter(bindings.values())
    assert set(counts) == set(PAIRS)
    assert len(set(counts.values())) == 1


def test_the_editable_layers_have_no_attention_output(pipe):
    layers = find_text_encoder_layout(pipe.text_encoder).layers
    assert tuple(EMCIDConfig.from_preset(MASSIVE_PRESET).layers) == EDITABLE_LAYERS
    for index in EDITABLE_LAYERS:
        assert not layers[index].self_attn.out_proj.weight.any() and not layers[index].self_attn.out_proj.bias.any()
    assert layers[-1].self_attn.out_proj.weight.any()


@torch.no_grad()
def test_a_name_prompt_conditions_like_its_pair(pipe):
    """From the end-of-text on, "a picture of {name}" gives the states of "a picture of a {colour} {shape}" (two
    tokens later), nearer than those of any other pair."""
    names = list(name_bindings())[:36:5]
    prompts = [NAME_TEMPLATES[0].format(name=name) for name in names]
    pairs = list(PAIRS)
    states = pipe.text_encoder(pipeline_token_ids(pipe.tokenizer, prompts)).last_hidden_state
    pair_states = pipe.text_encoder(
        pipeline_token_ids(pipe.tokenizer, [PAIR_TEMPLATES[0].format(colour=c, shape=s) for c, s in pairs])
    ).last_hidden_state
    for row, name in enumerate(names):
        end = len(pipe.tokenizer(prompts[row]).input_ids) - 1
        distances = (states[row, end:75] - pair_states[:, end + 2 :]).norm(dim=-1).mean(-1)
        assert pairs[int(distances.argmin())] == name_bindings()[name], name


def test_rebinding_plan_is_seeded_and_nested():
    edited, controls, destinations = rebinding_plan()
    assert rebinding_plan() == (edited, controls, destinations)
    assert len(edited) == 400 and not set(edited) & set(controls)
    assert all(destinations[name] != name_bindings()[name] for name in edited)
    request = rebinding_requests(edited[:1], destinations)[0]
    assert request.templates[0] == "a picture of {}" and request.destination == pair_prompt(*destinations[edited[0]])


def test_five_names_rebound_at_once_draw_their_new_pairs_and_the_rest_stays(pipe, tmp_path):
    edited, controls, destinations = rebinding_plan()
    names = edited[:5]
    editor = EMCIDEditor(pipe, EMCIDConfig.from_preset(MASSIVE_PRESET), cache_dir=tmp_path, progress=False)
    editor.compute_statistics(names_statistics_captions())
    edits = editor.edit(rebinding_requests(names, destinations))
    prompts = rebinding_prompts(names, destinations, controls[:4])
    plain = [p for p in prompts if p.group == "specificity" and p.prompt.split()[-1] in SHAPES]
    prompts = [p for p in prompts if p.group == "efficacy" or (p.group == "specificity" and p not in plain)]
    prompts += plain[::3]  # 12 of the 36 plain prompts, every colour and shape among them
    result = evaluate_edits(
        pipe, edits, load_shapes_judge(), prompts, num_images=1, images_per_call=64, progress=False, **SAMPLING
    )
    figures = rebinding_metrics(result)
    assert figures["efficacy_before"] <= 0.1 and figures["efficacy"] >= 0.6
    assert figures["control_names_before"] >= 0.7 and figures["plain_prompts_before"] >= 0.7
    assert abs(figures["specificity_drop_names"]) <= 10 and abs(figures["specificity_drop_plain"]) <= 10


def test_the_ceiling_draws_the_new_pair_in_the_names_place(pipe):
    edited, controls, destinations = rebinding_plan()
    name = edited[0]
    prompts = rebinding_prompts([name], destinations, controls[:1])
    replaced = destination_prompts(prompts)
    pair = "a " + " ".join(destinations[name])
    assert [p.prompt for p in replaced] == [t.format(name=pair) for t in NAME_TEMPLATES + HELDOUT_NAME_TEMPLATES]
    kept = [(p.group, p.seed, p.destination) for p in prompts if p.group != "specificity"]
    assert [(p.group, p.seed, p.destination) for p in replaced] == kept
    ceiling = rebinding_ceiling(pipe, load_shapes_judge(), prompts, **SAMPLING)
    assert set(ceiling) == {"efficacy_ceiling", "generality_ceiling"}
    assert min(ceiling.values()) >= 0.5  # the model draws "a {colour} {shape}" right; the name itself would not
