"""The PyTorch engine against direct PyTorch computations: logprobs, gradients, AdamW, checkpoints, sampling.

Every number is compared with a computation that does not go through the engine: the plain Hugging Face model
(with LoRA written out by hand as forward hooks), ``torch.optim.AdamW`` on copies, ``torch.log_softmax``.
"""

from __future__ import annotations

import json
import uuid
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from client_fixtures import hf_model, hf_tokenizer  # noqa: E402

from hpcai_async import types  # noqa: E402
from hpcai_async._errors import BadRequestError, ConfigurationError, NotFoundError  # noqa: E402
from hpcai_async.server.engine import Engine  # noqa: E402
from hpcai_async.server.engine_api import SampleJob  # noqa: E402
from hpcai_async.server.models import BUILTIN_DIR, BUILTIN_NAME  # noqa: E402

BASE = BUILTIN_NAME
ALL = types.LoraConfig(rank=4, seed=7, train_attn=True, train_mlp=True, train_unembed=True)


# --------------------------------------------------------------------------------------------- helpers


@pytest.fixture(scope="module")
def engine(real_engine: Engine) -> Engine:
    return real_engine


@pytest.fixture(scope="module")
def tok() -> Any:
    return hf_tokenizer()


@pytest.fixture(scope="module")
def plain() -> Any:
    """A second copy of the built-in model, loaded by plain transformers (no engine, no PEFT)."""
    return hf_model()


@pytest.fixture
def run(engine: Engine) -> Iterator[str]:
    """A fresh run on the built-in model with every target and a fixed seed; unloaded afterwards."""
    run_id = f"t-{uuid.uuid4().hex[:8]}"
    engine.create_run(run_id, BASE, ALL)
    yield run_id
    engine.unload(run_id)


def new_run(engine: Engine, lora: types.LoraConfig = ALL) -> str:
    run_id = f"t-{uuid.uuid4().hex[:8]}"
    engine.create_run(run_id, BASE, lora)
    return run_id


TEXTS = ["Q: What color is the sky?\nA: blue\n", "3+4=7\n5+6=11\n", "The small cat sat in the park."]


def ce_datum(ids: list[int], weights: list[float] | None = None) -> types.Datum:
    n = len(ids) - 1
    w = np.asarray(weights if weights is not None else [1.0] * n, dtype=np.float32)
    return types.Datum(
        model_input=types.ModelInput.from_ints(ids[:-1]),
        loss_fn_inputs={"target_tokens": np.asarray(ids[1:], dtype=np.int64), "weights": w},
    )


def rl_datum(ids: list[int], q: np.ndarray, adv: np.ndarray) -> types.Datum:
    return types.Datum(
        model_input=types.ModelInput.from_ints(ids[:-1]),
        loss_fn_inputs={
            "target_tokens": np.asarray(ids[1:], dtype=np.int64),
            "logprobs": q.astype(np.float32),
            "advantages": adv.astype(np.float32),
        },
    )


def batch(tok: Any) -> list[types.Datum]:
    out = []
    for k, text in enumerate(TEXTS):
        ids = tok.encode(text)
        w = [float((i + k) % 3 != 0) for i in range(len(ids) - 1)]  # uneven weights, some zero
        out.append(ce_datum(ids, w))
    return out


def lps(output: types.ForwardBackwardOutput) -> list[np.ndarray]:
    return [np.asarray(rec["logprobs"].to_numpy()) for rec in output.loss_fn_outputs]


def adapter(engine: Engine, run_id: str) -> list[tuple[str, Any]]:
    return engine._runs[run_id].params


def snapshot(engine: Engine, run_id: str) -> dict[str, Any]:
    return {k: p.detach().clone() for k, p in adapter(engine, run_id)}


def grads(engine: Engine, run_id: str) -> dict[str, Any]:
    return {k: None if p.grad is None else p.grad.clone() for k, p in adapter(engine, run_id)}


class HandLoRA:
    """The LoRA forward written out: ``y = W x + B (A x)`` on the plain model, through forward hooks."""

    def __init__(self, model: Any, tensors: dict[str, Any], requires_grad: bool = False) -> None:
        self.leaves: dict[str, Any] = {}
        modules: dict[str, dict[str, Any]] = {}
        for key, value in tensors.items():
            name, kind = key.removeprefix("base_model.model.").rsplit(".lora_", 1)
            leaf = value.detach().clone().requires_grad_(requires_grad)
            self.leaves[key] = leaf
            modules.setdefault(name, {})[kind.split(".")[0]] = leaf
        self.handles = [
            model.get_submodule(name).register_forward_hook(self._hook(ab["A"], ab["B"]))
            for name, ab in modules.items()
        ]

    @staticmethod
    def _hook(a: Any, b: Any) -> Any:
        def hook(module: Any, inputs: tuple[Any, ...], output: Any) -> Any:
            return output + (inputs[0] @ a.T) @ b.T  # scale = alpha / rank = 1

        return hook

    def __enter__(self) -> HandLoRA:
        return self

    def __exit__(self, *exc: object) -> None:
        for h in self.handles:
            h.remove()


