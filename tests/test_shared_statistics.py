"""Shared key statistics (save, push, load; through the loopback Hub) and the default caption source."""

import dataclasses
import json
import re
import sys
from pathlib import Path

import huggingface_hub.constants
import pytest
import torch
import yaml
from huggingface_hub import HfApi
from safetensors import safe_open

import diffusers_emcid
from diffusers_emcid import (
    BaseModelMismatchError,
    EMCIDConfig,
    EMCIDEditor,
    EMCIDFormatError,
    EMCIDNumericalError,
    key_statistics,
)
from diffusers_emcid.cli import main
from diffusers_emcid.key_statistics import CAPTIONS_ENV_VAR, DEFAULT_CAPTIONS, StatisticsStore, load_captions
from diffusers_emcid.serialization import safetensors_bytes
from diffusers_emcid.shared_statistics import DIGEST_KEY, TENSOR_NAME, statistics_digest, statistics_file_name
from diffusers_emcid.testing import tiny_sd_pipeline, tiny_sdxl_pipeline

from .conftest import CAPTIONS


@pytest.fixture(autouse=True)
def hub_cache(tmp_path, monkeypatch):
    """Downloads go to the test's folder, never the user's Hugging Face cache."""
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hf-cache"))


def new_editor(pipe, config, cache_dir, **changes):
    return EMCIDEditor(pipe, dataclasses.replace(config, **changes), cache_dir=cache_dir, progress=False)


def known(editor):
    """{component: {layer: C}} of the statistics the editor would edit with."""
    return {e.component: editor._statistics_of(e).covariances for e in editor.encoders}


def assert_no_statistics(editor):
    assert not editor.has_statistics() and not editor.statistics.known
    assert not list(editor.cache.root.glob("statistics/*")), "refused statistics reached the cache"


def same_updates(first, second):
    return all(
        torch.equal(first.deltas[c][layer].up, second.deltas[c][layer].up)
        and torch.equal(first.deltas[c][layer].down, second.deltas[c][layer].down)
        for c in first.deltas
        for layer in first.deltas[c]
    )


# ----------------------------------------------------------------------------------------------- through the Hub


def test_statistics_round_trip_through_the_hub_bit_for_bit_and_edit_uses_them(editor, fast_config, hub, tmp_path):
    url = editor.push_statistics("alice/tiny-statistics", base_model="tiny/sd", token=hub.token)
    assert "alice/tiny-statistics" in url
    assert hub.repo_exists("alice/tiny-statistics", "dataset") and not hub.repo_exists("alice/tiny-statistics")
    original = editor.statistics.known["text_encoder"]

    fresh = new_editor(tiny_sd_pipeline(seed=0), fast_config, tmp_path / "fresh")
    assert not fresh.has_statistics()
    loaded = fresh.load_statistics("alice/tiny-statistics", token=hub.token)
    assert sorted(loaded["text_encoder"]) == editor.layers == [0, 1, 2, 3]
    for layer in editor.layers:
        assert torch.equal(loaded["text_encoder"][layer], original.covariances[layer])
    found = fresh._statistics_of(fresh.encoders[0])
    assert (found.num_tokens, found.num_captions, found.caption_set, found.positions) == (
        original.num_tokens,
        len(CAPTIONS),
        StatisticsStore.caption_set(CAPTIONS),
        "pipeline1",
    )

    edits = fresh.edit([("dog", "cat")])  # stage 2 with the loaded statistics gives what the original ones give
    assert same_updates(edits, editor.solve([("dog", "cat")], edits.vectors))
    later = new_editor(tiny_sd_pipeline(seed=0), fast_config, tmp_path / "fresh")
    assert later.has_statistics(), "loaded statistics are not cached for later runs"


def test_statistics_of_another_base_model_or_dtype_are_refused(editor, fast_config, hub, tmp_path):
    editor.push_statistics("alice/seed-0", token=hub.token)
    other = new_editor(tiny_sd_pipeline(seed=1), fast_config, tmp_path / "other")
    with pytest.raises(
        BaseModelMismatchError,
        match=r"other base weights than this pipeline's text_encoder.*"
        r"editor\.compute_statistics\(\)",
    ):
        other.load_statistics("alice/seed-0", token=hub.token)
    assert_no_statistics(other)
    half = new_editor(tiny_sd_pipeline(seed=0).to(torch.float16), fast_config, tmp_path / "half")
    with pytest.raises(BaseModelMismatchError, match=r"in float32 .*this one is in float16"):
        half.load_statistics("alice/seed-0", token=hub.token)
    assert_no_statistics(half)


