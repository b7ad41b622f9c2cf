"""The loopback Hub (tests/hub_server.py) driven by the real huggingface_hub client, as the package's Hub tests
use it."""

from __future__ import annotations

import hashlib
import random
import socket
from pathlib import Path

import huggingface_hub
import pytest
from huggingface_hub import HfApi, hf_hub_download, snapshot_download
from huggingface_hub.errors import (
    EntryNotFoundError,
    HfHubHTTPError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)

from .hub_server import LoopbackHub

README = """---
license: apache-2.0
library_name: diffusers
tags:
- emcid
---

# A test model card
"""


@pytest.fixture
def api(hub: LoopbackHub) -> HfApi:
    return HfApi(endpoint=hub.endpoint, token=hub.token)


@pytest.fixture(autouse=True)
def no_server_errors(hub: LoopbackHub):
    """Every test fails if the server hit a bug of its own while serving it."""
    before = len(hub.errors)
    yield
    assert hub.errors[before:] == []


def weights(seed: int, size: int = 4096) -> bytes:
    """Binary content, larger than 1 KB, as a `.safetensors` file would hold."""
    return random.Random(seed).randbytes(size)


def write_files(folder: Path, files: dict[str, bytes | str]) -> Path:
    for name, content in files.items():
        path = folder / name
        path.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(content, str):
            path.write_text(content)
        else:
            path.write_bytes(content)
    return folder


def download(hub: LoopbackHub, repo_id: str, filename: str, cache_dir: Path, **kwargs) -> bytes:
    path = hf_hub_download(repo_id, filename, endpoint=hub.endpoint, cache_dir=cache_dir, **kwargs)
    return Path(path).read_bytes()


def test_the_client_is_online_and_pointed_at_the_loopback_hub(hub: LoopbackHub):
    assert hub.endpoint.startswith("http://127.0.0.1:")
    assert huggingface_hub.constants.ENDPOINT == hub.endpoint
    assert HfApi().endpoint == hub.endpoint
    assert not huggingface_hub.constants.HF_HUB_OFFLINE
    assert huggingface_hub.constants.HF_HUB_DISABLE_XET
    assert HfApi(endpoint=hub.endpoint, token=hub.token).whoami()["name"] == "loopback-user"


def test_no_test_reaches_beyond_loopback():
    with pytest.raises(OSError):
        socket.create_connection(("192.0.2.1", 80), timeout=1)  # TEST-NET-1: refused before any packet
    with pytest.raises(OSError):
        socket.getaddrinfo("huggingface.co", 443)


def test_public_repo_upload_and_download(hub: LoopbackHub, api: HfApi, tmp_path: Path):
    url = api.create_repo("emcid-tests/public-model")
    assert url == f"{hub.endpoint}/emcid-tests/public-model" and url.repo_id == "emcid-tests/public-model"
    blob = weights(0)
    files = {"README.md": README, "config.json": '{"rank": 4}', "unet/adapter.safetensors": blob}
    info = api.upload_folder(
        repo_id="emcid-tests/public-model",
        folder_path=write_files(tmp_path / "src", files),
        commit_message="Add adapter",
    )
    assert any(r.startswith("POST /api/validate-yaml") for r in hub.requests)  # the README's front matter passed
    assert hub.commits("emcid-tests/public-model")[-1].oid == info.oid

    # A public repo reads without a token; the binary file went to LFS and comes back whole.
    for name, content in files.items():
        expected = content.encode() if isinstance(content, str) else content
        assert download(hub, "emcid-tests/public-model", name, tmp_path / "cache", token=False) == expected
    tree = {
        f.path: f
        for f in api.list_repo_tree("emcid-tests/public-model", recursive=True)
        if isinstance(f, huggingface_hub.hf_api.RepoFile)
    }
    assert tree["unet/adapter.safetensors"].lfs.sha256 == hashlib.sha256(blob).hexdigest()
    assert tree["config.json"].lfs is None

    folder = Path(snapshot_download("emcid-tests/public-model", cache_dir=tmp_path / "snap", token=False))
    assert folder.name == info.oid
    assert sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file()) == [
        ".gitattributes",
        "README.md",
        "config.json",
        "unet/adapter.safetensors",
    ]
    assert (folder / "unet/adapter.safetensors").read_bytes() == blob


