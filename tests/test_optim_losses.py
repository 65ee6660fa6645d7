"""optim_step's grad_accumulation_normalization and weight_decay, loss_fn_config and the cispo / dro losses.

Through a LocalServer and the client; every number is checked against a direct PyTorch computation (the plain
Hugging Face model with the LoRA written out by hand, ``torch.optim.AdamW`` on copies). Against a server that
lacks the features (the hosted dialect), the client refuses before sending anything.
"""

from __future__ import annotations

import json
from typing import Any

import msgspec
import numpy as np
import pytest
from client_fixtures import client, hf_model, hf_tokenizer, run
from fault_proxy import FaultProxy

import hpcai_async
from hpcai_async import types

torch = pytest.importorskip("torch")

from test_engine import HandLoRA, direct_logprobs  # noqa: E402

from hpcai_async.server.models import BUILTIN_NAME  # noqa: E402

TEXTS = ["Q: What color is the sky?\nA: blue\n", "3+4=7\n5+6=11\n", "The small cat sat.", "Hello there!"]
RANK = 4


@pytest.fixture(scope="module")
def tok() -> Any:
    return hf_tokenizer()


@pytest.fixture(scope="module")
def plain() -> Any:
    return hf_model()


def ce(ids: list[int], weights: np.ndarray) -> types.Datum:
    return types.Datum(
        model_input=types.ModelInput.from_ints(ids[:-1]),
        loss_fn_inputs={
            "target_tokens": np.asarray(ids[1:], np.int64),
            "weights": weights.astype(np.float32),
        },
    )


def rl(ids: list[int], q: np.ndarray, adv: np.ndarray) -> types.Datum:
    return types.Datum(
        model_input=types.ModelInput.from_ints(ids[:-1]),
        loss_fn_inputs={
            "target_tokens": np.asarray(ids[1:], np.int64),
            "logprobs": q.astype(np.float32),
            "advantages": adv.astype(np.float32),
        },
    )


def inputs(datum: types.Datum) -> dict[str, Any]:
    return {
        k: torch.from_numpy(np.asarray(v.to_numpy(), dtype=v.dtype).copy())
        for k, v in datum.loss_fn_inputs.items()
    }


def direct_terms(lp: Any, x: dict[str, Any], loss_fn: str, config: dict[str, float] | None) -> Any:
    """The per-token loss of ``loss_fn`` written out from the Tinker docs' formulas."""
    cfg = config or {}
    if loss_fn == "cross_entropy":
        return -x["weights"] * lp
    q, adv = x["logprobs"], x["advantages"]
    ratio = torch.exp(lp - q)
    if loss_fn == "importance_sampling":
        return -ratio * adv
    if loss_fn == "ppo":
        clipped = ratio.clamp(cfg.get("clip_low_threshold", 0.8), cfg.get("clip_high_threshold", 1.2))
        return -torch.minimum(ratio * adv, clipped * adv)
    if loss_fn == "cispo":
        low, high = cfg.get("clip_low_threshold", 0.0), cfg.get("clip_high_threshold", 4.0)
        return -(ratio.clamp(low, high).detach() * lp * adv)
    assert loss_fn == "dro"
    return -(lp * adv - 0.5 * cfg.get("beta", 0.1) * (lp - q) ** 2)


def params(engine: Any, model_id: str) -> list[tuple[str, Any]]:
    return engine._runs[model_id].params


def snapshot(engine: Any, model_id: str) -> dict[str, Any]:
    return {k: p.detach().clone() for k, p in params(engine, model_id)}


def direct_grads(plain: Any, weights: dict[str, Any], calls: list[tuple[str, list[types.Datum], Any]]) -> Any:
    """The gradient of the summed loss over every call, by autograd on the hand-written LoRA."""
    with HandLoRA(plain, weights, requires_grad=True) as hand:
        total = torch.zeros(())
        for loss_fn, data, config in calls:
            for datum in data:
                ids = [
                    *datum.model_input.to_ints(),
                    int(datum.loss_fn_inputs["target_tokens"].to_numpy()[-1]),
                ]
                total = (
                    total + direct_terms(direct_logprobs(plain, ids), inputs(datum), loss_fn, config).sum()
                )
        total.backward()
        return {k: leaf.grad.detach().clone() for k, leaf in hand.leaves.items()}


