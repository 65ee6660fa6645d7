"""ServiceClient.create_reference_client: forward-only logprobs of the base model ("reference_forward").

For a LoRA policy the reference shares the policy's run with the adapter off (no second copy of the base
model, in turn with the policy's requests); for a full-parameter policy, or none, it is a frozen model the
server refuses to train. Its logprobs are checked against the built-in model run by plain transformers,
before and after the policy trains.
"""

from __future__ import annotations

import warnings
from typing import Any

import numpy as np
import pytest
from client_fixtures import client, datum, run

import hpcai_async
from hpcai_async import types

torch = pytest.importorskip("torch")

from test_engine import direct_logprobs  # noqa: E402

from hpcai_async.server.models import BUILTIN_DIR, BUILTIN_NAME  # noqa: E402

SEQS = [[5, 17, 256, 1001, 42, 7, 99, 3], [1200, 8, 64, 9, 300, 11], [77, 78, 79, 80, 81, 82, 83, 84, 85]]
ADAM = types.AdamParams(learning_rate=5e-2)  # large: the policy moves far from the base model


@pytest.fixture(scope="module")
def base_logprobs() -> list[Any]:
    """log p(target) of each sequence under the built-in model, by plain transformers."""
    from transformers import AutoModelForCausalLM

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = AutoModelForCausalLM.from_pretrained(str(BUILTIN_DIR), dtype=torch.float32).eval()
    with torch.no_grad():
        return [direct_logprobs(model, s).numpy() for s in SEQS]


def logprobs(out: types.ForwardBackwardOutput) -> list[Any]:
    return [o["logprobs"].to_numpy() for o in out.loss_fn_outputs]


def assert_base(got: list[Any], base: list[Any]) -> None:
    for g, b in zip(got, base, strict=True):
        np.testing.assert_allclose(g, b, atol=2e-5)


def far_from_base(got: list[Any], base: list[Any]) -> bool:
    return max(float(np.abs(g - b).max()) for g, b in zip(got, base, strict=True)) > 0.05


@pytest.mark.parametrize("lora_rank", [4, 0])
def test_reference_logprobs_stay_the_base_models_while_the_policy_trains(
    server: Any, real_engine: Any, base_logprobs: list[Any], lora_rank: int
) -> None:
    data = [datum(s) for s in SEQS]

    async def main() -> None:
        async with client(server) as service:
            policy = await service.create_training_client_async(base_model=BUILTIN_NAME, lora_rank=lora_rank)
            models = real_engine.loaded_models()
            ref = await service.create_reference_client_async(BUILTIN_NAME, lora_rank=lora_rank)
            assert (ref.policy is policy) == (lora_rank > 0)
            assert (ref.model_id == policy.model_id) == (lora_rank > 0)
            before = await ref.forward_async(data)
            # pipelined: the reference forwards are called between the policy's steps, none awaited
            during = []
            for _ in range(3):
                await policy.forward_backward_async(data)
                during.append(await ref.forward_async(data))
                await policy.optim_step_async(ADAM)
            trained = await (await policy.forward_async(data))
            after = await (await ref.forward_async(data))
            assert_base(logprobs(await before), base_logprobs)
            for f in during:
                assert_base(logprobs(await f), base_logprobs)
            assert_base(logprobs(after), base_logprobs)
            assert far_from_base(logprobs(trained), base_logprobs)  # the policy did move
            if lora_rank:  # the policy's run, adapter off: no other copy of the base model was made
                assert real_engine.loaded_models() == models
                info = await policy.get_info_async()  # every reference forward took a turn in its sequence
                assert info.next_seq_id == 1 + 3 * 3 + 3 + 1  # before/during/after/trained, and this

    run(main)


def test_a_frozen_reference_model_refuses_training_with_a_400(server: Any, base_logprobs: list[Any]) -> None:
    data = [datum(s) for s in SEQS]

    async def main() -> None:
        async with client(server) as service:
            ref = await service.create_reference_client_async(BUILTIN_NAME, lora_rank=8)  # no such policy
            assert ref.policy is None
            assert_base(logprobs(await (await ref.forward_async(data))), base_logprobs)
            with pytest.raises(AttributeError, match="forward-only"):
                ref.forward_backward  # noqa: B018
            raw = service.attach_training_client(ref.model_id, BUILTIN_NAME)  # the server refuses it too
            refused = [
                raw.forward_backward_async(data),
                raw.optim_step_async(ADAM),
                raw.save_state_async("x"),
                raw.save_weights_for_sampler_async("x"),
            ]
            for call in refused:
                with pytest.raises(hpcai_async.BadRequestError, match="forward-only reference model"):
                    await (await call)
            info = await raw.get_info_async()
            assert (info.is_lora, info.lora_rank) == (False, None)
            assert_base(logprobs(await (await raw.forward_async(data))), base_logprobs)  # forward still works
            runs = await service.create_rest_client().list_training_runs_async(limit=1000)
            assert ref.model_id not in {r.training_run_id for r in runs.training_runs}  # not a training run

    run(main)
