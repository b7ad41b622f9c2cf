"""A loopback stand-in for the Hugging Face Hub, so tests can drive the real `huggingface_hub` client offline.

It implements only the subset of the Hub's HTTP API that `huggingface_hub` (read against 2.4.0, with Xet disabled
through `HF_HUB_DISABLE_XET=1`) calls to create, configure and delete repositories, commit files (regular files
inline, large or binary files through Git LFS with the "basic" transfer), make branches and tags, list trees, refs
and commits, and download files. Everything else answers 404. It is a test double, not a Hub: one user, one token,
no rate limits, no Xet, no multipart LFS, no discussions beyond the number a `create_pr` commit gets.

Storage is in memory: repositories hold commits (each a full snapshot `{path: entry}`), branches, tags, pull
request refs and their own LFS objects, keyed by sha256. Written from scratch on the standard library
(`http.server` + `threading`).

Routes (`{type}` is `model`, `dataset`, `space` or `kernel`; `{prefix}` is empty for models, else `datasets/`...):

    GET    /api/whoami-v2
    POST   /api/repos/create                       JSON {name, organization, type?, private? | visibility?}
    DELETE /api/repos/delete                       JSON {name, organization, type?}
    POST   /api/validate-yaml                      JSON {content, repoType}
    GET    /api/{type}s/{repo}[/revision/{rev}]    repo info with `sha` and `siblings`
    PUT    /api/{type}s/{repo}/settings            JSON {private? | visibility?, gated?}
    POST   /api/{type}s/{repo}/preupload/{rev}     JSON {files: [{path, sample, size}]}
    POST   /api/{type}s/{repo}/commit/{rev}        NDJSON header line, then file / lfsFile / deletedFile /
                                                   deletedFolder lines; `?create_pr=1` commits to a new refs/pr/N
    GET    /api/{type}s/{repo}/tree/{rev}[/{path}] `?recursive=true`
    POST   /api/{type}s/{repo}/paths-info/{rev}    form {paths, expand}
    GET    /api/{type}s/{repo}/refs                `?include_prs=1`
    GET    /api/{type}s/{repo}/commits/{rev}
    POST   /api/{type}s/{repo}/branch/{name}       JSON {startingPoint?};  DELETE deletes it
    POST   /api/{type}s/{repo}/tag/{rev}           JSON {tag, message?};  DELETE /tag/{tag} deletes it
    POST   /{prefix}{repo}.git/info/lfs/objects/batch
    PUT    /lfs-upload/{ticket}                    the upload `href` a batch answer hands out (no auth header)
    HEAD   /{prefix}{repo}/resolve/{rev}/{path}    and GET (with `Range: bytes=a-b` support)

Revisions are branch names, tags, `refs/heads/...`, `refs/tags/...`, `refs/pr/N` or (abbreviated) commit ids, and
arrive percent-encoded (`refs%2Fpr%2F1`). Errors carry `X-Error-Code` (`RepoNotFound`, `RevisionNotFound`,
`EntryNotFound`) and `X-Error-Message` headers and a JSON `{"error": ...}` body, which the client maps to its
exception types. Reading a private repository, and every write, needs `Authorization: Bearer <token>`.
"""

from __future__ import annotations

import base64
import binascii
import collections
import fnmatch
import hashlib
import json
import re
import secrets
import threading
import traceback
from dataclasses import dataclass, field
from datetime import datetime, timezone
from email.message import Message
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType
from typing import Any, Callable, Mapping
from urllib.parse import parse_qs, unquote, urlsplit

USER_NAME = "loopback-user"
"""The one user: the owner of the token, who may write to every namespace."""

DEFAULT_TOKEN = "hf_loopbackHubTestToken0123456789abcdef"
"""The token a `LoopbackHub` accepts unless it is given another."""

REPO_TYPES: tuple[str, ...] = ("model", "dataset", "space", "kernel")
URL_PREFIXES: dict[str, str] = {"model": "", "dataset": "datasets/", "space": "spaces/", "kernel": "kernels/"}

MAX_BODY_BYTES = 256 * 1024 * 1024
"""Largest request body read; a larger one is answered 413 and its connection closed."""

LFS_SIZE_THRESHOLD = 10 * 1024 * 1024
"""Files larger than this go to LFS whatever their name (the Hub's rule)."""

MAX_PENDING_UPLOADS = 4096
"""Most LFS upload tickets kept at once; the oldest is dropped beyond it."""

INITIAL_GITATTRIBUTES = "".join(
    f"{pattern} filter=lfs diff=lfs merge=lfs -text\n"
    for pattern in (
        "*.7z",
        "*.arrow",
        "*.bin",
        "*.bz2",
        "*.ckpt",
        "*.ftz",
        "*.gguf",
        "*.gz",
        "*.h5",
        "*.joblib",
        "*.lfs.*",
        "*.mlmodel",
        "*.model",
        "*.msgpack",
        "*.npy",
        "*.npz",
        "*.onnx",
        "*.ot",
        "*.parquet",
        "*.pb",
        "*.pickle",
        "*.pkl",
        "*.pt",
        "*.pth",
        "*.rar",
        "*.safetensors",
        "saved_model/**/*",
        "*.tar.*",
        "*.tar",
        "*.tflite",
        "*.tgz",
        "*.wasm",
        "*.xz",
        "*.zip",
        "*.zst",
        "*tfevents*",
    )
).encode()
"""The `.gitattributes` a new repository's first commit holds: which file names go to LFS."""

