"""``univigu train`` on the CPU: loss goes down per stage, exact resume, gloo 2 processes == 1, bad data.

Everything runs on toy clips fitted to 32x32 pixels and 5 frames by a tiny randomly initialised model.
The runs keep a moving average of their weights, so resume and the gloo run check that too.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import os
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from model.checkpoint import load_transformer_folder
from model.errors import InvalidParameterError, InvalidVideoError, ManifestError
from model.pipeline import UniViGUPipeline
from model.toyworld.make import make_dataset
from model.training.batch import build_batch
from model.training.config import DataConfig, ObjectiveConfig, OptimConfig, TrainConfig
from model.training.data import LatentCache, VideoGeometry, load_posterior, prepare_dataset
from model.training.ema import EMA_FILE, WeightEMA, ema_decay
from model.training.objective import (
    CLEAN_TEXT,
    CLEAN_VIDEO,
    draw_example,
    example_generator,
    flow_matching_losses,
    shifted_sigma,
    text_path,
    video_path,
)
from model.training.trainer import TrainRequest, learning_rate, select_trainable, train

REPO = Path(__file__).resolve().parents[1]
TOY_LIMITS = DataConfig(max_prompt_tokens=8, min_caption_tokens=24, max_caption_tokens=32)
CONFIG = TrainConfig(
    steps=6,
    global_batch_size=4,
    checkpoint_every=3,
    ema_decay=0.999,
    data=TOY_LIMITS,
    optim=OptimConfig(lr=2e-3, warmup_steps=1),
)
CONFIG_TOML = """
steps = 6
global_batch_size = 4
checkpoint_every = 3
ema_decay = 0.999
[data]
max_prompt_tokens = 8
min_caption_tokens = 24
max_caption_tokens = 32
[optim]
lr = 2e-3
warmup_steps = 1
"""


@pytest.fixture(scope="module")
def init_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny preset with 32x32, 5-frame defaults, saved in our folder format."""
    pipe = UniViGUPipeline.from_preset("tiny", seed=0)
    pipe.defaults = dataclasses.replace(pipe.defaults, height=32, width=32, num_frames=5)
    return pipe.save_pretrained(tmp_path_factory.mktemp("init"))


