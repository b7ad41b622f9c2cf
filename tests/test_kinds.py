"""Every kind of edit of the paper (update, erase, rectify, debias) on SD 1.x, SD 2.x and SD-XL pipelines."""

import pytest
import torch
import torch.nn.functional as F
from diffusers import StableDiffusionImg2ImgPipeline
from transformers import BertConfig, BertModel

import diffusers_emcid  # noqa: F401
from diffusers_emcid import ConceptEdit, EMCIDConfig, EMCIDEditor
from diffusers_emcid.testing import tiny_sd2_pipeline, tiny_sdxl_pipeline

from .conftest import CAPTIONS, assert_pipeline_unchanged, counted_calls, model_state


def pooled(pipe, prompts):
    """The text encoder's end-of-text state: the summary of a prompt."""
    ids = pipe.tokenizer(prompts, padding=True, return_tensors="pt").input_ids
    with torch.no_grad():
        return pipe.text_encoder(ids).pooler_output


def subject_states(pipe, prompts, word):
    """The final hidden state at the last token of `word` in each prompt, and all final states."""
    from diffusers_emcid.tokens import subject_token_positions

    batch = pipe.tokenizer(prompts, padding=True, return_tensors="pt")
    positions = torch.tensor(subject_token_positions(pipe.tokenizer, prompts, word))
    with torch.no_grad():
        states = pipe.text_encoder(batch.input_ids, attention_mask=batch.attention_mask).last_hidden_state
    return states[torch.arange(len(prompts)), positions], states, batch.attention_mask.bool()


def test_erase_moves_the_erased_word_towards_the_destination(pipe, tmp_path):
    """On a random tiny UNet the distillation signal is weak next to the regularisers, so they are off here and
    stage 1 follows the noise-matching loss alone; MEMIT's residual then carries z to the z layer exactly."""
    config = EMCIDConfig.from_preset(
        "sd1-artists",
        num_steps=100,
        image_num_inference_steps=2,
        learning_rate=0.02,
        weight_decay=0.0,
        text_alignment_weight=0.0,
        residual="memit",
    )
    editor = EMCIDEditor(pipe, config, cache_dir=tmp_path, progress=False)
    editor.compute_statistics(CAPTIONS * 3)
    templates = ["painting by {}", "artwork by {}", "style of {}"]
    control = ["a red car on the street", "a green tree in the park"]
    before = {w: subject_states(pipe, [t.format(w) for t in templates], w)[0] for w in ("monet", "gogh")}
    destination = subject_states(pipe, [t.format("art") for t in templates], "art")[0]
    _, control_before, real = subject_states(pipe, control, "a")
    edits = editor.erase(["monet", "gogh"], destination="art", templates=templates)
    edits.apply(pipe)
    for word, old in before.items():
        new = subject_states(pipe, [t.format(word) for t in templates], word)[0]
        gain = F.cosine_similarity(new, destination) - F.cosine_similarity(old, destination)
        distance = ((new - destination).norm(dim=-1) / (old - destination).norm(dim=-1)).mean().item()
        assert (gain > 0.001).all() and distance < 0.95, (
            f"{word}: cosine gain {gain.tolist()}, distance ratio {distance:.3f}"
        )
        edited_move = ((new - old).norm(dim=-1) / old.norm(dim=-1)).mean().item()
    control_after = subject_states(pipe, control, "a")[1]
    control_move = ((control_after - control_before).norm(dim=-1) / control_before.norm(dim=-1))[real].mean().item()
    assert control_move < 0.2 * edited_move, f"controls moved {control_move:.4f}, erased words {edited_move:.4f}"


def test_twenty_words_erased_in_one_call(editor, pipe):
    words = [f"{a}{b}" for a in "bcdfg" for b in "xyzq"]
    edits = editor.erase(words, destination=" ")
    assert len(edits) == 20 and {r.destination for r in edits.requests} == {" "}
    edits.apply(pipe)
    edits.remove(pipe)
    with pytest.raises(TypeError, match="list of sources"):
        editor.erase("Van Gogh")


def test_rectify_trains_against_the_true_noise_of_the_given_images(editor, pipe):
    images = [torch.rand(3, 24, 24, generator=torch.Generator().manual_seed(i)) for i in range(3)]
    steps = editor.config.num_steps
    with counted_calls(pipe.unet) as calls:
        editor.edit([ConceptEdit("apple", "real apple", images=images)])
    assert len(calls) == 2 * steps, "a plain edit with images: edited and target UNet calls at every step"
    with counted_calls(pipe.unet) as calls:
        edits = editor.rectify([ConceptEdit("apple", "real apple", images=images)], text_alignment=False)
    assert len(calls) == steps, "rectification: the target is the true noise, so one UNet call per step"
    assert edits.requests[0].use_real_noise and not edits.requests[0].text_alignment
    with pytest.raises(ValueError, match="4 images for 3 templates"):
        editor.rectify([ConceptEdit("apple", "real apple", images=images + images[:1])])


