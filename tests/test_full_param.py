"""Full-parameter training (``lora_rank=0``, server feature ``full_param``) and Fireworks' client spelling.

Through a LocalServer and the client. Every number is checked against a direct PyTorch computation: a copy of
the built-in model trained with the same losses (written out from the Tinker formulas) and
``torch.optim.AdamW``; sampler weights are checked with the checkpoint folder loaded by plain transformers.
"""

from __future__ import annotations

import json
from typing import Any

import msgspec
import numpy as np
import pytest
from client_fixtures import client, datum, hf_model, hf_tokenizer, run, small_batch
from fault_proxy import FaultProxy

import hpcai_async
from hpcai_async import types

torch = pytest.importorskip("torch")

from test_engine import direct_logprobs  # noqa: E402
from test_optim_losses import TEXTS, accumulation_calls, ce, direct_terms, loss_token_counts, rl  # noqa: E402

from hpcai_async.server.engine.losses import LOSSES  # noqa: E402
from hpcai_async.server.models import BUILTIN_NAME  # noqa: E402

Call = tuple[str, list[types.Datum], Any]
ADAM = types.AdamParams(learning_rate=1e-2, beta1=0.8, beta2=0.9, eps=1e-3, weight_decay=0.3)


@pytest.fixture(scope="module")
def tok() -> Any:
    return hf_tokenizer()


def ids_of(d: types.Datum) -> list[int]:
    return [*d.model_input.to_ints(), int(d.loss_fn_inputs["target_tokens"].to_numpy()[-1])]


def terms_inputs(d: types.Datum) -> dict[str, Any]:
    return {k: torch.from_numpy(np.array(v.to_numpy(), dtype=v.dtype)) for k, v in d.loss_fn_inputs.items()}


class Replica:
    """The built-in model, every weight trained by torch.optim.AdamW: what a full-parameter run must do."""

    def __init__(self, adam: types.AdamParams) -> None:
        self.model = hf_model().requires_grad_(True)
        wd = adam.weight_decay if isinstance(adam.weight_decay, float) else 0.0
        betas = (adam.beta1, adam.beta2)
        self.opt = torch.optim.AdamW(
            self.model.parameters(), lr=adam.learning_rate, betas=betas, eps=adam.eps, weight_decay=wd
        )

    def logprobs(self, d: types.Datum) -> Any:
        with torch.no_grad():
            return direct_logprobs(self.model, ids_of(d))

    def step(self, calls: list[Call], divisor: float = 1.0) -> None:
        total = torch.zeros(())
        for loss_fn, data, config in calls:
            for d in data:
                total = (
                    total
                    + direct_terms(
                        direct_logprobs(self.model, ids_of(d)), terms_inputs(d), loss_fn, config
                    ).sum()
                )
        total.backward()
        for p in self.model.parameters():
            p.grad /= divisor
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)

    def weights(self) -> dict[str, Any]:
        return {k: p.detach() for k, p in self.model.named_parameters()}


def run_weights(engine: Any, model_id: str) -> dict[str, Any]:
    return {k: p.detach().clone() for k, p in engine._runs[model_id].params}


def assert_weights(got: dict[str, Any], want: dict[str, Any], exact: bool = False) -> None:
    assert got.keys() == want.keys()
    for k in want:
        if exact:
            assert torch.equal(got[k], want[k]), k
        else:
            torch.testing.assert_close(got[k], want[k], atol=2e-5, rtol=1e-4, msg=lambda m, k=k: f"{k}: {m}")


def policy_calls(tok: Any) -> list[Call]:
    """One call of each loss beyond cross_entropy and importance_sampling (with a loss_fn_config each)."""
    rng = np.random.default_rng(7)
    seqs = [tok.encode(t) for t in TEXTS]
    out: list[Call] = []
    for i, (loss_fn, config) in enumerate(
        [
            ("ppo", {"clip_low_threshold": 0.9, "clip_high_threshold": 1.1}),
            ("cispo", None),
            ("dro", {"beta": 0.2}),
        ]
    ):
        s = seqs[i + 1]
        n = len(s) - 1
        out.append((loss_fn, [rl(s, rng.normal(-3, 0.5, n), rng.normal(0, 1, n))], config))
    return out