def test_a_download_fetches_only_the_edited_layers(editor, fast_config, hub, tmp_path):
    editor.push_statistics("alice/layers", token=hub.token)
    subset = new_editor(editor.pipe, fast_config, tmp_path / "subset", layers=[1, 2])
    assert sorted(subset.load_statistics("alice/layers", token=hub.token)["text_encoder"]) == [1, 2]
    downloaded = sorted(path.name for path in (tmp_path / "hf-cache").rglob("*.safetensors"))
    assert downloaded == [statistics_file_name("text_encoder", 1), statistics_file_name("text_encoder", 2)]


def test_statistics_on_a_branch_and_a_repo_without_statistics(editor, fast_config, hub, tmp_path):
    editor.push_statistics("alice/branches", token=hub.token, revision="v2")
    fresh = new_editor(editor.pipe, fast_config, tmp_path / "fresh")
    with pytest.raises(EMCIDFormatError, match="holds no key statistics files"):
        fresh.load_statistics("alice/branches", token=hub.token)  # main holds only .gitattributes
    assert_no_statistics(fresh)
    loaded = fresh.load_statistics("alice/branches", revision="v2", token=hub.token)
    assert sorted(loaded["text_encoder"]) == [0, 1, 2, 3]


def test_pushing_again_uploads_nothing_new_and_drops_files_of_other_layers(editor, fast_config, hub, tmp_path):
    editor.push_statistics("alice/again", token=hub.token)
    uploads = hub.lfs_uploads
    editor.push_statistics("alice/again", token=hub.token, commit_message="again")
    assert hub.lfs_uploads == uploads
    fewer = new_editor(editor.pipe, fast_config, editor.cache.root, layers="-2:-1")
    fewer.compute_statistics(CAPTIONS)
    fewer.push_statistics("alice/again", token=hub.token)
    files = HfApi(token=hub.token).list_repo_files("alice/again", repo_type="dataset")
    assert sorted(f for f in files if f.endswith(".safetensors")) == [statistics_file_name("text_encoder", 3)]


# ----------------------------------------------------------------------------------------------- the folder


def test_files_metadata_and_card(editor, tmp_path):
    folder = editor.save_statistics(tmp_path / "statistics", base_model="tiny/sd")
    assert sorted(p.name for p in folder.iterdir()) == ["README.md"] + [
        statistics_file_name("text_encoder", layer) for layer in range(4)
    ]
    with safe_open(str(folder / "text_encoder.layer02.safetensors"), "pt") as file:
        metadata, names = file.metadata(), list(file.keys())
        covariance = file.get_tensor(TENSOR_NAME)
    assert names == [TENSOR_NAME] and covariance.shape == (64, 64) and covariance.dtype == torch.float32
    assert {k: v for k, v in metadata.items() if k != DIGEST_KEY} == {
        "format": "pt",
        "emcid_format": "emcid-key-statistics",
        "emcid_format_version": "1",
        "library_version": diffusers_emcid.__version__,
        "component": "text_encoder",
        "layer": "2",
        "model_fingerprint": editor._encoder_fingerprint(editor.encoders[0]),
        "model_dtype": "float32",
        "caption_set": StatisticsStore.caption_set(CAPTIONS),
        "num_captions": str(len(CAPTIONS)),
        "num_tokens": str(editor.statistics.known["text_encoder"].num_tokens),
        "statistics_positions": "pipeline",
        "statistics_padding_weight": "1.0",
        "base_model": "tiny/sd",
    }
    assert metadata[DIGEST_KEY] == statistics_digest(metadata, covariance)
    card = (folder / "README.md").read_text()
    front_matter = yaml.safe_load(card.split("---\n")[1])
    assert front_matter == {
        "pretty_name": "EMCID key statistics",
        "viewer": False,
        "tags": ["emcid", "diffusers-emcid", "key-statistics", "text-to-image", "stable-diffusion"],
    }
    assert "`tiny/sd`" in card and "| `text_encoder` | [0, 1, 2, 3] | 64 | float32 | 12 |" in card
    assert str(tmp_path) not in card


