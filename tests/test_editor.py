import pytest
import torch
from transformers import BertConfig, BertModel

from diffusers_emcid import ConceptEdit, EMCIDEditor
from diffusers_emcid.encoders import find_text_encoder_layout

from .conftest import CAPTIONS, assert_pipeline_unchanged, counted_calls, encode, hook_counts, model_state


def test_edit_leaves_the_pipeline_untouched(editor, pipe):
    pipe.unet.train()  # flags are restored too
    state = model_state(pipe)
    flags = [p.requires_grad for p in pipe.unet.parameters()]
    edits = editor.edit([("dog", "cat"), ConceptEdit("Van Gogh", "art", templates=["painting by {}"], seed=7)])
    assert_pipeline_unchanged(pipe, state)
    assert pipe.unet.training and [p.requires_grad for p in pipe.unet.parameters()] == flags
    assert all(p.grad is None for p in pipe.unet.parameters())
    assert edits.concepts == [("dog", "cat"), ("Van Gogh", "art")]
    assert sorted(edits.deltas["text_encoder"]) == editor.layers
    assert edits.vectors["text_encoder"].shape == (2, 32)


def test_hooks_are_removed_when_edit_raises(editor, pipe, monkeypatch):
    state = model_state(pipe)

    def failing_solve(*args, **kwargs):
        raise RuntimeError("solver exploded")

    monkeypatch.setattr("diffusers_emcid.stage2.solve_layer_update", failing_solve)
    with pytest.raises(RuntimeError, match="solver exploded"):
        editor.edit([("dog", "cat")])
    assert_pipeline_unchanged(pipe, state)

    calls = []

    def failing_unet(module, args):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("unet exploded")

    handle = pipe.unet.register_forward_pre_hook(failing_unet)
    try:
        with pytest.raises(RuntimeError, match="unet exploded"):
            editor.edit([("apple", "banana")])
        assert_pipeline_unchanged(pipe, state, hooks=1)
    finally:
        handle.remove()


def test_apply_then_remove_restores_bitwise_and_matches_an_in_place_update(editor, pipe):
    edits = editor.edit([("dog", "cat"), ("apple", "banana")])
    prompts = ["a photo of a dog", "an apple on a tree", "a red car"]
    state = model_state(pipe)
    before = encode(pipe, prompts)

    edits.apply(pipe)
    applied = encode(pipe, prompts)
    assert (applied[0] - before[0]).norm() > 1e-3 * before[0].norm(), "the edit did not change a prompt with its source"

    layout = find_text_encoder_layout(pipe.text_encoder)
    edits.remove(pipe)
    assert_pipeline_unchanged(pipe, state)
    assert torch.equal(encode(pipe, prompts), before)
    assert not hasattr(pipe.text_encoder, "peft_config")

    with torch.no_grad():
        for layer, delta in edits.deltas["text_encoder"].items():
            layout.fc2(layer).weight += delta.up @ delta.down
    in_place = encode(pipe, prompts)
    torch.testing.assert_close(applied, in_place, rtol=0, atol=1e-5)


def test_apply_checks_before_changing_anything(editor, pipe):
    edits = editor.edit([("dog", "cat")])
    edits.apply(pipe, name="first")
    state = model_state(pipe)
    with pytest.raises(ValueError, match="already has an adapter named 'first'"):
        edits.apply(pipe, name="first")
    with pytest.raises(ValueError, match="no adapter named 'other'"):
        edits.remove(pipe, name="other")
    assert_pipeline_unchanged(pipe, state)
    other = __import__("diffusers_emcid.testing", fromlist=["x"]).tiny_sd_pipeline(intermediate_size=48)
    with pytest.raises(ValueError, match="made for another model"):
        edits.apply(other)
    assert not hasattr(other.text_encoder, "peft_config")


def test_two_edit_sets_stay_active_together(editor, pipe):
    dog = editor.edit([("dog", "cat")])
    apple = editor.edit([("apple", "banana")])
    prompts = ["a photo of a dog", "an apple"]
    dog.apply(pipe, name="dog")
    only_dog = encode(pipe, prompts)
    apple.apply(pipe, name="apple")
    both = encode(pipe, prompts)
    dog.remove(pipe, name="dog")
    only_apple = encode(pipe, prompts)
    apple.remove(pipe, name="apple")
    base = encode(pipe, prompts)
    expected = only_dog + only_apple - base  # deltas add at each layer, so outputs are close to additive only
    assert not torch.allclose(both, only_dog) and not torch.allclose(both, only_apple)
    assert (both - expected).norm() < (both - base).norm()