# ------------------------------------------------------------------------------------ normalization


def accumulation_calls(tok: Any) -> list[tuple[str, list[types.Datum], Any]]:
    """Three forward_backward calls of different sizes; one datum has no loss token at all."""
    rng = np.random.default_rng(3)
    seqs = [tok.encode(t) for t in TEXTS]
    w0 = np.array([float(i % 3 != 0) for i in range(len(seqs[0]) - 1)])
    adv2 = rng.normal(0, 1, len(seqs[2]) - 1)
    adv2[:3] = 0.0  # prompt positions: no loss tokens
    adv3 = rng.normal(0, 1, len(seqs[3]) - 1)
    return [
        ("cross_entropy", [ce(seqs[0], w0)], None),
        (
            "cross_entropy",
            [ce(seqs[1], np.ones(len(seqs[1]) - 1)), ce(seqs[3], np.zeros(len(seqs[3]) - 1))],
            None,
        ),
        (
            "importance_sampling",
            [
                rl(seqs[2], rng.normal(-2, 0.3, len(seqs[2]) - 1), adv2),
                rl(seqs[3], rng.normal(-2, 0.3, len(seqs[3]) - 1), adv3),
                rl(seqs[1], np.zeros(len(seqs[1]) - 1), np.zeros(len(seqs[1]) - 1)),
            ],
            None,
        ),
    ]


def loss_token_counts(calls: list[tuple[str, list[types.Datum], Any]]) -> tuple[int, int]:
    """(loss tokens, sequences with a loss token), counted directly from the data."""
    tokens = sequences = 0
    for loss_fn, data, _ in calls:
        key = "weights" if loss_fn == "cross_entropy" else "advantages"
        for datum in data:
            n = int(np.count_nonzero(datum.loss_fn_inputs[key].to_numpy()))
            tokens += n
            sequences += n > 0
    return tokens, sequences


@pytest.mark.parametrize("mode", ["none", "num_loss_tokens", "num_sequences", None])
def test_grad_accumulation_normalization_and_weight_decay_match_torch_adamw(
    server: Any, real_engine: Any, tok: Any, plain: Any, mode: str | None
) -> None:
    calls = accumulation_calls(tok)
    tokens, sequences = loss_token_counts(calls)
    assert sequences == 4 and tokens > 2 * sequences  # two datums without a loss token are not counted
    divisor = {"num_loss_tokens": tokens, "num_sequences": sequences}.get(mode or "none", 1)
    adam = types.AdamParams(learning_rate=1e-2, beta1=0.8, beta2=0.9, eps=1e-3, weight_decay=0.3)

    async def main() -> tuple[str, dict[str, Any], dict[str, float]]:
        async with client(server) as service:
            tc = await service.create_lora_training_client_async(
                BUILTIN_NAME, rank=RANK, seed=5, train_mlp=True
            )
            before = snapshot(real_engine, tc.model_id)
            for loss_fn, data, _ in calls:
                await (await tc.forward_backward_async(data, loss_fn))
            step = await (await tc.optim_step_async(adam, mode))
            assert step.metrics is not None
            return tc.model_id, before, step.metrics

    model_id, before, metrics = run(main)
    assert metrics["step:max"] == 1.0
    want = direct_grads(plain, before, calls)
    copies = {k: torch.nn.Parameter(v.clone()) for k, v in before.items()}
    for k, p in copies.items():
        p.grad = want[k] / divisor
    ref = torch.optim.AdamW(list(copies.values()), lr=1e-2, betas=(0.8, 0.9), eps=1e-3, weight_decay=0.3)
    ref.step()
    run_ = real_engine._runs[model_id]
    for key, p in run_.params:
        torch.testing.assert_close(
            run_.optimizer.state[p]["exp_avg"], ref.state[copies[key]]["exp_avg"], atol=1e-7, rtol=1e-4
        )
        torch.testing.assert_close(p.detach(), copies[key].detach(), atol=1e-6, rtol=1e-5)
    assert (run_.loss_tokens, run_.loss_sequences) == (0, 0)  # counted afresh for the next step
    real_engine.unload(model_id)


# ------------------------------------------------------------------------------------------- losses


LOSS_CASES = [
    ("cispo", None),
    ("cispo", {"clip_low_threshold": 0.9, "clip_high_threshold": 1.1}),
    ("dro", None),
    ("dro", {"beta": 0.7}),
    ("ppo", {"clip_low_threshold": 0.95, "clip_high_threshold": 1.02}),
]