def test_create_repo_exist_ok_and_delete(hub: LoopbackHub, api: HfApi):
    first = api.create_repo("emcid-tests/twice", repo_type="dataset")
    assert api.create_repo("emcid-tests/twice", repo_type="dataset", exist_ok=True) == first
    with pytest.raises(HfHubHTTPError) as conflict:
        api.create_repo("emcid-tests/twice", repo_type="dataset")
    assert conflict.value.response.status_code == 409
    api.delete_repo("emcid-tests/twice", repo_type="dataset")
    with pytest.raises(RepositoryNotFoundError):
        api.repo_info("emcid-tests/twice", repo_type="dataset")
    api.delete_repo("emcid-tests/twice", repo_type="dataset", missing_ok=True)


def test_private_repo_needs_the_token(hub: LoopbackHub, api: HfApi, tmp_path: Path):
    api.create_repo("emcid-tests/private-model", private=True)
    api.upload_folder(
        repo_id="emcid-tests/private-model",
        commit_message="secret",
        folder_path=write_files(tmp_path / "src", {"secret.txt": "s3cret"}),
    )

    anonymous = HfApi(endpoint=hub.endpoint, token=False)
    with pytest.raises(RepositoryNotFoundError):
        anonymous.model_info("emcid-tests/private-model")
    with pytest.raises(RepositoryNotFoundError):
        download(hub, "emcid-tests/private-model", "secret.txt", tmp_path / "anon", token=False)
    with pytest.raises(RepositoryNotFoundError):
        snapshot_download("emcid-tests/private-model", cache_dir=tmp_path / "anon", token=False)
    with pytest.raises(RepositoryNotFoundError):  # nor can it be written to
        anonymous.upload_folder(repo_id="emcid-tests/private-model", commit_message="x", folder_path=tmp_path / "src")
    with pytest.raises(HfHubHTTPError) as wrong_token:
        HfApi(endpoint=hub.endpoint, token="hf_wrong").model_info("emcid-tests/private-model")
    assert wrong_token.value.response.status_code == 401

    assert api.model_info("emcid-tests/private-model").private
    assert download(hub, "emcid-tests/private-model", "secret.txt", tmp_path / "cache", token=hub.token) == b"s3cret"


def test_revisions_select_the_right_file_version(hub: LoopbackHub, api: HfApi, tmp_path: Path):
    repo = "emcid-tests/versions"
    api.create_repo(repo)

    def commit(text: str, revision: str | None = None, **kwargs):
        folder = write_files(tmp_path / f"src-{text}", {"notes/version.txt": text})
        return api.upload_folder(repo_id=repo, folder_path=folder, commit_message=text, revision=revision, **kwargs)

    first = commit("v1")
    api.create_branch(repo, branch="feature/x")  # from main, at v1; the "/" travels as %2F
    second = commit("v2")
    on_branch = commit("branch", revision="feature/x")
    api.create_tag(repo, tag="v1.0", revision=first.oid)
    pr = commit("proposal", create_pr=True)
    assert pr.pr_revision == "refs/pr/1"

    expected = {
        None: "v2",
        "main": "v2",
        first.oid: "v1",
        second.oid: "v2",
        "feature/x": "branch",
        "v1.0": "v1",
        "refs/pr/1": "proposal",
        on_branch.oid[:12]: "branch",
    }
    for revision, text in expected.items():
        kwargs = {} if revision is None else {"revision": revision}
        assert download(hub, repo, "notes/version.txt", tmp_path / "cache", **kwargs) == text.encode(), revision
    for revision, text in (("main", "v2"), ("feature/x", "branch"), ("refs/pr/1", "proposal"), (first.oid, "v1")):
        folder = Path(snapshot_download(repo, revision=revision, cache_dir=tmp_path / "snapshots"))
        assert (folder / "notes/version.txt").read_text() == text, revision

    refs = api.list_repo_refs(repo, include_pull_requests=True)
    assert {b.name: b.target_commit for b in refs.branches} == {"main": second.oid, "feature/x": on_branch.oid}
    assert {t.name: t.target_commit for t in refs.tags} == {"v1.0": first.oid}
    assert [p.ref for p in refs.pull_requests] == ["refs/pr/1"]
    assert [c.commit_id for c in api.list_repo_commits(repo)][:2] == [second.oid, first.oid]
    assert [(c.ref, c.title) for c in hub.commits(repo)] == [
        ("main", "initial commit"),
        ("main", "v1"),
        ("main", "v2"),
        ("feature/x", "branch"),
        ("refs/pr/1", "proposal"),
    ]

    with pytest.raises(RevisionNotFoundError):
        download(hub, repo, "notes/version.txt", tmp_path / "cache", revision="no-such-branch")
    with pytest.raises(EntryNotFoundError):
        download(hub, repo, "no/such/file.txt", tmp_path / "cache")
    with pytest.raises(RepositoryNotFoundError):
        download(hub, "emcid-tests/no-such-repo", "notes/version.txt", tmp_path / "cache")