def direct_logprobs(model: Any, ids: list[int]) -> Any:
    """log p(ids[i+1] | ids[:i+1]) for one unpadded sequence."""
    inp = torch.tensor([ids[:-1]])
    logits = model(input_ids=inp).logits[0].float()
    return torch.log_softmax(logits, dim=-1).gather(1, torch.tensor(ids[1:])[:, None])[:, 0]


def train(engine: Engine, run_id: str, data: list[types.Datum], steps: int, lr: float = 1e-2) -> list[float]:
    losses = []
    for _ in range(steps):
        out = engine.forward_backward(run_id, data, "cross_entropy")
        losses.append(out.metrics["loss:mean"])
        engine.optim_step(run_id, types.AdamParams(learning_rate=lr, weight_decay=0.01))
    return losses


# --------------------------------------------------------------------------------------------- forward


def test_fresh_run_computes_the_base_model(engine: Engine, run: str, tok: Any, plain: Any) -> None:
    data = batch(tok)
    out = engine.forward(run, data, "cross_entropy")
    assert out.loss_fn_output_type == "cross_entropy"
    assert set(out.metrics) == {"loss:mean", "num_examples:sum", "step:max"}
    assert out.metrics["num_examples:sum"] == 3.0 and out.metrics["step:max"] == 0.0
    total, weight = 0.0, 0.0
    with torch.no_grad():
        for datum, rec, text in zip(data, out.loss_fn_outputs, TEXTS, strict=True):
            ids = tok.encode(text)
            want = direct_logprobs(plain, ids).numpy()
            got = rec["logprobs"].to_numpy()
            assert rec["logprobs"].dtype == "float32" and got.shape == (len(ids) - 1,)
            np.testing.assert_allclose(got, want, atol=1e-5)
            w = datum.loss_fn_inputs["weights"].to_numpy()
            np.testing.assert_allclose(rec["elementwise_loss"].to_numpy(), -w * want, atol=1e-5)
            total += float((-w * want).sum())
            weight += float(w.sum())
    assert out.metrics["loss:mean"] == pytest.approx(total / weight, rel=1e-5)
    assert all(p.grad is None for _, p in adapter(engine, run))  # forward touches no gradient


def test_trained_logprobs_match_a_hand_merged_lora(
    engine: Engine, run: str, tok: Any, plain: Any, tmp_path: Path
) -> None:
    data = batch(tok)
    train(engine, run, data, 3)
    engine.save(run, tmp_path, optimizer=False)
    from safetensors.torch import load_file

    saved = load_file(str(tmp_path / "adapter_model.safetensors"))
    assert any(float(v.abs().sum()) > 0 for k, v in saved.items() if "lora_B" in k)
    got = lps(engine.forward(run, data, "cross_entropy"))
    with torch.no_grad(), HandLoRA(plain, saved):
        for text, g in zip(TEXTS, got, strict=True):
            np.testing.assert_allclose(g, direct_logprobs(plain, tok.encode(text)).numpy(), atol=1e-5)
    # the same with the LoRA merged into the weights: W + B @ A
    merged = {}
    with torch.no_grad():
        for key in saved:
            if ".lora_A." in key:
                name = key.removeprefix("base_model.model.").rsplit(".lora_", 1)[0]
                module = plain.get_submodule(name)
                merged[name] = module.weight.clone()
                module.weight += saved[key.replace("lora_A", "lora_B")] @ saved[key]
        try:
            for text, g in zip(TEXTS, got, strict=True):
                np.testing.assert_allclose(g, direct_logprobs(plain, tok.encode(text)).numpy(), atol=1e-5)
        finally:
            for name, weight in merged.items():
                plain.get_submodule(name).weight.copy_(weight)


def test_lora_targets_follow_the_config(engine: Engine) -> None:
    cases = {
        (True, False, False): {"q_proj", "k_proj", "v_proj", "o_proj"},
        (False, True, False): {"gate_proj", "up_proj", "down_proj"},
        (False, False, True): {"lm_head"},
    }
    for (attn, mlp, unembed), want in cases.items():
        run_id = new_run(
            engine, types.LoraConfig(rank=2, train_attn=attn, train_mlp=mlp, train_unembed=unembed)
        )
        try:
            names = {k.rsplit(".lora_", 1)[0].rsplit(".", 1)[-1] for k, _ in adapter(engine, run_id)}
            assert names == want
            for key, p in adapter(engine, run_id):
                assert p.shape[0 if "lora_A" in key else 1] == 2
                if "lora_B" in key:
                    assert (
                        float(p.detach().abs().sum()) == 0.0
                    )  # B starts at zero: the run starts as the base model
                else:
                    assert float(p.detach().abs().sum()) > 0.0
            info = engine.info(run_id)
            assert (info.is_lora, info.lora_rank, info.model_name) == (True, 2, BASE)
            assert info.model_data.arch == "Qwen3ForCausalLM" and info.model_data.model_name == BASE
        finally:
            engine.unload(run_id)
    with pytest.raises(BadRequestError, match="at least one"):
        engine.create_run("none", BASE, types.LoraConfig(rank=2, train_attn=False, train_mlp=False))


