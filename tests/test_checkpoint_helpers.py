"""Checkpoint lifetimes, Fireworks' checkpoint helpers, bounded restores, PEFT-loadable files (issue 11).

Every test talks to a real ``LocalServer`` on 127.0.0.1: NullEngine for the bookkeeping, engines slowed down
by a subclass for the timeouts, and the real PyTorch engine where numbers are compared (a restore by name,
the saved adapter opened with ``peft`` directly).
"""

from __future__ import annotations

import asyncio
import copy
import datetime as dt
import io
import json
import tarfile
import time
import warnings
from pathlib import Path
from typing import Any

import msgspec
import numpy as np
import pytest
from client_fixtures import client, datum, hf_model, run

from hpcai_async import (
    APITimeoutError,
    BadRequestError,
    ConfigurationError,
    NotFoundError,
    UnsupportedFeatureError,
    types,
)
from hpcai_async.server import LocalServer, NullEngine

NULL_MODEL = "null/instant"
BUILTIN = "hpcai-async/tiny-qwen3"
ADAM = types.AdamParams(learning_rate=0.05)


def _folder(srv: LocalServer, run_id: str, checkpoint_id: str) -> Path:
    assert srv.store is not None
    return srv.store.runs_dir / run_id / "checkpoints" / checkpoint_id


def _meta(srv: LocalServer, run_id: str, checkpoint_id: str) -> dict[str, Any]:
    meta: dict[str, Any] = json.loads((_folder(srv, run_id, checkpoint_id) / "meta.json").read_text())
    return meta


def _body(recorded: Any) -> Any:
    """A request body the proxy recorded, MessagePack or JSON."""
    if "msgpack" in recorded.headers.get("content-type", ""):
        return msgspec.msgpack.decode(recorded.body)
    return msgspec.json.decode(recorded.body)


def _loaded(srv: LocalServer) -> set[str]:
    """The runs the server's engine holds now."""
    engine = srv.engine
    assert engine is not None
    return {m for m in srv.scheduler.models if engine.has_run(m)}


async def _until(check: Any, within: float = 10.0) -> None:
    end = time.monotonic() + within
    while not check():
        assert time.monotonic() < end, "the condition did not come true in time"
        await asyncio.sleep(0.02)


# ------------------------------------------------------------------------------------------------ TTLs


def test_an_expired_checkpoint_is_listed_nowhere_refused_everywhere_and_its_files_go(
    null_server: LocalServer,
) -> None:
    async def main() -> None:
        async with client(null_server) as service:
            tc = await service.create_lora_training_client_async(NULL_MODEL, rank=4)
            kept = await (await tc.save_state_async("kept"))
            state = await (await tc.save_state_async("brief", ttl_seconds=1))
            sampler = await (await tc.save_weights_for_sampler_async("brief", ttl_seconds=1))
            rest = service.create_rest_client()
            listed = (await rest.list_checkpoints_async(tc.model_id)).checkpoints
            assert {c.checkpoint_id for c in listed} == {"kept_training", "brief_training", "brief_sampler"}
            assert await tc.list_checkpoints_async() == ["kept", "brief"]
            meta = _meta(null_server, tc.model_id, "brief_training")
            lifetime = dt.datetime.fromisoformat(meta["expires"]) - dt.datetime.fromisoformat(meta["time"])
            assert lifetime == dt.timedelta(seconds=1) and meta["ttl_seconds"] == 1
            assert _meta(null_server, tc.model_id, "kept_training")["expires"] is None

            await asyncio.sleep(1.2)
            # a load finds it expired: refused with a 404 that says so, and its folder goes at once
            with pytest.raises(NotFoundError, match="expired") as refused:
                await (await tc.load_state_async(state.path))
            assert refused.value.code == "checkpoint_expired" and refused.value.status == 404
            assert not _folder(null_server, tc.model_id, "brief_training").exists()
            sampling = service.create_sampling_client(model_path=sampler.path)
            prompt = types.ModelInput.from_ints([1, 2, 3])
            with pytest.raises(NotFoundError, match="expired"):
                await sampling.sample_async(prompt, 1, types.SamplingParams(max_tokens=2))
            with pytest.raises(NotFoundError, match="expired"):
                await rest.download_checkpoint_archive_async(tc.model_id, "brief_sampler")
            listed = (await rest.list_checkpoints_async(tc.model_id)).checkpoints
            assert [c.checkpoint_id for c in listed] == ["kept_training"]
            assert await tc.list_checkpoints_async() == ["kept"]
            info = await rest.get_training_run_async(tc.model_id)
            assert info.last_checkpoint is not None and info.last_checkpoint.checkpoint_id == "kept_training"
            assert info.last_sampler_checkpoint is None
            runs = (await rest.list_training_runs_async()).training_runs
            assert [r.last_sampler_checkpoint for r in runs if r.training_run_id == tc.model_id] == [None]
            for gone in ("brief_training", "brief_sampler"):
                assert not _folder(null_server, tc.model_id, gone).exists()
            await (await tc.load_state_async(kept.path))  # the other one is untouched
            assert _folder(null_server, tc.model_id, "kept_training").is_dir()

    run(main)