def steps_of(tok: Any) -> list[tuple[list[Call], str | None, int]]:
    """Three optimizer steps: (the forward_backward calls, grad_accumulation_normalization, divisor)."""
    first = accumulation_calls(tok)
    tokens, _ = loss_token_counts(first)
    rest = policy_calls(tok)
    _, sequences = loss_token_counts(rest)
    single = [("cross_entropy", [ce(tok.encode(TEXTS[0]), np.ones(len(tok.encode(TEXTS[0])) - 1))], None)]
    return [(single, None, 1), (first, "num_loss_tokens", tokens), (rest, "num_sequences", sequences)]


# ------------------------------------------------------------------------------------------ training


def test_full_param_training_matches_torch_adamw_on_every_weight(
    server: Any, real_engine: Any, tok: Any
) -> None:
    steps = steps_of(tok)
    covered = {loss_fn for calls, _, _ in steps for loss_fn, _, _ in calls}
    assert covered == set(LOSSES)  # every loss of the server trains a full-parameter run

    async def main() -> tuple[str, list[list[types.ForwardBackwardOutput]], types.GetInfoResponse]:
        async with client(server) as service:
            tc = await service.create_training_client_async(base_model=BUILTIN_NAME, lora_rank=0)
            outputs = []
            for calls, mode, _ in steps:
                futures = [
                    await tc.forward_backward_async(data, loss_fn, config) for loss_fn, data, config in calls
                ]
                step = await tc.optim_step_async(ADAM, mode)
                outputs.append([await f for f in futures])
                await step
            return tc.model_id, outputs, await tc.get_info_async()

    model_id, outputs, info = run(main)
    assert info.is_lora is False and info.lora_rank is None
    replica = Replica(ADAM)
    base = {k: v.clone() for k, v in replica.weights().items()}
    for (calls, _, divisor), outs in zip(steps, outputs, strict=True):
        for (_, data, _), out in zip(calls, outs, strict=True):  # each forward saw the weights of its step
            for d, got in zip(data, out.loss_fn_outputs, strict=True):
                np.testing.assert_allclose(got["logprobs"].to_numpy(), replica.logprobs(d).numpy(), atol=2e-5)
        replica.step(calls, divisor)
    got = run_weights(real_engine, model_id)
    assert_weights(got, replica.weights())
    assert all(
        not torch.equal(got[k], base[k]) for k in base
    )  # every weight trained (weight decay alone moves it)
    lora_free = real_engine._runs[model_id].base.module
    assert not any(
        "lora_" in name for name, _ in lora_free.named_modules()
    )  # its own copy: no adapters in it


def test_save_state_and_resume_with_optimizer_continue_the_uninterrupted_run(
    server: Any, real_engine: Any
) -> None:
    data = small_batch(3, length=7)

    async def main() -> tuple[str, str, str, str]:
        async with client(server) as service:
            tc = await service.create_training_client_async(base_model=BUILTIN_NAME, lora_rank=0)
            for _ in range(2):
                await tc.forward_backward_async(data)
                await tc.optim_step_async(ADAM)
            saved = await (await tc.save_state_async("two"))
            await tc.forward_backward_async(data)
            await (await tc.optim_step_async(ADAM))  # the uninterrupted third step
            resumed = await service.create_training_client_from_state_with_optimizer_async(saved.path)
            await resumed.forward_backward_async(data)
            third = await (await resumed.optim_step_async(ADAM))
            assert third.metrics is not None and third.metrics["step:max"] == 3.0
            # into an existing full-parameter run too (a second one: another ServiceClient may make it)
            async with client(server) as other:
                again = await other.create_training_client_async(base_model=BUILTIN_NAME, lora_rank=0)
                await (await again.load_state_with_optimizer_async(saved.path))
                await again.forward_backward_async(data)
                await (await again.optim_step_async(ADAM))
                fresh = await service.create_training_client_from_state_async(saved.path)  # weights only
            return tc.model_id, resumed.model_id, again.model_id, fresh.model_id

    original, resumed, again, fresh = run(main)
    want = run_weights(real_engine, original)
    for other in (resumed, again):
        assert_weights(run_weights(real_engine, other), want, exact=True)  # bit for bit
    assert real_engine._runs[fresh].optimizer is None and real_engine._runs[fresh].steps == 2
    ref = server.store.resolve(f"hpcai://{original}/weights/two_training")
    files = {p.name for p in ref.directory.iterdir()}
    assert {"model.safetensors", "optimizer.safetensors", "engine.json", "config.json", "meta.json"} <= files
    assert json.loads((ref.directory / "engine.json").read_text())["lora"] is None


