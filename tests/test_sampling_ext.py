"""Sampling extensions against a real local server: the queue-duration header, top-k prompt logprobs (checked
against the plain model), the deployment sampler, and a SamplingClient pickled into spawned processes.
"""

from __future__ import annotations

import asyncio
import multiprocessing
import pickle
from collections.abc import Callable
from typing import Any

import msgspec
import numpy as np
import pytest
from aiohttp import ClientSession
from client_fixtures import InFlight, SlowSampler, client, hf_model, run

from hpcai_async import (
    AdaptiveConcurrencyController,
    BadRequestError,
    ConfigurationError,
    FixedConcurrencyController,
    RetryConfig,
    SamplingClient,
    UnsupportedFeatureError,
    types,
)
from hpcai_async._tokenizer import load_tokenizer
from hpcai_async._wire import QUEUE_DURATION_MS
from hpcai_async.server import NULL_MODEL, LocalServer
from hpcai_async.server.engine_api import MAX_TOPK_PROMPT_LOGPROBS
from hpcai_async.server.models import BUILTIN_NAME

Factory = Callable[..., LocalServer]
PARAMS = {"max_tokens": 2, "seed": 1, "stop": None, "temperature": 1, "top_k": -1, "top_p": 1}
CONVERSATIONS = [
    [{"role": "user", "content": "What is 2+2?"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a color."}],
]


# ----------------------------------------------------------------------------------------- queue duration


async def _post(session: ClientSession, srv: LocalServer, path: str, body: Any, wait: float = 0.0) -> Any:
    headers = {"X-API-Key": srv.api_key, "Content-Type": "application/json"}
    if wait:
        headers["X-HpcAI-Async-Inline-Wait"] = str(wait)
    async with session.post(f"/api/v1/{path}", data=msgspec.json.encode(body), headers=headers) as resp:
        assert resp.status == 200, await resp.text()
        return msgspec.json.decode(await resp.read()), resp.headers.get(QUEUE_DURATION_MS)


def _sample_body() -> dict[str, Any]:
    return {"prompt": {"chunks": [{"tokens": [1, 2], "type": "encoded_text"}]}, "sampling_params": PARAMS,
            "num_samples": 1, "base_model": NULL_MODEL}  # fmt: skip


@pytest.mark.parametrize("dialect", ["local", "hosted"])
def test_results_say_how_long_the_sample_waited_in_the_queue(server_factory: Factory, dialect: str) -> None:
    """Two samples at once on an engine that runs one at a time for 0.2 s: the second waited ~0.2 s. The
    header comes with a poll's result, an inline result, a batch item and the synchronous route; the hosted
    dialect sends none."""
    engine = SlowSampler(0.2)
    srv = server_factory(engine=engine, dialect=dialect)
    srv.scheduler.max_batch_sequences = 1

    async def main() -> list[Any]:
        async with ClientSession(srv.url) as session:
            (first, _), (second, _) = await asyncio.gather(
                _post(session, srv, "asample", _sample_body()), _post(session, srv, "asample", _sample_body())
            )
            polls = [
                _post(session, srv, "retrieve_future", {"request_id": f["request_id"]})
                for f in (first, second)
            ]
            waits = [header for _, header in await asyncio.gather(*polls)]
            engine.delay = 0.0  # instant from here on, so that results fit in the inline wait
            inline, inline_wait = await _post(session, srv, "asample", _sample_body(), wait=0.05)
            assert (
                dialect == "hosted" or inline["result"]["type"] == "sample"
            )  # the hosted dialect holds none
            batch, _ = await _post(
                session, srv, "batch", {"requests": [{"path": "asample", "body": _sample_body()}]}, wait=0.05
            )
            _, direct = await _post(session, srv, "sample", _sample_body())
            return [*waits, inline_wait, batch["responses"][0].get("headers"), direct]

    first, second, inline, item, direct = run(main)
    if dialect == "hosted":
        assert [first, second, inline, item, direct] == [None] * 5
        return
    quick, queued = sorted([float(first), float(second)])
    assert 0.0 <= quick < 60.0 and 150.0 <= queued < 600.0  # the second waited for the first's 0.2 s
    assert 0.0 <= float(inline) < 60.0 and 0.0 <= float(direct) < 60.0
    assert float(item[QUEUE_DURATION_MS]) < 60.0


# ----------------------------------------------------------------------------------------- top-k logprobs


@pytest.fixture(scope="module")
def plain() -> Any:
    """The built-in model loaded by plain transformers (no engine)."""
    pytest.importorskip("torch")
    return hf_model()


def _direct_topk(plain: Any, ids: list[int], k: int) -> tuple[Any, Any, Any]:
    import torch

    with torch.no_grad():
        logprobs = torch.log_softmax(plain(torch.tensor([ids])).logits[0].float(), dim=-1)[:-1]
    values, top = logprobs.topk(k, dim=-1)
    return top.numpy(), values.numpy(), logprobs.gather(1, torch.tensor(ids[1:])[:, None])[:, 0].numpy()


def test_topk_prompt_logprobs_are_the_models_most_likely_tokens(server: Any, plain: Any) -> None:
    """Two prompts of different lengths sampled together (one left-padded batch), against the plain model."""
    prompts = [[5, 17, 3, 99, 42, 7, 11], [8, 64, 2]]

    async def main() -> list[types.SampleResponse]:
        async with client(server) as service:
            sampler = service.create_sampling_client(base_model=BUILTIN_NAME)
            params = types.SamplingParams(max_tokens=1)
            return await asyncio.gather(
                *(
                    sampler.sample_async(
                        types.ModelInput.from_ints(p), 1, params, True, topk_prompt_logprobs=5
                    )
                    for p in prompts
                )
            )

    for ids, response in zip(prompts, run(main), strict=True):
        topk = response.topk_prompt_logprobs
        assert topk is not None and len(topk) == len(ids) and topk[0] is None
        top, values, target = _direct_topk(plain, ids, 5)
        for pos, pairs in enumerate(topk[1:]):
            assert pairs is not None and [t for t, _ in pairs] == top[pos].tolist()
            np.testing.assert_allclose([v for _, v in pairs], values[pos], atol=1e-4)
        assert response.prompt_logprobs is not None
        np.testing.assert_allclose(
            np.asarray(response.prompt_logprobs[1:], dtype=np.float32), target, atol=1e-4
        )


def test_topk_prompt_logprobs_are_checked_and_need_the_feature(server_factory: Factory) -> None:
    local, hosted = server_factory(), server_factory(dialect="hosted")

    async def main() -> None:
        async with client(local) as service, client(hosted) as plain_service:
            sampler = service.create_sampling_client(base_model=NULL_MODEL)
            prompt, params = types.ModelInput.from_ints([1, 2, 3]), types.SamplingParams(max_tokens=1)
            assert (await sampler.sample_async(prompt, 1, params)).topk_prompt_logprobs is None
            for k in (-1, MAX_TOPK_PROMPT_LOGPROBS + 1):
                with pytest.raises(
                    BadRequestError, match=rf"topk_prompt_logprobs: must be in \[0, 20\].*got {k}"
                ):
                    await sampler.sample_async(prompt, 1, params, topk_prompt_logprobs=k)
            with pytest.raises(ConfigurationError, match="topk_prompt_logprobs must be an integer"):
                await sampler.sample_async(prompt, 1, params, topk_prompt_logprobs=2.0)  # type: ignore[arg-type]
            hosted_sampler = plain_service.create_sampling_client(base_model=NULL_MODEL)
            with pytest.raises(UnsupportedFeatureError, match="topk_prompt_logprobs"):
                await hosted_sampler.sample_async(prompt, 1, params, topk_prompt_logprobs=3)

    run(main)


# ----------------------------------------------------------------------------------------- deployment sampler


@pytest.fixture(scope="module")
def tokenizer() -> Any:
    return load_tokenizer(BUILTIN_NAME)  # the built-in tokenizer has a chat template


def test_the_deployment_sampler_returns_n_completions_per_conversation(server: Any, tokenizer: Any) -> None:
    """Each completion's tokens decode to its text, and its logprobs are the server's compute_logprobs of
    prompt + completion. Two asyncio.run calls with one controller, as Fireworks' guide samples each step."""
    counted = InFlight(server)
    controller = FixedConcurrencyController(2)
    with client(server) as service:
        sampler = service.create_deployment_sampler(
            base_model=BUILTIN_NAME, tokenizer=tokenizer, concurrency_controller=controller
        )
        # stop=[]: no stop at EOS (the tiny model mostly answers a chat with EOS at once), 8 tokens each
        options: dict[str, Any] = {"max_tokens": 8, "seed": 4, "stop": []}
        many = asyncio.run(sampler.sample_with_tokens(messages=CONVERSATIONS, n=3, **options))
        one = asyncio.run(sampler.sample_with_tokens(messages=CONVERSATIONS[0], n=2, **options))
        assert counted.submitted == 3 * 2 + 2 and counted.peak <= 2  # one request per sample, two at a time
        scorer = service.create_sampling_client(base_model=BUILTIN_NAME)
        scored = [scorer.compute_logprobs(types.ModelInput.from_ints(c.full_tokens)) for c in many]
        expected = [future.result(timeout=60) for future in scored]
    assert [c.prompt_index for c in many] == [0, 0, 0, 1, 1, 1] and [c.prompt_index for c in one] == [0, 0]
    assert [c.tokens for c in one] == [c.tokens for c in many[:2]]  # seed + i: the same samples again
    for c, lp in zip(many, expected, strict=True):
        conversation = CONVERSATIONS[c.prompt_index]
        text = tokenizer.apply_chat_template(conversation, tokenize=False, add_generation_prompt=True)
        assert c.prompt_tokens == tokenizer.encode(text, add_special_tokens=False)
        assert c.completion_len == 8 and c.finish_reason == "length"
        assert tokenizer.decode(c.tokens, skip_special_tokens=True) == c.text
        assert c.full_tokens == c.prompt_tokens + c.tokens and c.prompt_len == len(c.prompt_tokens)
        np.testing.assert_allclose(c.logprobs, lp[-c.completion_len :], atol=1e-4)
    assert len({tuple(c.tokens) for c in many[:3]}) > 1  # three different samples of one conversation


def test_the_deployment_sampler_explains_bad_messages_and_a_missing_chat_template(null_server: Any) -> None:
    templateless = load_tokenizer(BUILTIN_NAME)
    templateless.chat_template = None
    with client(null_server) as service:
        sampler = service.create_deployment_sampler(base_model=NULL_MODEL, tokenizer=templateless)
        for bad in ("hello", [], [[]], [{"role": "user", "content": "hi"}, "oops"]):
            with pytest.raises(ConfigurationError, match="is not a conversation"):
                asyncio.run(sampler.sample_with_tokens(messages=bad))  # type: ignore[arg-type]
        with pytest.raises(ConfigurationError, match=r"(?s)apply_chat_template failed.*chat_template"):
            asyncio.run(sampler.sample_with_tokens(messages=CONVERSATIONS[0]))
        with pytest.raises(ConfigurationError, match="needs a tokenizer"):
            service.create_deployment_sampler("hpcai://run/sampler_weights/x")


# ----------------------------------------------------------------------------------------- pickling


def _sample_in_worker(args: tuple[SamplingClient, int]) -> tuple[list[list[int]], dict[str, Any]]:
    sampler, seed = args
    params = types.SamplingParams(max_tokens=6, seed=seed)
    response = sampler.sample(types.ModelInput.from_ints([3, 14, 15, 92]), 2, params).result(timeout=60)
    assert sampler.concurrency_controller is not None
    return [s.tokens for s in response.sequences], sampler.concurrency_controller.settings()


def test_a_pickled_sampling_client_reconnects_in_spawned_processes(server: Any) -> None:
    controller = AdaptiveConcurrencyController(initial_window=4, target_queue_latency=0.2)
    with client(server) as service:
        sampler = service.create_sampling_client(
            base_model=BUILTIN_NAME,
            retry_config=RetryConfig(progress_timeout=60),
            concurrency_controller=controller,
        )
        expected = [_sample_in_worker((sampler, seed))[0] for seed in (1, 2)]
        copy = pickle.loads(pickle.dumps(sampler))
        assert copy._transport is not sampler._transport and copy.retry_config == sampler.retry_config
        assert copy.concurrency_controller is not controller
        with multiprocessing.get_context("spawn").Pool(2) as pool:
            got = pool.map(_sample_in_worker, [(sampler, 1), (sampler, 2)])
    assert [tokens for tokens, _ in got] == expected
    assert all(settings == controller.settings() for _, settings in got)