def test_the_periodic_sweep_removes_expired_checkpoints_nobody_asks_for(server_factory: Any) -> None:
    srv = server_factory(retention_s=1.0)  # the expiry tick (and the sweep) every 0.5 s

    async def main() -> str:
        async with client(srv) as service:
            tc = await service.create_lora_training_client_async(NULL_MODEL, rank=4)
            await (await tc.save_weights_for_sampler_async("brief", ttl_seconds=1))
            await (await tc.save_state_async("kept", ttl_seconds=3600))
            return tc.model_id

    model_id = run(main)
    folder = _folder(srv, model_id, "brief_sampler")
    assert folder.is_dir()
    assert srv.store is not None
    tmp = srv.store.tmp_dir
    # the sweep moves the folder into tmp/ and then deletes it there: wait for both (nothing else runs)
    end = time.monotonic() + 5.0
    while (folder.exists() or any(tmp.iterdir())) and time.monotonic() < end:
        time.sleep(0.05)
    assert not folder.exists()
    assert _folder(srv, model_id, "kept_training").is_dir()
    assert list(tmp.iterdir()) == []  # no trash left behind


def test_ttl_needs_the_servers_feature_and_nothing_is_sent_without_it(server_factory: Any) -> None:
    from fault_proxy import FaultProxy

    srv = server_factory(dialect="hosted")

    async def main(url: str) -> None:
        async with client(srv, base_url=url) as service:
            tc = await service.create_lora_training_client_async(NULL_MODEL, rank=4)
            with pytest.raises(UnsupportedFeatureError, match="'ttl'") as refused:
                await tc.save_state_async("brief", ttl_seconds=60)
            assert refused.value.feature == "ttl"
            with pytest.raises(UnsupportedFeatureError):
                await tc.save_weights_for_sampler_async("brief", ttl_seconds=60)
            with pytest.raises(UnsupportedFeatureError, match="'user_metadata'"):
                await tc.save_state_async("tagged", user_metadata={"step": "4"})
            saved = await (await tc.save_state_async("plain"))  # the sequence goes on
            assert saved.path.endswith("/plain_training")

    with FaultProxy(srv.url) as proxy:
        run(lambda: main(proxy.url))
        bodies = [_body(r) for r in proxy.requests if r.endpoint == "save_weights"]
    assert bodies == [{"model_id": bodies[0]["model_id"], "path": "plain"}]  # no ttl_seconds field


def test_listings_show_a_checkpoints_expiry_and_metadata(null_server: LocalServer) -> None:
    async def main() -> None:
        async with client(null_server) as service:
            tc = await service.create_lora_training_client_async(NULL_MODEL, rank=4)
            before = dt.datetime.now(dt.UTC)
            await (await tc.save_state_async("tagged", 3600, user_metadata={"step": "4", "note": "warm"}))
            await (await tc.save_weights_for_sampler_async("plain"))
            with pytest.raises(BadRequestError, match="user_metadata: at most 64 entries"):
                await (await tc.save_state_async("crowded", user_metadata={str(i): "x" for i in range(65)}))
            listed = await service.create_rest_client().list_checkpoints_async(tc.model_id)
            by_id = {c.checkpoint_id: c for c in listed.checkpoints}
            assert sorted(by_id) == ["plain_sampler", "tagged_training"]  # the refused save wrote nothing
            tagged, plain = by_id["tagged_training"], by_id["plain_sampler"]
            assert tagged.user_metadata == {"step": "4", "note": "warm"}
            assert isinstance(tagged.expires_at, dt.datetime)
            expected = before + dt.timedelta(seconds=3600)
            assert abs((tagged.expires_at - expected).total_seconds()) < 30
            assert plain.expires_at is msgspec.UNSET and plain.user_metadata is msgspec.UNSET

    run(main)


# ------------------------------------------------------------------------------------------------ helpers


