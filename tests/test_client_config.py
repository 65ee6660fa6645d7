"""Configuration (environment vs arguments, the missing-key error) and the exact wire format of requests.

The wire is observed through the recording proxy in front of a real local server: no mocks.
"""

from __future__ import annotations

import json
import re

import msgspec
import pytest
from client_fixtures import PLAIN_CAPABILITIES, HasURL, client, run, small_batch
from fault_proxy import FaultProxy

import hpcai_async
from hpcai_async import ConfigurationError, ServiceClient, types

NULL_MODEL = "null/instant"


def test_missing_api_key_is_a_configuration_error_before_any_request(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("HPCAI_API_KEY", raising=False)
    monkeypatch.setenv(
        "HPCAI_BASE_URL", "http://127.0.0.1:9"
    )  # nothing listens: a request would fail otherwise
    with pytest.raises(ConfigurationError, match="HPCAI_API_KEY"):
        ServiceClient()
    with pytest.raises(ValueError, match="api_key"):  # a ConfigurationError is a ValueError
        ServiceClient(api_key="")


def test_default_base_url_and_bad_arguments(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("HPCAI_BASE_URL", raising=False)
    assert ServiceClient(api_key="k").base_url == "https://www.hpc-ai.com/finetunesdk/"
    with pytest.raises(ConfigurationError, match="http"):
        ServiceClient(base_url="ftp://example.com", api_key="k")
    with pytest.raises(ConfigurationError, match="connection_limit"):
        ServiceClient(api_key="k", connection_limit=0)


def test_environment_is_used_and_an_argument_wins(
    null_server: HasURL, monkeypatch: pytest.MonkeyPatch
) -> None:
    with FaultProxy(null_server.url) as from_env, FaultProxy(null_server.url) as from_arg:
        monkeypatch.setenv("HPCAI_BASE_URL", from_env.url)
        monkeypatch.setenv("HPCAI_API_KEY", null_server.api_key)
        with ServiceClient() as service:
            assert service.get_server_capabilities().supported_models
        assert from_env.requests[0].headers["x-api-key"] == null_server.api_key

        monkeypatch.setenv("HPCAI_API_KEY", "the-environment-key")
        with ServiceClient(base_url=from_arg.url, api_key=null_server.api_key) as service:
            assert service.get_server_capabilities().supported_models
        assert len(from_env.requests) == 1  # the argument's URL was used ...
        assert from_arg.requests[0].headers["x-api-key"] == null_server.api_key  # ... and the argument's key


def _keys(proxy: FaultProxy, endpoint: str) -> list[str]:
    return [r.headers["x-idempotency-key"] for r in proxy.find(endpoint)]


def test_headers_and_bodies_match_the_official_client(null_server: HasURL) -> None:
    """Against a server that advertises no extension, requests carry exactly what the official SDK sends."""
    with FaultProxy(null_server.url) as proxy:
        proxy.inject("get_server_capabilities", "status", status=200, body=PLAIN_CAPABILITIES, times=10)

        async def main() -> None:
            async with client(null_server, base_url=proxy.url) as service:
                tc = await service.create_lora_training_client_async(NULL_MODEL, rank=4)
                await (await tc.forward_backward_async(small_batch(2), "cross_entropy"))
                await (await tc.optim_step_async(types.AdamParams(learning_rate=1e-3)))
                await (await tc.forward_async(small_batch(1)))
                sampler = service.create_sampling_client(base_model=NULL_MODEL)
                prompt = types.ModelInput.from_ints([1, 2, 3])
                params = types.SamplingParams(max_tokens=2, stop="\n")
                await sampler.sample_async(prompt, 1, params)
                await sampler.sample_async(prompt, 2, params)
                await service.create_rest_client().list_training_runs_async(limit=5)

        run(main)

    for req in proxy.requests:
        assert req.headers["x-api-key"] == null_server.api_key
        assert req.headers["user-agent"] == f"hpcai_async/{hpcai_async.__version__}"
        assert req.headers["accept"] == "application/json"
        if req.method == "POST":
            assert req.headers["content-type"] == "application/json"
            assert req.headers["x-idempotency-key"]
        else:
            assert "x-idempotency-key" not in req.headers

    (create,) = proxy.find("create_model")
    assert json.loads(create.body) == {
        "base_model": NULL_MODEL,
        "lora_config": {
            "rank": 4,
            "seed": None,
            "train_unembed": False,
            "train_mlp": False,
            "train_attn": True,
        },
        "type": "create_model",
    }

    # training: {session}:{client}:{n}, n counting from 0 in call order; no seq_id, nothing extra
    training = [r for r in proxy.requests if r.endpoint in ("forward_backward", "optim_step", "forward")]
    keys = [r.headers["x-idempotency-key"] for r in training]
    session = keys[0].split(":")[0]
    assert re.fullmatch(r"[0-9a-f-]{36}", session)
    assert keys == [f"{session}:0:0", f"{session}:0:1", f"{session}:0:2"]
    fb, opt, fwd = (json.loads(r.body) for r in training)
    assert set(fb) == {"forward_backward_input", "model_id"}
    assert set(fb["forward_backward_input"]) == {"data", "loss_fn"}
    assert fb["forward_backward_input"]["data"][0]["loss_fn_inputs"]["weights"] == {
        "data": [1.0] * 5,
        "dtype": "float32",
        "shape": [5],
    }
    assert opt == {
        "adam_params": {"learning_rate": 1e-3, "beta1": 0.9, "beta2": 0.95, "eps": 1e-12},
        "model_id": fb["model_id"],
    }
    assert set(fwd) == {"forward_input", "model_id"}

    # sampling: {session}:unordered:{n} from 1, the backpressure header, all six params, stop as a list
    samples = proxy.find("asample")
    assert _keys(proxy, "asample") == [f"{session}:unordered:1", f"{session}:unordered:2"]
    for req in samples:
        assert req.headers["x-hpcai-sampling-backpressure"] == "1"
    body = json.loads(samples[0].body)
    assert set(body) == {"prompt", "sampling_params", "num_samples", "base_model", "prompt_logprobs"}
    assert body["sampling_params"] == {
        "max_tokens": 2,
        "seed": None,
        "stop": ["\n"],
        "temperature": 1.0,
        "top_k": -1,
        "top_p": 1.0,
    }
    assert body["prompt_logprobs"] is False
    assert body["prompt"] == {"chunks": [{"type": "encoded_text", "tokens": [1, 2, 3]}]}

    # polling: request type and iteration headers; model_id only for training futures
    polls = proxy.find("retrieve_future")
    kinds = {r.headers["x-hpcai-request-type"] for r in polls}
    assert {"CreateModel", "ForwardBackward", "OptimStep", "Forward", "Sample"} <= kinds
    assert all(r.headers["x-hpcai-request-iteration"].isdigit() for r in polls)
    for req in polls:
        poll = json.loads(req.body)
        if req.headers["x-hpcai-request-type"] in ("CreateModel", "Sample"):
            assert set(poll) == {"request_id"}
        else:
            assert set(poll) == {"request_id", "model_id"}
    first_polls = [r for r in polls if r.headers["x-hpcai-request-iteration"] == "0"]
    assert all("x-hpcai-create-promise-roundtrip-time" in r.headers for r in first_polls)

    (runs,) = proxy.find("training_runs")
    assert runs.method == "GET" and runs.path.endswith("training_runs?limit=5&offset=0")


def test_extensions_are_used_only_when_advertised(null_server: HasURL) -> None:
    """The local server advertises seq_id (and more): then each training request carries seq_id = n + 1."""
    with FaultProxy(null_server.url) as proxy:

        async def main() -> list[str]:
            async with client(null_server, base_url=proxy.url) as service:
                features = (await service.get_server_capabilities_async()).features
                tc = await service.create_lora_training_client_async(NULL_MODEL, rank=4)
                await (await tc.forward_backward_async(small_batch(1)))
                await (await tc.optim_step_async(types.AdamParams()))
                await tc.get_info_async()
                return features

        features = run(main)
    assert "seq_id" in features
    bodies = []
    for req in proxy.requests:
        if req.endpoint in ("forward_backward", "optim_step", "get_info"):
            if req.headers["content-type"] == "application/msgpack":
                bodies.append(msgspec.msgpack.decode(req.body))
            else:
                bodies.append(json.loads(req.body))
            if "msgpack" not in features:
                assert req.headers["content-type"] == "application/json"
    assert [b["seq_id"] for b in bodies] == [1, 2, 3]
    assert len(proxy.find("get_server_capabilities")) == 1  # fetched once per ServiceClient