@pytest.mark.parametrize(("loss_fn", "config"), LOSS_CASES)
def test_loss_gradients_match_direct_autograd(
    server: Any, real_engine: Any, tok: Any, plain: Any, loss_fn: str, config: dict[str, float] | None
) -> None:
    rng = np.random.default_rng(11)
    seqs = [tok.encode(t) for t in TEXTS[:3]]

    async def main() -> tuple[str, dict[str, Any], list[types.Datum], types.ForwardBackwardOutput]:
        async with client(server) as service:
            tc = await service.create_lora_training_client_async(
                BUILTIN_NAME, rank=RANK, seed=9, train_mlp=True
            )
            warm = [ce(s, np.ones(len(s) - 1)) for s in seqs]
            await (await tc.forward_backward_async(warm))  # B != 0 afterwards: every tensor gets a gradient
            await (await tc.optim_step_async(types.AdamParams(learning_rate=1e-2)))
            now = await (await tc.forward_async(warm))
            data = []
            for s, rec in zip(seqs, now.loss_fn_outputs, strict=True):
                lp = np.asarray(rec["logprobs"].to_numpy())
                # sampler logprobs near the current ones: ratios inside and outside the clip ranges
                data.append(rl(s, lp + rng.normal(0, 0.2, lp.shape), rng.normal(0, 1, lp.shape)))
            weights = snapshot(real_engine, tc.model_id)
            out = await (await tc.forward_backward_async(data, loss_fn, config))
            return tc.model_id, weights, data, out

    model_id, weights, data, out = run(main)
    want = direct_grads(plain, weights, [(loss_fn, data, config)])
    for key, p in params(real_engine, model_id):
        torch.testing.assert_close(p.grad, want[key], atol=1e-5, rtol=1e-4)
    total, n = 0.0, 0
    for datum, rec in zip(data, out.loss_fn_outputs, strict=True):
        ids = [*datum.model_input.to_ints(), int(datum.loss_fn_inputs["target_tokens"].to_numpy()[-1])]
        with HandLoRA(plain, weights), torch.no_grad():
            el = direct_terms(direct_logprobs(plain, ids), inputs(datum), loss_fn, config)
        np.testing.assert_allclose(rec["elementwise_loss"].to_numpy(), el.numpy(), atol=1e-5, rtol=1e-4)
        total, n = total + float(el.sum()), n + len(ids) - 1
    assert out.metrics["loss:mean"] == pytest.approx(total / n, rel=1e-4)
    assert out.loss_fn_output_type == loss_fn
    real_engine.unload(model_id)


def test_loss_fn_config_changes_the_loss(server: Any, real_engine: Any, tok: Any) -> None:
    """ppo on the same data with the default and with narrow clip bounds: different losses."""
    ids = tok.encode(TEXTS[0])
    n = len(ids) - 1
    datum = rl(ids, np.full(n, -3.0), np.linspace(-1, 1, n))

    async def main() -> list[float]:
        async with client(server) as service:
            tc = await service.create_lora_training_client_async(BUILTIN_NAME, rank=RANK)
            out = []
            for config in (None, {"clip_low_threshold": 0.99, "clip_high_threshold": 1.01}):
                res = await (await tc.forward_async([datum], "ppo", config))
                out.append(res.metrics["loss:mean"])
            real_engine.unload(tc.model_id)
            return out

    default, narrow = run(main)
    assert default != pytest.approx(narrow)


# ------------------------------------------------------------------------------------------ bad input


