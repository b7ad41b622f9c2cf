"""The kohya-format export: the key names and header AUTOMATIC1111, Forge and ComfyUI read, diffusers loading it to the
conditioning of `apply` in every family (layers of different ranks included), float16 storage and arithmetic of large
updates, the atomic write, clear errors, `emcid export` and the file in pushed repos."""

import json
import os
import re
from collections.abc import Callable

import pytest
import torch
from diffusers import DiffusionPipeline
from huggingface_hub import HfApi
from safetensors import safe_open
from safetensors.torch import load_file

from diffusers_emcid import ConceptEdit, ConceptEdits, EMCIDConfig, EMCIDEditor, EMCIDNumericalError, LowRankDelta
from diffusers_emcid.cli import main
from diffusers_emcid.encoders import find_text_encoder_layout
from diffusers_emcid.evaluation import pipeline_conditioning
from diffusers_emcid.families import pipeline_family
from diffusers_emcid.kohya import KOHYA_WEIGHTS_NAME
from diffusers_emcid.testing import random_captions, tiny_sd2_pipeline, tiny_sd_pipeline, tiny_sdxl_pipeline

PIPELINES: dict[str, Callable[..., DiffusionPipeline]] = {
    "sd1": tiny_sd_pipeline,
    "sd2": tiny_sd2_pipeline,
    "sdxl": tiny_sdxl_pipeline,
}
PROMPTS = ["a photo of a dog", "an apple on a table", "a red car", ""]
PAIRS = [("dog", "cat"), ("apple", "banana"), ("car", "bus")]
KOHYA_KEY = re.compile(
    r"(?P<prefix>lora_te[12]?)_text_model_encoder_layers_(?P<layer>0|[1-9][0-9]*)_mlp_fc2"
    r"\.lora_(?P<factor>down|up)\.weight"
)
PREFIXES = {
    "sd1": {"text_encoder": "lora_te"},
    "sd2": {"text_encoder": "lora_te"},
    "sdxl": {"text_encoder": "lora_te1", "text_encoder_2": "lora_te2"},
}
"""The key prefixes AUTOMATIC1111's Lora extension maps to each text encoder."""


def mixed_rank_edits(pipe: DiffusionPipeline, scale: float = 0.05, seed: int = 0) -> ConceptEdits:
    """Random edits of every text encoder of `pipe`, at each layer the UNet sees, with ranks 1, 2, 3, 1, ... by layer:
    `up` (d, r) and `down` (r, d_ff) with entries of size `scale`."""
    generator = torch.Generator().manual_seed(seed)
    deltas, vectors, z_layers = {}, {}, {}
    for slot in pipeline_family(pipe).text_encoders:
        layout = find_text_encoder_layout(getattr(pipe, slot.component), slot.component)
        d, d_ff = layout.hidden_size, layout.intermediate_size
        deltas[slot.component] = {
            layer: LowRankDelta(
                torch.randn(d, 1 + layer % 3, generator=generator) * scale,
                torch.randn(1 + layer % 3, d_ff, generator=generator) * scale,
            )
            for layer in range(layout.num_layers - 1)
        }
        vectors[slot.component] = torch.randn(len(PAIRS), d, generator=generator)
        z_layers[slot.component] = layout.num_layers - 2
    return ConceptEdits([ConceptEdit(s, d) for s, d in PAIRS], vectors, deltas, EMCIDConfig(), z_layers)


def relative_difference(a: torch.Tensor, b: torch.Tensor) -> float:
    """`||a - b|| / ||b||` over all entries."""
    return float((a.double() - b.double()).norm() / b.double().norm())


def assert_diffusers_loads_it_like_apply(
    edits: ConceptEdits, make: Callable[..., DiffusionPipeline], file, tolerance: float = 1e-5
) -> None:
    """`load_lora_weights(file)` on a fresh pipeline gives the conditioning of `edits.apply`, to `tolerance`
    relative."""
    applied = make(seed=0)
    edits.apply(applied)
    expected = pipeline_conditioning(applied, PROMPTS)
    base = pipeline_conditioning(make(seed=0), PROMPTS)
    assert relative_difference(expected, base) > 1e-3, "the edits change nothing"
    loaded = make(seed=0)
    loaded.load_lora_weights(str(file), adapter_name="kohya")
    assert relative_difference(pipeline_conditioning(loaded, PROMPTS), expected) <= tolerance


