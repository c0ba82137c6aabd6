"""The GPU fast path, checked on the CPU: compiled blocks, the worker warm-up, attention backend
selection and VAE tiling. Every change is compared with the plain path within a stated tolerance."""

from __future__ import annotations

import dataclasses
import importlib.util
from collections.abc import Iterator

import numpy as np
import pytest
import torch
from diffusers.models.attention_dispatch import AttentionBackendName
from torch._dynamo.utils import counters

from model import network as network_module
from model.config import VaeTiling, get_preset
from model.errors import AttentionBackendError
from model.media import psnr
from model.network import UniViGUTransformer, resolve_attention_backend
from model.pipeline import UniViGUPipeline
from service.contract.settings import Settings
from worker.loading import WARMUP_PROMPT, ModelSpec, describe_model, load_pipeline, warm_up

CONFIG = dataclasses.replace(get_preset("tiny").transformer, num_layers=3, vocab_size=50)
COMPILED_TOLERANCE = 1e-5
"""Compiled against eager in float32: inductor fuses and reorders element-wise work (measured 5e-7)."""


@pytest.fixture(autouse=True)
def fresh_dynamo() -> Iterator[None]:
    """Each test counts its own graphs; compiled code of earlier tests is dropped."""
    torch._dynamo.reset()
    counters.clear()
    yield
    torch._dynamo.reset()


def inputs(seed: int, text_tokens: int = 6) -> tuple[torch.Tensor, ...]:
    """``(x_v (2, C, 2, 4, 4), x_t (2, L), time_v (2,), time_t (2,), cond (2, 8, text_dim))``."""
    generator = torch.Generator().manual_seed(seed)
    x_v = torch.randn(2, CONFIG.in_channels, 2, 4, 4, generator=generator)
    x_t = torch.randint(0, CONFIG.vocab_size, (2, text_tokens), generator=generator)
    cond = torch.randn(2, 8, CONFIG.text_dim, generator=generator)
    time = torch.rand(2, generator=generator) * 1000
    return x_v, x_t, time, time.flip(0), cond


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_compiled_blocks_match_eager_share_one_graph_and_do_not_recompile(backend: str) -> None:
    torch.manual_seed(0)
    network = UniViGUTransformer(CONFIG).eval().requires_grad_(False)
    with torch.inference_mode():
        eager = network(*inputs(0))
        network.compile_blocks(backend)
        compiled = network(*inputs(0))
        assert counters["stats"]["unique_graphs"] == 1  # three blocks, one graph
        with torch._dynamo.config.patch(error_on_recompile=True):
            again = network(*inputs(1))  # same shapes, other values and times: no new graph
            with pytest.raises(Exception, match="[Rr]ecompil"):
                network(*inputs(1, text_tokens=7))  # a new sequence length does compile again
    assert network.compiled
    for plain, fast in zip(eager, compiled, strict=True):
        torch.testing.assert_close(fast, plain, rtol=COMPILED_TOLERANCE, atol=COMPILED_TOLERANCE)
    torch._dynamo.reset()
    network_eager = UniViGUTransformer(CONFIG).eval().requires_grad_(False)
    network_eager.load_state_dict(network.state_dict())
    with torch.inference_mode():
        expected = network_eager(*inputs(1))
    for plain, fast in zip(expected, again, strict=True):
        torch.testing.assert_close(fast, plain, rtol=COMPILED_TOLERANCE, atol=COMPILED_TOLERANCE)


def test_load_with_compile_compiles_the_blocks() -> None:
    assert UniViGUPipeline.load(preset="tiny", compile=True).transformer.compiled
    assert not UniViGUPipeline.load(preset="tiny").transformer.compiled