def test_sdxl_statistics_round_trip_for_both_text_encoders(tmp_path):
    config = EMCIDConfig.from_preset("sdxl-paper")
    editor = EMCIDEditor(tiny_sdxl_pipeline(seed=0), config, cache_dir=tmp_path / "a", progress=False)
    editor.compute_statistics(CAPTIONS)
    folder = editor.save_statistics(tmp_path / "statistics")
    assert statistics_file_name("text_encoder_2", 5) in {p.name for p in folder.iterdir()}
    fresh = EMCIDEditor(tiny_sdxl_pipeline(seed=0), config, cache_dir=tmp_path / "b", progress=False)
    loaded = fresh.load_statistics(folder)
    assert {c: sorted(layers) for c, layers in loaded.items()} == {
        "text_encoder": [1, 2, 3],
        "text_encoder_2": [1, 2, 3, 4, 5],
    }
    for component, covariances in known(editor).items():
        assert all(torch.equal(loaded[component][layer], covariances[layer]) for layer in loaded[component])


@pytest.mark.parametrize(
    "changes, message",
    [
        (
            {"statistics_positions": "paper"},
            "computed with statistics_positions='pipeline', statistics_padding_weight="
            "1.0, but this editor uses statistics_positions='paper'",
        ),
        (
            {"statistics_padding_weight": 0.5},
            "statistics_padding_weight=1.0, but this editor uses "
            "statistics_positions='pipeline', statistics_padding_weight=0.5",
        ),
    ],
)
def test_statistics_of_other_positions_settings_are_refused(editor, fast_config, tmp_path, changes, message):
    folder = editor.save_statistics(tmp_path / "statistics")
    other = new_editor(editor.pipe, fast_config, tmp_path / "other", **changes)
    with pytest.raises(ValueError, match=re.escape(message) + ".*compute_statistics") as caught:
        other.load_statistics(folder)
    assert not isinstance(caught.value, (BaseModelMismatchError, EMCIDFormatError))
    assert_no_statistics(other)


def test_the_padding_weight_does_not_matter_for_paper_positions(fast_config, tmp_path):
    editor = new_editor(tiny_sd_pipeline(seed=0), fast_config, tmp_path / "a", statistics_positions="paper")
    editor.compute_statistics(CAPTIONS)
    folder = editor.save_statistics(tmp_path / "statistics")
    other = new_editor(
        editor.pipe, fast_config, tmp_path / "b", statistics_positions="paper", statistics_padding_weight=0.5
    )
    assert torch.equal(other.load_statistics(folder)["text_encoder"][0], known(editor)["text_encoder"][0])


def test_layers_the_statistics_lack_are_refused(editor, fast_config, tmp_path):
    folder = editor.save_statistics(tmp_path / "statistics")
    more = new_editor(editor.pipe, fast_config, tmp_path / "more", layers="0:5")
    with pytest.raises(
        BaseModelMismatchError,
        match=r"no key statistics of text_encoder layer 4 .*"
        r"text_encoder\.layer04\.safetensors",
    ):
        more.load_statistics(folder)
    assert_no_statistics(more)


def rewrite(path: Path, covariance=None, dtype=None, keep_digest=False, **metadata_changes):
    """Rewrites a statistics file with another tensor or metadata, and a digest that matches them (or the old one)."""
    with safe_open(str(path), "pt") as file:
        metadata, tensor = file.metadata(), file.get_tensor(TENSOR_NAME)
    tensor = covariance if covariance is not None else tensor
    tensor = tensor.to(dtype) if dtype is not None else tensor
    metadata.update(metadata_changes)
    if not keep_digest:
        metadata[DIGEST_KEY] = statistics_digest(metadata, tensor)
    path.write_bytes(safetensors_bytes({TENSOR_NAME: tensor}, metadata))


def flip_last_byte(path: Path):
    data = bytearray(path.read_bytes())
    data[-1] ^= 1
    path.write_bytes(bytes(data))


CORRUPTIONS = {
    "flipped data bit": (lambda p: flip_last_byte(p), "does not match the digest in its header"),
    "changed metadata": (lambda p: rewrite(p, keep_digest=True, num_tokens="5"), "does not match the digest"),
    "non-finite": (lambda p: rewrite(p, torch.full((64, 64), float("nan"))), "holds NaN or inf"),
    "infinite": (lambda p: rewrite(p, torch.eye(64) * float("inf")), "holds NaN or inf"),
    "shape": (lambda p: rewrite(p, torch.eye(32)), r"holds C of shape \[32, 32\], but d_ff of text_encoder is 64"),
    "not square": (
        lambda p: rewrite(p, torch.ones(64, 32)),
        r"expected one F32 tensor 'covariance' of shape "
        r"\[64, 64\]",
    ),
    "float16": (lambda p: rewrite(p, dtype=torch.float16), r"'covariance' F16 \[64, 64\]"),
    "newer format": (lambda p: rewrite(p, emcid_format_version="2"), "format version 2 .*pip install -U"),
    "not statistics": (lambda p: rewrite(p, emcid_format="something-else"), "not a diffusers-emcid key statistics"),
    "bad count": (lambda p: rewrite(p, num_tokens="-3"), "invalid num_tokens '-3'"),
    "renamed": (
        lambda p: p.write_bytes(p.with_name("text_encoder.layer01.safetensors").read_bytes()),
        "says it holds text_encoder layer 1, not text_encoder layer 2",
    ),
    "mixed caption sets": (lambda p: rewrite(p, caption_set="0" * 32), "mix caption sets"),
    "not safetensors": (lambda p: p.write_bytes(b"not a safetensors file"), "not a readable safetensors file"),
}


