from __future__ import annotations

import errno
import ipaddress
import os
import shutil
import socket
import tempfile
from typing import Any

from .hub_server import LoopbackHub  # standard library only: huggingface_hub is not imported yet

# The Hugging Face Hub of this test session: one loopback server. huggingface_hub reads HF_ENDPOINT,
# HF_HUB_OFFLINE and HF_HUB_DISABLE_XET when it is imported, and diffusers (imported below) imports it,
# so the server starts and the variables are set here, before any of those imports. The client is online
# (HF_HUB_OFFLINE=0) but the loopback endpoint is the only Hub there is; uploads use LFS, not Xet.
HUB = LoopbackHub().start()
os.environ["HF_ENDPOINT"] = HUB.endpoint
os.environ["HF_HUB_DISABLE_XET"] = "1"
os.environ["HF_HUB_OFFLINE"] = "0"
os.environ["HF_TOKEN"] = HUB.token  # the implicit token is the loopback Hub's, never a developer's own
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ["EMCID_CACHE"] = tempfile.mkdtemp(prefix="emcid-test-cache-")  # never the user's cache


def _is_loopback(host: Any) -> bool:
    if isinstance(host, bytes):
        host = host.decode("ascii", "replace")
    if not isinstance(host, str):
        return False
    if host.lower() in ("localhost", "localhost.localdomain"):
        return True
    try:
        address = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return False
    mapped = getattr(address, "ipv4_mapped", None)
    return address.is_loopback or (mapped is not None and mapped.is_loopback)


def _refuse_non_loopback_connections() -> None:
    """No test reaches anything but loopback: other connects are refused and other names don't resolve."""
    real_connect, real_connect_ex, real_getaddrinfo = (
        socket.socket.connect,
        socket.socket.connect_ex,
        socket.getaddrinfo,
    )

    def check(sock: socket.socket, address: Any) -> None:
        if sock.family in (socket.AF_INET, socket.AF_INET6) and not _is_loopback(address[0]):
            raise ConnectionRefusedError(errno.ECONNREFUSED, f"tests may only connect to loopback, not {address[0]}")

    def connect(self: socket.socket, address: Any) -> None:
        check(self, address)
        return real_connect(self, address)

    def connect_ex(self: socket.socket, address: Any) -> int:
        check(self, address)
        return real_connect_ex(self, address)

    def getaddrinfo(host: Any, *args: Any, **kwargs: Any) -> Any:
        if host is not None and not _is_loopback(host):
            raise socket.gaierror(socket.EAI_NONAME, f"tests may only resolve loopback names, not {host!r}")
        return real_getaddrinfo(host, *args, **kwargs)

    socket.socket.connect = connect  # type: ignore[method-assign]
    socket.socket.connect_ex = connect_ex  # type: ignore[method-assign]
    socket.getaddrinfo = getaddrinfo  # type: ignore[assignment]


_refuse_non_loopback_connections()

import contextlib  # noqa: E402
from typing import Callable, Iterator  # noqa: E402

import huggingface_hub.constants as hf_constants  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from diffusers import DiffusionPipeline  # noqa: E402
from hypothesis import HealthCheck  # noqa: E402

from diffusers_emcid import EMCIDConfig, EMCIDEditor  # noqa: E402
from diffusers_emcid.evaluation import pipeline_conditioning  # noqa: E402
from diffusers_emcid.families import pipeline_family  # noqa: E402
from diffusers_emcid.testing import random_captions, tiny_sd2_pipeline, tiny_sd_pipeline, tiny_sdxl_pipeline  # noqa: E402

# Should huggingface_hub have been imported before this file (by a plugin), point it at the loopback Hub anyway.
hf_constants.ENDPOINT = HUB.endpoint
hf_constants.HUGGINGFACE_CO_URL_TEMPLATE = HUB.endpoint + "/{repo_id}/resolve/{revision}/{filename}"
hf_constants.HF_HUB_OFFLINE = False
hf_constants.HF_HUB_DISABLE_XET = True

HUB_KEY = pytest.StashKey[LoopbackHub]()


def pytest_configure(config: pytest.Config) -> None:
    config.stash[HUB_KEY] = HUB


def pytest_unconfigure(config: pytest.Config) -> None:
    HUB.stop()
    shutil.rmtree(os.environ["EMCID_CACHE"], ignore_errors=True)


@pytest.fixture(scope="session")
def hub(pytestconfig: pytest.Config) -> LoopbackHub:
    """The session's loopback Hugging Face Hub (`hub.endpoint`, `hub.token`, `hub.lfs_uploads`, `hub.commits()`)."""
    return pytestconfig.stash[HUB_KEY]


CAPTIONS = [
    "a photo of a house",
    "a red car on the street",
    "a green tree in the park",
    "an apple and a banana",
    "a painting of a blue house",
    "a drawing of a circle and a square",
    "the president of the united states",
    "a doctor and a nurse",
    "a picture of a red apple",
    "an image of a green car",
    "a blue square",
    "a photo of a tree by a house",
]


