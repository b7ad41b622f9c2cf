import json

import pytest
import torch
from huggingface_hub import HfApi, hf_hub_download
from huggingface_hub.errors import RepositoryNotFoundError

import diffusers_emcid  # noqa: F401
from diffusers_emcid import ConceptEdits

from .conftest import PROMPTS, encode

EVERY_FAMILY = True


@pytest.fixture
def edits(editor):
    return editor.edit([("dog", "cat")])


def test_push_pull_load_gives_identical_outputs(edits, hub, tmp_path, make_pipe, family):
    repo = f"alice/no-dogs-{family}"  # one Hub serves the session: a repository per family
    commit_url = edits.push_to_hub(repo, token=hub.token)
    assert repo in commit_url
    assert len([c for c in hub.commits(repo) if c.title != "initial commit"]) == 1

    expected_pipe = make_pipe(seed=0)
    edits.apply(expected_pipe)
    pulled = make_pipe(seed=0)
    name = pulled.load_concept_edits(repo, cache_dir=tmp_path / "fresh-cache", token=hub.token)
    assert name == f"no-dogs-{family}"
    assert torch.equal(encode(pulled, PROMPTS), encode(expected_pipe, PROMPTS))
    card = hf_hub_download(repo, "README.md", cache_dir=tmp_path / "c2", token=hub.token)
    assert "emcid" in open(card).read()


def test_pushing_unchanged_weights_uploads_no_new_lfs_object(edits, hub, family):
    edits.push_to_hub(f"alice/twice-{family}", token=hub.token)
    uploads = hub.lfs_uploads
    edits.push_to_hub(f"alice/twice-{family}", token=hub.token, commit_message="again")
    assert hub.lfs_uploads == uploads


def test_private_repo_needs_the_token(edits, hub, tmp_path, family):
    repo = f"alice/secret-{family}"
    edits.push_to_hub(repo, private=True, token=hub.token)
    with pytest.raises(RepositoryNotFoundError):
        ConceptEdits.from_pretrained(repo, token=False, cache_dir=tmp_path / "anonymous")
    assert len(ConceptEdits.from_pretrained(repo, token=hub.token, cache_dir=tmp_path / "owner")) == 1


def test_revision_picks_the_right_version(editor, hub, tmp_path, family):
    repo = f"alice/versions-{family}"
    editor.edit([("dog", "cat")]).push_to_hub(repo, token=hub.token)
    editor.edit([("apple", "banana")]).push_to_hub(repo, token=hub.token, revision="apples")
    main = ConceptEdits.from_pretrained(repo, cache_dir=tmp_path / "a", token=hub.token)
    branch = ConceptEdits.from_pretrained(repo, revision="apples", cache_dir=tmp_path / "b", token=hub.token)
    assert main.concepts == [("dog", "cat")] and branch.concepts == [("apple", "banana")]


def test_pushed_manifest_names_no_local_path_and_no_token(edits, hub, tmp_path, family):
    edits.base_model = str(tmp_path / "my-local-model")
    repo = f"alice/paths-{family}"
    edits.push_to_hub(repo, token=hub.token)
    folder = HfApi(endpoint=hub.endpoint, token=hub.token).snapshot_download(repo, cache_dir=tmp_path / "c")
    texts = [
        open(f"{folder}/{name}", encoding="utf-8", errors="replace").read()
        for name in ("emcid_manifest.json", "README.md")
    ]
    assert json.loads(texts[0])["base_model"] is None
    for text in texts:
        assert str(tmp_path) not in text and hub.token not in text
    saved = edits.save_pretrained(tmp_path / "local")  # a local save keeps the path, for its owner
    assert json.loads((saved / "emcid_manifest.json").read_text())["base_model"] == str(tmp_path / "my-local-model")
