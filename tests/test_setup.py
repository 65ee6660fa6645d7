"""The one-call set-up: ``ServiceClient.from_config`` creates a run or reconnects to one after a restart, and
``cleanup_on_close`` says what ``close()`` releases. Against a LocalServer with the real engine."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
from client_fixtures import client, run, small_batch

import hpcai_async
from hpcai_async import ConfigurationError, ServiceClient, types
from hpcai_async.server import LocalServer
from hpcai_async.server.models import BUILTIN_NAME


def options(server: LocalServer) -> dict[str, Any]:
    return {"base_url": server.url, "api_key": server.api_key}


def step(tc: hpcai_async.TrainingClient, adam: types.AdamParams) -> float:
    fb = tc.forward_backward(small_batch(2), "cross_entropy")
    tc.optim_step(adam).result()
    return float(fb.result().metrics["loss:mean"])


def logprobs(tc: hpcai_async.TrainingClient) -> np.ndarray:
    out = tc.forward(small_batch(2), "cross_entropy").result()
    return np.concatenate([o["logprobs"].to_numpy() for o in out.loss_fn_outputs])


def test_from_config_creates_the_run_hands_it_out_once_and_unloads_it_on_close(
    server: LocalServer, real_engine: Any
) -> None:
    service = ServiceClient.from_config(BUILTIN_NAME, lora_rank=4, learning_rate=5e-3, **options(server))
    tc = service.training_client
    assert isinstance(tc, hpcai_async.TrainingClient)
    assert service.adam_params == types.AdamParams(learning_rate=5e-3)
    # Fireworks' flow: from_firetitan_config, then create_training_client(base_model, lora_rank): that run
    assert service.create_training_client(base_model=BUILTIN_NAME, lora_rank=4) is tc
    with pytest.raises(ValueError, match="already made a training client"):
        service.create_training_client(base_model=BUILTIN_NAME, lora_rank=4)
    first = step(tc, service.adam_params)
    assert step(tc, service.adam_params) < first  # it trains, with the configured learning rate
    info = tc.get_info()
    assert info.is_lora and info.lora_rank == 4
    assert real_engine.has_run(tc.model_id)
    service.close()
    assert not real_engine.has_run(tc.model_id)  # "unload", the set-up's default


def test_reconnecting_by_model_id_continues_the_run(server: LocalServer, real_engine: Any) -> None:
    adam = types.AdamParams(learning_rate=1e-2)
    first = ServiceClient.from_config(BUILTIN_NAME, lora_rank=4, cleanup_on_close="keep", **options(server))
    assert first.training_client is not None
    model_id = first.training_client.model_id
    step(first.training_client, adam)
    before = logprobs(first.training_client)
    first.close()  # the process "restarts": the run stays loaded
    assert real_engine.has_run(model_id)

    again = ServiceClient.from_config(BUILTIN_NAME, lora_rank=4, model_id=model_id, **options(server))
    tc = again.training_client
    assert tc is not None and tc.model_id == model_id
    np.testing.assert_allclose(logprobs(tc), before, rtol=0, atol=1e-6)  # the same trained weights
    step(tc, adam)  # a new step is applied, not answered from the first client's results
    assert np.abs(logprobs(tc) - before).max() > 1e-4
    again.close()  # the run it reconnected to is its run: "unload" releases it
    assert not real_engine.has_run(model_id)


def test_reconnecting_to_a_run_of_another_shape_is_refused_and_leaves_it(
    server: LocalServer, real_engine: Any
) -> None:
    with ServiceClient(**options(server)) as service:
        tc = service.create_lora_training_client(BUILTIN_NAME, rank=4)
    with pytest.raises(ConfigurationError, match=r"lora_rank=4, not of .* with lora_rank=8"):
        ServiceClient.from_config(BUILTIN_NAME, lora_rank=8, model_id=tc.model_id, **options(server))
    with pytest.raises(hpcai_async.NotFoundError):
        ServiceClient.from_config(BUILTIN_NAME, lora_rank=4, model_id="no-such-run", **options(server))
    assert real_engine.has_run(tc.model_id)  # a plain ServiceClient keeps its runs; the refusal did too


def test_cleanup_delete_removes_the_checkpoints_too(server: LocalServer, real_engine: Any) -> None:
    service = ServiceClient.from_config(
        BUILTIN_NAME, lora_rank=4, cleanup_on_close="delete", **options(server)
    )
    tc = service.training_client
    assert tc is not None
    saved = tc.save_state("kept-until-close").result()
    rest = service.create_rest_client()
    assert [c.checkpoint_id for c in rest.list_checkpoints(tc.model_id).result().checkpoints]
    service.close()
    assert not real_engine.has_run(tc.model_id)
    with client(server) as other:
        assert other.create_rest_client().list_checkpoints(tc.model_id).result().checkpoints == []
        with pytest.raises(hpcai_async.NotFoundError):
            other.create_training_client_from_state(saved.path)


def test_from_config_async_on_the_callers_loop_releases_the_reference_model_too(
    server: LocalServer, real_engine: Any
) -> None:
    async def main() -> tuple[str, str]:
        service = await ServiceClient.from_config_async(BUILTIN_NAME, lora_rank=0, **options(server))
        async with service:
            tc = service.training_client
            assert tc is not None and (await tc.get_info_async()).is_lora is False  # full-parameter
            reference = await service.create_reference_client_async(BUILTIN_NAME, lora_rank=0)
            await (await reference.forward_async(small_batch(1), "cross_entropy"))
            frozen = reference.model_id
            assert real_engine.has_run(tc.model_id)
            return tc.model_id, frozen

    model_id, frozen = run(main)
    assert not real_engine.has_run(model_id)
    assert not real_engine.has_run(frozen)


def test_bad_settings_fail_before_anything_is_created(server: LocalServer) -> None:
    with pytest.raises(ConfigurationError, match="cleanup_on_close"):
        ServiceClient(**options(server), cleanup_on_close="sometimes")  # type: ignore[arg-type]
    with pytest.raises(ConfigurationError, match="lora_rank"):
        ServiceClient.from_config(BUILTIN_NAME, lora_rank=-1, **options(server))
    with client(server) as service:
        assert service.create_rest_client().list_training_runs().result().training_runs == []
