import json

import pytest
import torch
from huggingface_hub import HfApi, hf_hub_download
from huggingface_hub.errors import RepositoryNotFoundError

import diffusers_emcid  # noqa: F401
from diffusers_emcid import ConceptEdits
from diffusers_emcid.testing import tiny_sd_pipeline

from .conftest import encode

PROMPTS = ["a photo of a dog", "a red car"]


@pytest.fixture
def edits(editor):
    return editor.edit([("dog", "cat")])


def test_push_pull_load_gives_identical_outputs(edits, hub, tmp_path):
    commit_url = edits.push_to_hub("alice/no-dogs", token=hub.token)
    assert "alice/no-dogs" in commit_url
    assert len([c for c in hub.commits("alice/no-dogs") if c.title != "initial commit"]) == 1

    expected_pipe = tiny_sd_pipeline(seed=0)
    edits.apply(expected_pipe)
    pulled = tiny_sd_pipeline(seed=0)
    name = pulled.load_concept_edits("alice/no-dogs", cache_dir=tmp_path / "fresh-cache", token=hub.token)
    assert name == "no-dogs"
    assert torch.equal(encode(pulled, PROMPTS), encode(expected_pipe, PROMPTS))
    card = hf_hub_download("alice/no-dogs", "README.md", cache_dir=tmp_path / "c2", token=hub.token)
    assert "emcid" in open(card).read()


def test_pushing_unchanged_weights_uploads_no_new_lfs_object(edits, hub):
    edits.push_to_hub("alice/twice", token=hub.token)
    uploads = hub.lfs_uploads
    edits.push_to_hub("alice/twice", token=hub.token, commit_message="again")
    assert hub.lfs_uploads == uploads


def test_private_repo_needs_the_token(edits, hub, tmp_path):
    edits.push_to_hub("alice/secret", private=True, token=hub.token)
    with pytest.raises(RepositoryNotFoundError):
        ConceptEdits.from_pretrained("alice/secret", token=False, cache_dir=tmp_path / "anonymous")
    assert len(ConceptEdits.from_pretrained("alice/secret", token=hub.token, cache_dir=tmp_path / "owner")) == 1


def test_revision_picks_the_right_version(editor, hub, tmp_path):
    editor.edit([("dog", "cat")]).push_to_hub("alice/versions", token=hub.token)
    editor.edit([("apple", "banana")]).push_to_hub("alice/versions", token=hub.token, revision="apples")
    main = ConceptEdits.from_pretrained("alice/versions", cache_dir=tmp_path / "a", token=hub.token)
    branch = ConceptEdits.from_pretrained("alice/versions", revision="apples", cache_dir=tmp_path / "b", token=hub.token)
    assert main.concepts == [("dog", "cat")] and branch.concepts == [("apple", "banana")]


def test_pushed_manifest_names_no_local_path_and_no_token(edits, hub, tmp_path):
    edits.base_model = str(tmp_path / "my-local-model")
    edits.push_to_hub("alice/paths", token=hub.token)
    folder = HfApi(endpoint=hub.endpoint, token=hub.token).snapshot_download("alice/paths", cache_dir=tmp_path / "c")
    texts = [open(f"{folder}/{name}", encoding="utf-8", errors="replace").read()
             for name in ("emcid_manifest.json", "README.md")]
    assert json.loads(texts[0])["base_model"] is None
    for text in texts:
        assert str(tmp_path) not in text and hub.token not in text
    saved = edits.save_pretrained(tmp_path / "local")  # a local save keeps the path, for its owner
    assert json.loads((saved / "emcid_manifest.json").read_text())["base_model"] == str(tmp_path / "my-local-model")