def test_sampling_from_saved_full_weights_uses_the_trained_weights(
    server: Any, real_engine: Any, tok: Any
) -> None:
    prompt = tok.encode("The small cat sat on the mat.")
    data = [datum(tok.encode(t)) for t in TEXTS]
    params = types.SamplingParams(max_tokens=1, temperature=0.0)

    async def main() -> tuple[str, str, list[list[float | None]]]:
        async with client(server) as service:
            tc = await service.create_training_client_async(base_model=BUILTIN_NAME, lora_rank=0)
            for _ in range(2):
                await tc.forward_backward_async(data)
                await tc.optim_step_async(types.AdamParams(learning_rate=3e-3))
            saved = await (await tc.save_weights_for_sampler_async("s"))
            sampler = await tc.save_weights_and_get_sampling_client_async("s")  # the same name, saved again
            got = []
            for _ in range(2):  # the second is served from the sampler cache
                out = await sampler.sample_async(
                    types.ModelInput.from_ints(prompt), 1, params, include_prompt_logprobs=True
                )
                got.append(out.prompt_logprobs)
            await tc.forward_backward_async(data)
            await tc.optim_step_async(types.AdamParams(learning_rate=3e-3))
            await (await tc.save_weights_for_sampler_async("s"))  # a new save under the name is loaded again
            out = await sampler.sample_async(
                types.ModelInput.from_ints(prompt), 1, params, include_prompt_logprobs=True
            )
            got.append(out.prompt_logprobs)
            return tc.model_id, saved.path, got

    model_id, path, got = run(main)
    assert got[0] == got[1]
    folder = server.store.resolve(path).directory
    trained = hf_model(folder)  # the checkpoint is a plain transformers model folder
    with torch.no_grad():
        want = direct_logprobs(trained, prompt).numpy()
        base = direct_logprobs(hf_model(), prompt).numpy()
    np.testing.assert_allclose(np.array(got[2][1:], dtype=np.float32), want, atol=2e-5)
    assert np.abs(want - base).max() > 1e-2  # the trained weights, not the base model
    for key, p in real_engine._runs[model_id].params:  # and they are the run's own
        torch.testing.assert_close(trained.get_parameter(key), p.detach())
    assert not np.allclose(np.array(got[0][1:], dtype=np.float32), want, atol=1e-4)  # the older save


def test_layout_mismatches_are_400s_naming_both_layouts_and_change_nothing(
    server: Any, real_engine: Any
) -> None:
    data = small_batch(2)

    async def main() -> None:
        async with client(server) as service:
            full = await service.create_training_client_async(base_model=BUILTIN_NAME, lora_rank=0)
            lora = await service.create_lora_training_client_async(BUILTIN_NAME, rank=4)
            for tc in (full, lora):
                await tc.forward_backward_async(data)
                await (await tc.optim_step_async(ADAM))
            full_path = (await (await full.save_state_async("f"))).path
            lora_path = (await (await lora.save_state_async("l"))).path
            before = {tc.model_id: run_weights(real_engine, tc.model_id) for tc in (full, lora)}
            with pytest.raises(hpcai_async.BadRequestError, match=r"LoRA rank 4 \(attn\).*full-parameter"):
                await (await full.load_state_async(lora_path))
            with pytest.raises(hpcai_async.BadRequestError, match=r"full-parameter.*LoRA rank 4 \(attn\)"):
                await (await lora.load_state_with_optimizer_async(full_path))
            for tc in (full, lora):
                for k, v in run_weights(real_engine, tc.model_id).items():
                    assert torch.equal(v, before[tc.model_id][k])
                step = await (await tc.optim_step_async(ADAM))  # both go on, in their sequence
                assert step.metrics is not None and step.metrics["step:max"] == 2.0

    run(main)


