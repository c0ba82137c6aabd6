"""Command-line pieces shared by the benchmark scripts: common arguments and the common ``main``.

Each script builds its parser with :func:`new_parser`, adds its own arguments and the shared ones in
the order it wants them listed (:func:`add_shape_args`, :func:`add_run_args`, :func:`add_output_args`),
and its ``main`` is :func:`run_main`: parse, run, write the JSON, print a header line and the table.
Scripts that run the pipeline name their model with :func:`add_model_args` and load it with
:func:`load_pipeline`.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from benchmarks._timing import markdown_table, write_json

if TYPE_CHECKING:
    from model.pipeline import UniViGUPipeline

Result = dict[str, Any]


def new_parser(description: str | None) -> argparse.ArgumentParser:
    """A parser whose ``--help`` shows ``description`` (the script's docstring) as written."""
    return argparse.ArgumentParser(
        description=description, formatter_class=argparse.RawDescriptionHelpFormatter
    )


def add_shape_args(parser: argparse.ArgumentParser) -> None:
    """``--height``, ``--width``, ``--frames``, ``--steps``; unset (None) means the model's default."""
    for name in ("--height", "--width", "--frames", "--steps"):
        parser.add_argument(name, type=int, help="default: the model's")


def add_model_args(parser: argparse.ArgumentParser, *, default_preset: str) -> None:
    """One model source: ``--preset`` (default ``default_preset``), ``--weights`` or ``--wan`` (with
    ``--checkpoint``); and ``--device`` (default cpu)."""
    source = parser.add_mutually_exclusive_group()
    source.add_argument(
        "--preset", help=f"a preset built in code, random weights (default: {default_preset})"
    )
    source.add_argument(
        "--weights", help="a pipeline folder written by save_pretrained, e.g. model/assets/toy"
    )
    source.add_argument("--wan", help="a Wan2.1 diffusers folder (with --checkpoint, the released .pth)")
    parser.add_argument("--checkpoint", help="the Uni-ViGU .pth that goes with --wan")
    parser.add_argument("--device", default="cpu")
    parser.set_defaults(default_preset=default_preset)


def load_pipeline(args: argparse.Namespace) -> tuple[UniViGUPipeline, str]:
    """The pipeline that :func:`add_model_args`' arguments name, and its name for the result."""
    from model.pipeline import UniViGUPipeline

    preset = None if args.weights or args.wan else args.preset or args.default_preset
    pipe = UniViGUPipeline.load(
        preset=preset, weights=args.weights, wan=args.wan, checkpoint=args.checkpoint, device=args.device
    )
    return pipe, preset or args.weights or args.wan


def add_run_args(
    parser: argparse.ArgumentParser,
    *,
    repeats: int,
    repeats_help: str | None = None,
    warmup: bool = True,
    warmup_help: str | None = None,
) -> None:
    """``--repeats`` (default ``repeats``) and, with ``warmup``, ``--warmup`` (default 1)."""
    parser.add_argument("--repeats", type=int, default=repeats, help=repeats_help)
    if warmup:
        parser.add_argument("--warmup", type=int, default=1, help=warmup_help)


def add_output_args(parser: argparse.ArgumentParser) -> None:
    """``--seed`` (default 0) and ``--json`` (a path for the full result)."""
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", help="also write the full result here")


def run_main(
    parser: argparse.ArgumentParser,
    run: Callable[[argparse.Namespace], Result],
    header: Callable[[Result], str],
    table: dict[str, str],
    *,
    check: Callable[[argparse.Namespace], None] | None = None,
    argv: Sequence[str] | None = None,
) -> None:
    """Parse ``argv`` (default: the command line), ``check`` the arguments, run; write the result to
    ``--json`` if given, print ``header(result)`` and the Markdown table of ``result["rows"]``."""
    args = parser.parse_args(argv)
    if check is not None:
        check(args)
    result = run(args)
    write_json(result, args.json)
    print(header(result))
    print(markdown_table(result["rows"], table))