@pytest.mark.parametrize("name", CORRUPTIONS)
def test_corrupt_and_non_finite_files_are_refused(editor, fast_config, tmp_path, name):
    folder = editor.save_statistics(tmp_path / "statistics")
    corrupt, message = CORRUPTIONS[name]
    corrupt(folder / "text_encoder.layer02.safetensors")
    fresh = new_editor(editor.pipe, fast_config, tmp_path / "fresh")
    with pytest.raises(EMCIDFormatError, match=message):
        fresh.load_statistics(folder)
    assert_no_statistics(fresh)


def test_a_folder_without_statistics_is_refused(editor, tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(EMCIDFormatError, match="holds no key statistics files"):
        editor.load_statistics(tmp_path / "empty")


def test_writes_are_atomic_and_refuse_non_finite_statistics(editor, tmp_path, monkeypatch):
    parent = tmp_path / "out"
    parent.mkdir()
    with monkeypatch.context() as patched:

        def disk_full(*args, **kwargs):
            raise OSError("No space left on device")

        patched.setattr(Path, "write_text", disk_full)  # the card is written after the statistics files
        with pytest.raises(OSError, match="No space"):
            editor.save_statistics(parent / "statistics")
    assert not list(parent.iterdir()), "a failed save left files behind"

    editor.statistics.known["text_encoder"].covariances[1] = torch.full((64, 64), float("nan"))
    with pytest.raises(EMCIDNumericalError, match="text_encoder layer 1"):
        editor.save_statistics(parent / "statistics")
    assert not list(parent.iterdir())


def test_saving_over_a_folder_replaces_the_statistics_it_held(editor, fast_config, tmp_path):
    folder = editor.save_statistics(tmp_path / "statistics")
    fewer = new_editor(editor.pipe, fast_config, editor.cache.root, layers="-2:-1")
    fewer.compute_statistics(CAPTIONS[:6])
    fewer.save_statistics(folder)
    assert sorted(p.name for p in folder.glob("*.safetensors")) == [statistics_file_name("text_encoder", 3)]


def test_edit_without_statistics_names_both_ways_out(pipe, fast_config, tmp_path):
    editor = new_editor(pipe, fast_config, tmp_path)
    with pytest.raises(
        ValueError,
        match=r"compute_statistics\(\) reads 100,000 Conceptual Captions.*"
        r"editor\.load_statistics\(repo_id_or_folder\)",
    ):
        editor.edit([("dog", "cat")])


# ----------------------------------------------------------------------------------------------- default captions


def upload(hub, repo_id, path, data, revision=None):
    api = HfApi(token=hub.token)
    api.create_repo(repo_id, repo_type="dataset", exist_ok=True)
    if revision:
        api.create_branch(repo_id, branch=revision, repo_type="dataset", exist_ok=True)
    api.upload_file(path_or_fileobj=data, path_in_repo=path, repo_id=repo_id, repo_type="dataset", revision=revision)


def test_compute_statistics_without_captions_reads_the_default_caption_set(
    pipe, fast_config, hub, tmp_path, monkeypatch
):
    rows = "".join(
        json.dumps({"url": f"https://example.com/{i}.jpg", "caption": c}) + "\n" for i, c in enumerate(CAPTIONS)
    )
    upload(hub, "emcid/captions", "data/captions.jsonl", rows.encode())
    monkeypatch.setenv(CAPTIONS_ENV_VAR, "hf://datasets/emcid/captions/data/captions.jsonl")
    default = new_editor(pipe, fast_config, tmp_path / "a").compute_statistics()["text_encoder"]
    direct = new_editor(pipe, fast_config, tmp_path / "b").compute_statistics(CAPTIONS)["text_encoder"]
    assert sorted(default) == sorted(direct) and all(torch.equal(default[k], direct[k]) for k in direct)
    assert list((tmp_path / "hf-cache").rglob("captions.jsonl")), "the captions were not downloaded"


def test_hub_caption_files_with_a_revision_and_columns(hub):
    upload(
        hub, "emcid/csv-captions", "captions.csv", b'image,text\n1.jpg,a dog\n2.jpg,"a cat, asleep"\n', revision="v2"
    )
    url = "hf://datasets/emcid/csv-captions@v2/captions.csv"
    assert load_captions(url, column="text") == ["a dog", "a cat, asleep"]
    assert load_captions(url.replace("@v2", "@refs%2Fheads%2Fv2"), column="text") == ["a dog", "a cat, asleep"]
    with pytest.raises(ValueError, match="not captions or objects with a 'caption' field; pass column="):
        load_captions(url)
    with pytest.raises(ValueError, match="does not name a file of a Hub dataset"):
        load_captions("hf://datasets/emcid/csv-captions")


def test_the_default_is_the_conceptual_captions_training_file(tmp_path, monkeypatch):
    calls = []
    captions = tmp_path / "captions.txt"
    captions.write_text("a dog\na cat\n")

    def fake_download(repo_id, filename, **kwargs):
        calls.append((repo_id, filename, kwargs))
        return str(captions)

    monkeypatch.delenv(CAPTIONS_ENV_VAR, raising=False)
    monkeypatch.setattr(key_statistics, "hf_hub_download", fake_download)
    assert load_captions() == ["a dog", "a cat"]
    assert calls == [
        (
            "google-research-datasets/conceptual_captions",
            "unlabeled/train-00000-of-00002.parquet",
            {"repo_type": "dataset", "revision": None},
        )
    ]
    assert DEFAULT_CAPTIONS.endswith(".parquet") and EMCIDConfig().statistics_num_samples == 100_000


def test_a_parquet_file_without_pyarrow_names_the_fix(tmp_path, monkeypatch):
    path = tmp_path / "captions.parquet"
    path.write_bytes(b"PAR1")
    monkeypatch.setitem(sys.modules, "pyarrow", None)
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    with pytest.raises(ImportError, match="needs pyarrow: pip install pyarrow"):
        load_captions(path)


def test_a_parquet_file_is_read_with_pyarrow(tmp_path):
    pyarrow = pytest.importorskip("pyarrow")
    parquet = pytest.importorskip("pyarrow.parquet")
    path = tmp_path / "captions.parquet"
    parquet.write_table(pyarrow.table({"image_url": ["u1", "u2"], "caption": ["a dog", "a cat"]}), path)
    assert load_captions(path) == ["a dog", "a cat"]
    with pytest.raises(ValueError, match="has no column 'text'"):
        load_captions(path, column="text")


# ----------------------------------------------------------------------------------------------- the command


def run(argv, capsys):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_stats_command_pushes_loads_and_saves(hub, tmp_path, capsys):
    model = tmp_path / "model"
    tiny_sd_pipeline(seed=0).save_pretrained(model)
    captions = tmp_path / "captions.txt"
    captions.write_text("\n".join(CAPTIONS) + "\n")
    common = ["--model", model, "--device", "cpu", "--num-steps", "2"]
    code, out, err = run(
        ["stats", *common, "--captions", captions, "--cache-dir", tmp_path / "a", "--push", "me/cli-statistics"], capsys
    )
    assert code == 0, err
    assert "me/cli-statistics" in out
    card = HfApi(token=hub.token).hf_hub_download("me/cli-statistics", "README.md", repo_type="dataset")
    assert str(tmp_path) not in Path(card).read_text()

    code, out, err = run(
        ["stats", *common, "--load", "me/cli-statistics", "--cache-dir", tmp_path / "b", "--save", tmp_path / "saved"],
        capsys,
    )
    assert code == 0, err
    assert (tmp_path / "saved" / statistics_file_name("text_encoder", 3)).is_file()
    pairs = tmp_path / "pairs.csv"
    pairs.write_text("dog,cat\n")
    code, out, err = run(
        ["edit", *common, "--pairs", pairs, "--out", tmp_path / "edits", "--cache-dir", tmp_path / "b"], capsys
    )
    assert code == 0, err  # the loaded statistics are in the cache

    other = tmp_path / "other-model"
    tiny_sd_pipeline(seed=1).save_pretrained(other)
    code, out, err = run(
        ["stats", "--model", other, "--device", "cpu", "--load", tmp_path / "saved", "--cache-dir", tmp_path / "c"],
        capsys,
    )
    assert code == 2 and "other base weights" in err