def test_list_and_resolve_checkpoints_by_name(null_server: LocalServer) -> None:
    async def main() -> None:
        async with client(null_server) as service:
            tc = await service.create_lora_training_client_async(NULL_MODEL, rank=4)
            other = await service.create_lora_training_client_async(NULL_MODEL, rank=4)
            assert await tc.list_checkpoints_async() == []
            paths = {}
            for name in ("step-2", "step-4", "step-6"):
                paths[name] = (await (await tc.save_state_async(name))).path
                await (await tc.save_weights_for_sampler_async(name))  # sampler weights are not listed
            assert await tc.list_checkpoints_async() == ["step-2", "step-4", "step-6"]  # oldest first
            assert await tc.resolve_checkpoint_path_async("step-4") == paths["step-4"]
            assert await tc.resolve_checkpoint_path_async("step-4_training") == paths["step-4"]
            assert paths["step-4"] == f"hpcai://{tc.model_id}/weights/step-4_training"
            # another run's checkpoint, for a cross-run resume
            assert (
                await other.resolve_checkpoint_path_async("step-2", source_job_id=tc.model_id)
                == (paths["step-2"])
            )
            with pytest.raises(NotFoundError, match=r"no training-state checkpoint named 'step-2'.*none"):
                await other.resolve_checkpoint_path_async("step-2")
            with pytest.raises(NotFoundError, match=r"step-3.*step-2, step-4, step-6"):
                await tc.resolve_checkpoint_path_async("step-3")
            with pytest.raises(ConfigurationError, match="already a path"):
                await tc.resolve_checkpoint_path_async(paths["step-2"])
            with pytest.raises(NotFoundError, match="step-3"):  # a load by an unknown name: nothing is sent
                await tc.load_state_async("step-3")
            await (await tc.optim_step_async(ADAM))  # and the run's sequence goes on past it

    run(main)


def test_the_helpers_return_values_from_plain_code(null_server: LocalServer) -> None:
    from fault_proxy import FaultProxy

    with FaultProxy(null_server.url) as proxy, client(null_server, base_url=proxy.url) as service:
        tc = service.create_lora_training_client(NULL_MODEL, rank=4)
        saved = tc.save_state("a").result().path
        tc.save_state("b", ttl_seconds=3600).result()
        assert tc.list_checkpoints() == ["a", "b"]
        assert tc.resolve_checkpoint_path("a") == saved
        proxy.clear()
        tc.load_state_with_optimizer("a").result()  # a bare name of this run
        tc.load_state(saved.replace("hpcai://", "tinker://")).result()  # either scheme; sent as hpcai://
        sent = [_body(r) for r in proxy.requests if r.endpoint == "load_weights"]
    assert [(b["path"], b["optimizer"]) for b in sent] == [
        (saved, True),
        (saved, False),  # the hosted service's scheme on the wire
    ]
    assert [b["seq_id"] for b in sent] == sorted(b["seq_id"] for b in sent)


def _logprobs(out: types.ForwardBackwardOutput) -> np.ndarray:
    return np.array(out.loss_fn_outputs[0]["logprobs"].data)


def test_a_load_by_name_restores_the_runs_weights_and_optimizer(server: LocalServer) -> None:
    ids = [5, 17, 99, 3, 250, 41, 7, 12]

    async def main() -> None:
        async with client(server) as service:
            tc = await service.create_lora_training_client_async(BUILTIN, rank=4, seed=1)
            for _ in range(2):
                await (await tc.forward_backward_async([datum(ids)]))
                await (await tc.optim_step_async(ADAM))
            await (await tc.save_state_async("step-2"))
            at_save = _logprobs(await (await tc.forward_async([datum(ids)])))
            await (await tc.forward_backward_async([datum(ids)]))
            await (await tc.optim_step_async(ADAM))
            moved = _logprobs(await (await tc.forward_async([datum(ids)])))
            assert np.abs(moved - at_save).max() > 1e-3  # training changed the model: the test can fail
            await (await tc.load_state_with_optimizer_async("step-2"))
            np.testing.assert_allclose(_logprobs(await (await tc.forward_async([datum(ids)]))), at_save, 1e-5)
            # a second run resumes from the first's checkpoint, named by run and name
            other = await service.create_lora_training_client_async(BUILTIN, rank=4, seed=2)
            path = await other.resolve_checkpoint_path_async("step-2", source_job_id=tc.model_id)
            await (await other.load_state_with_optimizer_async(path))
            np.testing.assert_allclose(
                _logprobs(await (await other.forward_async([datum(ids)]))), at_save, 1e-5
            )
            # the same optimizer state: one more identical step moves both runs the same way
            for client_ in (tc, other):
                await (await client_.forward_backward_async([datum(ids)]))
                await (await client_.optim_step_async(ADAM))
            after = [_logprobs(await (await c.forward_async([datum(ids)]))) for c in (tc, other)]
            np.testing.assert_allclose(after[0], after[1], 1e-5)

    run(main, timeout=120)


