"""Fireworks' ``save_weights_for_sampler_ext``: session-qualified names, ``checkpoint_type`` "base" / "delta",
``ttl_seconds`` (issue 11).

Every test talks to a real ``LocalServer`` on 127.0.0.1: the real PyTorch engine where numbers are compared
(the run's own forward, the sampler's logprobs, and the saved folder loaded by plain transformers), NullEngine
for the bookkeeping, and the hosted dialect behind a recording proxy for what is (not) sent.
"""

from __future__ import annotations

import asyncio
import json
import warnings
from pathlib import Path
from typing import Any

import msgspec
import numpy as np
import pytest
from aiohttp import ClientSession
from client_fixtures import client, datum, hf_model, run
from fault_proxy import FaultProxy

from hpcai_async import (
    BadRequestError,
    NotFoundError,
    SaveSamplerResult,
    TrainingClient,
    UnsupportedFeatureError,
    types,
)
from hpcai_async.server import LocalServer
from hpcai_async.server.models import BUILTIN_DIR, BUILTIN_NAME

NULL_MODEL = "null/instant"
ADAM = types.AdamParams(learning_rate=0.05)
IDS = [11, 400, 23, 9, 77, 1024, 5, 66, 301]


def _folder(srv: LocalServer, path: str) -> Path:
    assert srv.store is not None
    return srv.store.resolve(path).directory


def _engine_json(srv: LocalServer, path: str) -> dict[str, Any]:
    meta: dict[str, Any] = json.loads((_folder(srv, path) / "engine.json").read_text())
    return meta


def _direct_logprobs(model: Any, ids: list[int]) -> np.ndarray:
    import torch

    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ids[:-1]])).logits[0].float()
    return torch.log_softmax(logits, -1).gather(1, torch.tensor(ids[1:])[:, None])[:, 0].numpy()


async def _forward(tc: TrainingClient, ids: list[int]) -> np.ndarray:
    out = await (await tc.forward_async([datum(ids)]))
    return np.array(out.loss_fn_outputs[0]["logprobs"].data)


async def _sampled(service: Any, path: str, ids: list[int]) -> np.ndarray:
    """The prompt logprobs a SamplingClient for ``path`` computes (the first token has none)."""
    sampler = service.create_sampling_client(model_path=path)
    got = await sampler.compute_logprobs_async(types.ModelInput.from_ints(ids))
    assert got[0] is None
    return np.array(got[1:], dtype=np.float64)


async def _train(tc: TrainingClient, steps: int = 2) -> None:
    for _ in range(steps):
        await tc.forward_backward_async([datum(IDS)])
        await tc.optim_step_async(ADAM)


# ------------------------------------------------------------------------------------------- LoRA runs


def test_base_and_delta_of_a_lora_run_serve_the_runs_logprobs_and_base_is_merged(server: LocalServer) -> None:
    async def main() -> tuple[np.ndarray, dict[str, SaveSamplerResult], np.ndarray]:
        async with client(server) as service:
            tc = await service.create_lora_training_client_async(
                BUILTIN_NAME, rank=4, seed=3, train_mlp=True, train_unembed=True
            )
            await _train(tc)
            served = await _forward(tc, IDS)
            saved = {
                kind: await tc.save_weights_for_sampler_ext_async(f"step-2-{kind}", checkpoint_type=kind)
                for kind in ("base", "delta", None)
            }
            for kind, result in saved.items():
                got = await _sampled(service, result.path, IDS)
                np.testing.assert_allclose(got, served, atol=1e-4, err_msg=str(kind))
            # the merged weights are a full-parameter checkpoint: a full-parameter run loads them as its own
            full = await service.create_training_client_async(base_model=BUILTIN_NAME, lora_rank=0)
            await (await full.load_state_async(saved["base"].path))
            continued = await _forward(full, IDS)
            with pytest.raises(BadRequestError, match=r"merged into full weights.*lora_rank=0"):  # not LoRA
                await (await tc.load_state_async(saved["base"].path))
            return served, saved, continued

    served, saved, continued = run(main, timeout=180)
    np.testing.assert_allclose(continued, served, atol=1e-4)
    base, delta = _folder(server, saved["base"].path), _folder(server, saved["delta"].path)
    assert {p.name for p in base.iterdir()} >= {"model.safetensors", "config.json", "engine.json"}
    assert not (base / "adapter_model.safetensors").exists()
    assert (delta / "adapter_model.safetensors").is_file()
    assert [_engine_json(server, saved[k].path)["checkpoint_type"] for k in ("base", "delta", None)] == [
        "base",
        "delta",
        "delta",  # None: a LoRA run's own kind
    ]
    meta = json.loads((base / "meta.json").read_text())
    assert meta["merged"] is True and meta["lora_config"]["rank"] == 0  # the layout of its weights
    assert json.loads((delta / "meta.json").read_text())["merged"] is False
    merged = _direct_logprobs(hf_model(base), IDS)  # plain transformers, no PEFT: really merged weights
    np.testing.assert_allclose(merged, served, atol=1e-4)
    untrained = _direct_logprobs(hf_model(BUILTIN_DIR), IDS)
    assert np.abs(served - untrained).max() > 1e-3  # training changed the model: the test can fail


