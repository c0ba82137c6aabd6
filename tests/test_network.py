"""The network against diffusers' Wan, its masks and attention backends, and checkpoint loading."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch
from diffusers import WanTransformer3DModel
from safetensors.torch import save_file

from model.checkpoint import (
    build_transformer,
    load_transformer_folder,
    read_univigu_pth,
    read_wan_config,
    read_wan_weights,
    save_transformer,
    wan_to_univigu,
)
from model.config import UniViGUConfig, get_preset
from model.errors import AttentionBackendError, CheckpointError, UnknownPresetError
from model.network import UniViGUTransformer

CONFIG = UniViGUConfig(
    num_attention_heads=2,
    attention_head_dim=24,
    num_layers=2,
    ffn_dim=64,
    in_channels=4,
    out_channels=4,
    text_dim=16,
    vocab_size=50,
)


@pytest.fixture(scope="module")
def wan_and_ours() -> tuple[WanTransformer3DModel, UniViGUTransformer]:
    torch.manual_seed(0)
    wan = WanTransformer3DModel(**CONFIG.to_wan_config()).eval()
    ours = build_transformer(CONFIG, wan_to_univigu(wan.state_dict(), CONFIG), "test").eval()
    return wan, ours


def _inputs(batch: int = 2, text_len: int = 5, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    x_v = torch.randn(batch, 4, 3, 4, 6, generator=g)
    x_t = torch.randint(0, CONFIG.vocab_size, (batch, text_len), generator=g)
    time = torch.tensor([999.0, 250.0][:batch])
    cond = torch.randn(batch, 7, CONFIG.text_dim, generator=g)
    return x_v, x_t, time, cond


def test_empty_text_stream_equals_diffusers_wan(wan_and_ours) -> None:
    wan, ours = wan_and_ours
    x_v, _, time, cond = _inputs()
    with torch.no_grad():
        reference = wan(x_v, time, cond, return_dict=False)[0]
        velocity, logits = ours(x_v, torch.zeros(2, 0, dtype=torch.long), time, time, cond)
    assert torch.equal(velocity, reference)
    assert logits.shape == (2, 0, CONFIG.vocab_size)


def test_text_tokens_change_the_video_through_joint_attention(wan_and_ours) -> None:
    _, ours = wan_and_ours
    x_v, x_t, time, cond = _inputs()
    with torch.no_grad():
        alone, _ = ours(x_v, x_t[:, :0], time, time, cond)
        joint, logits = ours(x_v, x_t, time, time, cond)
    assert not torch.allclose(alone, joint)
    assert logits.shape == (2, 5, CONFIG.vocab_size)


def test_fresh_text_head_predicts_uniform_logits(wan_and_ours) -> None:
    """Spec §7: the text head starts at zero, so a fresh model's logits are all zero."""
    _, ours = wan_and_ours
    x_v, x_t, time, cond = _inputs()
    with torch.no_grad():
        _, logits = ours(x_v, x_t, time, time, cond)
    assert torch.count_nonzero(logits) == 0


def test_wan_initialisation_copies_the_video_branch(wan_and_ours) -> None:
    wan, ours = wan_and_ours
    wan_state, state = wan.state_dict(), ours.state_dict()
    for n in range(CONFIG.num_layers):
        assert torch.equal(
            state[f"blocks.{n}.ffn_t.net.0.proj.weight"], wan_state[f"blocks.{n}.ffn.net.0.proj.weight"]
        )
    for modality in ("v", "t"):
        assert torch.equal(
            state[f"time_embedding_{modality}.time_proj.weight"],
            wan_state["condition_embedder.time_proj.weight"],
        )
        assert torch.equal(state[f"scale_shift_table_{modality}"], wan_state["scale_shift_table"])
    assert torch.equal(state["video_head.proj_out.weight"], wan_state["proj_out.weight"])


