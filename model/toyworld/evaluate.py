"""``univigu toyworld eval MODEL``: how well a trained model knows the toy world, as a JSON report.

For fresh scenes of the seen colour+shape pairs and, separately, of the held-out ones:

* captioning: the clip's frames are captioned (no prompt, the model's default ``video_reuse``); shape,
  colour and motion parsed from the caption are compared with the ground truth, per attribute and all
  three;
* text-to-video: the video generated for the scene's prompt is read by the analytic detector and
  compared with what the prompt asked;
* joint: the generated description and the generated video are read and compared with each other
  (agreement), and the video with the prompt (adherence);
* reconstruction: the clip's VAE round trip (:meth:`UniViGUPipeline.reconstruct`) read by the detector
  and compared with the ground truth. A generated video is decoded by the same decoder, so this is the
  ceiling of text-to-video adherence: a low figure here blames the VAE, not the transformer.

With ``step_cache`` the videos of text-to-video and joint mode are generated with the first-block step
cache at that threshold (:mod:`model.step_cache`), which measures what the cache costs in adherence.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import TypeVar

from model.pipeline import UniViGUPipeline
from model.toyworld.describe import Attributes, parse_description
from model.toyworld.detector import detect
from model.toyworld.make import scenes
from model.toyworld.world import Scene, prompt_of, render

ATTRIBUTES = ("shape", "colour", "motion", "all")
T = TypeVar("T")


def _rates(results: list[dict[str, bool]]) -> dict[str, float]:
    return {name: round(sum(r[name] for r in results) / len(results), 4) for name in ATTRIBUTES}


def _caption(pipe: UniViGUPipeline, scene: Scene, seed: int) -> dict[str, bool]:
    text = pipe.caption(render(scene), seed=seed).text
    return parse_description(text).matches(Attributes.of(scene))


def _text_to_video(
    pipe: UniViGUPipeline, scene: Scene, seed: int, step_cache: float | None = None
) -> dict[str, bool]:
    frames = pipe.generate(prompt_of(scene), seed=seed, step_cache=step_cache).frames
    return detect(frames).matches(Attributes.of(scene))


def _joint(
    pipe: UniViGUPipeline, scene: Scene, seed: int, step_cache: float | None = None
) -> tuple[dict[str, bool], dict[str, bool]]:
    result = pipe.joint(prompt_of(scene), seed=seed, step_cache=step_cache)
    shown = detect(result.frames)
    return parse_description(result.text).matches(shown), shown.matches(Attributes.of(scene))


def _reconstruction(pipe: UniViGUPipeline, scene: Scene, seed: int) -> dict[str, bool]:
    return detect(pipe.reconstruct(render(scene), seed=seed)).matches(Attributes.of(scene))


def _per_scene(
    mode: Callable[[UniViGUPipeline, Scene, int], T], pipe: UniViGUPipeline, test: list[Scene], seed: int
) -> list[T]:
    """``mode`` on every scene of ``test``, the i-th with seed ``seed + i``."""
    return [mode(pipe, scene, seed + i) for i, scene in enumerate(test)]


def evaluate_model(model: Path, *, n: int = 60, seed: int = 1234, step_cache: float | None = None) -> dict:
    """The report for the pipeline folder ``model`` on ``n`` fresh scenes per split and mode."""
    pipe = UniViGUPipeline.from_pretrained(model)
    d = pipe.defaults
    sampling = {"steps": d.steps, "guidance_scale": d.guidance_scale, "video_reuse": d.video_reuse}
    report: dict = {
        "model": str(model),
        "clips_per_split": n,
        "seed": seed,
        "sampling": sampling if step_cache is None else {**sampling, "step_cache": step_cache},
    }
    text_to_video = partial(_text_to_video, step_cache=step_cache)
    joint_mode = partial(_joint, step_cache=step_cache)
    for split, held_out in (("seen", False), ("held_out", True)):
        test = scenes(n, held_out=held_out, seed=seed + int(held_out))
        joint = _per_scene(joint_mode, pipe, test, seed)
        report[split] = {
            "captioning": _rates(_per_scene(_caption, pipe, test, seed)),
            "text_to_video": _rates(_per_scene(text_to_video, pipe, test, seed)),
            "joint_agreement": _rates([agreement for agreement, _ in joint]),
            "joint_video_adherence": _rates([adherence for _, adherence in joint]),
            "reconstruction": _rates(_per_scene(_reconstruction, pipe, test, seed)),
        }
    return report
