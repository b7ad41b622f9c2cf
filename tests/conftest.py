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
    real_connect, real_connect_ex, real_getaddrinfo = socket.socket.connect, socket.socket.connect_ex, socket.getaddrinfo

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

import huggingface_hub.constants as hf_constants  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from diffusers import StableDiffusionPipeline  # noqa: E402

from diffusers_emcid import EMCIDConfig, EMCIDEditor  # noqa: E402
from diffusers_emcid.testing import tiny_sd_pipeline  # noqa: E402

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


@pytest.fixture
def pipe() -> StableDiffusionPipeline:
    return tiny_sd_pipeline(seed=0)


@pytest.fixture
def fast_config() -> EMCIDConfig:
    """The paper preset with few steps, so stage 1 takes a fraction of a second per concept."""
    return EMCIDConfig.from_preset("sd1-paper", num_steps=8, image_num_inference_steps=2)


@pytest.fixture
def editor(pipe: StableDiffusionPipeline, fast_config: EMCIDConfig, tmp_path) -> EMCIDEditor:
    editor = EMCIDEditor(pipe, fast_config, cache_dir=tmp_path / "cache", progress=False)
    editor.compute_statistics(CAPTIONS)
    return editor


def model_state(pipe: StableDiffusionPipeline) -> dict[str, torch.Tensor]:
    """A copy of every weight of the pipeline's networks."""
    return {
        f"{name}.{key}": value.detach().clone()
        for name in ("text_encoder", "text_encoder_2", "unet", "vae")
        if getattr(pipe, name, None) is not None
        for key, value in getattr(pipe, name).state_dict().items()
    }


def hook_counts(pipe: StableDiffusionPipeline) -> int:
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


def assert_pipeline_unchanged(pipe: StableDiffusionPipeline, state: dict[str, torch.Tensor], hooks: int = 0) -> None:
    now = model_state(pipe)
    assert now.keys() == state.keys(), "the pipeline's module structure changed"
    changed = [key for key in state if not torch.equal(state[key], now[key])]
    assert not changed, f"weights changed: {changed[:5]}"
    assert hook_counts(pipe) == hooks, "hooks were left on the pipeline"


def encode(pipe: StableDiffusionPipeline, prompts: list[str]) -> torch.Tensor:
    """The conditioning the pipeline gives its UNet: (B, 77, d)."""
    ids = pipe.tokenizer(prompts, padding="max_length", max_length=pipe.tokenizer.model_max_length,
                         return_tensors="pt").input_ids
    with torch.no_grad():
        return pipe.text_encoder(ids)[0]
