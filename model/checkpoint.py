"""Transformer weights in and out: the released ``.pth``, a plain Wan2.1 folder, and our own format.

* :func:`read_univigu_pth` reads the authors' ``{"model": state_dict, "step": int}`` pickle with
  ``weights_only=True`` and strips FSDP / ``torch.compile`` key fragments.
* :func:`wan_to_univigu` builds a fresh Uni-ViGU state dict from a Wan2.1 transformer (spec §7): the
  text branch starts as copies of the video branch and the text head at zero.
* :func:`save_transformer` / :func:`load_transformer_folder` are our format: ``config.json`` (a
  :class:`UniViGUConfig`) and ``model.safetensors``.

Every load is strict: a missing, unexpected or wrongly shaped key is one :class:`CheckpointError`
naming the file and the key. Only the text rotary buffer, which is recomputable, may be absent.
Networks are built on the meta device and receive the loaded tensors, so nothing is allocated
twice and nothing can stay on the meta device unnoticed.
"""

from __future__ import annotations

import hashlib
import json
import pickle
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from model.config import UniViGUConfig
from model.errors import CheckpointError
from model.network import UniViGUTransformer

WRAPPER_FRAGMENTS = ("_fsdp_wrapped_module.", "_orig_mod.")
RECOMPUTABLE_KEYS = frozenset({"rotary_emb_text.inv_freq"})
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
WAN_WEIGHTS = "diffusion_pytorch_model.safetensors"

StateDict = dict[str, torch.Tensor]


def strip_wrapper_prefixes(state_dict: StateDict) -> StateDict:
    """Remove the ``_fsdp_wrapped_module.`` and ``_orig_mod.`` fragments that wrappers add to keys."""
    cleaned = {}
    for key, value in state_dict.items():
        for fragment in WRAPPER_FRAGMENTS:
            key = key.replace(fragment, "")
        cleaned[key] = value
    return cleaned