def test_padding_mask_hides_padded_tokens(wan_and_ours) -> None:
    """Masked positions cannot influence the video or the real text positions."""
    _, ours = wan_and_ours
    x_v, x_t, time, cond = _inputs()
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 0, 0]])
    other = x_t.clone()
    other[:, 3:] = (other[:, 3:] + 7) % CONFIG.vocab_size
    with torch.no_grad():
        v1, l1 = ours(x_v, x_t, time, time, cond, mask)
        v2, l2 = ours(x_v, other, time, time, cond, mask)
        v3, _ = ours(x_v, other, time, time, cond)
    torch.testing.assert_close(v1, v2)
    torch.testing.assert_close(l1[:, :3], l2[:, :3])
    assert not torch.allclose(v2, v3)


def test_dropping_masked_padding_gives_the_same_velocity(wan_and_ours) -> None:
    """Why text-to-video may trim the prompt's padding instead of masking it."""
    _, ours = wan_and_ours
    x_v, x_t, time, cond = _inputs()
    mask = torch.tensor([[1, 1, 1, 0, 0]] * 2)
    with torch.no_grad():
        masked, _ = ours(x_v, x_t, time, time, cond, mask)
        trimmed, _ = ours(x_v, x_t[:, :3], time, time, cond)
    torch.testing.assert_close(masked, trimmed, rtol=1e-5, atol=1e-6)


def test_backend_without_mask_support_is_refused_only_when_padding_is_present(wan_and_ours) -> None:
    _, ours = wan_and_ours
    ours._attention_backend = "flash"  # the check needs no flash install: it runs before any kernel
    try:
        with pytest.raises(AttentionBackendError, match="cannot apply a text padding mask"):
            ours._key_mask(torch.tensor([[1, 1, 0, 0, 0]] * 2), num_video=12)
        assert ours._key_mask(torch.ones(2, 5, dtype=torch.long), num_video=12) is None
    finally:
        ours._attention_backend = "native"


def test_unknown_attention_backend_lists_the_choices(wan_and_ours) -> None:
    _, ours = wan_and_ours
    with pytest.raises(AttentionBackendError, match="choose one of"):
        ours.set_attention_backend("warp-drive")


def test_native_backend_matches_default(wan_and_ours) -> None:
    _, ours = wan_and_ours
    x_v, x_t, time, cond = _inputs()
    with torch.no_grad():
        before, _ = ours(x_v, x_t, time, time, cond)
        ours.set_attention_backend("native")
        after, _ = ours(x_v, x_t, time, time, cond)
    torch.testing.assert_close(before, after)


def test_gradient_checkpointing_gives_the_same_gradients() -> None:
    torch.manual_seed(0)
    model = UniViGUTransformer(CONFIG)
    x_v, x_t, time, cond = _inputs()

    def grads() -> list[torch.Tensor]:
        model.zero_grad()
        velocity, logits = model(x_v, x_t, time, time, cond)
        (velocity.square().mean() + logits.square().mean()).backward()
        return [p.grad.clone() for p in model.parameters() if p.grad is not None]

    plain = grads()
    model.gradient_checkpointing = True
    checkpointed = grads()
    for a, b in zip(plain, checkpointed, strict=True):
        torch.testing.assert_close(a, b)


# ------------------------------------------------------------------ checkpoints


@pytest.fixture()
def state() -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    return UniViGUTransformer(CONFIG).state_dict()


def test_released_checkpoint_prefixes_are_stripped(tmp_path: Path, state) -> None:
    wrapped = {
        f"_fsdp_wrapped_module.{k}".replace("blocks.", "blocks._orig_mod."): v for k, v in state.items()
    }
    torch.save({"model": wrapped, "step": 123}, tmp_path / "ck.pth")
    loaded = read_univigu_pth(tmp_path / "ck.pth")
    assert set(loaded) == set(state)
    model = build_transformer(CONFIG, loaded, "ck.pth")
    assert torch.equal(model.state_dict()["blocks.1.attn1.to_q.weight"], state["blocks.1.attn1.to_q.weight"])


def test_rotary_buffer_may_be_absent_and_is_recomputed(state) -> None:
    reference = state.pop("rotary_emb_text.inv_freq")
    model = build_transformer(CONFIG, state, "ck")
    torch.testing.assert_close(model.rotary_emb_text.inv_freq, reference)
    assert not any(t.is_meta for t in [*model.parameters(), *model.buffers()])