def test_true_noise_target_follows_the_prediction_type(tmp_path):
    """SD 2.x predicts v: the true-noise target must then be the velocity, not the noise."""
    pipe = tiny_sd2_pipeline()
    editor = EMCIDEditor(
        pipe,
        EMCIDConfig.from_preset("sd1-paper", num_steps=3, image_num_inference_steps=2),
        cache_dir=tmp_path,
        progress=False,
    )
    editor.compute_statistics(CAPTIONS * 3)
    seen = []
    import diffusers_emcid.stage1 as stage1

    original = stage1.DDPMScheduler.get_velocity

    def spy(self, sample, noise, timesteps):
        seen.append(1)
        return original(self, sample, noise, timesteps)

    stage1.DDPMScheduler.get_velocity = spy
    try:
        editor.rectify([ConceptEdit("apple", "real apple", templates=["{}"], images=[torch.rand(3, 16, 16)])])
    finally:
        stage1.DDPMScheduler.get_velocity = original
    assert len(seen) == 3


def test_debias_blends_until_the_judge_is_balanced_and_gives_one_adapter(editor, pipe):
    """The stub judge reads the drawn images' text conditioning: the closer the profession's conditioning is to
    the female phrase's, the more images it calls female; the loop must balance that."""
    phrases_seen, calls = [], []

    def judge(images, phrases):
        calls.append(len(images))
        phrases_seen.append(list(phrases))
        current = pooled(pipe, ["an image of doctor"])  # conditioning of the pipeline as it is while drawing
        targets = pooled(pipe, phrases)
        similarity = F.cosine_similarity(current, targets)
        female_share = torch.sigmoid(40 * (similarity[0] - similarity[1]))
        count = int(round(female_share.item() * len(images)))
        probabilities = torch.zeros(len(images), 2)
        probabilities[:count, 0], probabilities[count:, 1] = 1.0, 1.0
        return probabilities

    editor.config.num_steps = 4
    base = model_state(pipe)
    edits = editor.debias(["a doctor", "a nurse"], attributes=["a female {}", "a male {}"], judge=judge, num_images=25)
    assert_pipeline_unchanged(pipe, base)
    assert phrases_seen[0] == ["a female doctor", "a male doctor"]
    assert all(n == 25 for n in calls) and 2 <= len(calls) <= 20
    assert [r.source for r in edits.requests] == ["a doctor", "a nurse"]
    assert set(edits.deltas) == {"text_encoder"} and all(d.rank <= 2 for d in edits.deltas["text_encoder"].values())
    with pytest.raises(TypeError, match="needs judge"):
        editor.debias(["a doctor"], judge=None)


def round_trip(pipe, editor, prompts):
    state = model_state(pipe)
    base = {
        c: encode_component(pipe, c, prompts)
        for c in ("text_encoder", "text_encoder_2")
        if getattr(pipe, c, None) is not None
    }
    edits = editor.edit([("dog", "cat"), ("apple", "banana")])
    assert_pipeline_unchanged(pipe, state)
    edits.apply(pipe)
    applied = {c: encode_component(pipe, c, prompts) for c in base}
    assert all(not torch.allclose(applied[c], base[c]) for c in base)
    edits.remove(pipe)
    assert_pipeline_unchanged(pipe, state)
    return edits, base, applied


def encode_component(pipe, component, prompts):
    tokenizer = pipe.tokenizer if component == "text_encoder" else pipe.tokenizer_2
    ids = tokenizer(prompts, padding="max_length", max_length=77, return_tensors="pt").input_ids
    with torch.no_grad():
        return getattr(pipe, component)(ids, output_hidden_states=True).hidden_states[-2]


def test_sd2_edit_apply_remove(tmp_path):
    pipe = tiny_sd2_pipeline(num_hidden_layers=7)
    editor = EMCIDEditor(
        pipe,
        EMCIDConfig.from_preset("sd1-paper", num_steps=3, image_num_inference_steps=2),
        cache_dir=tmp_path,
        progress=False,
    )
    assert editor.layers == [0, 1, 2, 3, 4, 5] and editor.layout.intermediate_size == 128
    editor.compute_statistics(CAPTIONS * 3)
    round_trip(pipe, editor, ["a photo of a dog"])