_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,95}$")
_SHA256_RE = re.compile(r"^[0-9a-f]{64}$")
_HEX_RE = re.compile(r"^[0-9a-f]{7,40}$")
_API_ACTIONS = frozenset(
    {"revision", "settings", "preupload", "commit", "tree", "paths-info", "refs", "commits", "branch", "tag"}
)


def git_blob_id(data: bytes) -> str:
    """The git object id of a blob with this content (what the Hub reports as a regular file's oid and ETag)."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def lfs_pointer(oid: str, size: int) -> bytes:
    """The Git LFS pointer file (spec v1) that git stores in place of an LFS file's content."""
    return f"version https://git-lfs.github.com/spec/v1\noid sha256:{oid}\nsize {size}\n".encode()


def _now() -> str:
    """The current UTC time in the Hub's format, `2024-01-31T12:00:00.000Z`."""
    now = datetime.now(timezone.utc)
    return now.strftime("%Y-%m-%dT%H:%M:%S.") + f"{now.microsecond // 1000:03d}Z"


@dataclass(frozen=True)
class Entry:
    """One file of a snapshot: inline bytes (`content`) for a regular file, or an LFS object id (`lfs_oid`)."""

    size: int
    blob_id: str
    content: bytes | None = None
    lfs_oid: str | None = None
    pointer_size: int = 0

    @classmethod
    def regular(cls, data: bytes) -> Entry:
        return cls(size=len(data), blob_id=git_blob_id(data), content=data)

    @classmethod
    def lfs(cls, oid: str, size: int) -> Entry:
        pointer = lfs_pointer(oid, size)
        return cls(size=size, blob_id=git_blob_id(pointer), lfs_oid=oid, pointer_size=len(pointer))

    @property
    def upload_oid(self) -> str:
        """The id the client compares before uploading: sha256 for LFS files, the git blob id otherwise."""
        return self.lfs_oid if self.lfs_oid is not None else self.blob_id


@dataclass(frozen=True)
class Commit:
    oid: str
    parent: str | None
    title: str
    message: str
    date: str
    files: Mapping[str, Entry]


@dataclass(frozen=True)
class CommitRecord:
    """What a test can see of a commit: its id, the ref it went to, its title and the paths it wrote or deleted."""

    oid: str
    ref: str
    title: str
    changed: tuple[str, ...]


@dataclass
class Repo:
    repo_type: str
    repo_id: str
    private: bool
    created_at: str
    sdk: str | None = None
    gated: bool | str = False
    commits: dict[str, Commit] = field(default_factory=dict)
    branches: dict[str, str] = field(default_factory=dict)
    tags: dict[str, str] = field(default_factory=dict)
    pull_requests: dict[int, str] = field(default_factory=dict)
    lfs_objects: dict[str, bytes] = field(default_factory=dict)
    log: list[CommitRecord] = field(default_factory=list)

    @property
    def url_path(self) -> str:
        return URL_PREFIXES[self.repo_type] + self.repo_id


@dataclass
class Response:
    status: int = 200
    body: bytes = b""
    headers: dict[str, str] = field(default_factory=dict)

    @classmethod
    def json(
        cls,
        payload: Any,
        status: int = 200,
        content_type: str = "application/json",
        headers: dict[str, str] | None = None,
    ) -> Response:
        return cls(status, json.dumps(payload).encode(), {"Content-Type": content_type, **(headers or {})})