@pytest.mark.parametrize(
    ("change", "message", "key"),
    [
        (lambda s: s.pop("blocks.0.ffn_t.net.2.bias"), "missing parameter", "blocks.0.ffn_t.net.2.bias"),
        (lambda s: s.update({"blocks.0.extra": torch.zeros(1)}), "unexpected parameter", "blocks.0.extra"),
        (
            lambda s: s.update({"blocks.1.norm2.weight": torch.zeros(3)}),
            "does not match",
            "blocks.1.norm2.weight",
        ),
        (
            lambda s: s.update({"vocab_embed.weight": torch.zeros(51, CONFIG.hidden_size)}),
            "vocabulary size differs",
            "vocab_embed.weight",
        ),
    ],
    ids=["missing", "unexpected", "shape", "vocabulary"],
)
def test_bad_state_dicts_name_file_and_key(state, change, message, key) -> None:
    change(state)
    with pytest.raises(CheckpointError, match=message) as info:
        build_transformer(CONFIG, state, "weights.pth")
    assert info.value.key == key
    assert info.value.file == "weights.pth"
    assert "weights.pth" in str(info.value)


def test_unreadable_and_missing_checkpoints(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="not found"):
        read_univigu_pth(tmp_path / "absent.pth")
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="not a loadable torch checkpoint"):
        read_univigu_pth(tmp_path / "junk.pth")
    torch.save({"model": {"x": "not a tensor"}}, tmp_path / "odd.pth")
    with pytest.raises(CheckpointError, match="expected"):
        read_univigu_pth(tmp_path / "odd.pth")


def test_our_folder_format_round_trips(tmp_path: Path, state) -> None:
    model = build_transformer(CONFIG, state, "ck")
    save_transformer(model, tmp_path / "transformer")
    again = load_transformer_folder(tmp_path / "transformer")
    assert again.config == CONFIG
    for key, value in model.state_dict().items():
        assert torch.equal(again.state_dict()[key], value), key


def test_wan_folder_reads_sharded_weights(tmp_path: Path) -> None:
    torch.manual_seed(0)
    wan = WanTransformer3DModel(**CONFIG.to_wan_config())
    wan.save_pretrained(tmp_path, max_shard_size="20KB")
    assert (tmp_path / "diffusion_pytorch_model.safetensors.index.json").is_file()
    config, weights = read_wan_config(tmp_path), read_wan_weights(tmp_path)
    assert UniViGUConfig.from_wan_config(config, vocab_size=CONFIG.vocab_size) == CONFIG
    assert set(weights) == set(wan.state_dict())


def test_wan_config_checks() -> None:
    base = CONFIG.to_wan_config()
    with pytest.raises(CheckpointError, match="image-conditioned"):
        UniViGUConfig.from_wan_config({**base, "image_dim": 1280}, vocab_size=10)
    with pytest.raises(CheckpointError, match="qk_norm"):
        UniViGUConfig.from_wan_config({**base, "qk_norm": "rms_norm"}, vocab_size=10)
    with pytest.raises(CheckpointError, match="unknown Uni-ViGU config fields"):
        UniViGUConfig.from_dict({**dataclasses.asdict(CONFIG), "wings": 2})


def test_presets() -> None:
    assert get_preset("wan2.1-1.3b").transformer.hidden_size == 1536
    with pytest.raises(UnknownPresetError, match="choose one of"):
        get_preset("huge")


def test_real_size_parameter_count() -> None:
    """Spec §3: about 3B parameters for the 1.3B base (Wan's 1.42B plus text FFNs, embedding and head)."""
    with torch.device("meta"):
        model = UniViGUTransformer(get_preset("wan2.1-1.3b").transformer)
    count = sum(p.numel() for p in model.parameters())
    assert 2.8e9 < count < 3.2e9


def test_safetensors_shard_missing_is_reported(tmp_path: Path) -> None:
    save_file({"a": torch.zeros(1)}, tmp_path / "diffusion_pytorch_model-00001-of-00002.safetensors")
    (tmp_path / "diffusion_pytorch_model.safetensors.index.json").write_text(
        '{"weight_map": {"a": "diffusion_pytorch_model-00001-of-00002.safetensors",'
        ' "b": "diffusion_pytorch_model-00002-of-00002.safetensors"}}'
    )
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(CheckpointError, match="shard not found"):
        read_wan_weights(tmp_path)
