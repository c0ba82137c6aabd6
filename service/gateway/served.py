"""The served model's limits as this gateway enforces and shows them.

A worker publishes what its pipeline accepts (``ServedModel.limits``, from ``model.limits``) and its
``tokenizer.json``; the gateway narrows those limits by its own settings (:meth:`Settings.cap`) and checks
every submit against them, prompts counted in the served tokenizer's tokens exactly as the pipeline counts
them, so an over-long prompt is a 422 before anything is queued. ``GET /model``, the OpenAPI schema and the
web page show the same limits. Before any worker has published, the hard bounds within the settings apply
and prompts are checked in characters only.
"""

from __future__ import annotations

import copy
import hashlib
import threading
from collections.abc import Callable
from typing import Any

from tokenizers import Tokenizer

from model.limits import MODES, Limits, Mode, hard_limits
from service.contract.schemas import JobType, ServedModel
from service.contract.settings import Settings
from service.contract.store import JobStore

CountTokens = Callable[[str], int]


class ServedLimits:
    def __init__(self, store: JobStore, settings: Settings) -> None:
        self.store = store
        self.settings = settings
        self._lock = threading.Lock()
        self._tokenizer: tuple[str, CountTokens] | None = None  # (sha256 of tokenizer.json, its counter)

    def limits(self, model: ServedModel | None, mode: Mode) -> Limits:
        """What ``mode`` accepts here: the served model's limits (the hard ones before any worker has
        published) within this gateway's settings."""
        return self.settings.cap(hard_limits(mode) if model is None else model.mode_limits(mode))

    def check(self, job_type: JobType, params: dict[str, Any]) -> None:
        """InvalidParameterError (PromptTooLongError for a text) unless ``params`` fit the served model."""
        model = self.store.served_model()
        mode: Mode = job_type.value  # type: ignore[assignment]  # the job types are the modes
        self.limits(model, mode).check(params, self.count_tokens(model))

    def count_tokens(self, model: ServedModel | None) -> CountTokens | None:
        """Counts tokens as the served pipeline does (the end token included); None while the served
        tokenizer is unknown."""
        digest = None if model is None else model.tokenizer_sha256
        if digest is None:
            return None
        with self._lock:
            if self._tokenizer is None or self._tokenizer[0] != digest:
                raw = self.store.served_tokenizer()
                if raw is None or hashlib.sha256(raw.encode()).hexdigest() != digest:
                    return None  # a worker is publishing another model right now
                tokenizer = Tokenizer.from_str(raw)
                # The file keeps whatever padding the worker's last call set; a count needs none.
                tokenizer.no_padding()
                tokenizer.no_truncation()
                self._tokenizer = (digest, lambda text: len(tokenizer.encode(text).ids))
            return self._tokenizer[1]

    def shown(self, model: ServedModel) -> ServedModel:
        """``model`` as ``GET /model`` shows it: with the limits enforced here."""
        return model.model_copy(
            update={"limits": {mode: self.limits(model, mode).to_json() for mode in MODES}}
        )

    def openapi(self, schema: dict[str, Any]) -> dict[str, Any]:
        """``schema`` (the app's OpenAPI document) with the request bodies' ranges of the served model."""
        model = self.store.served_model()
        patched = copy.deepcopy(schema)
        components = patched.get("components", {}).get("schemas", {})
        caption = patched["paths"]["/caption"]["post"]["requestBody"]["content"]["multipart/form-data"]
        for mode, properties in (
            ("generate", components["GenerateRequest"]["properties"]),
            ("joint", components["JointRequest"]["properties"]),
            ("caption", caption["schema"]["properties"]),
        ):
            _show_limits(properties, self.limits(model, mode))  # type: ignore[arg-type]
        return patched


def _show_limits(properties: dict[str, Any], limits: Limits) -> None:
    for name, rule in limits.rules.items():
        shown = _value_schema(properties[name])
        shown["minimum"], shown["maximum"] = rule.minimum, rule.maximum
    for name, text in limits.texts.items():
        shown = _value_schema(properties[name])
        if text.max_chars is not None:
            shown["maxLength"] = text.max_chars
        if text.max_tokens is not None:
            shown["x-max-tokens"] = text.max_tokens
            said = properties[name].get("description", "").rstrip(".")
            properties[name]["description"] = (f"{said}. " if said else "") + (
                f"At most {text.max_tokens} tokens of the served model's tokenizer, the end token counted."
            )


def _value_schema(property_schema: dict[str, Any]) -> dict[str, Any]:
    """The non-null branch of an optional field's schema (the schema itself for a required one)."""
    for branch in property_schema.get("anyOf", []):
        if branch.get("type") != "null":
            return branch
    return property_schema