def read_univigu_pth(path: str | Path) -> StateDict:
    """The state dict of a released Uni-ViGU checkpoint (``{"model": state_dict, "step": int}``)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError("Uni-ViGU checkpoint not found", file=str(path))
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError, OSError) as exc:
        raise CheckpointError(f"not a loadable torch checkpoint: {exc}", file=str(path)) from exc
    if isinstance(payload, dict) and isinstance(payload.get("model"), dict):
        payload = payload["model"]
    if not isinstance(payload, dict) or not all(isinstance(v, torch.Tensor) for v in payload.values()):
        raise CheckpointError(
            'expected {"model": state_dict, "step": int} or a plain state dict', file=str(path)
        )
    return strip_wrapper_prefixes(payload)


def read_safetensors(path: Path) -> StateDict:
    """All tensors of one safetensors file, or of a sharded set described by ``<name>.index.json``."""
    index = path.with_name(path.name + ".index.json")
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        files = [path.with_name(shard) for shard in shards]
    elif path.is_file():
        files = [path]
    else:
        raise CheckpointError("weights file not found", file=str(path))
    tensors: StateDict = {}
    for file in files:
        if not file.is_file():
            raise CheckpointError("weights shard not found", file=str(file))
        with safe_open(file, framework="pt") as handle:
            for key in handle.keys():  # noqa: SIM118 - safe_open is not a mapping
                tensors[key] = handle.get_tensor(key)
    return tensors


def read_wan_config(transformer_dir: str | Path) -> dict:
    """The config dict of a diffusers ``WanTransformer3DModel`` folder."""
    config_path = Path(transformer_dir) / CONFIG_FILE
    if not config_path.is_file():
        raise CheckpointError("Wan transformer config not found", file=str(config_path))
    return json.loads(config_path.read_text())


def read_wan_weights(transformer_dir: str | Path) -> StateDict:
    """The state dict of a diffusers ``WanTransformer3DModel`` folder (single or sharded safetensors)."""
    return read_safetensors(Path(transformer_dir) / WAN_WEIGHTS)


def wan_to_univigu(
    wan_state: StateDict, config: UniViGUConfig, generator: torch.Generator | None = None
) -> StateDict:
    """A fresh Uni-ViGU state dict from Wan2.1 transformer weights (spec §7).

    Shared parts keep Wan's names; ``ffn_t`` copies ``ffn``, ``time_embedding_t`` copies the video time
    embedding, both head tables copy Wan's ``scale_shift_table``, the text head starts at zero, and the
    token embedding is drawn from N(0, 0.02²).
    """
    renames = {
        "condition_embedder.time_embedder.": (
            "time_embedding_v.time_embedder.",
            "time_embedding_t.time_embedder.",
        ),
        "condition_embedder.time_proj.": ("time_embedding_v.time_proj.", "time_embedding_t.time_proj."),
        "condition_embedder.text_embedder.": ("cond_text_embedder.",),
        "proj_out.": ("video_head.proj_out.",),
    }
    state: StateDict = {}
    for key, value in wan_state.items():
        if key == "scale_shift_table":
            state["scale_shift_table_v"] = value.clone()
            state["scale_shift_table_t"] = value.clone()
            continue
        prefix = next((p for p in renames if key.startswith(p)), None)
        targets = renames[prefix] if prefix else (key,)
        for target in targets:
            name = target + key[len(prefix) :] if prefix else target
            state[name] = value.clone()
        if ".ffn." in key and key.startswith("blocks."):
            state[key.replace(".ffn.", ".ffn_t.")] = value.clone()
    dim, vocab = config.hidden_size, config.vocab_size
    state["vocab_embed.weight"] = torch.randn(vocab, dim, generator=generator) * 0.02
    state["text_head.norm_final.weight"] = torch.ones(dim)
    state["text_head.linear.weight"] = torch.zeros(vocab, dim)
    state["text_head.linear.bias"] = torch.zeros(vocab)
    return state


def build_transformer(config: UniViGUConfig, state_dict: StateDict, source: str) -> UniViGUTransformer:
    """A network on the CPU holding exactly ``state_dict`` (strict; see the module docstring)."""
    with torch.device("meta"):
        model = UniViGUTransformer(config)
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state_dict) - RECOMPUTABLE_KEYS)
    unexpected = sorted(set(state_dict) - set(expected))
    if missing:
        more = f" and {len(missing) - 1} more" if len(missing) > 1 else ""
        raise CheckpointError(f"missing parameter{more}", file=source, key=missing[0])
    if unexpected:
        more = f" and {len(unexpected) - 1} more" if len(unexpected) > 1 else ""
        raise CheckpointError(f"unexpected parameter{more}", file=source, key=unexpected[0])
    for key, tensor in state_dict.items():
        if tuple(tensor.shape) != tuple(expected[key].shape):
            hint = (
                " (vocabulary size differs from the config)"
                if "vocab" in key or "text_head.linear" in key
                else ""
            )
            raise CheckpointError(
                f"shape {tuple(tensor.shape)} does not match the model's {tuple(expected[key].shape)}{hint}",
                file=source,
                key=key,
            )
    model.load_state_dict(state_dict, strict=False, assign=True)
    # Buffers that are not in checkpoints are computed from the config, on the CPU.
    model.rope = type(model.rope)(config.attention_head_dim, config.patch_size, config.rope_max_seq_len)
    if "rotary_emb_text.inv_freq" not in state_dict:
        model.rotary_emb_text = type(model.rotary_emb_text)(config.attention_head_dim, config.text_rope_theta)
    left_on_meta = [name for name, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if left_on_meta:
        raise CheckpointError("parameters were left uninitialised", file=source, key=left_on_meta[0])
    return model


def save_transformer(model: UniViGUTransformer, folder: str | Path) -> Path:
    """Write ``config.json`` and ``model.safetensors`` into ``folder``; returns the folder."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / CONFIG_FILE).write_text(json.dumps(model.config.to_dict(), indent=2) + "\n")
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    save_file(tensors, folder / WEIGHTS_FILE)
    return folder


def load_transformer_folder(folder: str | Path) -> UniViGUTransformer:
    """A network saved by :func:`save_transformer`."""
    folder = Path(folder)
    config_path = folder / CONFIG_FILE
    if not config_path.is_file():
        raise CheckpointError("transformer config not found", file=str(config_path))
    config = UniViGUConfig.from_dict(json.loads(config_path.read_text()))
    return build_transformer(config, read_safetensors(folder / WEIGHTS_FILE), str(folder / WEIGHTS_FILE))


def weights_sha256(*modules: torch.nn.Module) -> str:
    """sha256 over the state dicts of ``modules`` as they are held (names, dtypes, shapes, bytes), in order.

    Identifies the weights a pipeline serves: the same checkpoint cast to another dtype hashes
    differently, as it also computes differently. sha256 runs at about 1.5 GB/s on one CPU core, so the
    real model (Wan2.1-1.3B, its VAE and the umT5-XXL encoder, about 14 GB in bf16) adds some 10 s to
    a worker's start.
    """
    digest = hashlib.sha256()
    for index, module in enumerate(modules):
        for name, tensor in module.state_dict().items():
            header = f"{index}:{name}:{tensor.dtype}:{tuple(tensor.shape)};"
            digest.update(header.encode())
            data = tensor.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8)
            digest.update(data.numpy())  # the buffer itself, not a copy
    return digest.hexdigest()