def test_seed_makes_the_initial_adapter_reproducible(engine: Engine) -> None:
    a, b = new_run(engine), new_run(engine)
    c = new_run(engine, types.LoraConfig(rank=4, seed=8, train_unembed=True))
    try:
        sa, sb, sc = snapshot(engine, a), snapshot(engine, b), snapshot(engine, c)
        assert all(torch.equal(sa[k], sb[k]) for k in sa)
        assert any(not torch.equal(sa[k], sc[k]) for k in sa if "lora_A" in k)
    finally:
        for r in (a, b, c):
            engine.unload(r)


# --------------------------------------------------------------------------------------------- gradients


@pytest.mark.parametrize("loss_fn", ["cross_entropy", "importance_sampling", "ppo"])
def test_gradients_match_direct_autograd(
    engine: Engine, run: str, tok: Any, plain: Any, loss_fn: str
) -> None:
    train(engine, run, batch(tok), 1)  # B != 0, so every adapter tensor gets a gradient
    rng = np.random.default_rng(0)
    seqs = [tok.encode(t) for t in TEXTS]
    if loss_fn == "cross_entropy":
        data = batch(tok)
    else:
        base_lp = [x for x in lps(engine.forward(run, [ce_datum(s) for s in seqs], "cross_entropy"))]
        # sampler logprobs near the current ones so that PPO's ratios fall inside and outside the clip range
        data = [
            rl_datum(s, lp + rng.normal(0, 0.3, lp.shape), rng.normal(0, 1, lp.shape))
            for s, lp in zip(seqs, base_lp, strict=True)
        ]
    weights = snapshot(engine, run)
    out = engine.forward_backward(run, data, loss_fn)
    got = grads(engine, run)

    with HandLoRA(plain, weights, requires_grad=True) as hand:
        total = torch.zeros(())
        want_el = []
        for s, datum in zip(seqs, data, strict=True):
            lp = direct_logprobs(plain, s)
            inputs = {k: torch.from_numpy(v.to_numpy().copy()) for k, v in datum.loss_fn_inputs.items()}
            if loss_fn == "cross_entropy":
                el = -inputs["weights"] * lp
            else:
                ratio = torch.exp(lp - inputs["logprobs"])
                adv = inputs["advantages"]
                if loss_fn == "importance_sampling":
                    el = -ratio * adv
                else:
                    el = -torch.minimum(ratio * adv, ratio.clamp(0.8, 1.2) * adv)
            want_el.append(el.detach().numpy())
            total = total + el.sum()
        total.backward()
        for key, leaf in hand.leaves.items():
            assert got[key] is not None, key
            torch.testing.assert_close(got[key], leaf.grad, atol=1e-5, rtol=1e-4)
    for rec, want in zip(out.loss_fn_outputs, want_el, strict=True):
        np.testing.assert_allclose(rec["elementwise_loss"].to_numpy(), want, atol=1e-5)
    if loss_fn != "cross_entropy":
        n_tokens = sum(len(s) - 1 for s in seqs)
        assert out.metrics["loss:mean"] == pytest.approx(float(total.detach()) / n_tokens, rel=1e-4)


def test_a_new_loss_is_one_registered_function(engine: Engine, run: str, tok: Any, plain: Any) -> None:
    from hpcai_async.server.engine import losses

    @losses.loss("test_squared_logprob", scale="float32")
    def squared(lp: Any, batch: Any) -> tuple[Any, float]:
        return batch["scale"] * lp**2 * batch["mask"].to(lp.dtype), float(batch["mask"].sum())

    ids = tok.encode(TEXTS[0])
    scale = np.linspace(0.5, 1.5, len(ids) - 1).astype(np.float32)
    datum = types.Datum(
        model_input=types.ModelInput.from_ints(ids[:-1]),
        loss_fn_inputs={"target_tokens": np.asarray(ids[1:], dtype=np.int64), "scale": scale},
    )
    try:
        with pytest.raises(BadRequestError, match="needs target_tokens, scale; missing scale"):
            engine.forward(run, [ce_datum(ids)], "test_squared_logprob")
        out = engine.forward(run, [datum], "test_squared_logprob")
    finally:
        del losses.LOSSES["test_squared_logprob"]
    with torch.no_grad():
        want = torch.from_numpy(scale) * direct_logprobs(plain, ids) ** 2  # a fresh run = the base model
    np.testing.assert_allclose(out.loss_fn_outputs[0]["elementwise_loss"].to_numpy(), want.numpy(), rtol=1e-5)
    assert out.metrics["loss:mean"] == pytest.approx(float(want.mean()), rel=1e-5)
    with pytest.raises(BadRequestError, match="use one of cross_entropy, importance_sampling, ppo"):
        engine.forward(run, [datum], "test_squared_logprob")


def test_gradients_accumulate_over_calls(engine: Engine, run: str, tok: Any) -> None:
    train(engine, run, batch(tok), 1)
    data = batch(tok)
    engine.forward_backward(run, data, "cross_entropy")
    one = grads(engine, run)
    engine.forward_backward(run, data, "cross_entropy")
    two = grads(engine, run)
    for key in one:
        torch.testing.assert_close(two[key], 2 * one[key], atol=1e-6, rtol=1e-5)