class HubError(Exception):
    """An error answer: HTTP `status`, a message, and the `X-Error-Code` the client dispatches on."""

    def __init__(
        self,
        status: int,
        message: str,
        code: str | None = None,
        headers: dict[str, str] | None = None,
        extra: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code
        self.headers = headers or {}
        self.extra = extra or {}

    def response(self) -> Response:
        headers = {"X-Error-Message": self.message.replace("\n", " "), **self.headers}
        if self.code is not None:
            headers["X-Error-Code"] = self.code
        return Response.json({"error": self.message, **self.extra}, self.status, headers=headers)


def _json_body(body: bytes) -> dict[str, Any]:
    if not body:
        return {}
    try:
        payload = json.loads(body)
    except ValueError as exc:
        raise HubError(400, f"Invalid JSON body: {exc}") from exc
    if not isinstance(payload, dict):
        raise HubError(400, "The JSON body must be an object")
    return payload


def _clean_path(path: Any) -> str:
    """A repository path, checked: relative, no empty, `.` or `..` segments."""
    if not isinstance(path, str) or not path or path.startswith("/") or len(path) > 1024:
        raise HubError(400, f"Invalid path in repo: {path!r}")
    if any(part in ("", ".", "..") for part in path.split("/")):
        raise HubError(400, f"Invalid path in repo: {path!r}")
    return path


def _flag(query: dict[str, list[str]], name: str) -> bool:
    return query.get(name, ["0"])[-1].lower() in ("1", "true", "yes")


class LoopbackHub:
    """An in-memory Hub on `127.0.0.1`, served by a background thread (see the module docstring).

    `start()` binds a free port and `endpoint` then reads `http://127.0.0.1:PORT`; `stop()` shuts it down; it is
    also a context manager. Clients authenticate with `Authorization: Bearer {token}`. For tests: `lfs_uploads`
    counts the LFS object PUTs received, `commits(repo_id)` lists a repo's commits in the order they were made,
    `requests` keeps the last request lines seen and `errors` the tracebacks of any request the server failed on.
    """

    def __init__(self, token: str = DEFAULT_TOKEN, max_body_bytes: int = MAX_BODY_BYTES) -> None:
        self.token = token
        self.max_body_bytes = max_body_bytes
        self.lfs_uploads = 0
        self.requests: collections.deque[str] = collections.deque(maxlen=1000)
        self.errors: list[str] = []
        self._repos: dict[tuple[str, str], Repo] = {}
        self._uploads: dict[str, tuple[tuple[str, str], str, int]] = {}
        self._commit_counter = 0
        self._lock = threading.RLock()
        self._server: _HubHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> LoopbackHub:
        if self._server is not None:
            raise RuntimeError("LoopbackHub is already started")
        server = _HubHTTPServer(("127.0.0.1", 0), _Handler)
        server.hub = self
        self._server = server
        self._thread = threading.Thread(
            target=server.serve_forever, kwargs={"poll_interval": 0.05}, name="loopback-hub", daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        server, thread = self._server, self._thread
        if server is None:
            return
        server.shutdown()
        server.server_close()
        if thread is not None:
            thread.join(timeout=10)
        self._server = self._thread = None

    def __enter__(self) -> LoopbackHub:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    @property
    def endpoint(self) -> str:
        if self._server is None:
            raise RuntimeError("LoopbackHub is not started")
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    # ------------------------------------------------------------------ test helpers

    def commits(self, repo_id: str, repo_type: str = "model") -> list[CommitRecord]:
        """The commits made to a repository (its initial commit first), on every branch and pull request."""
        with self._lock:
            repo = self._repos.get((repo_type, repo_id))
            return list(repo.log) if repo is not None else []

    def repo_exists(self, repo_id: str, repo_type: str = "model") -> bool:
        with self._lock:
            return (repo_type, repo_id) in self._repos

    # ------------------------------------------------------------------ dispatch

    def handle(self, method: str, target: str, headers: Message | Mapping[str, str], body: bytes) -> Response:
        """Answers one request; `target` is the raw request target (percent-encoded path and query)."""
        self.requests.append(f"{method} {target}")
        try:
            with self._lock:
                return self._route(method, target, headers, body)
        except HubError as exc:
            return exc.response()
        except Exception:  # a bug here: record it for the test to see, answer 500
            self.errors.append(traceback.format_exc())
            return HubError(500, "Internal error in LoopbackHub").response()

    def _route(self, method: str, target: str, headers: Message | Mapping[str, str], body: bytes) -> Response:
        split = urlsplit(target)
        query = parse_qs(split.query, keep_blank_values=True)
        segments = split.path.split("/")[1:]  # still percent-encoded, so "%2F" stays inside its segment
        user = self._user(headers)

        if segments[:1] == ["api"]:
            rest = segments[1:]
            if rest == ["whoami-v2"] and method == "GET":
                return self._whoami(user)
            if rest == ["repos", "create"] and method == "POST":
                return self._create_repo(user, _json_body(body))
            if rest == ["repos", "delete"] and method == "DELETE":
                return self._delete_repo(user, _json_body(body))
            if rest == ["validate-yaml"] and method == "POST":
                return self._validate_yaml(_json_body(body))
            if rest and rest[0] in {t + "s" for t in REPO_TYPES}:
                return self._repo_api(method, rest[0][:-1], rest[1:], query, user, body)
        elif segments[:1] == ["lfs-upload"] and len(segments) == 2 and method == "PUT":
            return self._lfs_put(segments[1], body)
        elif (
            len(segments) >= 5
            and segments[-4:] == ["info", "lfs", "objects", "batch"]
            and segments[-5].endswith(".git")
        ):
            if method == "POST":
                repo_type, repo_segments = self._split_type(segments[:-4])
                repo_segments[-1] = repo_segments[-1][: -len(".git")]
                return self._lfs_batch(self._repo_for_write(repo_type, "/".join(repo_segments), user), _json_body(body))
        elif method in ("GET", "HEAD") and "resolve" in segments:
            return self._resolve(method, segments, headers, user)
        raise HubError(404, f"No such route in LoopbackHub: {method} {split.path}")

    def _repo_api(
        self,
        method: str,
        repo_type: str,
        segments: list[str],
        query: dict[str, list[str]],
        user: str | None,
        body: bytes,
    ) -> Response:
        n = self._repo_segment_count(repo_type, segments)
        repo_id = "/".join(unquote(s) for s in segments[:n])
        action = segments[n] if len(segments) > n else None
        args = [unquote(s) for s in segments[n + 1 :]]
        if action is None:
            if method == "GET":
                return self._info(self._repo_for_read(repo_type, repo_id, user), "main", query)
        elif action not in _API_ACTIONS:
            pass
        elif action == "revision" and method == "GET" and len(args) == 1:
            return self._info(self._repo_for_read(repo_type, repo_id, user), args[0], query)
        elif action == "settings" and method == "PUT" and not args:
            return self._settings(self._repo_for_write(repo_type, repo_id, user), _json_body(body))
        elif action == "preupload" and method == "POST" and len(args) == 1:
            return self._preupload(self._repo_for_write(repo_type, repo_id, user), args[0], _json_body(body))
        elif action == "commit" and method == "POST" and len(args) == 1:
            return self._commit(
                self._repo_for_write(repo_type, repo_id, user), args[0], body, create_pr=_flag(query, "create_pr")
            )
        elif action == "tree" and method == "GET" and args:
            return self._tree(
                self._repo_for_read(repo_type, repo_id, user),
                args[0],
                "/".join(args[1:]),
                recursive=_flag(query, "recursive"),
            )
        elif action == "paths-info" and method == "POST" and len(args) == 1:
            form = parse_qs(body.decode("utf-8", "replace"), keep_blank_values=True)
            return self._paths_info(self._repo_for_read(repo_type, repo_id, user), args[0], form.get("paths", []))
        elif action == "refs" and method == "GET" and not args:
            return self._refs(self._repo_for_read(repo_type, repo_id, user), _flag(query, "include_prs"))
        elif action == "commits" and method == "GET" and len(args) == 1:
            return self._commit_list(self._repo_for_read(repo_type, repo_id, user), args[0])
        elif action == "branch" and len(args) == 1 and method in ("POST", "DELETE"):
            repo = self._repo_for_write(repo_type, repo_id, user)
            if method == "POST":
                return self._create_branch(repo, args[0], _json_body(body))
            return self._delete_ref(repo, repo.branches, args[0], "branch")
        elif action == "tag" and len(args) == 1 and method in ("POST", "DELETE"):
            repo = self._repo_for_write(repo_type, repo_id, user)
            if method == "POST":
                return self._create_tag(repo, args[0], _json_body(body))
            return self._delete_ref(repo, repo.tags, args[0], "tag")
        raise HubError(404, f"No such route in LoopbackHub: {method} /api/{repo_type}s/{'/'.join(segments)}")

    # ------------------------------------------------------------------ auth and lookups

    def _user(self, headers: Message | Mapping[str, str]) -> str | None:
        authorization = headers.get("Authorization")
        if authorization is None:
            return None
        scheme, _, credentials = authorization.partition(" ")
        if scheme.lower() != "bearer" or not secrets.compare_digest(credentials.strip(), self.token):
            raise HubError(401, "Invalid credentials in Authorization header")
        return USER_NAME

    def _repo_segment_count(self, repo_type: str, segments: list[str]) -> int:
        """Whether a path's repo id is its first one or two segments (ids may lack a namespace)."""
        for n in (2, 1):
            if len(segments) >= n and (repo_type, "/".join(unquote(s) for s in segments[:n])) in self._repos:
                return n
        if len(segments) >= 2 and segments[1] not in _API_ACTIONS:
            return 2
        return 1

    @staticmethod
    def _split_type(segments: list[str]) -> tuple[str, list[str]]:
        """`datasets/ns/name` -> ("dataset", ["ns", "name"]); no known prefix means a model."""
        for repo_type, prefix in URL_PREFIXES.items():
            if prefix and segments[:1] == [prefix[:-1]] and len(segments) > 1:
                return repo_type, [unquote(s) for s in segments[1:]]
        return "model", [unquote(s) for s in segments]

    def _repo_for_read(self, repo_type: str, repo_id: str, user: str | None) -> Repo:
        repo = self._repos.get((repo_type, repo_id))
        if repo is None or (repo.private and user is None):
            raise HubError(401 if user is None else 404, f"Repository not found: {repo_type} {repo_id}", "RepoNotFound")
        return repo

    def _repo_for_write(self, repo_type: str, repo_id: str, user: str | None) -> Repo:
        if user is None:
            raise HubError(401, "You must be authenticated to write to a repository", "RepoNotFound")
        return self._repo_for_read(repo_type, repo_id, user)

    def _resolve_revision(self, repo: Repo, revision: str) -> Commit:
        oid = self._ref_target(repo, revision)
        if oid is None and _HEX_RE.match(revision):
            matches = [c for c in repo.commits if c.startswith(revision)]
            oid = matches[0] if len(matches) == 1 else None
        if oid is None:
            raise HubError(404, f"Invalid rev id: {revision}", "RevisionNotFound")
        return repo.commits[oid]

    @staticmethod
    def _ref_target(repo: Repo, revision: str) -> str | None:
        if revision in repo.branches:
            return repo.branches[revision]
        if revision in repo.tags:
            return repo.tags[revision]
        if revision.startswith("refs/heads/"):
            return repo.branches.get(revision[len("refs/heads/") :])
        if revision.startswith("refs/tags/"):
            return repo.tags.get(revision[len("refs/tags/") :])
        match = re.fullmatch(r"refs/pr/(\d+)", revision)
        return repo.pull_requests.get(int(match.group(1))) if match else None

    # ------------------------------------------------------------------ account and repositories

    def _whoami(self, user: str | None) -> Response:
        if user is None:
            raise HubError(401, "Authorization header is required")
        return Response.json(
            {
                "type": "user",
                "id": "0" * 24,
                "name": user,
                "fullname": "Loopback User",
                "email": None,
                "emailVerified": False,
                "isPro": False,
                "orgs": [],
                "auth": {"type": "access_token", "accessToken": {"displayName": "loopback", "role": "write"}},
            }
        )

    def _create_repo(self, user: str | None, payload: dict[str, Any]) -> Response:
        if user is None:
            raise HubError(401, "You must be authenticated to create a repository")
        name, organization = payload.get("name"), payload.get("organization")
        repo_type = payload.get("type") or "model"
        if repo_type not in REPO_TYPES:
            raise HubError(400, f"Invalid repo type: {repo_type!r}")
        namespace = organization if organization is not None else user
        for part in (name, namespace):
            if not isinstance(part, str) or not _NAME_RE.match(part):
                raise HubError(400, f"Invalid repository name or namespace: {part!r}")
        repo_id = f"{namespace}/{name}"
        url = f"{self.endpoint}/{URL_PREFIXES[repo_type]}{repo_id}"
        if (repo_type, repo_id) in self._repos:
            raise HubError(409, f"You already created this {repo_type} repo", extra={"url": url})
        visibility = payload.get("visibility")
        private = visibility in ("private", "protected") if visibility is not None else bool(payload.get("private"))
        repo = Repo(repo_type, repo_id, private=private, created_at=_now(), sdk=payload.get("sdk"))
        self._repos[(repo_type, repo_id)] = repo
        self._add_commit(
            repo,
            "main",
            None,
            {".gitattributes": Entry.regular(INITIAL_GITATTRIBUTES)},
            "initial commit",
            "",
            (".gitattributes",),
        )
        return Response.json({"url": url, "name": repo_id, "id": repo_id})

    def _delete_repo(self, user: str | None, payload: dict[str, Any]) -> Response:
        if user is None:
            raise HubError(401, "You must be authenticated to delete a repository")
        name, organization = payload.get("name"), payload.get("organization")
        repo_type = payload.get("type") or "model"
        repo_id = f"{organization if organization is not None else user}/{name}"
        if self._repos.pop((repo_type, repo_id), None) is None:
            raise HubError(404, f"Repository not found: {repo_type} {repo_id}", "RepoNotFound")
        return Response.json({})

    def _settings(self, repo: Repo, payload: dict[str, Any]) -> Response:
        if "visibility" in payload:
            repo.private = payload["visibility"] in ("private", "protected")
        elif "private" in payload:
            repo.private = bool(payload["private"])
        if "gated" in payload:
            repo.gated = payload["gated"]
        return Response.json({})

    @staticmethod
    def _validate_yaml(payload: dict[str, Any]) -> Response:
        """Checks only that YAML front matter, when a README opens with `---`, is closed by a `---` line."""
        content = payload.get("content")
        if not isinstance(content, str):
            return Response.json({"errors": [{"message": "`content` must be a string"}], "warnings": []}, 400)
        lines = content.splitlines()
        if lines and lines[0].strip() == "---" and not any(line.strip() == "---" for line in lines[1:]):
            return Response.json(
                {"errors": [{"message": "Unclosed YAML front matter in README.md"}], "warnings": []}, 400
            )
        return Response.json({"errors": [], "warnings": []})

    def _info(self, repo: Repo, revision: str, query: dict[str, list[str]]) -> Response:
        commit = self._resolve_revision(repo, revision)
        blobs = _flag(query, "blobs")
        siblings = []
        for path, entry in sorted(commit.files.items()):
            sibling: dict[str, Any] = {"rfilename": path}
            if blobs:
                sibling.update(size=entry.size, blobId=entry.blob_id)
                if entry.lfs_oid is not None:
                    sibling["lfs"] = {"size": entry.size, "sha256": entry.lfs_oid, "pointerSize": entry.pointer_size}
            siblings.append(sibling)
        info: dict[str, Any] = {
            "_id": hashlib.sha1(f"{repo.repo_type}/{repo.repo_id}".encode()).hexdigest()[:24],
            "id": repo.repo_id,
            "author": repo.repo_id.split("/")[0] if "/" in repo.repo_id else None,
            "sha": commit.oid,
            "lastModified": commit.date,
            "createdAt": repo.created_at,
            "private": repo.private,
            "gated": repo.gated,
            "disabled": False,
            "downloads": 0,
            "likes": 0,
            "tags": [],
            "siblings": siblings,
            "usedStorage": sum(len(data) for data in repo.lfs_objects.values()),
        }
        if repo.repo_type == "space":
            info.update(sdk=repo.sdk, runtime={"stage": "NO_APP_FILE", "hardware": {"current": None}})
        return Response.json(info)

    # ------------------------------------------------------------------ refs

    def _refs(self, repo: Repo, include_prs: bool) -> Response:
        def refs(items: Mapping[Any, str], prefix: str) -> list[dict[str, str]]:
            return [{"name": str(name), "ref": f"{prefix}{name}", "targetCommit": oid} for name, oid in items.items()]

        payload: dict[str, Any] = {
            "branches": refs(repo.branches, "refs/heads/"),
            "converts": [],
            "tags": refs(repo.tags, "refs/tags/"),
        }
        if include_prs:
            payload["pullRequests"] = refs(repo.pull_requests, "refs/pr/")
        return Response.json(payload)

    @staticmethod
    def _check_ref_name(name: str, kind: str) -> None:
        if (
            not name
            or name.startswith(("refs/", "/"))
            or name.endswith("/")
            or ".." in name
            or " " in name
            or len(name) > 255
        ):
            raise HubError(400, f"Invalid {kind} name: {name!r}")

    def _create_branch(self, repo: Repo, branch: str, payload: dict[str, Any]) -> Response:
        self._check_ref_name(branch, "branch")
        if branch in repo.branches:
            raise HubError(409, f"Branch already exists: {branch}")
        starting_point = payload.get("startingPoint")
        start = self._resolve_revision(repo, starting_point if isinstance(starting_point, str) else "main")
        repo.branches[branch] = start.oid
        return Response.json({})

    def _create_tag(self, repo: Repo, revision: str, payload: dict[str, Any]) -> Response:
        tag = payload.get("tag")
        if not isinstance(tag, str):
            raise HubError(400, "`tag` is required")
        self._check_ref_name(tag, "tag")
        if tag in repo.tags:
            raise HubError(409, f"Tag already exists: {tag}")
        repo.tags[tag] = self._resolve_revision(repo, revision).oid
        return Response.json({})

    @staticmethod
    def _delete_ref(repo: Repo, refs: dict[str, str], name: str, kind: str) -> Response:
        if kind == "branch" and name == "main":
            raise HubError(403, "The main branch cannot be deleted")
        if refs.pop(name, None) is None:
            raise HubError(404, f"Invalid rev id: {name}", "RevisionNotFound")
        return Response.json({})

    def _commit_list(self, repo: Repo, revision: str) -> Response:
        commit: Commit | None = self._resolve_revision(repo, revision)
        items = []
        for _ in range(len(repo.commits)):  # a parent chain never repeats a commit
            if commit is None:
                break
            items.append(
                {
                    "id": commit.oid,
                    "title": commit.title,
                    "message": commit.message,
                    "date": commit.date,
                    "authors": [{"user": USER_NAME}],
                }
            )
            commit = repo.commits.get(commit.parent) if commit.parent is not None else None
        return Response.json(items)

    # ------------------------------------------------------------------ trees

    @staticmethod
    def _file_json(path: str, entry: Entry) -> dict[str, Any]:
        item: dict[str, Any] = {"type": "file", "oid": entry.blob_id, "size": entry.size, "path": path}
        if entry.lfs_oid is not None:
            item["lfs"] = {"oid": entry.lfs_oid, "size": entry.size, "pointerSize": entry.pointer_size}
        return item

    @staticmethod
    def _folder_json(path: str, files: Mapping[str, Entry]) -> dict[str, Any]:
        prefix = path + "/"
        listing = "".join(f"{p}\0{e.blob_id}\n" for p, e in sorted(files.items()) if p.startswith(prefix))
        return {"type": "directory", "oid": hashlib.sha1(listing.encode()).hexdigest(), "size": 0, "path": path}

    def _tree(self, repo: Repo, revision: str, path: str, recursive: bool) -> Response:
        commit = self._resolve_revision(repo, revision)
        files = commit.files
        prefix = path.rstrip("/") + "/" if path else ""
        if prefix and not any(p.startswith(prefix) for p in files):
            raise HubError(404, f"Entry not found: {path}", "EntryNotFound", {"X-Repo-Commit": commit.oid})
        folders: set[str] = set()
        items = []
        for file_path, entry in sorted(files.items()):
            if not file_path.startswith(prefix):
                continue
            parts = file_path[len(prefix) :].split("/")
            for depth in range(1, len(parts)):
                folders.add(prefix + "/".join(parts[:depth]))
            if recursive or len(parts) == 1:
                items.append(self._file_json(file_path, entry))
        depth_limit = None if recursive else prefix.count("/") + 1
        for folder in sorted(folders):
            if depth_limit is None or folder.count("/") + 1 == depth_limit:
                items.append(self._folder_json(folder, files))
        return Response.json(items)

    def _paths_info(self, repo: Repo, revision: str, paths: list[str]) -> Response:
        commit = self._resolve_revision(repo, revision)
        items = []
        for path in paths:
            path = path.strip("/")
            if path in commit.files:
                items.append(self._file_json(path, commit.files[path]))
            elif any(p.startswith(path + "/") for p in commit.files):
                items.append(self._folder_json(path, commit.files))
        return Response.json(items)

    # ------------------------------------------------------------------ uploads and commits

    def _is_lfs(self, commit: Commit, path: str, size: int, sample: bytes) -> bool:
        """The Hub's choice: LFS if `.gitattributes` says so, if the file is large, or if it looks binary."""
        if size > LFS_SIZE_THRESHOLD or b"\0" in sample:
            return True
        attributes = commit.files.get(".gitattributes")
        text = attributes.content.decode("utf-8", "replace") if attributes and attributes.content else ""
        name = path.rsplit("/", 1)[-1]
        for line in text.splitlines():
            if not line.strip() or line.lstrip().startswith("#"):
                continue
            pattern, *attrs = line.split()
            if "filter=lfs" in attrs and (
                fnmatch.fnmatchcase(name, pattern) if "/" not in pattern else fnmatch.fnmatchcase(path, pattern)
            ):
                return True
        return False

    def _preupload(self, repo: Repo, revision: str, payload: dict[str, Any]) -> Response:
        commit = self._resolve_revision(repo, revision)
        files = payload.get("files")
        if not isinstance(files, list):
            raise HubError(400, "`files` must be a list")
        answer = []
        for item in files:
            if not isinstance(item, dict) or not isinstance(item.get("size"), int):
                raise HubError(400, "Each file needs `path`, `sample` and `size`")
            path = _clean_path(item.get("path"))
            try:
                sample = base64.b64decode(item.get("sample") or "", validate=True)
            except (binascii.Error, ValueError) as exc:
                raise HubError(400, f"Invalid base64 sample for {path}") from exc
            mode = "lfs" if self._is_lfs(commit, path, item["size"], sample) else "regular"
            result: dict[str, Any] = {"path": path, "uploadMode": mode, "shouldIgnore": False}
            existing = commit.files.get(path)
            if existing is not None:
                result["oid"] = existing.upload_oid
            answer.append(result)
        return Response.json({"files": answer, "commitOid": commit.oid})

    def _lfs_batch(self, repo: Repo, payload: dict[str, Any]) -> Response:
        if payload.get("operation") != "upload":
            raise HubError(400, "LoopbackHub's LFS batch endpoint only supports the upload operation")
        transfers = payload.get("transfers") or ["basic"]
        if "basic" not in transfers:
            raise HubError(400, "LoopbackHub only supports the basic LFS transfer")
        objects = payload.get("objects")
        if not isinstance(objects, list):
            raise HubError(400, "`objects` must be a list")
        answer = []
        for item in objects:
            oid, size = (item.get("oid"), item.get("size")) if isinstance(item, dict) else (None, None)
            if not isinstance(oid, str) or not _SHA256_RE.match(oid) or not isinstance(size, int) or size < 0:
                raise HubError(400, f"Invalid LFS object: {item!r}")
            result: dict[str, Any] = {"oid": oid, "size": size, "authenticated": True}
            if oid not in repo.lfs_objects:  # known objects get no action, so the client skips their upload
                ticket = secrets.token_hex(16)
                self._uploads[ticket] = ((repo.repo_type, repo.repo_id), oid, size)
                while len(self._uploads) > MAX_PENDING_UPLOADS:
                    del self._uploads[next(iter(self._uploads))]
                result["actions"] = {"upload": {"href": f"{self.endpoint}/lfs-upload/{ticket}", "expires_in": 3600}}
            answer.append(result)
        return Response.json(
            {"transfer": "basic", "objects": answer, "hash_algo": "sha256"}, content_type="application/vnd.git-lfs+json"
        )

    def _lfs_put(self, ticket: str, body: bytes) -> Response:
        upload = self._uploads.pop(ticket, None)
        if upload is None:
            raise HubError(404, "Unknown or expired LFS upload")
        key, oid, size = upload
        repo = self._repos.get(key)
        if repo is None:
            raise HubError(404, "The repository of this upload is gone", "RepoNotFound")
        if len(body) != size or hashlib.sha256(body).hexdigest() != oid:
            raise HubError(400, f"Uploaded content does not match LFS object {oid} ({size} bytes)")
        repo.lfs_objects[oid] = body
        self.lfs_uploads += 1
        return Response()

    def _commit(self, repo: Repo, revision: str, body: bytes, create_pr: bool) -> Response:
        lines = [line for line in body.split(b"\n") if line.strip()]
        try:
            items = [json.loads(line) for line in lines]
        except ValueError as exc:
            raise HubError(400, f"Invalid NDJSON commit payload: {exc}") from exc
        if not items or not isinstance(items[0], dict) or items[0].get("key") != "header":
            raise HubError(400, "A commit payload must start with a header line")
        header = items[0].get("value") or {}
        title = header.get("summary")
        if not isinstance(title, str) or not title:
            raise HubError(400, "The commit needs a summary")

        base = self._resolve_revision(repo, revision)
        if not create_pr:
            target = revision[len("refs/heads/") :] if revision.startswith("refs/heads/") else revision
            if target not in repo.branches and not re.fullmatch(r"refs/pr/\d+", target):
                raise HubError(400, f"Cannot commit to {revision}: not a branch or a pull request")
            parent_commit = header.get("parentCommit")
            if parent_commit is not None and parent_commit != base.oid:
                raise HubError(412, "A commit has happened since. Please refresh and try again.")

        files = dict(base.files)
        changed: list[str] = []
        for item in items[1:]:
            key, value = (item.get("key"), item.get("value")) if isinstance(item, dict) else (None, None)
            if not isinstance(value, dict):
                raise HubError(400, f"Invalid commit operation: {item!r}")
            raw_path = value.get("path")
            path = _clean_path(
                raw_path.rstrip("/") if key == "deletedFolder" and isinstance(raw_path, str) else raw_path
            )
            if key == "file":
                content = value.get("content", "")
                if value.get("encoding", "utf-8") == "base64":
                    try:
                        data = base64.b64decode(content, validate=True)
                    except (binascii.Error, ValueError) as exc:
                        raise HubError(400, f"Invalid base64 content for {path}") from exc
                else:
                    data = str(content).encode()
                files[path] = Entry.regular(data)
            elif key == "lfsFile":
                oid = value.get("oid")
                if value.get("algo", "sha256") != "sha256" or oid not in repo.lfs_objects:
                    raise HubError(400, f"LFS object {oid} of {path} was never uploaded to this repository")
                size = len(repo.lfs_objects[oid])
                if value.get("size") not in (None, size):
                    raise HubError(400, f"LFS object {oid} has {size} bytes, not {value.get('size')}")
                files[path] = Entry.lfs(oid, size)
            elif key == "deletedFile":
                if files.pop(path, None) is None:
                    raise HubError(404, f"A file with this name doesn't exist: {path}", "EntryNotFound")
            elif key == "deletedFolder":
                inside = [p for p in files if p.startswith(path + "/")]
                if not inside:
                    raise HubError(404, f"A folder with this name doesn't exist: {path}", "EntryNotFound")
                for p in inside:
                    del files[p]
            else:
                raise HubError(400, f"Unknown commit operation: {key!r}")
            changed.append(path)

        ref = revision
        if create_pr:
            number = max(repo.pull_requests, default=0) + 1
            ref = f"refs/pr/{number}"
        elif revision.startswith("refs/heads/"):
            ref = revision[len("refs/heads/") :]
        commit = self._add_commit(
            repo, ref, base.oid, files, title, str(header.get("description") or ""), tuple(changed)
        )
        answer = {
            "success": True,
            "commitOid": commit.oid,
            "commitUrl": f"{self.endpoint}/{repo.url_path}/commit/{commit.oid}",
            "hookOutput": "",
        }
        if create_pr:
            answer["pullRequestUrl"] = f"{self.endpoint}/{repo.url_path}/discussions/{ref.rsplit('/', 1)[-1]}"
        return Response.json(answer)

    def _add_commit(
        self,
        repo: Repo,
        ref: str,
        parent: str | None,
        files: dict[str, Entry],
        title: str,
        message: str,
        changed: tuple[str, ...],
    ) -> Commit:
        self._commit_counter += 1
        digest = hashlib.sha1(f"{self._commit_counter}\0{repo.repo_id}\0{parent}\0{title}\0{message}\0".encode())
        for path, entry in sorted(files.items()):
            digest.update(f"{path}\0{entry.blob_id}\n".encode())
        commit = Commit(digest.hexdigest(), parent, title, message, _now(), files)
        repo.commits[commit.oid] = commit
        pr = re.fullmatch(r"refs/pr/(\d+)", ref)
        if pr:
            repo.pull_requests[int(pr.group(1))] = commit.oid
        else:
            repo.branches[ref] = commit.oid
        repo.log.append(CommitRecord(commit.oid, ref, title, changed))
        return commit

    # ------------------------------------------------------------------ downloads

    def _resolve(
        self, method: str, segments: list[str], headers: Message | Mapping[str, str], user: str | None
    ) -> Response:
        index = segments.index("resolve")
        repo_type, repo_segments = self._split_type(segments[:index])
        if not 1 <= len(repo_segments) <= 2 or len(segments) < index + 3:
            raise HubError(404, "Malformed resolve URL")
        repo = self._repo_for_read(repo_type, "/".join(repo_segments), user)
        commit = self._resolve_revision(repo, unquote(segments[index + 1]))
        path = "/".join(unquote(s) for s in segments[index + 2 :])
        entry = commit.files.get(path)
        common = {"X-Repo-Commit": commit.oid}
        if entry is None:
            raise HubError(404, f"Entry not found: {path}", "EntryNotFound", common)
        data = entry.content if entry.content is not None else repo.lfs_objects[entry.lfs_oid or ""]
        common.update(
            {"ETag": f'"{entry.blob_id}"', "Accept-Ranges": "bytes", "Content-Type": "application/octet-stream"}
        )
        if entry.lfs_oid is not None:
            common.update({"X-Linked-Etag": f'"{entry.lfs_oid}"', "X-Linked-Size": str(entry.size)})
        range_header = headers.get("Range")
        match = re.fullmatch(r"bytes=(\d+)-(\d*)", range_header.strip()) if range_header else None
        if method == "GET" and match:
            start = int(match.group(1))
            end = min(int(match.group(2)) if match.group(2) else len(data) - 1, len(data) - 1)
            if start > end:
                return Response(416, b"", {**common, "Content-Range": f"bytes */{len(data)}"})
            return Response(206, data[start : end + 1], {**common, "Content-Range": f"bytes {start}-{end}/{len(data)}"})
        return Response(200, data, common)


class _HubHTTPServer(ThreadingHTTPServer):
    daemon_threads = True  # a connection left open by a client never holds up stop()
    hub: LoopbackHub


class _BodyError(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


class _Handler(BaseHTTPRequestHandler):
    """Reads a request (body by Content-Length or chunked, bounded), hands it to the hub, writes the answer."""

    protocol_version = "HTTP/1.1"
    server_version = "LoopbackHub/1.0"
    timeout = 30  # seconds an idle keep-alive connection stays open
    server: _HubHTTPServer

    def do_GET(self) -> None:
        self._serve("GET")

    def do_HEAD(self) -> None:
        self._serve("HEAD")

    def do_POST(self) -> None:
        self._serve("POST")

    def do_PUT(self) -> None:
        self._serve("PUT")

    def do_DELETE(self) -> None:
        self._serve("DELETE")

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the base class's signature
        """Quiet: tests read `LoopbackHub.requests` instead."""

    def _serve(self, method: str) -> None:
        hub = self.server.hub
        try:
            body = self._read_body(hub.max_body_bytes)
        except _BodyError as exc:
            self.close_connection = True
            response = HubError(exc.status, str(exc)).response()
        else:
            response = hub.handle(method, self.path, self.headers, body)
        self.send_response(response.status)
        for name, value in response.headers.items():
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(response.body)))
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        if method != "HEAD":
            self.wfile.write(response.body)

    def _read_body(self, limit: int) -> bytes:
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            return self._read_chunked(limit)
        length_header = self.headers.get("Content-Length")
        if length_header is None:
            return b""
        try:
            length = int(length_header)
        except ValueError:
            raise _BodyError(400, "Invalid Content-Length") from None
        if length < 0 or length > limit:
            raise _BodyError(413, f"Request body over {limit} bytes")
        data = self.rfile.read(length)
        if len(data) != length:
            raise _BodyError(400, "Request body shorter than its Content-Length")
        return data

    def _read_chunked(self, limit: int) -> bytes:
        chunks: list[bytes] = []
        total = 0
        read_line: Callable[[int], bytes] = self.rfile.readline
        for _ in range(limit + 1):  # every chunk but the last carries at least one byte
            line = read_line(1026)
            try:
                size = int(line.split(b";", 1)[0].strip(), 16)
            except ValueError:
                raise _BodyError(400, "Invalid chunk size") from None
            if size == 0:
                break
            total += size
            if total > limit:
                raise _BodyError(413, f"Request body over {limit} bytes")
            chunk = self.rfile.read(size)
            if len(chunk) != size or self.rfile.read(2) != b"\r\n":
                raise _BodyError(400, "Truncated chunk")
            chunks.append(chunk)
        else:
            raise _BodyError(400, "Too many chunks")
        for _ in range(64):  # trailer lines, up to the blank line that ends the body
            if read_line(8194) in (b"\r\n", b"\n", b""):
                return b"".join(chunks)
        raise _BodyError(400, "Too many trailer lines")
