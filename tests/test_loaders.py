import numpy as np
import pytest
import torch
from peft import LoraConfig, get_peft_model_state_dict, inject_adapter_in_model

import diffusers_emcid  # noqa: F401
from diffusers_emcid import ConceptEditsLoaderMixin
from diffusers_emcid.encoders import find_text_encoder_layout

from .conftest import PROMPTS, assert_pipeline_unchanged, encode, model_state

EVERY_FAMILY = True


@pytest.fixture
def folder(editor, tmp_path):
    return editor.edit([("dog", "cat"), ("apple", "banana")]).save_pretrained(tmp_path / "dogs-and-apples")


@pytest.fixture
def style_lora(tmp_path, make_pipe):
    """A diffusers LoRA file on the UNet and the (first) text encoder's attention, as users download them."""
    source = make_pipe(seed=0)
    config = LoraConfig(
        r=4, lora_alpha=4, target_modules=["q_proj", "k_proj", "v_proj", "out_proj"], init_lora_weights=False
    )
    inject_adapter_in_model(config, source.text_encoder, adapter_name="default")
    source.unet.add_adapter(
        LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_k", "to_v"], init_lora_weights=False)
    )
    path = tmp_path / "style"
    type(source).save_lora_weights(
        path,
        unet_lora_layers=get_peft_model_state_dict(source.unet),
        text_encoder_lora_layers=get_peft_model_state_dict(source.text_encoder),
    )
    return path


def images(pipe):
    return pipe(
        "a photo of a dog", num_inference_steps=2, generator=torch.Generator().manual_seed(0), output_type="np"
    ).images


def test_methods_are_added_to_stable_diffusion_pipelines_and_the_mixin_is_public(pipe):
    for name in (
        "load_concept_edits",
        "set_concept_edits",
        "enable_concept_edits",
        "disable_concept_edits",
        "concept_edits_disabled",
        "fuse_concept_edits",
        "unfuse_concept_edits",
        "unload_concept_edits",
        "get_concept_edits",
    ):
        assert callable(getattr(pipe, name)) and hasattr(ConceptEditsLoaderMixin, name)


def test_toggles_give_bitwise_base_images_and_the_edited_ones(pipe, folder, editor):
    base = images(pipe)
    name = pipe.load_concept_edits(folder)
    assert name == "dogs-and-apples"
    edited = images(pipe)
    assert not np.array_equal(base, edited)
    pipe.disable_concept_edits()
    assert np.array_equal(images(pipe), base)
    pipe.enable_concept_edits()
    assert np.array_equal(images(pipe), edited)
    with pipe.concept_edits_disabled():
        assert np.array_equal(images(pipe), base)
    assert np.array_equal(images(pipe), edited)
    info = pipe.get_concept_edits()[name]
    assert info["concepts"] == [("apple", "banana"), ("dog", "cat")] and info["enabled"] and info["strength"] == 1.0


def test_strength_equals_a_scaled_delta(pipe, folder):
    edits = diffusers_emcid.ConceptEdits.from_pretrained(folder)
    name = pipe.load_concept_edits(folder)
    pipe.set_concept_edits([name], strengths=[0.5])
    half = encode(pipe, PROMPTS)
    pipe.unload_concept_edits()
    with torch.no_grad():
        for component, deltas in edits.deltas.items():
            layout = find_text_encoder_layout(getattr(pipe, component))
            for layer, delta in deltas.items():
                layout.fc2(layer).weight += 0.5 * delta.up @ delta.down
    torch.testing.assert_close(half, encode(pipe, PROMPTS), rtol=0, atol=1e-5)


def test_unload_and_unfuse_restore_the_base_weights_bitwise(pipe, folder):
    state = model_state(pipe)
    base = encode(pipe, PROMPTS)
    name = pipe.load_concept_edits(folder, strength=0.7)
    edited = encode(pipe, PROMPTS)
    pipe.fuse_concept_edits()
    assert pipe.get_concept_edits()[name]["fused"]
    torch.testing.assert_close(encode(pipe, PROMPTS), edited, rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match="fused"):
        pipe.set_concept_edits(name, 1.0)
    pipe.unfuse_concept_edits()
    assert torch.equal(encode(pipe, PROMPTS), edited)
    pipe.fuse_concept_edits()
    pipe.unload_concept_edits()  # unfuses first
    assert torch.equal(encode(pipe, PROMPTS), base)
    assert_pipeline_unchanged(pipe, state)
    assert pipe.get_concept_edits() == {}