def test_warm_up_compiles_every_mode_so_requests_of_the_default_shape_do_not_recompile() -> None:
    pipe = UniViGUPipeline.from_preset("tiny")
    pipe.transformer.compile_blocks("aot_eager")  # inductor would work too, only slower to build
    seconds = warm_up(pipe, steps=2)  # a caption's first full pass keeps the video's keys and values
    assert list(seconds) == ["generate", "joint", "caption"]
    assert all(value > 0 for value in seconds.values())
    graphs = counters["stats"]["unique_graphs"]
    assert graphs >= 3  # guided generate, guided joint, captioning (and joint's clean pass)

    d = pipe.defaults
    same_length = " ".join(["blue"] * len(WARMUP_PROMPT.split()))  # as many tokens as the warm-up prompt
    with torch._dynamo.config.patch(error_on_recompile=True):
        video = pipe.generate(same_length, steps=2, seed=5)
        pipe.joint("a cat", steps=2, seed=5)
        pipe.caption(np.full((d.num_frames, d.height, d.width, 3), 90, np.uint8), steps=2, seed=5)
    assert counters["stats"]["unique_graphs"] == graphs
    assert video.frames.shape == (d.num_frames, d.height, d.width, 3)


def test_auto_attention_is_sdpa_on_the_cpu_and_is_shown_to_the_gateway() -> None:
    pipe = load_pipeline(ModelSpec(device="cpu", preset="tiny", attention_backend="auto"))
    assert pipe.transformer.attention_backend == "native"
    served = describe_model(pipe)
    assert (served.attention_backend, served.compiled) == ("native", False)


def test_auto_attention_on_cuda_takes_the_first_installed_kernel(monkeypatch: pytest.MonkeyPatch) -> None:
    cuda = torch.device("cuda")  # only names are resolved: no GPU is touched
    installed: set[str] = set()

    def missing(backend: AttentionBackendName) -> str | None:
        return None if backend.value in installed else "not installed"

    monkeypatch.setattr(network_module, "_missing_requirement", missing)
    assert resolve_attention_backend("auto", cuda) == "native"
    installed.add("sage")
    assert resolve_attention_backend("auto", cuda) == "sage"
    installed.add("flash")
    assert resolve_attention_backend("auto", cuda) == "flash"
    assert resolve_attention_backend("AUTO", torch.device("cpu")) == "native"


@pytest.mark.parametrize(
    ("backend", "message"),
    [("warp-drive", "unknown attention backend 'warp-drive'"), ("flash", "'flash' is not usable here")],
)
def test_an_unknown_or_uninstalled_attention_backend_stops_the_worker_at_start(
    backend: str, message: str
) -> None:
    if backend == "flash" and importlib.util.find_spec("flash_attn") is not None:
        pytest.skip("flash-attn is installed here")
    spec = ModelSpec.from_settings(Settings(preset="tiny", attention_backend=backend))
    with pytest.raises(AttentionBackendError, match=message):
        load_pipeline(spec)


def test_vae_tiling_applies_above_its_pixel_area() -> None:
    tiling = VaeTiling()
    assert not tiling.applies(480, 832) and not tiling.applies(720, 1280)
    assert tiling.applies(720, 1296)
    assert VaeTiling(min_pixels=0).applies(16, 16)
    spec = ModelSpec.from_settings(Settings(preset="tiny", vae_tiling_min_pixels=0))
    assert load_pipeline(spec).vae_tiling == VaeTiling(
        min_pixels=0
    )  # the worker setting reaches the pipeline


def test_tiled_vae_decode_is_close_to_the_untiled_one() -> None:
    """Forced small tiles (48 px, stride 32) at 64x64. The tiny VAE's random weights have no smoothness,
    so the seams cost more than a trained VAE's would: the bound is 20 dB PSNR (measured 24.5 dB)."""
    pipe = UniViGUPipeline.from_preset("tiny")
    video = {"height": 64, "width": 64, "num_frames": 5, "steps": 2, "seed": 1}
    untiled = pipe.generate("a red circle", **video).frames
    assert not pipe.vae.use_tiling
    pipe.vae_tiling = VaeTiling(min_pixels=0, tile=64, stride=48)  # one tile covers the video
    assert np.array_equal(pipe.generate("a red circle", **video).frames, untiled)
    pipe.vae_tiling = VaeTiling(min_pixels=0, tile=48, stride=32)
    tiled = pipe.generate("a red circle", **video).frames
    assert pipe.vae.use_tiling and pipe.vae.tile_sample_min_height == 48
    assert tiled.shape == untiled.shape
    assert not np.array_equal(tiled, untiled)  # the tiled path did run
    assert psnr(tiled, untiled) > 20.0