@pytest.fixture
def sdxl(tmp_path):
    pipe = tiny_sdxl_pipeline()
    config = EMCIDConfig.from_preset("sdxl-paper", num_steps=3, image_num_inference_steps=2, image_resolution=64)
    editor = EMCIDEditor(pipe, config, cache_dir=tmp_path, progress=False)
    editor.compute_statistics(CAPTIONS * 3)
    return pipe, editor


def test_sdxl_is_detected_with_both_encoders_and_their_own_settings(sdxl):
    pipe, editor = sdxl
    assert editor.config.preset == "sdxl-paper"
    assert EMCIDEditor(pipe, progress=False).config.preset == "sdxl-paper"
    (first, second) = editor.encoders
    assert (first.component, first.layers, first.z_layer, first.preservation_weight) == (
        "text_encoder",
        [1, 2, 3],
        3,
        4000.0,
    )
    assert (second.component, second.layers, second.z_layer, second.preservation_weight) == (
        "text_encoder_2",
        [1, 2, 3, 4, 5],
        5,
        10000.0,
    )
    assert first.conditioning == second.conditioning == "penultimate"


def test_sdxl_stage_1_conditions_the_unet_with_both_encoders_and_the_time_ids(sdxl):
    pipe, editor = sdxl
    with counted_calls(pipe.unet) as calls:
        editor.edit([ConceptEdit("dog", "cat", images=[torch.rand(3, 16, 16) for _ in range(3)])])
    args, kwargs = calls[0]
    hidden = kwargs.get("encoder_hidden_states", args[2] if len(args) > 2 else None)
    assert hidden.shape[-1] == 64 == pipe.text_encoder.config.hidden_size + pipe.text_encoder_2.config.hidden_size
    added = kwargs["added_cond_kwargs"]
    assert added["text_embeds"].shape == (3, 32)
    # images are drawn at 64 and trained on at half that, 32 pixels, and the time ids say so (given ones too)
    assert added["time_ids"].tolist() == [[32.0, 32.0, 0.0, 0.0, 32.0, 32.0]] * 3
    sample = kwargs.get("sample", args[0] if args else None)
    assert sample.shape[-1] == 32 // pipe.vae_scale_factor


def test_sdxl_paper_draws_at_the_pipelines_size_and_trains_at_half_of_it(sdxl):
    from diffusers_emcid.images import image_resolution, training_images

    pipe, editor = sdxl
    assert EMCIDConfig.from_preset("sdxl-paper").image_training_scale == 0.5  # 1024 -> 512 on SD-XL
    request = ConceptEdit("dog", "cat", templates=["a photo of {}"], seed=3)
    (images,) = training_images(pipe, [request], editor.config)
    assert image_resolution(pipe, editor.config) == 64 and images.shape[-2:] == (32, 32)
    drawn = pipe(
        ["a photo of dog"],
        num_inference_steps=2,
        guidance_scale=editor.config.image_guidance_scale,
        height=64,
        width=64,
        generator=[torch.Generator().manual_seed(3)],
        output_type="pt",
    ).images
    expected = F.interpolate(drawn, size=(32, 32), mode="bilinear", antialias=True, align_corners=False).clamp(0, 1)
    torch.testing.assert_close(images[0, 0], expected[0], rtol=0, atol=1e-5)


def test_sdxl_round_trip_and_the_second_encoder_gets_its_delta_once(sdxl):
    pipe, editor = sdxl
    edits, base, applied = round_trip(pipe, editor, ["a photo of a dog", "a red car"])
    with torch.no_grad():
        for component, deltas in edits.deltas.items():
            layout = diffusers_emcid.encoders.find_text_encoder_layout(getattr(pipe, component))
            for layer, delta in deltas.items():
                layout.fc2(layer).weight += delta.up @ delta.down
    for component in base:
        torch.testing.assert_close(
            applied[component], encode_component(pipe, component, ["a photo of a dog", "a red car"]), rtol=0, atol=1e-5
        )


