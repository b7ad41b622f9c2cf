import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import diffusers_emcid  # noqa: F401  (adds the pipeline methods)
from diffusers_emcid import ConceptEdit, ConceptEdits, EMCIDFormatError
from diffusers_emcid.adapters import inject_lora_deltas, layers_with_adapter, lora_config
from diffusers_emcid.encoders import find_text_encoder_layout
from diffusers_emcid.serialization import (
    FORMAT_VERSION,
    LORA_METADATA_FIELDS,
    MANIFEST_HEADER_KEY,
    VECTORS_NAME,
    WEIGHTS_NAME,
    Manifest,
    lora_adapter_metadata,
)
from diffusers_emcid.stage2 import LowRankDelta
from diffusers_emcid.testing import tiny_sd_pipeline, tiny_sdxl_pipeline

from .conftest import PROMPTS, assert_pipeline_unchanged, encode, model_state

EVERY_FAMILY = True
EDITED_LAYERS = {
    "sd1": {"text_encoder": [0, 1, 2, 3]},  # "0:-1" of 5 layers
    "sd2": {"text_encoder": [0, 1, 2, 3, 4]},  # of 6
    "sdxl": {"text_encoder": [1, 2, 3], "text_encoder_2": [1, 2, 3, 4, 5]},  # "-4:-1" of 5, "-6:-1" of 7
}


@pytest.fixture
def edits(editor):
    return editor.edit([("dog", "cat"), ConceptEdit("Van Gogh", "art", templates=["painting by {}", "style of {}"])])


@pytest.fixture
def in_memory(edits, pipe):
    edits.apply(pipe)
    outputs = encode(pipe, PROMPTS)
    edits.remove(pipe)
    return outputs


def test_round_trip_gives_the_in_memory_outputs(edits, pipe, in_memory, tmp_path):
    folder = edits.save_pretrained(tmp_path / "edits")
    assert sorted(p.name for p in folder.iterdir()) == sorted(
        ["README.md", "emcid_manifest.json", "emcid_vectors.safetensors", "pytorch_lora_weights.safetensors"]
    )
    loaded = ConceptEdits.from_pretrained(folder)
    assert loaded.concepts == edits.concepts
    assert [r.templates for r in loaded.requests] == [r.templates for r in edits.requests]
    assert [r.resolved_seed for r in loaded.requests] == [r.resolved_seed for r in edits.requests]
    assert loaded.vectors.keys() == edits.vectors.keys()
    assert all(torch.equal(loaded.vectors[c], edits.vectors[c]) for c in edits.vectors)
    assert loaded.config == edits.config and loaded.z_layers == edits.z_layers
    loaded.apply(pipe)
    assert (encode(pipe, PROMPTS) - in_memory).abs().max() <= 1e-6


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_16_bit_storage_stays_within_the_reported_error(edits, pipe, tmp_path, dtype):
    folder = edits.save_pretrained(tmp_path / "edits", dtype=dtype)
    manifest = json.loads((folder / "emcid_manifest.json").read_text())
    assert manifest["storage_dtype"] == str(dtype).removeprefix("torch.")
    loaded = ConceptEdits.from_pretrained(folder)
    errors = [
        (loaded.deltas[component][layer].to(torch.float64).dense() - delta.to(torch.float64).dense()).abs().max().item()
        for component, deltas in edits.deltas.items()
        for layer, delta in deltas.items()
    ]
    assert 0 < max(errors) <= manifest["storage_max_abs_error"] * (1 + 1e-6)
    with safe_open(str(folder / WEIGHTS_NAME), "pt") as file:
        assert all(file.get_slice(k).get_dtype() == ("F16" if dtype == torch.float16 else "BF16") for k in file.keys())


def test_plain_diffusers_loads_the_same_file(edits, tmp_path, in_memory, make_pipe):
    folder = edits.save_pretrained(tmp_path / "edits")
    plain = make_pipe(seed=0)
    plain.load_lora_weights(str(folder), adapter_name="edits")
    ours = make_pipe(seed=0)
    ours.load_concept_edits(folder)
    torch.testing.assert_close(encode(plain, PROMPTS), encode(ours, PROMPTS), rtol=0, atol=1e-6)
    torch.testing.assert_close(encode(plain, PROMPTS), in_memory, rtol=0, atol=1e-6)


def test_keys_keep_the_text_model_prefix_and_the_manifest_is_in_the_header(edits, tmp_path, family):
    folder = edits.save_pretrained(tmp_path / "edits")
    with safe_open(str(folder / WEIGHTS_NAME), "pt") as file:
        keys, metadata = list(file.keys()), file.metadata()
    assert {k.split(".text_model.encoder.layers.")[0] for k in keys} == set(EDITED_LAYERS[family])
    assert json.loads(metadata[MANIFEST_HEADER_KEY]) == json.loads((folder / "emcid_manifest.json").read_text())
    lora_config = json.loads(metadata["lora_adapter_metadata"])
    assert lora_config["text_encoder.lora_alpha"] == lora_config["text_encoder.r"]
    manifest = json.loads(metadata[MANIFEST_HEADER_KEY])
    assert manifest["concepts"][1] == {
        "source": "Van Gogh",
        "destination": "art",
        "templates": ["painting by {}", "style of {}"],
        "seed": edits.requests[1].resolved_seed,
        "num_images": 0,
        "text_alignment": True,
        "use_real_noise": False,
    }
    assert {c: info["layers"] for c, info in manifest["components"].items()} == EDITED_LAYERS[family]
    assert all(len(info["base_fingerprint"]) == 64 for info in manifest["components"].values())