def test_several_edit_sets_add_up_and_unload_one_by_one(pipe, editor, tmp_path):
    dogs = editor.edit([("dog", "cat")]).save_pretrained(tmp_path / "dogs")
    apples = editor.edit([("apple", "banana")]).save_pretrained(tmp_path / "apples")
    base = encode(pipe, PROMPTS)
    pipe.load_concept_edits(dogs, adapter_name="dogs")
    only_dogs = encode(pipe, PROMPTS)
    pipe.load_concept_edits(apples, adapter_name="apples")
    pipe.set_concept_edits(["dogs", "apples"], strengths=[1.0, 0.5])
    assert sorted(pipe.get_concept_edits()) == ["apples", "dogs"]
    both = encode(pipe, PROMPTS)
    assert not torch.allclose(both, only_dogs)
    pipe.unload_concept_edits("apples")
    assert torch.equal(encode(pipe, PROMPTS), only_dogs)
    pipe.unload_concept_edits("dogs")
    assert torch.equal(encode(pipe, PROMPTS), base)
    with pytest.raises(ValueError, match="No concept edits named \\['dogs'\\]"):
        pipe.disable_concept_edits("dogs")


def test_other_loras_before_and_after_coexist_and_toggle_independently(pipe, folder, style_lora):
    base = encode(pipe, PROMPTS)
    pipe.load_lora_weights(str(style_lora), adapter_name="style")
    style_only = encode(pipe, PROMPTS)
    style_images = images(pipe)
    assert not torch.equal(style_only, base)
    pipe.load_concept_edits(folder, adapter_name="edits")
    both = encode(pipe, PROMPTS)
    assert not torch.allclose(both, style_only)
    pipe.disable_concept_edits()
    assert torch.equal(encode(pipe, PROMPTS), style_only)
    assert np.array_equal(images(pipe), style_images)
    pipe.enable_concept_edits()
    assert torch.equal(encode(pipe, PROMPTS), both)
    pipe.unload_concept_edits()
    assert torch.equal(encode(pipe, PROMPTS), style_only)
    assert pipe.get_list_adapters()["text_encoder"] == ["style"]

    # and a LoRA loaded after the edits
    pipe.unload_lora_weights()
    assert torch.equal(encode(pipe, PROMPTS), base)
    pipe.load_concept_edits(folder, adapter_name="edits")
    edits_only = encode(pipe, PROMPTS)
    pipe.load_lora_weights(str(style_lora), adapter_name="style")
    pipe.set_adapters(["style", "edits"])  # diffusers' own control sees the edits as an adapter
    torch.testing.assert_close(encode(pipe, PROMPTS), both, rtol=0, atol=1e-6)
    pipe.disable_concept_edits()
    torch.testing.assert_close(encode(pipe, PROMPTS), style_only, rtol=0, atol=1e-6)
    pipe.delete_adapters("style")
    pipe.enable_concept_edits()
    torch.testing.assert_close(encode(pipe, PROMPTS), edits_only, rtol=0, atol=1e-6)


def test_a_stale_lora_scale_does_not_scale_the_edits(pipe, folder, make_pipe):
    expected_pipe = make_pipe(seed=0)
    expected_pipe.load_concept_edits(folder)
    expected = encode(expected_pipe, PROMPTS)
    pipe("a dog", num_inference_steps=1, cross_attention_kwargs={"scale": 0.3})
    pipe.load_concept_edits(folder)
    assert torch.equal(encode(pipe, PROMPTS), expected)


def test_a_taken_name_is_refused_and_default_names_are_unique(pipe, folder):
    assert pipe.load_concept_edits(folder) == "dogs-and-apples"
    assert pipe.load_concept_edits(folder) == "dogs-and-apples_2"
    state = model_state(pipe)
    with pytest.raises(ValueError, match="already has an adapter named 'dogs-and-apples'"):
        pipe.load_concept_edits(folder, adapter_name="dogs-and-apples")
    assert_pipeline_unchanged(pipe, state)


def test_the_mixin_serves_a_custom_pipeline_class(folder, make_pipe):
    source = make_pipe(seed=0)

    class MyPipeline(type(source), ConceptEditsLoaderMixin):
        pass

    custom = MyPipeline(**source.components)
    name = custom.load_concept_edits(folder)
    assert custom.get_concept_edits()[name]["concepts"] == [("apple", "banana"), ("dog", "cat")]


@pytest.mark.parametrize(
    "name, error",
    [
        ("update", ValueError),
        ("keys", ValueError),
        ("to", ValueError),
        ("a.b", ValueError),
        ("", ValueError),
        ("with space", ValueError),
        (3, TypeError),
    ],
)
def test_bad_adapter_names_are_refused_before_anything_changes(pipe, folder, name, error):
    pipe.load_concept_edits(folder, adapter_name="first")
    state = model_state(pipe)
    with pytest.raises(error, match="cannot name an adapter|must be a str"):
        pipe.load_concept_edits(folder, adapter_name=name)
    assert_pipeline_unchanged(pipe, state)
    assert sorted(pipe.get_concept_edits()) == ["first"]


def test_a_folder_named_like_a_module_attribute_gets_a_safe_default_name(editor, tmp_path, pipe):
    folder = editor.edit([("dog", "cat")]).save_pretrained(tmp_path / "update")
    assert pipe.load_concept_edits(folder) == "update_edits"
