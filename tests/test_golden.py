"""The authors' reference outputs: every golden folder loads and reproduces velocity and logits.

Folders come from ``tests/golden`` (the repository's own copy of the reference sets) and from
``UNIVIGU_GOLDEN_DIRS`` (separated by ``os.pathsep``; each entry is a golden folder or a folder of
them), so more sets can be checked without copying them in.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from model.checkpoint import build_transformer, read_univigu_pth
from model.config import UniViGUConfig
from model.network import UniViGUTransformer
from model.pipeline import cast_transformer

pytestmark = pytest.mark.golden

DEFAULT_ROOT = Path(__file__).resolve().parent / "golden"
RELATIVE_TOLERANCE = 1e-4


def _is_golden(folder: Path) -> bool:
    return (folder / "reference_io.safetensors").is_file()


def golden_folders() -> list[Path]:
    roots = [
        DEFAULT_ROOT,
        *(Path(p) for p in os.environ.get("UNIVIGU_GOLDEN_DIRS", "").split(os.pathsep) if p),
    ]
    found: list[Path] = []
    for root in roots:
        candidates = [root] if _is_golden(root) else sorted(p for p in root.glob("*") if _is_golden(p))
        found.extend(c for c in candidates if c not in found)
    return found


FOLDERS = golden_folders()


def test_golden_sets_are_present() -> None:
    assert FOLDERS, f"no golden folders under {DEFAULT_ROOT} or UNIVIGU_GOLDEN_DIRS"


def relative_error(ours: torch.Tensor, reference: torch.Tensor) -> float:
    return ((ours - reference).norm() / reference.norm()).item()


def run_reference(
    folder: Path, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    """Our forward pass on the folder's inputs: ``(velocity, logits, reference io)``."""
    state = read_univigu_pth(folder / "reference_checkpoint.pth")
    wan_config = json.loads((folder / "wan" / "transformer" / "config.json").read_text())
    config = UniViGUConfig.from_wan_config(wan_config, vocab_size=state["vocab_embed.weight"].shape[0])
    model = cast_transformer(build_transformer(config, state, str(folder)), torch.device("cpu"), dtype)
    io = load_file(folder / "reference_io.safetensors")
    with torch.no_grad():
        velocity, logits = model(
            io["x_v"], io["x_t"], io["time_v"], io["time_t"], io["cond_t"], io["x_t_attention_mask"]
        )
    return velocity.float(), logits, io


@pytest.mark.parametrize("folder", FOLDERS, ids=[f.name for f in FOLDERS])
def test_reproduces_reference_outputs(folder: Path) -> None:
    velocity, logits, io = run_reference(folder, torch.float32)
    assert velocity.shape == io["out_velocity"].shape
    assert logits.shape == io["out_logits"].shape
    assert relative_error(velocity, io["out_velocity"]) < RELATIVE_TOLERANCE
    assert relative_error(logits, io["out_logits"]) < RELATIVE_TOLERANCE


@pytest.mark.parametrize("folder", FOLDERS, ids=[f.name for f in FOLDERS])
def test_bfloat16_with_float32_tables_stays_close(folder: Path) -> None:
    """The CUDA precision (bf16 weights, float32 time embeddings and modulation tables), run on the CPU."""
    velocity, logits, io = run_reference(folder, torch.bfloat16)
    assert relative_error(velocity, io["out_velocity"]) < 2e-2
    assert relative_error(logits, io["out_logits"]) < 2e-2


@pytest.mark.parametrize("folder", FOLDERS, ids=[f.name for f in FOLDERS])
def test_parameter_names_equal_the_released_checkpoint(folder: Path) -> None:
    manifest = json.loads((folder / "reference_manifest.json").read_text())
    wan_config = json.loads((folder / "wan" / "transformer" / "config.json").read_text())
    config = UniViGUConfig.from_wan_config(wan_config, vocab_size=manifest["config"]["vocab"])
    with torch.device("meta"):
        model = UniViGUTransformer(config)
    assert {k: list(v.shape) for k, v in model.state_dict().items()} == manifest["keys"]
    assert sum(p.numel() for p in model.parameters()) == manifest["param_count"]