def test_model_card_has_yaml_metadata_concepts_and_citation(edits, tmp_path):
    import yaml

    card = (edits.save_pretrained(tmp_path / "edits") / "README.md").read_text()
    _, header, body = card.split("---\n", 2)
    metadata = yaml.safe_load(header)
    assert metadata["library_name"] == "diffusers"
    assert {"emcid", "concept-editing", "lora"} <= set(metadata["tags"])
    assert "| 2 | Van Gogh | art |" in body and "load_lora_weights" in body and "load_concept_edits" in body
    assert "2403.13807" in body


def test_save_is_atomic_when_interrupted(edits, tmp_path, monkeypatch):
    target = tmp_path / "out" / "edits"

    def crash(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr("diffusers_emcid.serialization.safetensors_bytes", crash)
    with pytest.raises(KeyboardInterrupt):
        edits.save_pretrained(target)
    assert not target.exists()
    assert list(target.parent.iterdir()) == [], "a temporary folder was left behind"


def test_equal_edits_give_equal_bytes(edits, tmp_path):
    first, second = edits.save_pretrained(tmp_path / "a"), edits.save_pretrained(tmp_path / "b")
    for name in ("pytorch_lora_weights.safetensors", "emcid_vectors.safetensors", "emcid_manifest.json", "README.md"):
        assert (first / name).read_bytes() == (second / name).read_bytes(), name


def corrupt(folder, mutate):
    weights = folder / WEIGHTS_NAME
    with safe_open(str(weights), "pt") as file:
        metadata = file.metadata()
    tensors = load_file(str(weights))
    tensors, metadata = mutate(tensors, dict(metadata))
    save_file(tensors, str(weights), metadata=metadata)


def future_version(tensors, metadata):
    manifest = json.loads(metadata[MANIFEST_HEADER_KEY])
    manifest["format_version"] = FORMAT_VERSION + 1
    manifest["library_version"] = "9.0.0"
    return tensors, {**metadata, MANIFEST_HEADER_KEY: json.dumps(manifest)}


def first_key(tensors, suffix):
    return next(k for k in sorted(tensors) if k.endswith(suffix))


@pytest.mark.parametrize(
    "mutate, message",
    [
        (
            lambda t, m: ({k: v for k, v in t.items() if k != first_key(t, "up.weight")}, m),
            "lacks the up factor|holds updates of layers",
        ),
        (
            lambda t, m: (
                {
                    **t,
                    "text_encoder.text_model.encoder.layers.0.mlp.fc1.lora_linear_layer.up.weight": torch.zeros(2, 2),
                },
                m,
            ),
            "unexpected tensor",
        ),
        (lambda t, m: ({**t, first_key(t, "down.weight"): torch.zeros(2, 7)}, m), "inconsistent with"),
        (
            lambda t, m: (
                {**t, first_key(t, "down.weight"): torch.full_like(t[first_key(t, "down.weight")], float("nan"))},
                m,
            ),
            "NaN",
        ),
        (lambda t, m: (t, {**m, MANIFEST_HEADER_KEY: "{not json"}), "not valid JSON"),
        (lambda t, m: (t, {k: v for k, v in m.items() if k != MANIFEST_HEADER_KEY}), "not a diffusers-emcid adapter"),
        (future_version, "newer than this one.*pip install -U diffusers-emcid"),
    ],
)
def test_bad_files_give_clear_errors_and_leave_the_pipeline_as_it_was(edits, pipe, tmp_path, mutate, message):
    folder = edits.save_pretrained(tmp_path / "edits")
    corrupt(folder, mutate)
    state = model_state(pipe)
    with pytest.raises(EMCIDFormatError, match=message):
        pipe.load_concept_edits(folder)
    assert_pipeline_unchanged(pipe, state)
    assert pipe.get_concept_edits() == {}


def test_truncated_and_garbage_files(edits, pipe, tmp_path):
    folder = edits.save_pretrained(tmp_path / "edits")
    data = (folder / WEIGHTS_NAME).read_bytes()
    state = model_state(pipe)
    (folder / WEIGHTS_NAME).write_bytes(data[: len(data) // 2])
    with pytest.raises(EMCIDFormatError, match="not a readable safetensors file"):
        pipe.load_concept_edits(folder)
    (folder / WEIGHTS_NAME).write_bytes(b"\x00" * 100)
    with pytest.raises(EMCIDFormatError):
        pipe.load_concept_edits(folder)
    (folder / WEIGHTS_NAME).unlink()
    with pytest.raises(EMCIDFormatError, match="has no pytorch_lora_weights.safetensors"):
        pipe.load_concept_edits(folder)
    assert_pipeline_unchanged(pipe, state)


def test_vectors_from_another_save_are_detected(editor, tmp_path):
    first = editor.edit([("dog", "cat")]).save_pretrained(tmp_path / "a")
    second = editor.edit([("apple", "banana")]).save_pretrained(tmp_path / "b")
    (first / VECTORS_NAME).write_bytes((second / VECTORS_NAME).read_bytes())
    with pytest.raises(EMCIDFormatError, match="does not belong to"):
        ConceptEdits.from_pretrained(first)


def test_other_base_weights_are_refused_unless_forced(edits, tmp_path, make_pipe):
    folder = edits.save_pretrained(tmp_path / "edits")
    other = make_pipe(seed=1)
    state = model_state(other)
    with pytest.raises(ValueError, match="other base weights.*force=True"):
        other.load_concept_edits(folder)
    assert_pipeline_unchanged(other, state)
    assert other.load_concept_edits(folder, force=True) == "edits"


def test_a_model_of_another_shape_is_refused(edits, tmp_path, make_pipe):
    folder = edits.save_pretrained(tmp_path / "edits")
    other = make_pipe(seed=0)
    other.text_encoder = tiny_sd_pipeline(intermediate_size=48).text_encoder  # keys of 48 dimensions, not 64 or 128
    with pytest.raises(ValueError, match="made for another model"):
        other.load_concept_edits(folder, force=True)
    assert not hasattr(other.text_encoder, "peft_config")


def test_bad_storage_dtype(edits, tmp_path):
    with pytest.raises(ValueError, match="not a storage precision"):
        edits.save_pretrained(tmp_path / "x", dtype=torch.int8)


def manifest_of(edits):
    return Manifest.build(
        edits.requests, edits.config, edits.z_layers, edits.deltas, edits.base_model, edits.base_fingerprints
    )


def test_manifest_round_trips_through_its_dict_and_json(edits):
    manifest = manifest_of(edits)
    assert manifest.to_dict() == edits.manifest()
    assert Manifest.from_dict(manifest.to_dict(), "memory") == manifest
    assert Manifest.from_json(manifest.to_json(), "memory") == manifest
    assert [r.resolved_seed for r in manifest.requests()] == [r.resolved_seed for r in edits.requests]


def test_manifest_warns_of_unknown_keys_and_ignores_them(edits, caplog):
    data = edits.manifest()
    data["extra_field"] = 1
    data["config"]["new_field"] = "x"
    data["concepts"][0]["mood"] = "happy"
    data["components"]["text_encoder"]["notes"] = []
    with caplog.at_level("WARNING", logger="diffusers_emcid.serialization"):
        manifest = Manifest.from_dict(data, "somewhere.json")
    assert manifest == manifest_of(edits)
    warnings = "\n".join(record.getMessage() for record in caplog.records)
    for key in ("extra_field", "new_field", "mood", "notes"):
        assert key in warnings
    assert "somewhere.json" in warnings


def test_a_saved_folder_loads_without_warnings(edits, tmp_path, caplog):
    folder = edits.save_pretrained(tmp_path / "edits")
    with caplog.at_level("WARNING", logger="diffusers_emcid"):
        ConceptEdits.from_pretrained(folder)
    assert caplog.records == []


def test_the_injected_lora_config_is_the_one_in_the_header():
    # text_encoder_2 of SD-XL keeps transformers' `text_model.` level, which the file's module paths leave out
    text_encoder = tiny_sdxl_pipeline(seed=0).text_encoder_2
    layout = find_text_encoder_layout(text_encoder, "text_encoder_2")
    generator = torch.Generator().manual_seed(0)
    deltas = {
        layer: LowRankDelta(
            up=torch.randn(layout.hidden_size, rank, generator=generator),
            down=torch.randn(rank, layout.intermediate_size, generator=generator),
        )
        for layer, rank in [(2, 1), (5, 3)]
    }
    inject_lora_deltas(layout, deltas, "edits")
    injected = text_encoder.peft_config["edits"]
    assert injected.to_dict() == lora_config(deltas).to_dict()
    assert injected.rank_pattern == {"encoder.layers.2.mlp.fc2": 1, "encoder.layers.5.mlp.fc2": 3}
    assert {path: layer.r["edits"] for path, layer in layers_with_adapter(text_encoder, "edits")} == {
        layout.fc2_path(2): 1,
        layout.fc2_path(5): 3,
    }
    header = lora_adapter_metadata({"text_encoder_2": deltas})
    assert set(header) == {f"text_encoder_2.{field}" for field in LORA_METADATA_FIELDS}
    for field in LORA_METADATA_FIELDS:
        value = getattr(injected, field)
        assert header[f"text_encoder_2.{field}"] == (sorted(value) if isinstance(value, set) else value), field