# ------------------------------------------------------------------------------------------ the spelling


def test_create_training_client_creates_once_per_pair_and_attach_continues_the_sequence(
    null_server: Any,
) -> None:
    model = "null/instant"
    with client(null_server) as service:
        full = service.create_training_client(base_model=model, lora_rank=0, user_metadata={"exp": "a1"})
        lora = service.create_training_client(base_model=model, lora_rank=8)
        for rank in (0, 8):
            with pytest.raises(ValueError, match=f"lora_rank={rank}"):
                service.create_training_client(base_model=model, lora_rank=rank)
        twice = [service.create_lora_training_client(model, rank=8) for _ in range(2)]  # not subject to it
        assert len({lora.model_id, *(t.model_id for t in twice)}) == 3
        with pytest.raises(hpcai_async.ConfigurationError, match="base_model= by keyword"):
            service.create_training_client("null/instant", lora_rank=0)  # Fireworks' positional base_model
        with pytest.raises(hpcai_async.ConfigurationError, match="lora_rank=0"):
            service.create_lora_training_client(model, rank=0)
        with pytest.raises(hpcai_async.ConfigurationError, match="model_id"):
            service.create_training_client()
        tagged = service.create_lora_training_client(model, rank=4, user_metadata={"who": "me", "k": "v"})
        rest = service.create_rest_client()
        assert rest.get_training_run(full.model_id).result().user_metadata == {"exp": "a1"}
        listed = {r.training_run_id: r for r in rest.list_training_runs(limit=100).result().training_runs}
        assert listed[tagged.model_id].user_metadata == {"who": "me", "k": "v"}
        assert listed[lora.model_id].user_metadata is msgspec.UNSET
        assert (listed[full.model_id].is_lora, listed[full.model_id].lora_rank) == (False, None)
        assert (listed[lora.model_id].is_lora, listed[lora.model_id].lora_rank) == (True, 8)
        ref = service.create_reference_client(model, lora_rank=8)  # the blocking forms
        assert ref.policy is lora and ref.forward(small_batch(2)).result().metrics["num_examples:sum"] == 2.0
        assert service.create_reference_client(model).policy is None  # lora_rank=0: a frozen model

        full.forward_backward(small_batch()).result()
        full.optim_step(types.AdamParams()).result()
        order = null_server.scheduler.models[full.model_id].order
        assert order.next_seq_id == 3
    with client(null_server) as later:  # another process attaches to the run and goes on from seq_id 3
        attached = later.attach_training_client(full.model_id, model)
        assert later.create_training_client(full.model_id).model_id == full.model_id  # hpcai's spelling
        attached.forward_backward(small_batch()).result()
        assert attached.optim_step(types.AdamParams()).result().metrics == {
            "step:max": 2.0,
            "learning_rate:mean": 1e-4,
            "recent_loss:mean": 0.0,
        }
        assert order.next_seq_id == 5


def test_the_hosted_dialect_refuses_full_param_and_metadata_before_sending(server_factory: Any) -> None:
    hosted = server_factory(dialect="hosted")
    with FaultProxy(hosted.url) as proxy:

        async def main() -> None:
            async with client(hosted, base_url=proxy.url) as service:
                refused = [
                    (
                        "full_param",
                        service.create_training_client_async(base_model="null/instant", lora_rank=0),
                    ),
                    (
                        "user_metadata",
                        service.create_lora_training_client_async("null/instant", user_metadata={}),
                    ),
                    ("reference_forward", service.create_reference_client_async("null/instant")),
                ]
                for feature, call in refused:
                    with pytest.raises(hpcai_async.UnsupportedFeatureError) as info:
                        await call
                    assert info.value.feature == feature
                # the refused pair is not taken: a LoRA run of the same spelling still goes through
                tc = await service.create_training_client_async(base_model="null/instant", lora_rank=4)
                assert (await tc.get_info_async()).is_lora is True

        run(main)
        created = proxy.find("create_model")
        assert len(created) == 1 and json.loads(created[0].body)["lora_config"]["rank"] == 4
        assert "user_metadata" not in json.loads(created[0].body)