# --------------------------------------------------------------------------------------------- optimizer


def test_optim_step_is_torch_adamw(engine: Engine, run: str, tok: Any) -> None:
    params = types.AdamParams(
        learning_rate=3e-3, beta1=0.8, beta2=0.9, eps=1e-6, weight_decay=0.1, grad_clip_norm=0.05
    )
    engine.forward_backward(run, batch(tok), "cross_entropy")
    before, g = snapshot(engine, run), grads(engine, run)
    copies = {k: torch.nn.Parameter(v.clone()) for k, v in before.items()}
    for k, p in copies.items():
        p.grad = g[k].clone()
    ref = torch.optim.AdamW(list(copies.values()), lr=3e-3, betas=(0.8, 0.9), eps=1e-6, weight_decay=0.1)
    for step in range(2):
        if step:  # the second step: a fresh gradient on both sides
            engine.forward_backward(run, batch(tok), "cross_entropy")
            for k, gk in grads(engine, run).items():
                copies[k].grad = gk.clone()
        torch.nn.utils.clip_grad_norm_(list(copies.values()), 0.05)
        ref.step()
        res = engine.optim_step(run, params)
        assert res.metrics is not None and res.metrics["step:max"] == step + 1
        assert res.metrics["learning_rate:mean"] == pytest.approx(3e-3)
        after = snapshot(engine, run)
        for k in after:
            torch.testing.assert_close(after[k], copies[k].detach(), atol=1e-7, rtol=1e-6)
    assert all(p.grad is None for _, p in adapter(engine, run))  # cleared after the step


def test_optim_step_without_gradients_is_a_zero_gradient_step(engine: Engine, run: str) -> None:
    before = snapshot(engine, run)
    res = engine.optim_step(run, types.AdamParams(learning_rate=1e-2))
    assert res.metrics == {"step:max": 1.0, "learning_rate:mean": 1e-2, "recent_loss:mean": 0.0}
    after = snapshot(engine, run)
    assert all(torch.equal(before[k], after[k]) for k in before)
    opt = engine.forward(run, [ce_datum([5, 6, 7])], "cross_entropy")
    assert opt.metrics["step:max"] == 1.0


def test_loss_falls_and_recent_loss_reports_it(engine: Engine, run: str, tok: Any) -> None:
    data = batch(tok)
    losses = []
    for _ in range(10):
        fb = engine.forward_backward(run, data, "cross_entropy")
        res = engine.optim_step(run, types.AdamParams(learning_rate=2e-2))
        assert res.metrics is not None
        assert res.metrics["recent_loss:mean"] == pytest.approx(fb.metrics["loss:mean"], rel=1e-6)
        losses.append(fb.metrics["loss:mean"])
    assert losses[-1] < 0.5 * losses[0]
    assert engine.forward(run, data, "cross_entropy").metrics["step:max"] == 10.0


def test_bad_adam_params_are_rejected_before_anything_changes(engine: Engine, run: str, tok: Any) -> None:
    engine.forward_backward(run, batch(tok), "cross_entropy")
    g = grads(engine, run)
    for bad in (
        types.AdamParams(learning_rate=-1.0),
        types.AdamParams(beta1=1.0),
        types.AdamParams(eps=float("nan")),
        types.AdamParams(weight_decay=-0.1),
    ):
        with pytest.raises(BadRequestError, match="adam_params"):
            engine.optim_step(run, bad)
    assert all(torch.equal(g[k], v) for k, v in grads(engine, run).items())


# --------------------------------------------------------------------------------------------- checkpoints


def test_save_then_load_gives_identical_logprobs(engine: Engine, run: str, tok: Any, tmp_path: Path) -> None:
    data = batch(tok)
    train(engine, run, data, 3)
    engine.save(run, tmp_path)
    meta = json.loads((tmp_path / "engine.json").read_text())
    assert meta["base_model"] == BASE and meta["steps"] == 3 and meta["lora"]["rank"] == 4
    assert (tmp_path / "adapter_config.json").is_file() and (tmp_path / "optimizer.safetensors").is_file()
    want = lps(engine.forward(run, data, "cross_entropy"))
    other = new_run(engine, types.LoraConfig(rank=4, seed=99, train_unembed=True))
    try:
        engine.load(other, tmp_path)
        got = engine.forward(other, data, "cross_entropy")
        assert got.metrics["step:max"] == 3.0
        for w, g in zip(want, lps(got), strict=True):
            np.testing.assert_array_equal(w, g)
    finally:
        engine.unload(other)


