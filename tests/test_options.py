"""One declaration of the request options (``model.limits.OPTIONS``), and every place that lists them
agrees with it: the pipeline's signatures, the API's request schemas, the Python client and both
command lines."""

from __future__ import annotations

import inspect
import typing
from typing import Any

import pytest

from model.limits import MODE_OPTIONS, OPTIONS, Mode
from model.pipeline import UniViGUPipeline
from service.cli.main import build_parser
from service.client import Client
from service.contract.schemas import PARAMS_BY_TYPE, WEBHOOK_FIELD, JobType, build_request_models
from service.contract.settings import Settings

MODES: tuple[Mode, ...] = ("generate", "joint", "caption")
INPUT = {"generate": "prompt", "joint": "prompt", "caption": "video"}
NOT_OPTIONS = {"self", "progress", "should_cancel", "idempotency_key", "webhook", "path"}


def keyword_options(function: Any) -> dict[str, Any]:
    """The keyword options of ``function`` with their annotations (its input and callbacks left out)."""
    hints = typing.get_type_hints(function)
    return {
        name: hints[name]
        for name, parameter in inspect.signature(function).parameters.items()
        if parameter.kind == inspect.Parameter.KEYWORD_ONLY and name not in NOT_OPTIONS
    }


def declared(mode: Mode) -> dict[str, Any]:
    return {name: OPTIONS[name].type | None for name in MODE_OPTIONS[mode]}


@pytest.mark.parametrize("mode", MODES)
def test_the_pipeline_takes_the_declared_options(mode: Mode) -> None:
    assert keyword_options(getattr(UniViGUPipeline, mode)) == declared(mode)


@pytest.mark.parametrize("mode", MODES)
def test_the_client_takes_the_declared_options(mode: Mode) -> None:
    assert keyword_options(getattr(Client, mode)) == declared(mode)


@pytest.mark.parametrize("mode", MODES)
def test_the_api_schemas_take_the_declared_options(mode: Mode) -> None:
    models = build_request_models(Settings())
    params, request = PARAMS_BY_TYPE[JobType(mode)], getattr(models, mode)
    assert WEBHOOK_FIELD in request.model_fields and WEBHOOK_FIELD not in params.model_fields
    for schema in (params, request):
        fields = {name: field for name, field in schema.model_fields.items() if name != WEBHOOK_FIELD}
        if mode != "caption":
            assert fields.pop(INPUT[mode]).annotation is str
        assert {name: field.annotation for name, field in fields.items()} == declared(mode), schema


@pytest.mark.parametrize("command", ["submit", None])
@pytest.mark.parametrize("mode", MODES)
def test_both_command_lines_take_the_declared_options(command: str | None, mode: Mode) -> None:
    """Every option's flag parses to its declared type, in `univigu MODE` and `univigu submit MODE`."""
    samples = {int: "5", float: "0.5", str: "words"}
    argv = [*([command] if command else []), mode, "input"]
    for name in MODE_OPTIONS[mode]:
        argv += [OPTIONS[name].flag, samples[OPTIONS[name].type]]
    args = build_parser().parse_args(argv)
    for name in MODE_OPTIONS[mode]:
        assert getattr(args, name) == OPTIONS[name].type(samples[OPTIONS[name].type]), name
