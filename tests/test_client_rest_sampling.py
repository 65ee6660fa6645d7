"""SamplingClient and RestClient against the real local server: sampling, logprobs, runs, checkpoints, and the
streamed, all-or-nothing archive download.
"""

from __future__ import annotations

import asyncio
import tarfile
from pathlib import Path

import pytest
from client_fixtures import LOOPS, HasURL, client, run, small_batch
from fault_proxy import FaultProxy

from hpcai_async import (
    APIConnectionError,
    ConfigurationError,
    NotFoundError,
    RetryBudgetExceededError,
    ServiceClient,
    types,
)

NULL_MODEL = "null/instant"
BUILTIN = "hpcai-async/tiny-qwen3"


@pytest.mark.parametrize("loop", LOOPS)
def test_many_concurrent_samples(null_server: HasURL, loop: str) -> None:
    async def main() -> None:
        async with client(null_server) as service:
            sampler = service.create_sampling_client(base_model=NULL_MODEL)
            prompt = types.ModelInput.from_ints([1, 2, 3])
            params = types.SamplingParams(max_tokens=4, temperature=0.7)
            responses = await asyncio.gather(*(sampler.sample_async(prompt, 2, params) for _ in range(200)))
            assert all(len(r.sequences) == 2 and len(r.sequences[0].tokens) == 4 for r in responses)
            logprobs = await sampler.compute_logprobs_async(prompt)
            assert len(logprobs) == 3 and logprobs[0] is None

    run(main, loop)


def test_requests_waiting_for_a_batch_fail_cleanly_when_the_client_closes(null_server: HasURL) -> None:
    with FaultProxy(null_server.url) as proxy:
        proxy.inject("asample", "delay", delay=0.5, times=2)  # both slots busy: the rest wait for a batch

        async def main() -> list[BaseException | types.SampleResponse]:
            service = client(null_server, base_url=proxy.url)
            sampler = service.create_sampling_client(base_model=NULL_MODEL)
            prompt = types.ModelInput.from_ints([1, 2, 3])
            await service.get_server_capabilities_async()
            calls = [
                asyncio.ensure_future(sampler.sample_async(prompt, 1, types.SamplingParams(max_tokens=2)))
                for _ in range(5)
            ]
            await asyncio.sleep(0.1)
            await service.aclose()
            return await asyncio.gather(*calls, return_exceptions=True)

        outcomes = run(main)
    assert all(isinstance(o, APIConnectionError) and "closed" in str(o) for o in outcomes), outcomes
    assert len(proxy.find("asample")) <= 2 and not proxy.find("batch")  # the waiting three never went


def test_sampling_the_builtin_model_and_prompt_logprobs(server: HasURL) -> None:
    with client(server) as service:
        tc = service.create_lora_training_client(BUILTIN, rank=4)
        tok = tc.get_tokenizer()
        sampler = service.create_sampling_client(base_model=BUILTIN)
        prompt = types.ModelInput.from_ints(tok.encode("Q: What color is the sky?\nA:"))
        params = types.SamplingParams(max_tokens=4, temperature=0.0, stop=["\n"])
        response = sampler.sample(prompt, 1, params, include_prompt_logprobs=True).result(timeout=60)
        assert response.prompt_logprobs is not None and len(response.prompt_logprobs) == prompt.length
        assert response.prompt_logprobs[0] is None
        sequence = response.sequences[0]
        assert sequence.logprobs is not None and len(sequence.logprobs) == len(sequence.tokens)
        assert sampler.compute_logprobs(prompt).result(timeout=60) == pytest.approx(response.prompt_logprobs)


def test_sampling_client_arguments() -> None:
    service = ServiceClient(base_url="http://127.0.0.1:9", api_key="k")  # nothing is sent
    with pytest.raises(ConfigurationError, match="hpcai://"):
        service.create_sampling_client(model_path="/tmp/weights")
    with pytest.raises(ConfigurationError):
        service.create_sampling_client()


def test_runs_and_checkpoints(null_server: HasURL, tmp_path: Path) -> None:
    progress: list[tuple[int, int | None]] = []

    async def main() -> None:
        async with client(null_server) as service:
            rest = service.create_rest_client()
            tc = await service.create_lora_training_client_async(NULL_MODEL, rank=8)
            await tc.forward_backward_async(small_batch(1))
            await tc.optim_step_async(types.AdamParams())
            training = (await (await tc.save_state_async("ckpt"))).path
            sampler = (await (await tc.save_weights_for_sampler_async("ckpt"))).path

            run_info = await rest.get_training_run_async(tc.model_id)
            assert run_info.base_model == NULL_MODEL and run_info.lora_rank == 8 and run_info.is_lora
            assert (
                await rest.get_training_run_by_checkpoint_path_async(sampler)
            ).training_run_id == tc.model_id
            listed = await rest.list_checkpoints_async(tc.model_id)
            assert {(c.checkpoint_id, c.checkpoint_type, c.checkpoint_path) for c in listed.checkpoints} == {
                ("ckpt_training", "training", training),
                ("ckpt_sampler", "sampler", sampler),
            }
            page = await rest.list_training_runs_async(limit=1, offset=0)
            assert len(page.training_runs) == 1 and page.cursor.total_count >= 1

            # streamed to a file, with progress
            target = await rest.download_checkpoint_archive_by_checkpoint_path_async(
                training,
                tmp_path,
                progress=lambda done, total: progress.append((done, total)),
                show_progress=True,
            )
            assert target.parent == tmp_path and target.name.endswith(".tar.gz")
            with tarfile.open(target) as archive:
                assert archive.getnames()
            assert progress and progress[-1][0] == target.stat().st_size
            assert [p.name for p in tmp_path.iterdir()] == [target.name]  # noqa: ASYNC240 - no temporary file left

            await rest.delete_checkpoint_by_checkpoint_path_async(training)
            await rest.delete_checkpoint_async(tc.model_id, "ckpt_sampler")
            assert (await rest.list_checkpoints_async(tc.model_id)).checkpoints == []
            with pytest.raises(NotFoundError):
                await rest.get_training_run_async("no-such-run")

    run(main)


def test_a_failed_download_leaves_nothing_behind(null_server: HasURL, tmp_path: Path) -> None:
    with (
        FaultProxy(null_server.url) as proxy,
        client(null_server, base_url=proxy.url, retry_timeout=0.5) as service,
    ):
        tc = service.create_lora_training_client(NULL_MODEL, rank=4)
        path = tc.save_state("x").result().path
        rest = service.create_rest_client()
        proxy.inject("/archive", "truncate", times=1)  # one cut, then a good retry
        good = rest.download_checkpoint_archive_by_checkpoint_path(path, tmp_path / "good.tar.gz").result()
        with tarfile.open(good) as archive:
            assert archive.getnames()
        proxy.inject("/archive", "truncate", times=10_000)
        with pytest.raises(RetryBudgetExceededError):
            rest.download_checkpoint_archive_by_checkpoint_path(path, tmp_path / "bad.tar.gz").result()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["good.tar.gz"]