def test_a_lora_adapter_on_a_tied_lm_head_cannot_merge_but_one_on_attention_can(
    server_factory: Any, tmp_path: Path
) -> None:
    """A model with tie_word_embeddings: merging an lm_head adapter would untie it (400); others merge."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from hpcai_async.server.engine import Engine

    config = AutoConfig.from_pretrained(str(BUILTIN_DIR))
    config.tie_word_embeddings = True
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        AutoModelForCausalLM.from_config(config).save_pretrained(str(tmp_path / "tied"))
    engine = Engine([str(tmp_path / "tied")], device="cpu", builtin=False)
    srv = server_factory(engine=engine)

    async def main() -> None:
        async with client(srv) as service:
            unembed = await service.create_lora_training_client_async(
                "tied", rank=2, seed=1, train_unembed=True
            )
            await _train(unembed, 1)
            with pytest.raises(BadRequestError, match="tied") as refused:
                await unembed.save_weights_for_sampler_ext_async("m", checkpoint_type="base")
            assert "checkpoint_type" in str(refused.value)
            assert (await unembed.save_weights_for_sampler_ext_async("d", "delta")).path  # the adapter saves
            attn = await service.create_lora_training_client_async("tied", rank=2, seed=2)
            await _train(attn, 1)
            served = await _forward(attn, IDS)
            saved = await attn.save_weights_for_sampler_ext_async("m", checkpoint_type="base")
            np.testing.assert_allclose(await _sampled(service, saved.path, IDS), served, atol=1e-4)
            merged = _direct_logprobs(hf_model(_folder(srv, saved.path)), IDS)
            np.testing.assert_allclose(merged, served, atol=1e-4)

    try:
        run(main, timeout=180)
    finally:
        engine.close()


# ------------------------------------------------------------------------------------------- full-param runs


def test_a_full_param_runs_base_serves_its_weights_and_delta_is_a_400(server: LocalServer) -> None:
    async def main() -> tuple[np.ndarray, list[SaveSamplerResult]]:
        async with client(server) as service:
            tc = await service.create_training_client_async(base_model=BUILTIN_NAME, lora_rank=0)
            await _train(tc, 1)
            served = await _forward(tc, IDS)
            with pytest.raises(BadRequestError, match=r"checkpoint_type: 'delta'.*full-parameter") as refused:
                await tc.save_weights_for_sampler_ext_async("d", checkpoint_type="delta")
            assert refused.value.status == 400 and "checkpoint_type='base'" in str(refused.value)
            saved = [
                await tc.save_weights_for_sampler_ext_async("b", checkpoint_type="base"),
                await tc.save_weights_for_sampler_ext_async("n"),  # the sequence went on past the 400
            ]
            for result in saved:
                np.testing.assert_allclose(await _sampled(service, result.path, IDS), served, atol=1e-4)
            listed = (await service.create_rest_client().list_checkpoints_async(tc.model_id)).checkpoints
            assert sorted(c.checkpoint_path for c in listed) == sorted(r.path for r in saved)  # no "d"
            return served, saved

    served, saved = run(main, timeout=120)
    for result in saved:
        assert _engine_json(server, result.path)["checkpoint_type"] == "base"
        assert json.loads((_folder(server, result.path) / "meta.json").read_text())["merged"] is False
        loaded = _direct_logprobs(hf_model(_folder(server, result.path)), IDS)
        np.testing.assert_allclose(loaded, served, atol=1e-4)


# ------------------------------------------------------------------------------------------- names, bad input


def test_snapshot_names_carry_the_session_and_two_clients_do_not_collide(null_server: LocalServer) -> None:
    with client(null_server) as one, client(null_server) as two:
        first = one.create_lora_training_client(NULL_MODEL, rank=4)
        second = two.create_lora_training_client(NULL_MODEL, rank=4)
        a = first.save_weights_for_sampler_ext("step-100")  # the plain form returns the value itself
        b = second.save_weights_for_sampler_ext("step-100")
        again = first.save_weights_for_sampler_ext("step-100")
        tags = [s._transport.session_id[:8] for s in (one, two)]
        listed = one.create_rest_client().list_checkpoints(first.model_id).result().checkpoints
    assert isinstance(a, SaveSamplerResult) and a.snapshot_name != b.snapshot_name
    assert [a.snapshot_name, b.snapshot_name] == [f"step-100-{t}" for t in tags]
    for result in (a, b):
        assert result.path.endswith(f"/sampler_weights/{result.snapshot_name}_sampler")
    assert again == a  # stable within a session: the same name saves over the same checkpoint
    assert [c.checkpoint_id for c in listed] == [f"{a.snapshot_name}_sampler"]


def test_checkpoint_type_is_checked_by_the_server_naming_the_field(null_server: LocalServer) -> None:
    async def main() -> tuple[str, str]:
        async with client(null_server) as service:
            tc = await service.create_lora_training_client_async(NULL_MODEL, rank=4)
            for bad in ("full", "BASE", ""):
                with pytest.raises(BadRequestError, match=r"checkpoint_type: must be 'base'.*or 'delta'"):
                    await tc.save_weights_for_sampler_ext_async("x", checkpoint_type=bad)
            saved = await tc.save_weights_for_sampler_ext_async("x", "base")  # the NullEngine merges too
            return tc.model_id, saved.snapshot_name

    model_id, snapshot = run(main)

    async def raw() -> list[tuple[int, Any]]:
        async with ClientSession(null_server.url) as http:
            out = []
            for path, value in (("save_weights", "base"), ("save_weights_for_sampler", 5)):
                body = {"model_id": model_id, "path": "raw", "checkpoint_type": value}
                async with http.post(
                    f"/api/v1/{path}", json=body, headers={"X-API-Key": null_server.api_key}
                ) as resp:
                    out.append((resp.status, msgspec.json.decode(await resp.read())))
            return out

    (status, training), (bad_status, bad_type) = asyncio.run(raw())
    assert status == 400 and "checkpoint_type: applies to sampler weights" in json.dumps(training)
    assert bad_status == 400 and "checkpoint_type" in json.dumps(bad_type)
    assert null_server.store is not None  # nothing refused was saved
    assert [c.checkpoint_id for c in null_server.store.list_checkpoints(model_id)] == [f"{snapshot}_sampler"]


def test_ttl_seconds_passes_through_and_the_snapshot_expires(null_server: LocalServer) -> None:
    async def main() -> None:
        async with client(null_server) as service:
            tc = await service.create_lora_training_client_async(NULL_MODEL, rank=4)
            saved = await tc.save_weights_for_sampler_ext_async("brief", ttl_seconds=1)
            meta = json.loads((_folder(null_server, saved.path) / "meta.json").read_text())
            assert meta["ttl_seconds"] == 1 and meta["expires"] is not None
            sampler = service.create_sampling_client(model_path=saved.path)
            prompt, params = types.ModelInput.from_ints([1, 2, 3]), types.SamplingParams(max_tokens=1)
            await sampler.sample_async(prompt, 1, params)  # it serves until its time is up
            await asyncio.sleep(1.2)
            with pytest.raises(NotFoundError, match="expired"):
                await sampler.sample_async(prompt, 1, params)

    run(main)


def test_the_hosted_dialect_refuses_checkpoint_type_and_ttl_before_sending(server_factory: Any) -> None:
    hosted = server_factory(dialect="hosted")

    async def main(url: str) -> SaveSamplerResult:
        async with client(hosted, base_url=url) as service:
            tc = await service.create_lora_training_client_async(NULL_MODEL, rank=4)
            for kwargs, feature in (
                ({"checkpoint_type": "base"}, "checkpoint_type"),
                ({"checkpoint_type": "delta"}, "checkpoint_type"),
                ({"ttl_seconds": 60}, "ttl"),
            ):
                with pytest.raises(UnsupportedFeatureError) as refused:
                    await tc.save_weights_for_sampler_ext_async("step-1", **kwargs)
                assert refused.value.feature == feature
            return await tc.save_weights_for_sampler_ext_async("step-1")  # a plain save: the hosted protocol

    with FaultProxy(hosted.url) as proxy:
        plain = run(lambda: main(proxy.url))
        bodies = [json.loads(r.body) for r in proxy.find("save_weights_for_sampler")]
    assert bodies == [{"model_id": bodies[0]["model_id"], "path": plain.snapshot_name}]  # no extension fields
    assert plain.snapshot_name.startswith("step-1-")