@pytest.mark.parametrize(
    ("loss_fn", "config", "message"),
    [
        (
            "ppo",
            {"beta": 0.1},
            r"unknown key\(s\) 'beta' for ppo; allowed keys: clip_low_threshold, clip_high_threshold",
        ),
        ("dro", {"clip_low_threshold": 0.1}, "allowed keys: beta"),
        ("cross_entropy", {"x": 1.0}, "takes no loss_fn_config"),
        ("cispo", {"clip_low_threshold": 2.0, "clip_high_threshold": 1.0}, "clip_low_threshold 2 is above"),
        ("dro", {"beta": -1.0}, r"loss_fn_config.beta: must be >= 0"),
    ],
)
def test_bad_loss_fn_config_is_a_400_naming_the_allowed_keys(
    null_server: Any, loss_fn: str, config: dict[str, float], message: str
) -> None:
    datum = (
        rl([1, 2, 3, 4], np.zeros(3), np.ones(3)) if loss_fn != "cross_entropy" else ce([1, 2, 3], np.ones(2))
    )

    async def main() -> None:
        async with client(null_server) as service:
            tc = await service.create_lora_training_client_async("null/instant", rank=RANK)
            with pytest.raises(hpcai_async.BadRequestError, match=message) as info:
                await (await tc.forward_backward_async([datum], loss_fn, config))  # type: ignore[arg-type]
            assert info.value.status == 400
            assert "forward_backward_input.loss_fn_config" in str(info.value)
            ok = await (await tc.forward_backward_async([datum], loss_fn))  # type: ignore[arg-type]
            assert ok.metrics["num_examples:sum"] == 1.0

    run(main)


def test_bad_normalization_values_are_refused(null_server: Any) -> None:
    async def main() -> None:
        async with client(null_server) as service:
            tc = await service.create_lora_training_client_async("null/instant", rank=RANK)
            with pytest.raises(ValueError, match="'tokens' is not a valid GradAccNormalization"):
                await tc.optim_step_async(types.AdamParams(), "tokens")
            body = {
                "model_id": tc.model_id,
                "adam_params": {"learning_rate": 1e-4},
                "grad_accumulation_normalization": "tokens",
            }
            with pytest.raises(
                hpcai_async.BadRequestError, match="use one of num_loss_tokens, num_sequences, none"
            ):
                await service._transport.call("POST", "optim_step", body=body)
            step = await (
                await tc.optim_step_async(types.AdamParams(), types.GradAccNormalization.NUM_SEQUENCES)
            )
            assert step.metrics is not None and step.metrics["step:max"] == 1.0

    run(main)


# ------------------------------------------------------------------------------- a server without them


def test_the_hosted_dialect_refuses_each_feature_before_sending(server_factory: Any) -> None:
    hosted = server_factory(dialect="hosted")
    datum = rl([1, 2, 3, 4], np.zeros(3), np.ones(3))
    with FaultProxy(hosted.url) as proxy:

        async def main() -> None:
            async with client(hosted, base_url=proxy.url) as service:
                tc = await service.create_lora_training_client_async("null/instant", rank=RANK)
                refused = [
                    ("loss:cispo", tc.forward_backward_async([datum], "cispo")),
                    ("loss:dro", tc.forward_async([datum], "dro", {"beta": 0.2})),
                    (
                        "loss_fn_config",
                        tc.forward_backward_async([datum], "ppo", {"clip_low_threshold": 0.9}),
                    ),
                    ("grad_acc_normalization", tc.optim_step_async(types.AdamParams(), "num_loss_tokens")),
                    ("weight_decay", tc.optim_step_async(types.AdamParams(weight_decay=0.01))),
                    ("grad_clip_norm", tc.optim_step_async(types.AdamParams(grad_clip_norm=1.0))),
                ]
                for feature, call in refused:
                    with pytest.raises(hpcai_async.UnsupportedFeatureError) as info:
                        await call
                    assert info.value.feature == feature
                # the refused calls gave their turns back: the official calls go through, in order
                fb = await tc.forward_backward_async([datum], "ppo")
                # zero weight decay and clipping are the official step: sent without the fields
                step = await tc.optim_step_async(
                    types.AdamParams(weight_decay=0.0, grad_clip_norm=0.0), "none"
                )
                await fb
                assert (await step).metrics == {
                    "step:max": 1.0,
                    "learning_rate:mean": 1e-4,
                    "recent_loss:mean": 0.0,
                }

        run(main)
        sent = [r for r in proxy.requests if r.endpoint in ("forward", "forward_backward", "optim_step")]
        assert [r.endpoint for r in sent] == ["forward_backward", "optim_step"]
        bodies = [json.loads(r.body) if r.body[:1] == b"{" else msgspec.msgpack.decode(r.body) for r in sent]
        assert "loss_fn_config" not in bodies[0]["forward_backward_input"]
        assert "grad_accumulation_normalization" not in bodies[1]
        assert sorted(bodies[1]["adam_params"]) == ["beta1", "beta2", "eps", "learning_rate"]