# ------------------------------------------------------------------------------------------------ timeouts


class SlowLoads(NullEngine):
    """NullEngine whose loads take LOAD_S seconds on the device thread (the server's own timing)."""

    LOAD_S = 1.5

    def load(self, run_id: str, directory: str | Path, *, optimizer: bool = False) -> None:
        time.sleep(self.LOAD_S)
        super().load(run_id, directory, optimizer=optimizer)


class SlowCreates(NullEngine):
    CREATE_S = 1.0

    def create_run(self, run_id: str, base_model: str, lora: types.LoraConfig) -> None:
        time.sleep(self.CREATE_S)
        super().create_run(run_id, base_model, lora)


def test_a_load_past_its_timeout_raises_the_timeout_error_and_the_run_goes_on(server_factory: Any) -> None:
    srv = server_factory(engine=SlowLoads)

    async def main() -> None:
        async with client(srv) as service:
            tc = await service.create_lora_training_client_async(NULL_MODEL, rank=4)
            saved = await (await tc.save_state_async("a"))
            started = time.monotonic()
            with pytest.raises(APITimeoutError, match=r"load_state\(.*timeout=0.3 s") as late:
                await (await tc.load_state_async(saved.path, timeout=0.3))
            assert isinstance(late.value, TimeoutError) and time.monotonic() - started < 1.2
            with pytest.raises(TimeoutError):
                await (await tc.load_state_with_optimizer_async("a", timeout=0.3))  # by name, too
            # the loads still run on the server; what comes next runs after them, in order
            step = await (await tc.optim_step_async(ADAM))
            assert step.metrics["step:max"] == 1
            assert time.monotonic() - started >= 2 * SlowLoads.LOAD_S
            await (await tc.load_state_async("a", timeout=30))  # within its bound: as without one
            for bad in (0, -1, float("nan"), float("inf"), "1"):
                with pytest.raises(ConfigurationError, match="timeout"):
                    await tc.load_state_async(saved.path, timeout=bad)
            await (await tc.optim_step_async(ADAM))  # nothing was reserved by the refused calls

    run(main)


def test_a_restore_past_its_timeout_unloads_the_new_run(server_factory: Any) -> None:
    srv = server_factory(engine=SlowLoads)

    async def main() -> None:
        async with client(srv) as service:
            tc = await service.create_lora_training_client_async(NULL_MODEL, rank=4)
            saved = await (await tc.save_state_async("a"))
            before = _loaded(srv)
            started = time.monotonic()
            with pytest.raises(APITimeoutError, match="create_training_client_from_state"):
                await service.create_training_client_from_state_async(saved.path, timeout=0.5)
            with pytest.raises(APITimeoutError, match="with_optimizer"):
                await service.create_training_client_from_state_with_optimizer_async(saved.path, timeout=0.5)
            assert time.monotonic() - started < 2 * SlowLoads.LOAD_S  # the unloads were not waited for
            new = set(srv.scheduler.models) - before
            assert len(new) == 2
            # each goes once what is queued before it has run (the second was still being created,
            # behind the first one's load, when its deadline passed)
            await _until(lambda: all(srv.scheduler.models[m].status == "unloaded" for m in new))
            assert _loaded(srv) == before
            restored = await service.create_training_client_from_state_async(saved.path, timeout=30)
            assert _loaded(srv) == before | {restored.model_id}

    run(main)


def test_a_restore_that_times_out_while_its_run_is_created_unloads_it_once_made(
    server_factory: Any,
) -> None:
    srv = server_factory(engine=SlowCreates)

    async def main() -> None:
        async with client(srv) as service:
            tc = await service.create_lora_training_client_async(NULL_MODEL, rank=4)
            saved = await (await tc.save_state_async("a"))
            before = set(srv.scheduler.models)
            with pytest.raises(APITimeoutError):
                await service.create_training_client_from_state_async(saved.path, timeout=0.3)
            new = set(srv.scheduler.models) - before
            assert len(new) == 1  # being created
            await _until(lambda: srv.scheduler.models[next(iter(new))].status == "unloaded")
            assert _loaded(srv) == {tc.model_id}

    run(main)


# ------------------------------------------------------------------------------------------------ restores