def test_resume_with_optimizer_continues_the_same_trajectory(
    engine: Engine, run: str, tok: Any, tmp_path: Path
) -> None:
    data = batch(tok)
    train(engine, run, data, 3)
    engine.save(run, tmp_path)
    train(engine, run, data, 2)
    uninterrupted = snapshot(engine, run)
    resumed = new_run(engine, types.LoraConfig(rank=4, seed=1, train_unembed=True))
    weights_only = new_run(engine, types.LoraConfig(rank=4, seed=1, train_unembed=True))
    try:
        engine.load(resumed, tmp_path, optimizer=True)
        train(engine, resumed, data, 2)
        got = snapshot(engine, resumed)
        for k in uninterrupted:
            torch.testing.assert_close(got[k], uninterrupted[k], atol=1e-7, rtol=0)
        engine.load(weights_only, tmp_path, optimizer=False)  # fresh AdamW: a different trajectory
        train(engine, weights_only, data, 2)
        fresh = snapshot(engine, weights_only)
        assert any(not torch.allclose(fresh[k], uninterrupted[k], atol=1e-6) for k in fresh)
    finally:
        engine.unload(resumed)
        engine.unload(weights_only)


def test_load_checks_everything_before_applying(engine: Engine, run: str, tok: Any, tmp_path: Path) -> None:
    data = batch(tok)
    train(engine, run, data, 1)
    engine.save(run, tmp_path / "train")
    engine.save(run, tmp_path / "sampler", optimizer=False)
    other = new_run(engine, types.LoraConfig(rank=4, seed=3, train_unembed=True))
    small = new_run(engine, types.LoraConfig(rank=2, seed=3, train_unembed=True))
    attn_only = new_run(engine, types.LoraConfig(rank=4, seed=3, train_mlp=False))
    try:
        engine.forward_backward(other, data, "cross_entropy")
        before, g = snapshot(engine, other), grads(engine, other)
        with pytest.raises(BadRequestError, match="no optimizer state"):
            engine.load(other, tmp_path / "sampler", optimizer=True)
        with pytest.raises(BadRequestError, match="not a checkpoint"):
            engine.load(other, tmp_path / "missing")
        (tmp_path / "broken").mkdir()
        for name in ("engine.json", "adapter_model.safetensors"):
            (tmp_path / "broken" / name).write_bytes((tmp_path / "train" / name).read_bytes())
        meta = json.loads((tmp_path / "broken" / "engine.json").read_text())
        meta["base_model"] = "someone/else"
        (tmp_path / "broken" / "engine.json").write_text(json.dumps(meta))
        with pytest.raises(BadRequestError, match="base model"):
            engine.load(other, tmp_path / "broken")
        after, g2 = snapshot(engine, other), grads(engine, other)
        assert all(torch.equal(before[k], after[k]) for k in before)
        assert all(torch.equal(g[k], g2[k]) for k in g)
        for mismatched in (small, attn_only):
            with pytest.raises(BadRequestError, match="different LoRA layout"):
                engine.load(mismatched, tmp_path / "train")
        engine.load(other, tmp_path / "sampler")  # weights only: pending gradients are dropped
        assert all(p.grad is None for _, p in adapter(engine, other))
    finally:
        for r in (other, small, attn_only):
            engine.unload(r)


def test_a_checkpoint_holding_nan_or_inf_is_refused(
    engine: Engine, run: str, tok: Any, tmp_path: Path
) -> None:
    from safetensors.torch import load_file, save_file

    train(engine, run, batch(tok), 1)
    engine.save(run, tmp_path)
    engine.forward_backward(run, batch(tok), "cross_entropy")
    before, g = snapshot(engine, run), grads(engine, run)
    for name in ("adapter_model.safetensors", "optimizer.safetensors"):
        path = tmp_path / name
        good = path.read_bytes()
        tensors = load_file(str(path))
        first = next(iter(tensors))
        tensors[first] = tensors[first].clone()
        tensors[first].view(-1)[0] = float("inf") if name.startswith("adapter") else float("nan")
        save_file(tensors, str(path))
        with pytest.raises(BadRequestError, match="NaN or infinite values"):
            engine.load(run, tmp_path, optimizer=True)
        if name.startswith("adapter"):
            with pytest.raises(BadRequestError, match="NaN or infinite values"):
                engine.sample([job(tok.encode("The cat"), adapter_dir=tmp_path, max_tokens=2)])
        path.write_bytes(good)
    after, g2 = snapshot(engine, run), grads(engine, run)
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert all(torch.equal(g[k], g2[k]) for k in g)


def test_runs_on_one_base_do_not_affect_each_other(engine: Engine, tok: Any) -> None:
    data = batch(tok)
    a, b, solo = new_run(engine), new_run(engine), new_run(engine)
    try:
        b_before = lps(engine.forward(b, data, "cross_entropy"))
        # interleave: a's gradient, b's gradient, a steps (b's pending gradient must survive), b steps
        engine.forward_backward(a, data, "cross_entropy")
        engine.forward_backward(b, data[:1], "cross_entropy")
        b_grads = grads(engine, b)
        engine.optim_step(a, types.AdamParams(learning_rate=1e-2))
        assert all(torch.equal(b_grads[k], v) for k, v in grads(engine, b).items())
        for w, g in zip(b_before, lps(engine.forward(b, data, "cross_entropy")), strict=True):
            np.testing.assert_array_equal(w, g)
        engine.optim_step(b, types.AdamParams(learning_rate=1e-2))
        # a equals a run trained alone on the same data
        engine.forward_backward(solo, data, "cross_entropy")
        engine.optim_step(solo, types.AdamParams(learning_rate=1e-2))
        sa, ss = snapshot(engine, a), snapshot(engine, solo)
        assert all(torch.equal(sa[k], ss[k]) for k in sa)
        assert engine.forward(b, data, "cross_entropy").metrics["step:max"] == 1.0
    finally:
        for r in (a, b, solo):
            engine.unload(r)
    assert not engine.has_run(a)
    with pytest.raises(NotFoundError):
        engine.forward(a, data, "cross_entropy")


