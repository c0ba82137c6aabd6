"""``univigu generate | caption | joint``: run the pipeline locally, without any server.

Registered into the ``univigu`` console script by :func:`register`; torch is imported only when one of
these commands runs, so the gateway's commands stay torch-free.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from model.errors import UniViGUError
from model.limits import add_option_flags, option_values
from model.toyworld import default_model_source
from model.training.cli import register_training


def _add_model_options(parser: argparse.ArgumentParser) -> None:
    source = parser.add_argument_group(
        "model (at most one of --preset, --weights, --wan; none: the model `univigu up` serves by "
        "default, the shipped toy model, else the tiny preset)"
    )
    source.add_argument("--preset", help="a preset built in code, e.g. 'tiny' (random weights)")
    source.add_argument("--weights", type=Path, help="a Uni-ViGU folder in our format (univigu.json)")
    source.add_argument("--wan", type=Path, help="a Wan2.1-T2V-1.3B diffusers folder")
    source.add_argument("--checkpoint", type=Path, help="the released Uni-ViGU .pth (with --wan)")
    source.add_argument(
        "--null-prompt", type=Path, help="precomputed empty-prompt umT5 embedding (with --wan)"
    )
    parser.add_argument("--device", default="cpu", help="torch device: cpu, cuda, cuda:1 ... (default cpu)")
    parser.add_argument(
        "--attention-backend", help="diffusers attention backend: auto, native, flash, sage ..."
    )
    parser.add_argument("--sampler", default="euler", choices=["euler", "unipc"], help="video sampler")


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``generate``, ``caption`` and ``joint`` to the ``univigu`` command."""
    generate = subparsers.add_parser("generate", help="text-to-video, written as an MP4")
    generate.add_argument("prompt")
    add_option_flags(generate, "generate")
    _add_model_options(generate)
    generate.add_argument("--out", type=Path, default=Path("video.mp4"), help="MP4 path (default video.mp4)")
    generate.set_defaults(handler=_run_generate)

    caption = subparsers.add_parser("caption", help="caption a video file, written as JSON")
    caption.add_argument("video", type=Path)
    add_option_flags(caption, "caption")
    _add_model_options(caption)
    caption.add_argument("--out", type=Path, help="JSON path (default: print to stdout)")
    caption.set_defaults(handler=_run_caption)

    joint = subparsers.add_parser("joint", help="a video and its description together")
    joint.add_argument("prompt")
    add_option_flags(joint, "joint")
    _add_model_options(joint)
    joint.add_argument(
        "--out", type=Path, default=Path("joint.mp4"), help="MP4 path; the text goes beside it as .json"
    )
    joint.set_defaults(handler=_run_joint)
    register_training(subparsers)


def _model_source(args: argparse.Namespace) -> dict[str, Any]:
    """The model the command line names, or the default (:func:`model.toyworld.default_model_source`)."""
    given = {"preset": args.preset, "weights": args.weights, "wan": args.wan}
    if any(value is not None for value in given.values()) or args.checkpoint is not None:
        return given
    source, value = default_model_source()
    print(f"no model given; using {source} {value} (what `univigu up` serves)", file=sys.stderr)
    return {**given, source: value}


def _load(args: argparse.Namespace):  # -> UniViGUPipeline; torch is imported here
    from model.pipeline import UniViGUPipeline

    return UniViGUPipeline.load(
        **_model_source(args),
        checkpoint=args.checkpoint,
        null_prompt=args.null_prompt,
        device=args.device,
        attention_backend=args.attention_backend,
        video_sampler=args.sampler,
    )


def _progress_bar(description: str):
    """A ``progress(step, total)`` callback drawing a tqdm bar on stderr, created at the first step."""
    from tqdm import tqdm

    bars: list[tqdm] = []

    def update(step: int, total: int) -> None:
        if not bars:
            bars.append(tqdm(desc=description, total=total, unit="step", file=sys.stderr))
        bars[0].update(step - bars[0].n)
        if step == total:
            bars[0].close()

    return update


def _write_json(payload: dict[str, Any], out: Path | None) -> None:
    text = json.dumps(payload, indent=2)
    if out is None:
        print(text)
    else:
        out.write_text(text + "\n")
        print(out)


def _run_generate(args: argparse.Namespace) -> None:
    from model.media import write_mp4

    options = option_values(args, "generate")
    result = _load(args).generate(args.prompt, progress=_progress_bar("generate"), **options)
    print(write_mp4(result.frames, args.out, fps=result.fps))


def _run_caption(args: argparse.Namespace) -> None:
    options = option_values(args, "caption")
    result = _load(args).caption(args.video, progress=_progress_bar("caption"), **options)
    _write_json({"caption": result.text, "seed": result.seed, "tokens": result.tokens}, args.out)


def _run_joint(args: argparse.Namespace) -> None:
    from model.media import write_mp4

    options = option_values(args, "joint")
    result = _load(args).joint(args.prompt, progress=_progress_bar("joint"), **options)
    print(write_mp4(result.frames, args.out, fps=result.fps))
    _write_json(
        {"caption": result.text, "seed": result.seed, "tokens": result.tokens}, args.out.with_suffix(".json")
    )


def run(args: argparse.Namespace) -> int:
    """Run a parsed model command; a domain error becomes one line on stderr and exit status 2."""
    try:
        args.handler(args)
    except UniViGUError as error:
        print(f"error ({error.code}): {error}", file=sys.stderr)
        return 2
    return 0


def main(argv: list[str] | None = None) -> int:
    """``python -m model.cli ...``: the model commands alone, for installs without the server."""
    parser = argparse.ArgumentParser(prog="univigu", description=__doc__.splitlines()[0])
    register(parser.add_subparsers(dest="command", required=True))
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