@pytest.fixture(scope="module", params=list(PIPELINES))
def computed(request, tmp_path_factory) -> tuple[str, ConceptEdits]:
    """A family and two edits an `EMCIDEditor` computed on its tiny pipeline."""
    pipe = PIPELINES[request.param](seed=0)
    config = EMCIDConfig.from_preset(pipeline_family(pipe).default_preset, num_steps=8, image_num_inference_steps=2)
    editor = EMCIDEditor(pipe, config, cache_dir=tmp_path_factory.mktemp("cache"), progress=False)
    editor.compute_statistics(random_captions())
    return request.param, editor.edit(PAIRS[:2])


@pytest.fixture(params=list(PIPELINES))
def mixed(request) -> tuple[str, ConceptEdits]:
    """A family and random edits of its tiny pipeline with layers of ranks 1, 2 and 3."""
    return request.param, mixed_rank_edits(PIPELINES[request.param](seed=0))


def test_diffusers_loads_the_export_of_computed_edits_like_apply(computed, tmp_path):
    family, edits = computed
    assert_diffusers_loads_it_like_apply(edits, PIPELINES[family], edits.export_kohya(tmp_path / "edits.safetensors"))


def test_layers_of_different_ranks_load_at_scale_one(mixed, tmp_path):
    family, edits = mixed
    assert {delta.rank for layers in edits.deltas.values() for delta in layers.values()} == {1, 2, 3}
    file = edits.export_kohya(tmp_path / "edits.safetensors")
    assert_diffusers_loads_it_like_apply(edits, PIPELINES[family], file)
    with safe_open(str(file), "pt") as weights:
        ranks = {weights.get_slice(key).get_shape()[0] for key in weights.keys() if key.endswith("lora_down.weight")}
        assert ranks == {3} and weights.metadata()["ss_network_dim"] == "3"  # zero-padded: one rank per file


def test_keys_and_header_are_what_the_uis_read(mixed, tmp_path):
    family, edits = mixed
    file = edits.export_kohya(tmp_path / "edits.safetensors")
    with safe_open(str(file), "pt") as weights:
        keys, header = list(weights.keys()), weights.metadata()
    layers: dict[str, set[int]] = {}
    for key in keys:
        match = KOHYA_KEY.fullmatch(key)
        assert match, f"{key!r} is no kohya text-encoder key"
        module, _, part = key.partition(".")  # AUTOMATIC1111 cuts each key at its first dot
        assert "." not in module and part in ("lora_down.weight", "lora_up.weight")
        layers.setdefault(match["prefix"], set()).add(int(match["layer"]))
    prefixes = PREFIXES[family]
    assert layers == {prefixes[c]: set(d) for c, d in edits.deltas.items()}
    assert not any(key.endswith("alpha") for key in keys) and "lora_adapter_metadata" not in header
    assert header["ss_network_module"] == "networks.lora"
    assert header["ss_network_alpha"] == header["ss_network_dim"]  # scale 1
    assert header["ss_base_model_version"].startswith("sdxl_") == (family == "sdxl")
    assert header["ss_v2"] == "False"  # the tiny SD 2.x pipeline's text encoder is narrower than OpenCLIP-H's
    assert json.loads(header["emcid_manifest"])["concepts"][0]["source"] == "dog"


@pytest.mark.parametrize("width, version, v2", [(768, "sd_v1", "False"), (1024, "sd_v2", "True")])
def test_sd2_is_told_by_the_width_of_its_text_encoder(tmp_path, width, version, v2):
    deltas = {"text_encoder": {0: LowRankDelta(torch.randn(width, 1), torch.randn(1, 8))}}
    edits = ConceptEdits([ConceptEdit("dog", "cat")], {}, deltas, EMCIDConfig(), {"text_encoder": 0})
    with safe_open(str(edits.export_kohya(tmp_path / "edits.safetensors")), "pt") as weights:
        header = weights.metadata()
    assert (header["ss_base_model_version"], header["ss_v2"]) == (version, v2)


def test_float16_export_of_a_large_update_stays_finite_and_close(tmp_path):
    edits = mixed_rank_edits(tiny_sd_pipeline(seed=0))
    edits.deltas = {
        c: {layer: LowRankDelta(d.up * 1e6, d.down * 1e-1) for layer, d in layers.items()}
        for c, layers in edits.deltas.items()
    }  # unbalanced: entries of `up` beyond float16's range
    assert not all(torch.isfinite(d.up.half()).all() for d in edits.deltas["text_encoder"].values())
    half = load_file(str(edits.export_kohya(tmp_path / "half.safetensors", dtype=torch.float16)))
    full = load_file(str(edits.export_kohya(tmp_path / "full.safetensors", dtype="float32")))
    assert {t.dtype for t in half.values()} == {torch.float16} and {t.dtype for t in full.values()} == {torch.float32}
    for key in (k for k in half if k.endswith("lora_up.weight")):
        down_key = key.replace("lora_up", "lora_down")
        expected = full[key].double() @ full[down_key].double()
        assert relative_difference(half[key].double() @ half[down_key].double(), expected) <= 2e-3
        in_float16 = half[key] @ half[down_key]  # as AUTOMATIC1111 applies them
        assert torch.isfinite(in_float16).all() and relative_difference(in_float16, expected) <= 5e-3