# --------------------------------------------------------------------------------------------- validation


def _bad_batches(tok: Any) -> dict[str, tuple[str, list[types.Datum], str]]:
    ids = tok.encode(TEXTS[0])
    good = ce_datum(ids)
    n = len(ids) - 1
    tgt = np.asarray(ids[1:], dtype=np.int64)
    w = np.ones(n, dtype=np.float32)

    def ce(**inputs: Any) -> types.Datum:
        return types.Datum(model_input=types.ModelInput.from_ints(ids[:-1]), loss_fn_inputs=inputs)

    nan_w = w.copy()
    nan_w[2] = np.nan
    big = tgt.copy()
    big[0] = 10**6
    image = types.ImageAssetPointerChunk(format="png", height=1, width=1, location="x.png", tokens=3)
    return {
        "empty batch": ("cross_entropy", [], "empty"),
        "unknown loss": ("mse", [good], "cross_entropy, importance_sampling, ppo"),
        "missing weights": ("cross_entropy", [good, ce(target_tokens=tgt)], r"data\[1\].*weights"),
        "missing advantages": ("importance_sampling", [good], "advantages"),
        "float targets": (
            "cross_entropy",
            [ce(target_tokens=types.TensorData(data=tgt.astype(np.float32), dtype="float32"), weights=w)],
            "int64",
        ),
        "int weights": (
            "cross_entropy",
            [ce(target_tokens=tgt, weights=types.TensorData(data=[1] * n, dtype="int64"))],
            "float32",
        ),
        "length mismatch": ("cross_entropy", [ce(target_tokens=tgt, weights=w[:-1])], "weights"),
        "nan weights": ("cross_entropy", [ce(target_tokens=tgt, weights=nan_w)], "finite|nan"),
        "inf advantages": (
            "ppo",
            [ce(target_tokens=tgt, logprobs=w * -1, advantages=np.full(n, np.inf, dtype=np.float32))],
            "finite|inf",
        ),
        "target outside vocab": ("cross_entropy", [ce(target_tokens=big, weights=w)], "vocabulary|lie in"),
        "input outside vocab": ("cross_entropy", [ce_datum([1, 5000, 3])], "vocabulary|5000"),
        "too long": ("cross_entropy", [ce_datum([5] * 600)], "context"),
        "image chunk": (
            "cross_entropy",
            [
                types.Datum(
                    model_input=types.ModelInput(chunks=[image]),
                    loss_fn_inputs={"target_tokens": [1, 2, 3], "weights": [1.0, 1.0, 1.0]},
                )
            ],
            "not supported|text",
        ),
        "extra key": ("cross_entropy", [ce(target_tokens=tgt, weights=w, mask=w)], "mask"),
    }


def test_bad_batches_are_rejected_and_change_nothing(engine: Engine, run: str, tok: Any) -> None:
    engine.forward_backward(run, batch(tok), "cross_entropy")
    before, g = snapshot(engine, run), grads(engine, run)
    for case, (loss_fn, data, pattern) in _bad_batches(tok).items():
        with pytest.raises(BadRequestError, match=pattern):
            engine.validate_batch(run, data, loss_fn)
        with pytest.raises(BadRequestError, match=pattern):
            engine.forward_backward(run, data, loss_fn)
        after, g2 = snapshot(engine, run), grads(engine, run)
        assert all(torch.equal(before[k], after[k]) for k in before), case
        assert all(torch.equal(g[k], g2[k]) for k in g), case
    res = engine.optim_step(run, types.AdamParams())
    assert res.metrics is not None and res.metrics["step:max"] == 1.0  # the failed calls added no loss either
    assert res.metrics["recent_loss:mean"] == pytest.approx(
        engine.forward(run, batch(tok), "cross_entropy").metrics["loss:mean"], rel=0.2
    )


# --------------------------------------------------------------------------------------------- sampling


def job(
    prompt: list[int],
    *,
    base: str = BASE,
    adapter_dir: Path | None = None,
    n: int = 1,
    prompt_logprobs: bool = False,
    **params: Any,
) -> SampleJob:
    return SampleJob(
        prompt=types.ModelInput.from_ints(prompt),
        params=types.SamplingParams(**params),
        num_samples=n,
        prompt_logprobs=prompt_logprobs,
        base_model=base,
        adapter_dir=adapter_dir,
    )