def test_a_failed_restore_leaves_no_run_loaded_on_the_real_engine(server: LocalServer) -> None:
    from fault_proxy import FaultProxy

    async def main(proxy_url: str) -> None:
        async with client(server) as service, client(server, base_url=proxy_url) as proxied:
            tc = await service.create_lora_training_client_async(BUILTIN, rank=4, train_mlp=True)
            state = await (await tc.save_state_async("good"))
            sampler = await (await tc.save_weights_for_sampler_async("good"))
            rest = service.create_rest_client()

            async def loaded_runs() -> set[str]:  # the runs the REST listing knows that the engine holds
                listed = (await rest.list_training_runs_async(limit=1000)).training_runs
                engine = server.engine
                assert engine is not None
                return {r.training_run_id for r in listed if engine.has_run(r.training_run_id)}

            before = await loaded_runs()
            assert tc.model_id in before
            with pytest.raises(NotFoundError, match="missing"):
                await service.create_training_client_from_state_async(state.path.replace("/good", "/missing"))
            with pytest.raises(BadRequestError, match="no optimizer state"):  # a sampler checkpoint
                await service.create_training_client_from_state_with_optimizer_async(sampler.path)
            # a layout mismatch: a run record naming only the rank (as the hosted service's) gives the new
            # run the default layout (attention only), which the checkpoint (attention + MLP) does not fit
            record = json.loads(msgspec.json.encode(await rest.get_training_run_async(tc.model_id)))
            record.pop("lora_config")
            proxy.inject(
                f"training_runs/{tc.model_id}", "status", status=200, body=json.dumps(record).encode()
            )
            with pytest.raises(BadRequestError, match="LoRA layout"):
                await proxied.create_training_client_from_state_async(state.path)
            assert await loaded_runs() == before
            assert len((await rest.list_training_runs_async(limit=1000)).training_runs) == len(before) + 3

    with FaultProxy(server.url) as proxy:
        run(lambda: main(proxy.url), timeout=120)


# ------------------------------------------------------------------------------------------------ PEFT


@pytest.fixture(scope="module")
def plain_model() -> Any:
    """The built-in model loaded by plain transformers, as the server builds it (float32)."""
    pytest.importorskip("torch")
    return hf_model()


def _direct_logprobs(model: Any, ids: list[int]) -> np.ndarray:
    import torch

    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ids[:-1]])).logits[0].float()
    return torch.log_softmax(logits, -1).gather(1, torch.tensor(ids[1:])[:, None])[:, 0].numpy()


def _peft_logprobs(base: Any, folder: Path, ids: list[int]) -> np.ndarray:
    """Logprobs of ``ids`` from a copy of ``base`` with the adapter in ``folder``, loaded by PEFT itself."""
    from peft import PeftModel

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = PeftModel.from_pretrained(copy.deepcopy(base), str(folder)).eval()
    return _direct_logprobs(model, ids)


def test_saved_adapters_open_with_peft_and_compute_the_servers_logprobs(
    server: LocalServer, plain_model: Any, tmp_path: Path
) -> None:
    ids = [11, 400, 23, 9, 77, 1024, 5, 66, 301]

    async def main() -> tuple[str, np.ndarray, bytes]:
        async with client(server) as service:
            tc = await service.create_lora_training_client_async(
                BUILTIN, rank=4, seed=3, train_mlp=True, train_unembed=True
            )
            for _ in range(3):
                await (await tc.forward_backward_async([datum(ids)]))
                await (await tc.optim_step_async(ADAM))
            await (await tc.save_weights_for_sampler_async("peft"))
            await (await tc.save_state_async("peft"))
            served = _logprobs(await (await tc.forward_async([datum(ids)])))
            archive = await service.create_rest_client().download_checkpoint_archive_async(
                tc.model_id, "peft_sampler"
            )
            assert isinstance(archive, bytes)
            return tc.model_id, served, archive

    model_id, served, archive = run(main, timeout=120)
    with tarfile.open(fileobj=io.BytesIO(archive), mode="r:gz") as tar:
        tar.extractall(tmp_path / "downloaded", filter="data")
    config = json.loads((tmp_path / "downloaded" / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 4 and "lm_head" in config["target_modules"]
    untrained = _direct_logprobs(plain_model, ids)
    assert np.abs(served - untrained).max() > 1e-3  # the adapter changes the model: the test can fail
    for folder in (tmp_path / "downloaded", _folder(server, model_id, "peft_training")):
        np.testing.assert_allclose(_peft_logprobs(plain_model, folder, ids), served, rtol=1e-4, atol=1e-4)
