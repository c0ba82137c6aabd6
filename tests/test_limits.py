"""One rule set for every limit (``model.limits``): the rules themselves, the served model's token limits
checked at submit exactly as its pipeline counts them, and a queue limit that holds under a flood of
concurrent submits."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest
from conftest import REPO, assert_envelope
from fastapi.testclient import TestClient
from redis import Redis

from model.errors import InvalidParameterError, PromptTooLongError
from model.limits import RULES, ModelCaps, hard_limits, model_limits
from service.contract.settings import Settings
from service.gateway.app import create_app

TOY = REPO / "model" / "assets" / "toy"


# --- the rules ---------------------------------------------------------------------------------------


def test_a_narrowed_rule_keeps_its_form() -> None:
    """An operator's cap that is no value of the rule's form becomes the nearest one inside it."""
    frames = RULES["num_frames"].narrowed(minimum=2, maximum=130)
    assert (frames.minimum, frames.maximum) == (5, 129)
    side = RULES["height"].narrowed(minimum=20, maximum=1000)
    assert (side.minimum, side.maximum) == (32, 992)
    assert RULES["steps"].narrowed(maximum=5000) == RULES["steps"]  # a wider cap changes nothing
    with pytest.raises(InvalidParameterError, match="no value of num_frames"):
        RULES["num_frames"].narrowed(minimum=2, maximum=4)


@pytest.mark.parametrize(
    ("name", "value", "said"),
    [
        (
            "num_frames",
            20,
            "num_frames must be of the form 4k+1 (1, 5, 9, ...) between 1 and 161, got 20; "
            "the nearest allowed value is 21",
        ),
        ("height", 250, "height must be a multiple of 16 between 16 and 1920, got 250"),
        ("seed", -1, "seed must be between 0 and 9223372036854775807, got -1"),
        ("guidance_scale", 21.0, "guidance_scale must be between 0.0 and 20.0, got 21.0"),
    ],
)
def test_a_refusal_names_the_parameter_the_value_and_what_is_allowed(
    name: str, value: float, said: str
) -> None:
    with pytest.raises(InvalidParameterError) as refused:
        RULES[name].check(value)
    assert refused.value.message == said and refused.value.param == name


def test_a_model_narrows_its_texts_and_caption_length() -> None:
    caps = ModelCaps(max_prompt_tokens=24, context_tokens=32, max_caption_tokens=48)
    generate, joint = model_limits("generate", caps), model_limits("joint", caps)
    # generate holds its prompt in the text stream (24) as well as encoding it (32); joint only encodes it.
    assert generate.texts["prompt"].max_tokens == 24 and joint.texts["prompt"].max_tokens == 32
    assert joint.texts["negative_prompt"].max_tokens == 32
    assert joint.rules["max_tokens"].maximum == 48 and "max_tokens" not in generate.rules
    assert model_limits("caption", caps).to_json()["prompt"] == {"max_tokens": 32, "max_chars": None}


def test_settings_cap_the_hard_limits() -> None:
    capped = Settings(max_size=1000, max_frames=130, max_steps=40, max_prompt_chars=50).cap(
        hard_limits("generate")
    )
    assert capped.rules["width"].maximum == 992 and capped.rules["num_frames"].maximum == 129
    assert capped.rules["steps"].maximum == 40 and capped.texts["prompt"].max_chars == 50
    assert capped.rules["seed"] == hard_limits("generate").rules["seed"]


# --- prompt tokens at submit, as the served pipeline counts them ---------------------------------------


@pytest.fixture(scope="module")
def toy_pipeline():  # type: ignore[no-untyped-def]
    from model.pipeline import UniViGUPipeline

    return UniViGUPipeline.from_pretrained(TOY)


def words_of_tokens(pipe, tokens: int) -> str:  # type: ignore[no-untyped-def]
    """A prompt of exactly ``tokens`` tokens of ``pipe``'s tokenizer, the end token counted."""
    prompt = " ".join(["red"] * (tokens - 1))
    assert pipe.text.token_count(prompt) == tokens
    return prompt