def test_greedy_sampling_is_deterministic_and_follows_the_forward_pass(
    engine: Engine, tok: Any, plain: Any
) -> None:
    prompt = tok.encode("Q: What is the capital of France?\nA:")
    [res] = engine.sample([job(prompt, n=3, max_tokens=6, temperature=0.0)])
    first = res.sequences[0]
    assert all(s.tokens == first.tokens for s in res.sequences)
    assert len(first.tokens) == 6 and first.stop_reason == "length"
    assert tok.decode(first.tokens).startswith(" Paris\n")
    with torch.no_grad():  # each greedy token is the argmax, and its logprob the raw T=1 log-softmax
        seq = prompt + first.tokens
        lp_all = torch.log_softmax(plain(input_ids=torch.tensor([seq])).logits[0].float(), dim=-1)
        for i, t in enumerate(first.tokens):
            row = lp_all[len(prompt) - 1 + i]
            assert int(row.argmax()) == t
            assert first.logprobs is not None
            assert first.logprobs[i] == pytest.approx(float(row[t]), abs=1e-5)


def test_seeded_sampling_does_not_depend_on_the_batch(engine: Engine, tok: Any) -> None:
    prompt = tok.encode("The small")
    alone = engine.sample([job(prompt, n=4, max_tokens=12, seed=42, temperature=1.0, top_k=50, top_p=0.95)])[
        0
    ]
    other = job(tok.encode("Q: What is 3+4?\nA:"), n=5, max_tokens=3, seed=1)
    mixed = engine.sample(
        [other, job(prompt, n=4, max_tokens=12, seed=42, temperature=1.0, top_k=50, top_p=0.95)]
    )
    assert [s.tokens for s in mixed[1].sequences] == [s.tokens for s in alone.sequences]
    assert len({tuple(s.tokens) for s in alone.sequences}) > 1  # the samples of a job differ from each other
    different = engine.sample([job(prompt, n=4, max_tokens=12, seed=43, temperature=1.0)])[0]
    assert [s.tokens for s in different.sequences] != [s.tokens for s in alone.sequences]


def test_stop_strings_and_stop_tokens(engine: Engine, tok: Any) -> None:
    prompt = tok.encode("Q: What color is grass?\nA:")
    by_string, by_token, by_eos, no_stop = engine.sample(
        [
            job(prompt, max_tokens=20, temperature=0.0, stop=["\n"]),
            job(prompt, max_tokens=20, temperature=0.0, stop=[tok.encode("\n")[0]]),
            job(prompt, max_tokens=40, temperature=0.0),
            job(prompt, max_tokens=20, temperature=0.0, stop=[]),
        ]
    )
    s = by_string.sequences[0]
    assert s.stop_reason == "stop" and tok.decode(s.tokens) == " green\n"  # the stop is the last token
    t = by_token.sequences[0]
    assert t.stop_reason == "stop" and t.tokens == s.tokens
    e = by_eos.sequences[0]
    if e.stop_reason == "stop":
        assert e.tokens[-1] == tok.eos_token_id and tok.eos_token_id not in e.tokens[:-1]
    n = no_stop.sequences[0]
    assert n.stop_reason == "length" and len(n.tokens) == 20


def test_prompt_logprobs_equal_forward_logprobs(engine: Engine, run: str, tok: Any) -> None:
    ids = tok.encode(TEXTS[0])
    [res] = engine.sample(
        [job(ids, max_tokens=1, prompt_logprobs=True), job(tok.encode("3+4="), max_tokens=5)]
    )[:1]
    assert res.prompt_logprobs is not None and res.prompt_logprobs[0] is None
    assert len(res.prompt_logprobs) == len(ids)
    fwd = lps(engine.forward(run, [ce_datum(ids)], "cross_entropy"))[0]  # a fresh run = the base model
    np.testing.assert_allclose(np.asarray(res.prompt_logprobs[1:], dtype=np.float32), fwd, atol=1e-5)


def test_sampling_a_saved_adapter_leaves_training_state_alone(
    engine: Engine, run: str, tok: Any, tmp_path: Path
) -> None:
    data = [ce_datum(tok.encode("Q: What color is a blicket?\nA: green\n"))]
    train(engine, run, data, 15, lr=2e-2)
    engine.save(run, tmp_path, optimizer=False)
    prompt = tok.encode("Q: What color is a blicket?\nA:")
    engine.forward_backward(run, data, "cross_entropy")  # a pending gradient that sampling must not touch
    before, g = snapshot(engine, run), grads(engine, run)
    tuned, base = engine.sample(
        [
            job(
                prompt, adapter_dir=tmp_path, max_tokens=3, temperature=0.0, stop=["\n"], prompt_logprobs=True
            ),
            job(prompt, max_tokens=3, temperature=0.0, stop=["\n"]),
        ]
    )
    assert tok.decode(tuned.sequences[0].tokens) == " green\n"
    assert tuned.prompt_logprobs is not None
    fwd = lps(engine.forward(run, data, "cross_entropy"))[0]
    np.testing.assert_allclose(
        np.asarray(tuned.prompt_logprobs[1:], dtype=np.float32), fwd[: len(prompt) - 1], atol=1e-5
    )
    assert (
        base.sequences[0].tokens != tuned.sequences[0].tokens
        or tok.decode(base.sequences[0].tokens) != " green\n"
    )
    after, g2 = snapshot(engine, run), grads(engine, run)
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert all(torch.equal(g[k], g2[k]) for k in g)