PROMPTS = ["a photo of a dog", "an apple", "a red car", "painting by Van Gogh"]
"""Prompts whose conditioning tests compare, edited ones among them."""
FAMILY_PIPELINES: dict[str, Callable[..., DiffusionPipeline]] = {
    "sd1": tiny_sd_pipeline,
    "sd2": tiny_sd2_pipeline,
    "sdxl": tiny_sdxl_pipeline,
}
"""The tiny pipeline of each family the package supports."""
FUZZ_SETTINGS = dict(
    deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture]
)
"""Hypothesis settings of the property tests besides the number of examples: no deadline (pipelines are slow to
build), no example database (runs are reproducible from the seed), and fixtures shared by the examples."""


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """A test module that sets `EVERY_FAMILY = True` runs each of its tests that uses the `family` fixture (also
    through `pipe`, `editor`, `make_pipe`) on SD 1.x, SD 2.x and SD-XL."""
    if getattr(metafunc.module, "EVERY_FAMILY", False) and "family" in metafunc.fixturenames:
        metafunc.parametrize("family", list(FAMILY_PIPELINES), indirect=True)


@pytest.fixture
def family(request: pytest.FixtureRequest) -> str:
    """The family under test: `"sd1"` unless the module runs every family (`EVERY_FAMILY`)."""
    return getattr(request, "param", "sd1")


@pytest.fixture
def make_pipe(family: str) -> Callable[..., DiffusionPipeline]:
    """The family's tiny-pipeline constructor (`seed=` gives another set of random weights)."""
    return FAMILY_PIPELINES[family]


@pytest.fixture
def pipe(make_pipe: Callable[..., DiffusionPipeline]) -> DiffusionPipeline:
    return make_pipe(seed=0)


@pytest.fixture
def fast_config(pipe: DiffusionPipeline) -> EMCIDConfig:
    """The family's default preset with few steps, so stage 1 takes a fraction of a second per concept."""
    return EMCIDConfig.from_preset(pipeline_family(pipe).default_preset, num_steps=8, image_num_inference_steps=2)


@pytest.fixture
def editor(pipe: DiffusionPipeline, fast_config: EMCIDConfig, family: str, tmp_path) -> EMCIDEditor:
    """An editor with the family's statistics captions."""
    editor = EMCIDEditor(pipe, fast_config, cache_dir=tmp_path / "cache", progress=False)
    editor.compute_statistics(statistics_captions(family))
    return editor


def statistics_captions(family: str) -> list[str]:
    """The short caption list on SD 1.x; random captions where the keys are wider (its 12 captions leave SD 2.x's and
    SD-XL's statistics singular)."""
    return CAPTIONS if family == "sd1" else random_captions()


@contextlib.contextmanager
def counted_calls(module: torch.nn.Module) -> Iterator[list[tuple]]:
    """Records `(args, kwargs)` of every forward call of `module` for the duration."""
    calls: list[tuple] = []
    handle = module.register_forward_pre_hook(lambda _, args, kwargs: calls.append((args, kwargs)), with_kwargs=True)
    try:
        yield calls
    finally:
        handle.remove()


def model_state(pipe: DiffusionPipeline) -> dict[str, torch.Tensor]:
    """A copy of every weight of the pipeline's networks."""
    return {
        f"{name}.{key}": value.detach().clone()
        for name in ("text_encoder", "text_encoder_2", "unet", "vae")
        if getattr(pipe, name, None) is not None
        for key, value in getattr(pipe, name).state_dict().items()
    }


def hook_counts(pipe: DiffusionPipeline) -> int:
    """Forward hooks on the pipeline's networks, leaving out those transformers installs for itself (it
    captures hidden states through hooks that stay once a model was asked for them)."""
    return sum(
        1
        for name in ("text_encoder", "text_encoder_2", "unet", "vae")
        if getattr(pipe, name, None) is not None
        for module in getattr(pipe, name).modules()
        for hook in [*module._forward_hooks.values(), *module._forward_pre_hooks.values()]
        if not getattr(hook, "__module__", "").startswith("transformers.")
    )


def assert_pipeline_unchanged(pipe: DiffusionPipeline, state: dict[str, torch.Tensor], hooks: int = 0) -> None:
    now = model_state(pipe)
    assert now.keys() == state.keys(), "the pipeline's module structure changed"
    changed = [key for key in state if not torch.equal(state[key], now[key])]
    assert not changed, f"weights changed: {changed[:5]}"
    assert hook_counts(pipe) == hooks, "hooks were left on the pipeline"


def encode(pipe: DiffusionPipeline, prompts: list[str]) -> torch.Tensor:
    """The conditioning the pipeline gives its UNet: (B, 77, D)."""
    return pipeline_conditioning(pipe, prompts)