def test_sdxl_adapter_loads_with_plain_diffusers_and_toggles_per_encoder(sdxl, tmp_path):
    pipe, editor = sdxl
    folder = editor.edit([("dog", "cat")]).save_pretrained(tmp_path / "xl")
    plain, ours = tiny_sdxl_pipeline(), tiny_sdxl_pipeline()
    plain.load_lora_weights(str(folder), adapter_name="edits")
    ours.load_concept_edits(folder, adapter_name="edits")
    for component in ("text_encoder", "text_encoder_2"):
        torch.testing.assert_close(
            encode_component(plain, component, ["a dog"]),
            encode_component(ours, component, ["a dog"]),
            rtol=0,
            atol=1e-6,
        )
    base = tiny_sdxl_pipeline()
    ours.set_adapters(["edits"], adapter_weights={"text_encoder": 1.0, "text_encoder_2": 0.0})
    assert torch.equal(
        encode_component(ours, "text_encoder_2", ["a dog"]), encode_component(base, "text_encoder_2", ["a dog"])
    )
    assert not torch.equal(
        encode_component(ours, "text_encoder", ["a dog"]), encode_component(base, "text_encoder", ["a dog"])
    )
    ours.disable_concept_edits()
    for component in ("text_encoder", "text_encoder_2"):
        assert torch.equal(encode_component(ours, component, ["a dog"]), encode_component(base, component, ["a dog"]))


def test_image_to_image_pipelines_share_the_support(pipe, tmp_path):
    img2img = StableDiffusionImg2ImgPipeline(**pipe.components)
    editor = EMCIDEditor(
        img2img,
        EMCIDConfig.from_preset("sd1-paper", num_steps=2, image_num_inference_steps=2),
        cache_dir=tmp_path,
        progress=False,
    )
    editor.compute_statistics(CAPTIONS)
    edits = editor.edit([("dog", "cat")])
    name = img2img.load_concept_edits(edits)
    assert img2img.get_concept_edits()[name]["concepts"] == [("dog", "cat")]


def test_unsupported_pipelines_name_the_supported_families(pipe):
    pipe.text_encoder = BertModel(
        BertConfig(vocab_size=100, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32)
    )
    with pytest.raises(
        ValueError, match="BertModel; EMCID edits CLIP text encoders.*Stable Diffusion 1.x/2.x and SD-XL"
    ):
        EMCIDEditor(pipe)

    class NotAPipeline:
        text_encoder = None

    with pytest.raises(ValueError, match="Stable Diffusion 1.x/2.x and SD-XL"):
        EMCIDEditor(NotAPipeline())


class StopAfterRecording(Exception):
    pass


def test_a_default_editor_runs_debias_and_rectify_with_the_settings_of_the_papers_runs(tmp_path, monkeypatch):
    import diffusers_emcid.editor as editor_module
    import diffusers_emcid.stage1_cache as stage1_cache_module
    from diffusers_emcid.stage1 import Stage1Result
    from diffusers_emcid.testing import random_captions, tiny_sd_pipeline

    pipe = tiny_sd_pipeline(seed=0)
    editor = EMCIDEditor(pipe, cache_dir=tmp_path, progress=False)
    editor.compute_statistics(random_captions())
    used = []

    def record_stage1(pipe, encoders, requests, config, *args):
        used.append(("stage 1", config.num_steps, config.text_alignment_weight, config.samples_per_prompt))
        if config.num_steps == 300:
            raise StopAfterRecording
        return [
            Stage1Result({"text_encoder": torch.randn(32)}, {"text_encoder": torch.randn(32)}, torch.zeros(1))
            for _ in requests
        ]

    def record_stage2(*args):
        used.append(("stage 2", args[7]))  # alpha
        raise StopAfterRecording

    monkeypatch.setattr(stage1_cache_module, "optimize_concept_vectors", record_stage1)
    monkeypatch.setattr(editor_module, "compute_stage2_deltas", record_stage2)
    with pytest.raises(StopAfterRecording):
        editor.rectify([ConceptEdit("dog", "real dog", images=[torch.rand(3, 16, 16)] * 3)])
    assert used == [("stage 1", 300, 0.0, 3)]
    with pytest.raises(StopAfterRecording):
        editor.debias(["a doctor"], judge=lambda images, phrases: torch.full((len(images), len(phrases)), 0.5))
    assert used[1:] == [("stage 1", 200, 0.01, 1), ("stage 2", 0.5)]
    assert editor.config == EMCIDConfig.from_preset("sd1-paper"), "the kind's settings outlived the call"

    used.clear()  # an explicit (or changed) config is the user's choice
    editor.config.edit_weight = 0.7
    with pytest.raises(StopAfterRecording):
        editor.debias(["a nurse"], judge=lambda images, phrases: torch.full((len(images), len(phrases)), 0.5))
    assert used[-1] == ("stage 2", 0.7)