@pytest.fixture(scope="module")
def manifest(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_dataset(3, tmp_path_factory.mktemp("toy"), seed=0)


def _run(
    stage: str, manifest: Path, init: Path, out: Path, config: TrainConfig = CONFIG, **options
) -> list[float]:
    request = TrainRequest(stage, manifest, str(init), out, config, progress=False, **options)
    return train(request).losses


@pytest.fixture(scope="module")
def recall_run(tmp_path_factory, manifest, init_folder) -> tuple[Path, list[float]]:
    out = tmp_path_factory.mktemp("recall")
    return out, _run("recall", manifest, init_folder, out)


def _fixed_batch_loss(model_folder: Path, stage: str, manifest: Path) -> float:
    """The objective on one fixed batch of 12 draws, without gradients."""
    pipe = UniViGUPipeline.from_pretrained(model_folder)
    geometry = VideoGeometry(32, 32, 5, 8)
    cache = LatentCache(manifest.parent / ".latent_cache", pipe.vae, geometry)
    data = prepare_dataset(manifest, stage, pipe.text.token_count, cache, TOY_LIMITS)
    positions = list(range(1000, 1012))
    batch = build_batch(
        [data.examples[p % len(data.examples)] for p in positions],
        positions,
        seed=7,
        stage=stage,
        text=pipe.text,
        objective=ObjectiveConfig(),
        text_tokens=TOY_LIMITS.text_tokens(stage),
        vocab_size=pipe.transformer.config.vocab_size,
        device=torch.device("cpu"),
    )
    with torch.no_grad():
        velocity, logits = pipe.transformer(
            batch.x_v, batch.x_t, batch.time_v, batch.time_t, batch.cond, batch.text_mask
        )
    terms = flow_matching_losses(
        velocity, logits, batch.video_target, batch.text_target, batch.video_on, batch.text_on
    )
    return float(terms.total(ObjectiveConfig()))


def test_recall_lowers_the_loss_on_a_fixed_batch(recall_run, manifest, init_folder):
    out, losses = recall_run
    assert len(losses) == CONFIG.steps
    before = _fixed_batch_loss(init_folder, "recall", manifest)
    after = _fixed_batch_loss(out / "final", "recall", manifest)
    assert after < 0.95 * before


def test_refine_lowers_the_loss_on_a_fixed_batch(tmp_path, manifest, init_folder):
    checkpointed = dataclasses.replace(CONFIG, gradient_checkpointing=True)
    _run("refine", manifest, init_folder, tmp_path, checkpointed)
    before = _fixed_batch_loss(init_folder, "refine", manifest)
    after = _fixed_batch_loss(tmp_path / "final", "refine", manifest)
    assert after < 0.95 * before


def test_final_folder_is_a_servable_pipeline(recall_run):
    out, _ = recall_run
    pipe = UniViGUPipeline.from_pretrained(out / "final")
    assert pipe.defaults.height == 32
    result = pipe.caption(torch.zeros(5, 32, 32, 3, dtype=torch.uint8).numpy(), steps=2, seed=0)
    assert len(result.tokens) == pipe.defaults.caption_tokens
    rows = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [row["step"] for row in rows] == list(range(1, CONFIG.steps + 1))
    assert rows[0]["lr"] == pytest.approx(2e-3) and rows[-1]["lr"] < rows[1]["lr"]


def test_resume_equals_the_uninterrupted_run(tmp_path, recall_run, manifest, init_folder):
    full_out, full_losses = recall_run
    first = _run("recall", manifest, init_folder, tmp_path, stop_after=3)
    assert not (tmp_path / "final").exists()
    second = _run("recall", manifest, init_folder, tmp_path, resume=True)
    assert first + second == full_losses
    resumed = load_transformer_folder(tmp_path / "final" / "transformer").state_dict()
    uninterrupted = load_transformer_folder(full_out / "final" / "transformer").state_dict()
    assert all(torch.equal(resumed[k], uninterrupted[k]) for k in uninterrupted)


def test_resuming_a_finished_run_exports_the_same_final_folder(tmp_path, recall_run, manifest, init_folder):
    """No step runs, so nothing was gathered by a checkpoint: the export gathers the states itself."""
    full_out, _ = recall_run
    shutil.copytree(full_out / "checkpoints", tmp_path / "checkpoints")
    assert _run("recall", manifest, init_folder, tmp_path, resume=True) == []
    exported = load_transformer_folder(tmp_path / "final" / "transformer").state_dict()
    uninterrupted = load_transformer_folder(full_out / "final" / "transformer").state_dict()
    assert all(torch.equal(exported[k], uninterrupted[k]) for k in uninterrupted)


def test_an_existing_run_is_not_overwritten_without_resume(tmp_path, manifest, init_folder):
    _run("recall", manifest, init_folder, tmp_path, stop_after=3)
    with pytest.raises(InvalidParameterError, match="--resume"):
        _run("recall", manifest, init_folder, tmp_path)


def test_two_gloo_processes_match_one_process(tmp_path, recall_run, manifest, init_folder):
    single_out, single_losses = recall_run
    config = tmp_path / "train.toml"
    config.write_text(CONFIG_TOML)
    command = [
        *(sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"),
        *("-m", "model.cli", "train", "--stage", "recall", "--data", str(manifest)),
        *("--init", str(init_folder), "--out", str(tmp_path / "run"), "--config", str(config)),
        *("--stop-after", "3", "--device", "cpu"),
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    proc = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert [row["loss"] for row in rows] == pytest.approx(single_losses[:3], rel=1e-4)
    checkpoint = tmp_path / "run" / "checkpoints" / "step-000003"
    assert (checkpoint / "model" / "univigu.json").is_file()
    sharded_average = load_file(checkpoint / EMA_FILE)
    single_average = load_file(single_out / "checkpoints" / "step-000003" / EMA_FILE)
    assert sharded_average.keys() == single_average.keys()
    # Summation order differs across processes; one step moves a weight by about lr = 2e-3.
    for name, tensor in single_average.items():
        torch.testing.assert_close(sharded_average[name], tensor, rtol=1e-3, atol=5e-5)


def test_final_folder_holds_the_weight_average(recall_run):
    """``final/`` is the average of the last checkpoint, not its raw weights."""
    out, _ = recall_run
    final = load_transformer_folder(out / "final" / "transformer").state_dict()
    last = out / "checkpoints" / "step-000006"
    raw = load_transformer_folder(last / "model" / "transformer").state_dict()
    average = load_file(last / EMA_FILE)
    assert all(torch.equal(final[name], tensor) for name, tensor in average.items())
    assert any(not torch.equal(final[name], raw[name]) for name in average)


def test_weight_average_follows_its_decay_and_reloads():
    model = torch.nn.Linear(3, 2)
    start = {name: p.detach().clone() for name, p in model.named_parameters()}
    ema = WeightEMA(model, decay=0.9)
    with torch.no_grad():
        model.weight.add_(1.0)
    ema.update(step=0)  # warm-up bound: 1/10, so 90% of the way to the new weights
    torch.testing.assert_close(ema.shadow["weight"], start["weight"] + 0.9)
    torch.testing.assert_close(ema.shadow["bias"], start["bias"])
    assert [ema_decay(0.9, step) for step in (0, 80, 10_000)] == pytest.approx([0.1, 0.9, 0.9])
    restored = WeightEMA(torch.nn.Linear(3, 2), decay=0.9)
    restored.load_full_state(ema.full_state())
    assert all(torch.equal(restored.shadow[n], ema.shadow[n]) for n in ema.shadow)


def test_learning_rate_warms_up_then_decays_to_the_floor():
    optim = OptimConfig(lr=1.0, warmup_steps=4, min_lr_ratio=0.1)
    rates = [learning_rate(step, optim, 20) for step in range(20)]
    assert rates[:4] == [0.25, 0.5, 0.75, 1.0]
    assert all(a >= b for a, b in itertools.pairwise(rates[3:]))
    assert learning_rate(20, optim, 20) == pytest.approx(0.1)


def test_config_file_rejects_unknown_keys(tmp_path):
    path = tmp_path / "bad.toml"
    path.write_text("steps = 3\n[optim]\nlearning_rate = 1.0\n")
    with pytest.raises(InvalidParameterError, match=r"optim\.learning_rate"):
        TrainConfig.from_toml(path)
    path.write_text(CONFIG_TOML)
    assert TrainConfig.from_toml(path) == CONFIG
    with pytest.raises(InvalidParameterError, match=r"ema_decay must be in \[0, 1\)"):
        TrainConfig(ema_decay=1.0)


# ---------------------------------------------------------------- manifests


@pytest.fixture(scope="module")
def cache(tmp_path_factory, init_folder) -> LatentCache:
    pipe = UniViGUPipeline.from_pretrained(init_folder)
    return LatentCache(tmp_path_factory.mktemp("cache"), pipe.vae, VideoGeometry(32, 32, 5, 8)), pipe.text


def _write_manifest(folder: Path, rows: list) -> Path:
    path = folder / "manifest.jsonl"
    path.write_text("".join((row if isinstance(row, str) else json.dumps(row)) + "\n" for row in rows))
    return path


def test_bad_rows_are_reported_with_a_reason_and_skipped(tmp_path, manifest, cache):
    latent_cache, text = cache
    good = json.loads(manifest.read_text().splitlines()[0])
    good["video"] = str(manifest.parent / good["video"])
    (tmp_path / "broken.mp4").write_bytes(b"not a video at all")
    rows = [
        good,
        {**good, "video": str(tmp_path / "missing.mp4")},
        {**good, "video": str(tmp_path / "broken.mp4")},
        {**good, "prompt": "a red circle moving left " * 3},
        {**good, "caption": "a red circle"},
        {key: value for key, value in good.items() if key != "caption"},
        "{not json",
        {"video": good["video"]},
    ]
    prepared = prepare_dataset(
        _write_manifest(tmp_path, rows), "refine", text.token_count, latent_cache, TOY_LIMITS
    )
    assert len(prepared.examples) == 1
    reasons = {r.line: r.reason for r in prepared.rejections}
    assert sorted(reasons) == [2, 3, 4, 5, 6, 7, 8]
    assert "not found" in reasons[2]
    assert "unusable video" in reasons[3]
    assert "prompt is 16 tokens; 0-8 allowed" in reasons[4]
    assert "caption is 4 tokens; 24-32 allowed" in reasons[5]
    assert "needs a 'caption'" in reasons[6]
    assert "not valid JSON" in reasons[7]
    assert "'prompt' is missing" in reasons[8]
    assert "7 of 8 rows skipped" in prepared.report(tmp_path / "manifest.jsonl")
    # recall needs no caption: the caption rows are fine there.
    recall = prepare_dataset(
        tmp_path / "manifest.jsonl", "recall", text.token_count, latent_cache, TOY_LIMITS
    )
    assert len(recall.examples) == 3


def test_manifests_without_usable_rows_are_errors(tmp_path, cache):
    latent_cache, text = cache
    with pytest.raises(ManifestError, match="not found"):
        prepare_dataset(tmp_path / "absent.jsonl", "recall", text.token_count, latent_cache, TOY_LIMITS)
    empty = _write_manifest(tmp_path, [])
    with pytest.raises(ManifestError, match="no usable rows"):
        prepare_dataset(empty, "recall", text.token_count, latent_cache, TOY_LIMITS)
    only_bad = _write_manifest(tmp_path, [{"video": "missing.mp4", "prompt": "a red square"}])
    with pytest.raises(ManifestError, match="line 1: video file not found"):
        prepare_dataset(only_bad, "recall", text.token_count, latent_cache, TOY_LIMITS)


def test_latents_are_cached_once(manifest, cache):
    latent_cache, _ = cache
    video = manifest.parent / "videos" / "00000.mp4"
    [path] = latent_cache.ensure_all([video])
    stamp = path.stat().st_mtime_ns
    assert latent_cache.ensure_all([video]) == [path] and path.stat().st_mtime_ns == stamp


def test_batched_latents_equal_one_at_a_time(tmp_path, manifest, init_folder):
    """A batch of videos, one unreadable among them, caches what encoding each alone caches."""
    pipe = UniViGUPipeline.from_pretrained(init_folder)
    geometry = VideoGeometry(32, 32, 5, 8)
    videos = sorted((manifest.parent / "videos").iterdir())[:3]
    (tmp_path / "broken.mp4").write_bytes(b"not a video at all")
    batched = LatentCache(tmp_path / "batched", pipe.vae, geometry).ensure_all(
        [videos[0], tmp_path / "broken.mp4", *videos[1:]]
    )
    assert isinstance(batched[1], InvalidVideoError)
    for video, path in zip(videos, [batched[0], *batched[2:]], strict=True):
        [alone] = LatentCache(tmp_path / f"alone-{video.stem}", pipe.vae, geometry).ensure_all([video])
        for batch_tensor, alone_tensor in zip(load_posterior(path), load_posterior(alone), strict=True):
            torch.testing.assert_close(batch_tensor, alone_tensor, atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------- objective pieces


def test_paths_interpolate_between_data_and_noise():
    x0, noise = torch.randn(2, 4, 2, 4, 4), torch.randn(2, 4, 2, 4, 4)
    x_sigma, target = video_path(x0, noise, torch.tensor([0.0, 1.0]))
    assert torch.equal(x_sigma[0], x0[0]) and torch.equal(x_sigma[1], noise[1])
    assert torch.equal(target, noise - x0)
    clean, random_ids = torch.arange(8).repeat(2, 1), torch.full((2, 8), 99)
    keep = torch.linspace(0.05, 0.95, 8).repeat(2, 1)
    mixed = text_path(clean, random_ids, keep, torch.tensor([1.0, 0.5]))
    assert torch.equal(mixed[0], clean[0])
    assert mixed[1].tolist() == [0, 1, 2, 3, 99, 99, 99, 99]
    assert shifted_sigma(torch.tensor([0.0, 0.5, 1.0]), 3.0).tolist() == pytest.approx([0.0, 0.75, 1.0])


def test_example_kinds_and_condition_drops_follow_the_config():
    objective = ObjectiveConfig(clean_video_fraction=0.2, clean_text_fraction=0.3, uncond_prob=0.5)
    draws = [
        draw_example(example_generator(0, p), (1, 1, 1, 1), 4, 10, objective, "recall") for p in range(3000)
    ]
    kinds = Counter(d.kind for d in draws)
    assert kinds[CLEAN_VIDEO] / 3000 == pytest.approx(0.2, abs=0.03)
    assert kinds[CLEAN_TEXT] / 3000 == pytest.approx(0.3, abs=0.03)
    assert all(d.sigma == 0 for d in draws if d.kind == CLEAN_VIDEO)
    assert all(d.text_t == 1 and not d.drop_prompt for d in draws if d.kind == CLEAN_TEXT)
    noisy_text = [d for d in draws if d.kind != CLEAN_TEXT]
    assert sum(d.drop_prompt for d in noisy_text) / len(noisy_text) == pytest.approx(0.5, abs=0.04)
    assert not any(d.uncond for d in noisy_text)
    again = draw_example(example_generator(0, 17), (1, 1, 1, 1), 4, 10, objective, "recall")
    assert torch.equal(again.video_noise, draws[17].video_noise) and again.sigma == draws[17].sigma


def test_text_only_training_selects_the_text_branch():
    pipe = UniViGUPipeline.from_preset("tiny", seed=0)
    names = select_trainable(pipe.transformer, "text")
    assert {"vocab_embed.weight", "text_head.linear.weight", "scale_shift_table_t"} <= set(names)
    assert "blocks.0.ffn_t.net.2.weight" in names and "time_embedding_t.time_proj.weight" in names
    frozen = {n for n, p in pipe.transformer.named_parameters() if not p.requires_grad}
    assert {"patch_embedding.weight", "blocks.0.attn1.to_q.weight", "blocks.0.ffn.net.2.weight"} <= frozen
    assert not frozen & set(names)