def test_export_is_atomic(tmp_path, monkeypatch):
    edits = mixed_rank_edits(tiny_sd_pipeline(seed=0))
    target = tmp_path / "loras" / "edits.safetensors"

    def crash(*args, **kwargs):
        raise KeyboardInterrupt

    with monkeypatch.context() as patch:
        patch.setattr(os, "replace", crash)
        with pytest.raises(KeyboardInterrupt):
            edits.export_kohya(target)
    assert list(target.parent.iterdir()) == [], "a partial or temporary file was left behind"
    before = edits.export_kohya(target).read_bytes()
    with monkeypatch.context() as patch:
        patch.setattr(os, "replace", crash)
        with pytest.raises(KeyboardInterrupt):
            mixed_rank_edits(tiny_sd_pipeline(seed=0), seed=1).export_kohya(target)
    assert target.read_bytes() == before and list(target.parent.iterdir()) == [target]


def test_bad_arguments_name_the_value_and_the_fix(tmp_path):
    edits = mixed_rank_edits(tiny_sd_pipeline(seed=0))
    with pytest.raises(ValueError, match=r"'.*edits\.pt' is not a \.safetensors file name.*'.*edits\.safetensors'"):
        edits.export_kohya(tmp_path / "edits.pt")
    (tmp_path / "folder.safetensors").mkdir()
    with pytest.raises(ValueError, match=r"folder\.safetensors' is a folder; give the path of the file"):
        edits.export_kohya(tmp_path / "folder.safetensors")
    with pytest.raises(ValueError, match=r"dtype='float8' is not a storage precision.*'float16'"):
        edits.export_kohya(tmp_path / "edits.safetensors", dtype="float8")
    only_second = ConceptEdits(
        edits.requests, {}, {"text_encoder_2": edits.deltas["text_encoder"]}, edits.config, {"text_encoder_2": 0}
    )
    with pytest.raises(ValueError, match=r"\['text_encoder_2'\] fit no supported family"):
        only_second.export_kohya(tmp_path / "edits.safetensors")
    huge = ConceptEdits(
        edits.requests,
        {},
        {"text_encoder": {0: LowRankDelta(torch.full((32, 1), 1e9), torch.full((1, 64), 1e9))}},
        edits.config,
        {"text_encoder": 0},
    )
    with pytest.raises(EMCIDNumericalError, match="too large for float16.*dtype=torch.float32"):
        huge.export_kohya(tmp_path / "edits.safetensors", dtype=torch.float16)
    edits.deltas["text_encoder"][0].up[0, 0] = float("nan")
    with pytest.raises(EMCIDNumericalError, match="NaN or inf"):
        edits.export_kohya(tmp_path / "edits.safetensors")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["folder.safetensors"]


def test_emcid_export_writes_the_file(tmp_path, capsys):
    edits = mixed_rank_edits(tiny_sd_pipeline(seed=0))
    folder = edits.save_pretrained(tmp_path / "edits")
    out = tmp_path / "loras" / "no-dogs.safetensors"
    assert main(["export", str(folder), str(out), "--dtype", "float16"]) == 0
    assert "<lora:no-dogs:1>" in capsys.readouterr().out
    assert {t.dtype for t in load_file(str(out)).values()} == {torch.float16}
    assert_diffusers_loads_it_like_apply(edits, tiny_sd_pipeline, out, tolerance=1e-3)
    assert main(["export", str(folder), str(tmp_path / "no-dogs.ckpt")]) == 2
    assert "is not a .safetensors file name" in capsys.readouterr().err


def test_pushed_repo_holds_a_kohya_file_that_loads_like_apply(hub, tmp_path):
    edits = mixed_rank_edits(tiny_sdxl_pipeline(seed=0))
    edits.push_to_hub("alice/kohya-sdxl", token=hub.token)
    assert KOHYA_WEIGHTS_NAME in HfApi(endpoint=hub.endpoint, token=hub.token).list_repo_files("alice/kohya-sdxl")
    file = HfApi(endpoint=hub.endpoint, token=hub.token).hf_hub_download(
        "alice/kohya-sdxl", KOHYA_WEIGHTS_NAME, cache_dir=tmp_path
    )
    assert_diffusers_loads_it_like_apply(edits, tiny_sdxl_pipeline, file)