def test_a_prompt_over_the_served_models_tokens_is_a_422_before_it_is_queued(
    toy_pipeline, settings: Settings, client: TestClient
) -> None:
    """The shipped toy model takes 16 prompt tokens: 16 are queued, 17 answer 422 prompt_too_long, and the
    pipeline agrees on both. The model is published by the worker's own code."""
    from worker.loading import cap_limits, describe_model, served_tokenizer

    cap_limits(toy_pipeline, settings)
    tokenizer = served_tokenizer(toy_pipeline)
    services = client.app.state.services  # type: ignore[attr-defined]
    longest = toy_pipeline.limits["generate"].texts["prompt"].max_tokens
    assert longest == 16
    fits, too_long = words_of_tokens(toy_pipeline, longest), words_of_tokens(toy_pipeline, longest + 1)

    # Before any worker has published, only characters are counted: the over-long prompt is queued.
    assert client.post("/generate", json={"prompt": too_long}).status_code == 202

    services.store.publish_model(describe_model(toy_pipeline, tokenizer=tokenizer), tokenizer)
    depth = services.queue.depth()
    assert client.post("/generate", json={"prompt": fits}).status_code == 202
    for path, body in (
        ("/generate", {"prompt": too_long}),
        ("/joint", {"prompt": too_long}),
        ("/generate", {"prompt": fits, "negative_prompt": too_long}),
    ):
        param = "negative_prompt" if "negative_prompt" in body else "prompt"
        error = assert_envelope(client.post(path, json=body), 422, "prompt_too_long", param)
        assert f"{param} is 17 tokens long; at most 16 tokens" in error["message"]
    assert services.queue.depth() == depth + 1

    # The pipeline counts the same: the 16-token prompt runs, the 17-token one is refused alike.
    toy_pipeline.generate(fits, steps=1, seed=0, num_frames=1)
    with pytest.raises(PromptTooLongError, match="prompt is 17 tokens long; at most 16 tokens"):
        toy_pipeline.generate(too_long, steps=1, seed=0)


def test_a_caption_length_over_the_served_models_is_a_422(
    toy_pipeline, settings: Settings, client: TestClient
) -> None:
    from worker.loading import describe_model

    client.app.state.services.store.publish_model(describe_model(toy_pipeline))  # type: ignore[attr-defined]
    error = assert_envelope(
        client.post("/joint", json={"prompt": "a red ball", "max_tokens": 33}),
        422,
        "invalid_parameter",
        "max_tokens",
    )
    assert error["message"] == "max_tokens must be between 1 and 32, got 33"
    model = client.get("/model").json()
    assert model["limits"]["joint"]["max_tokens"]["maximum"] == 32
    # No tokenizer published: characters only, so a long prompt is queued (the worker refuses it later).
    assert client.post("/generate", json={"prompt": "red " * 30}).status_code == 202


# --- the queue limit under concurrency -----------------------------------------------------------------

FLOOD = 300
QUEUE_LIMIT = 100


@pytest.fixture
def flood_settings(settings_factory: Callable[..., Settings]) -> Settings:
    return settings_factory(max_queue_length=QUEUE_LIMIT)


def test_a_flood_of_concurrent_submits_never_overfills_the_queue(
    flood_settings: Settings, tmp_path: Path
) -> None:
    """300 submits at once through the ASGI app (its thread pool runs them concurrently against Redis), no
    worker consuming: exactly the limit is queued, the rest answer 503 queue_full, and the queue's length,
    sampled throughout, never exceeds the limit."""
    app = create_app(flood_settings)
    queue = app.state.services.queue
    redis = Redis.from_url(flood_settings.redis_url)
    deepest = [0]
    flooding = threading.Event()
    flooding.set()

    def sample() -> None:
        while flooding.is_set():
            deepest[0] = max(deepest[0], int(redis.llen(queue.key)))

    sampler = threading.Thread(target=sample)
    sampler.start()

    async def flood() -> list[httpx.Response]:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://gateway") as http:
            return await asyncio.gather(
                *(http.post("/generate", json={"prompt": f"a red ball {n}"}) for n in range(FLOOD))
            )

    try:
        answers = asyncio.run(flood())
    finally:
        flooding.clear()
        sampler.join()
    statuses = [answer.status_code for answer in answers]
    assert statuses.count(202) == QUEUE_LIMIT, sorted(set(statuses))
    assert statuses.count(503) == FLOOD - QUEUE_LIMIT
    for answer in answers:
        if answer.status_code == 503:
            assert answer.json()["error"]["code"] == "queue_full" and answer.headers["Retry-After"]
    assert queue.depth() == QUEUE_LIMIT and deepest[0] <= QUEUE_LIMIT
    app.state.services.store.redis.close()
    redis.close()