@pytest.mark.parametrize(
    "make_requests, message",
    [
        (lambda: [("dog", "dog")], "the same"),
        (lambda: [("", "cat")], "empty"),
        (lambda: [(3, "cat")], "source must be a str"),
        (lambda: [("dog", "cat"), ("DOG", "cow")], "both edit the source"),
        (lambda: [ConceptEdit("dog", "cat", templates=["a photo of a dog"])], "must contain"),
        (
            lambda: [ConceptEdit("dog", "cat", templates=["a photo of {} " + "with a red car " * 20])],
            "over the text encoder's limit",
        ),
        (lambda: [ConceptEdit("dog", "cat", images=[torch.zeros(3, 8, 8)] * 2)], "2 images for 3 templates"),
    ],
)
def test_bad_input_fails_fast_and_changes_nothing(editor, pipe, make_requests, message):
    state = model_state(pipe)
    with counted_calls(pipe.unet) as calls, pytest.raises((ValueError, TypeError), match=message):
        editor.edit(make_requests())
    assert not calls, "heavy work ran before the bad input was noticed"
    assert_pipeline_unchanged(pipe, state)


def test_unsupported_text_encoder_is_a_clear_error(pipe, fast_config):
    pipe.text_encoder = BertModel(
        BertConfig(vocab_size=100, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32)
    )
    with pytest.raises(ValueError, match="BertModel; EMCID edits CLIP text encoders"):
        EMCIDEditor(pipe, fast_config)


def test_fused_lora_is_refused(editor, pipe):
    edits = editor.edit([("dog", "cat")])
    edits.apply(pipe)
    for module in pipe.text_encoder.modules():
        if hasattr(module, "merge") and hasattr(module, "lora_A"):
            module.merge()
    with pytest.raises(ValueError, match="fused LoRA weights"):
        editor.edit([("apple", "banana")])


def test_hooks_clean_after_statistics(pipe, fast_config, tmp_path):
    EMCIDEditor(pipe, fast_config, cache_dir=tmp_path, progress=False).compute_statistics(CAPTIONS)
    assert hook_counts(pipe) == 0


def test_edit_keeps_every_module_flag_and_other_adapters_as_they_were(editor, pipe):
    edits = editor.edit([("dog", "cat")])
    edits.apply(pipe, name="kept")
    pipe.text_encoder.encoder.layers[1].eval()
    pipe.text_encoder.train()
    pipe.text_encoder.encoder.layers[1].eval()
    modes = [m.training for m in pipe.text_encoder.modules()]
    grads = [p.requires_grad for p in pipe.text_encoder.parameters()]
    editor.edit([("apple", "banana")])
    assert [m.training for m in pipe.text_encoder.modules()] == modes
    assert [p.requires_grad for p in pipe.text_encoder.parameters()] == grads


def test_removing_a_fused_adapter_restores_the_base_weights(editor, pipe):
    edits = editor.edit([("dog", "cat")])
    state = model_state(pipe)
    edits.apply(pipe)
    for module in pipe.text_encoder.modules():
        if hasattr(module, "merge") and hasattr(module, "lora_A") and "emcid" in module.lora_A:
            module.merge(adapter_names=["emcid"])
    edits.remove(pipe)
    for key, value in model_state(pipe).items():
        torch.testing.assert_close(value, state[key], rtol=0, atol=1e-6)


def test_inpainting_unets_are_refused_with_a_way_out(pipe):
    from diffusers import UNet2DConditionModel

    pipe.unet = UNet2DConditionModel(**{**pipe.unet.config, "in_channels": 9})
    with pytest.raises(ValueError, match="9 input channels.*text-to-image model of the same base"):
        EMCIDEditor(pipe)


def test_image_inputs_are_checked_before_stage_1(editor, pipe):
    uint8 = [torch.full((3, 16, 16), 255, dtype=torch.uint8)] * 3
    assert editor.edit([ConceptEdit("dog", "cat", images=uint8)]).concepts == [("dog", "cat")]
    with pytest.raises(ValueError, match="values in \\[0, 1\\]"):
        editor.edit([ConceptEdit("apple", "banana", images=[torch.full((3, 8, 8), 2.0)] * 3)])
    with pytest.raises(ValueError, match="cannot be used"):
        editor.edit([ConceptEdit("apple", "banana", images=["/no/such/image.png"] * 3)])