def test_bad_sample_requests(engine: Engine, tok: Any) -> None:
    ok = tok.encode("The cat")
    cases = {
        "empty": (job([]), "prompt"),
        "too long": (job([5] * 600), "context"),
        "outside vocab": (job([1, 99999]), "vocabulary"),
        "num_samples 0": (job(ok, n=0), "num_samples"),
        "num_samples big": (job(ok, n=257), "256"),
        "temperature": (job(ok, temperature=-1.0), "temperature"),
        "top_p": (job(ok, top_p=0.0), "top_p"),
        "top_k": (job(ok, top_k=0), "top_k"),
        "max_tokens": (job(ok, max_tokens=0), "max_tokens"),
        "stop id": (job(ok, stop=[99999]), "stop"),
        "unknown model": (job(ok, base="nope/nope"), "nope/nope"),
        "not a checkpoint": (job(ok, adapter_dir=Path("/nonexistent")), "checkpoint"),
    }
    for name, (bad, pattern) in cases.items():
        with pytest.raises(BadRequestError, match=pattern):
            engine.validate_sample(bad)
        with pytest.raises(BadRequestError, match=pattern):
            engine.sample([bad])
        assert name


# --------------------------------------------------------------------------------------------- other models


def test_local_folder_model(tmp_path: Path) -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    folder = tmp_path / "tiny-llama"
    config = LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        eos_token_id=1,
        pad_token_id=0,
    )
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        LlamaForCausalLM(config).save_pretrained(str(folder))
    eng = Engine(models=[str(folder)], builtin=False, device="cpu")
    try:
        [spec] = eng.supported_models()
        assert spec.model_name == "tiny-llama" and spec.max_context_length == 128
        assert eng.has_model("tiny-llama") and not eng.has_model(BASE)
        assert eng.tokenizer_path("tiny-llama") == folder.resolve()
        eng.create_run("r", "tiny-llama", types.LoraConfig(rank=2, seed=0))
        assert eng.info("r").model_data.arch == "LlamaForCausalLM"
        datum = ce_datum([2, 3, 4, 5, 6, 7])
        losses = []
        for _ in range(5):
            losses.append(eng.forward_backward("r", [datum], "cross_entropy").metrics["loss:mean"])
            eng.optim_step("r", types.AdamParams(learning_rate=5e-2))
        assert losses[-1] < losses[0]
        eng.save("r", tmp_path / "ckpt", optimizer=False)
        [res] = eng.sample(
            [
                job(
                    [2, 3, 4],
                    base="tiny-llama",
                    adapter_dir=tmp_path / "ckpt",
                    n=2,
                    max_tokens=4,
                    seed=0,
                    stop=[63],
                )
            ]
        )
        assert len(res.sequences) == 2 and all(1 <= len(s.tokens) <= 4 for s in res.sequences)
        with pytest.raises(BadRequestError, match="vocabulary"):
            eng.validate_batch("r", [ce_datum([2, 64, 3])], "cross_entropy")
    finally:
        eng.close()
    with pytest.raises(ConfigurationError, match="no/such-model"):
        Engine(models=["no/such-model"], builtin=False)


def test_builtin_model_ships_complete() -> None:
    from transformers import AutoTokenizer

    names = {p.name for p in BUILTIN_DIR.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"} <= names
    assert sum(p.stat().st_size for p in BUILTIN_DIR.iterdir()) < 8 * 2**20
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        t = AutoTokenizer.from_pretrained(str(BUILTIN_DIR))
    assert t.is_fast and t.eos_token == "<|endoftext|>" and t.pad_token is not None
    assert {"<|im_start|>", "<|im_end|>"} <= set(t.all_special_tokens)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_engine_matches_cpu(engine: Engine, tok: Any, tmp_path: Path) -> None:
    gpu = Engine(device="cuda")
    try:
        data = batch(tok)
        cpu_run = new_run(engine)
        gpu.create_run("g", BASE, ALL)
        try:
            train(engine, cpu_run, data, 3)
            train(gpu, "g", data, 3)
            for c, g in zip(
                lps(engine.forward(cpu_run, data, "cross_entropy")),
                lps(gpu.forward("g", data, "cross_entropy")),
                strict=True,
            ):
                np.testing.assert_allclose(c, g, atol=2e-4)
            gpu.save("g", tmp_path)
            engine.load(cpu_run, tmp_path, optimizer=True)  # a GPU checkpoint loads on the CPU
            prompt = tok.encode("Q: What is the capital of Italy?\nA:")
            [c] = engine.sample([job(prompt, adapter_dir=tmp_path, max_tokens=4, temperature=0.0)])
            [g] = gpu.sample(
                [job(prompt, adapter_dir=tmp_path, max_tokens=4, temperature=0.0, prompt_logprobs=True)]
            )
            assert c.sequences[0].tokens == g.sequences[0].tokens
            [s] = gpu.sample([job(prompt, n=8, max_tokens=8, seed=5, temperature=1.0, top_p=0.9)])
            assert len(s.sequences) == 8
        finally:
            engine.unload(cpu_run)
    finally:
        gpu.close()
