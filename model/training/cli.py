"""``univigu train`` and ``univigu toyworld make | train | refine-decoder | eval``.

Registered into the ``univigu`` command by :func:`model.cli.register`; torch is imported only inside
the handlers. Multi-GPU: launch the same command under ``torchrun --nproc_per_node N -m model.cli
train ...``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def register_training(subparsers: argparse._SubParsersAction) -> None:
    """Add ``train`` and ``toyworld`` to the ``univigu`` command."""
    train = subparsers.add_parser("train", help="train one stage (recall or refine) from a manifest")
    train.add_argument("--stage", required=True, choices=["recall", "refine"])
    train.add_argument(
        "--data", required=True, type=Path, help='JSONL manifest of {"video", "prompt", "caption"}'
    )
    train.add_argument(
        "--init", required=True, help="a Wan2.1 folder, a Uni-ViGU folder (univigu.json) or a preset name"
    )
    train.add_argument("--out", required=True, type=Path, help="run folder (checkpoints, log, final/)")
    train.add_argument(
        "--config", type=Path, help="TOML training config (defaults: model/training/config.py)"
    )
    train.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in --out")
    train.add_argument("--stop-after", type=int, help="stop after this step (with a checkpoint)")
    train.add_argument("--device", help="torch device (default: cuda:LOCAL_RANK when available, else cpu)")
    train.set_defaults(handler=_run_train)

    toyworld = subparsers.add_parser("toyworld", help="the synthetic toy world: data, recipe, evaluation")
    commands = toyworld.add_subparsers(dest="toyworld_command", required=True)
    make = commands.add_parser("make", help="render toy clips and write a manifest")
    make.add_argument("--n", type=int, required=True, help="number of clips")
    make.add_argument("--out", type=Path, required=True)
    make.add_argument("--held-out", action="store_true", help="only the held-out colour+shape pairs")
    make.add_argument("--seed", type=int, default=0)
    make.set_defaults(handler=_run_make)

    recipe = commands.add_parser("train", help="the whole toy recipe: data, VAE, recall, refine, polish")
    recipe.add_argument("--out", type=Path, default=Path("runs/toy"), help="work folder (default runs/toy)")
    recipe.add_argument("--config", type=Path, help="TOML recipe config (defaults: model/toyworld/recipe.py)")
    recipe.add_argument("--ship", type=Path, help="also copy the trained model here (e.g. model/assets/toy)")
    recipe.set_defaults(handler=_run_recipe)

    decoder = commands.add_parser(
        "refine-decoder",
        help="train the VAE decoder of a trained model further (in place; the encoder does not change)",
    )
    decoder.add_argument("model", type=Path, help="a Uni-ViGU pipeline folder; its vae/ is rewritten")
    decoder.add_argument("--data", type=Path, required=True, help="the toy manifest to reconstruct")
    decoder.add_argument("--config", type=Path, help="TOML recipe config; its [vae] decoder_* fields apply")
    decoder.set_defaults(handler=_run_refine_decoder)

    evaluate = commands.add_parser("eval", help="captioning, text-to-video and joint accuracy as JSON")
    evaluate.add_argument("model", type=Path, help="a Uni-ViGU pipeline folder")
    evaluate.add_argument("--n", type=int, default=60, help="clips per split and mode (default 60)")
    evaluate.add_argument("--seed", type=int, default=1234)
    evaluate.add_argument(
        "--step-cache",
        type=float,
        metavar="THRESHOLD",
        help="generate text-to-video and joint videos with the first-block step cache (default: off)",
    )
    evaluate.add_argument("--out", type=Path, help="JSON path (default: print to stdout)")
    evaluate.set_defaults(handler=_run_eval)


def _run_train(args: argparse.Namespace) -> None:
    from model.training.config import TrainConfig
    from model.training.trainer import TrainRequest, train

    config = TrainConfig.from_toml(args.config) if args.config else TrainConfig()
    result = train(
        TrainRequest(
            stage=args.stage,
            manifest=args.data,
            init=args.init,
            out=args.out,
            config=config,
            resume=args.resume,
            stop_after=args.stop_after,
            device=args.device,
        )
    )
    if result.final is not None:
        print(result.final)


def _run_make(args: argparse.Namespace) -> None:
    from model.toyworld.make import make_dataset

    print(make_dataset(args.n, args.out, held_out=args.held_out, seed=args.seed))


def _run_recipe(args: argparse.Namespace) -> None:
    from model.toyworld.recipe import RecipeConfig, run_recipe

    config = RecipeConfig.from_toml(args.config) if args.config else RecipeConfig()
    print(run_recipe(config, args.out, ship=args.ship))


def _run_refine_decoder(args: argparse.Namespace) -> None:
    from model.toyworld.recipe import RecipeConfig, refine_model_decoder

    config = RecipeConfig.from_toml(args.config) if args.config else RecipeConfig()
    print(refine_model_decoder(args.model, args.data, config.vae))


def _run_eval(args: argparse.Namespace) -> None:
    from model.toyworld.evaluate import evaluate_model

    report = evaluate_model(args.model, n=args.n, seed=args.seed, step_cache=args.step_cache)
    text = json.dumps(report, indent=2)
    if args.out is None:
        print(text)
    else:
        args.out.write_text(text + "\n")
        print(args.out)