def test_identical_lfs_content_is_not_uploaded_again(hub: LoopbackHub, api: HfApi, tmp_path: Path):
    repo = "emcid-tests/dedup"
    api.create_repo(repo)
    blob = weights(1)
    src = write_files(tmp_path / "src", {"model.safetensors": blob})
    before = hub.lfs_uploads
    api.upload_folder(repo_id=repo, folder_path=src, commit_message="weights")
    assert hub.lfs_uploads == before + 1
    commits = len(hub.commits(repo))

    # The same file again: the server reports it unchanged, so the client commits nothing and PUTs nothing.
    api.upload_folder(repo_id=repo, folder_path=src, commit_message="same weights")
    assert hub.lfs_uploads == before + 1 and len(hub.commits(repo)) == commits

    # The same bytes under another name: the LFS batch answer has no upload action, so no PUT, but a commit.
    copy = write_files(tmp_path / "copy", {"copy.safetensors": blob})
    api.upload_folder(repo_id=repo, folder_path=copy, commit_message="copy")
    assert hub.lfs_uploads == before + 1 and len(hub.commits(repo)) == commits + 1
    assert download(hub, repo, "copy.safetensors", tmp_path / "cache") == blob

    # New content is uploaded.
    write_files(copy, {"copy.safetensors": weights(2)})
    api.upload_folder(repo_id=repo, folder_path=copy, commit_message="new copy")
    assert hub.lfs_uploads == before + 2
    assert download(hub, repo, "copy.safetensors", tmp_path / "cache") == weights(2)


def test_delete_operations(hub: LoopbackHub, api: HfApi, tmp_path: Path):
    repo = "emcid-tests/deletions"
    api.create_repo(repo)
    api.upload_folder(
        repo_id=repo,
        commit_message="files",
        folder_path=write_files(
            tmp_path / "src", {"keep.txt": "k", "old/a.txt": "a", "old/b.txt": "b", "gone.txt": "g"}
        ),
    )
    api.delete_file("gone.txt", repo_id=repo)
    api.delete_folder("old", repo_id=repo)
    assert sorted(api.list_repo_files(repo)) == [".gitattributes", "keep.txt"]
    with pytest.raises(EntryNotFoundError):
        api.delete_file("gone.txt", repo_id=repo)


def test_listings_metadata_and_settings(hub: LoopbackHub, api: HfApi, tmp_path: Path):
    repo = "emcid-tests/listings"
    api.create_repo(repo)
    blob = weights(3)
    api.upload_folder(
        repo_id=repo,
        commit_message="files",
        folder_path=write_files(tmp_path / "src", {"a.txt": "a", "unet/w.safetensors": blob, "unet/sub/c.txt": "c"}),
    )
    root = {f.path: type(f).__name__ for f in api.list_repo_tree(repo)}
    assert root == {".gitattributes": "RepoFile", "a.txt": "RepoFile", "unet": "RepoFolder"}
    assert {f.path for f in api.list_repo_tree(repo, path_in_repo="unet")} == {"unet/w.safetensors", "unet/sub"}
    assert {f.path for f in api.get_paths_info(repo, ["a.txt", "unet", "missing"])} == {"a.txt", "unet"}
    assert api.file_exists(repo, "unet/sub/c.txt") and not api.file_exists(repo, "nope.txt")
    siblings = {s.rfilename: s for s in api.model_info(repo, files_metadata=True).siblings}
    assert siblings["unet/w.safetensors"].lfs.sha256 == hashlib.sha256(blob).hexdigest()
    assert siblings["a.txt"].size == 1 and siblings["a.txt"].lfs is None

    api.update_repo_settings(repo, private=True)
    with pytest.raises(RepositoryNotFoundError):
        HfApi(endpoint=hub.endpoint, token=False).model_info(repo)
