"""The local server's real engine: one forward_backward + optim_step step, against a plain PyTorch loop.

Both sides do the same work on the built-in model (``hpcai-async/tiny-qwen3``, float32 on the CPU): a LoRA
adapter (rank 8 on the attention and MLP projections, alpha = rank, no dropout), a batch of 8 datums x 256
tokens, summed cross-entropy (weights 1), backward, one AdamW step (lr 1e-4, betas 0.9/0.95, eps 1e-12).

- ours: the LocalServer with its PyTorch Engine in the bench process, in the hosted dialect (JSON, plain
  polling) and the local one (MessagePack, inline results); the client in another process sends
  ``forward_backward`` and ``optim_step`` pipelined and waits for both results — so the time includes
  encoding, HTTP, scheduling, the engine's bookkeeping and the results.
- plain: the same model loaded the same way (``server.models.load_model``), the adapter injected with PEFT,
  and a hand-written training step in one process: forward, per-token cross-entropy, loss, backward,
  ``AdamW.step``.

Both sides run torch on one intra-op thread (see THREADS). Median step time after warm-up steps; the target
is ours (local dialect) <= 1.10x the plain loop. No official SDK here (the second column is the plain loop).
Run: ``python -m bench.engine``.
"""

from __future__ import annotations

import time
from typing import Any

from bench import _official
from bench._common import errors, median, report, row, run_async

TARGET_X = 1.10
BATCH, SEQ, RANK = 8, 256, 8
# torch intra-op threads on both sides. One, because with two on a 2-core machine that also runs the server's
# event loop (or anything else), OpenMP's spinning threads make a step up to 30x slower at random.
THREADS = 1
MODEL = "hpcai-async/tiny-qwen3"


def _arrays(batch: int, seq: int, vocab: int) -> tuple[Any, Any, Any]:
    import numpy as np

    rng = np.random.default_rng(0)
    seqs = rng.integers(0, vocab, size=(batch, seq + 1), dtype=np.int64)
    weights = np.ones((batch, seq), dtype=np.float32)
    return seqs[:, :-1].copy(), seqs[:, 1:].copy(), weights


def plain(
    batch: int = BATCH,
    seq: int = SEQ,
    rank: int = RANK,
    steps: int = 10,
    warmup: int = 3,
    threads: int = THREADS,
) -> dict[str, Any]:
    import torch

    torch.set_num_threads(threads)
    from peft import LoraConfig
    from peft import functional as peft_fn

    from hpcai_async.server.engine import ATTN_MODULES, MLP_MODULES
    from hpcai_async.server.models import load_model, resolve_model

    spec = resolve_model(MODEL)
    model = load_model(spec, "cpu").module
    config = LoraConfig(
        r=rank, lora_alpha=rank, lora_dropout=0.0, target_modules=[*ATTN_MODULES, *MLP_MODULES], bias="none"
    )
    torch.manual_seed(0)
    peft_fn.inject_adapter_in_model(config, model, adapter_name="bench")
    peft_fn.set_adapter(model, ["bench"], inference_mode=False)
    params = [p for n, p in model.named_parameters() if "lora_" in n and p.requires_grad]
    assert params, "no trainable LoRA parameters"
    opt = torch.optim.AdamW(params, lr=1e-4, betas=(0.9, 0.95), eps=1e-12, weight_decay=0.0)

    tokens, targets, weights = _arrays(batch, seq, spec.vocab_size)
    input_ids = torch.from_numpy(tokens)
    mask = torch.ones_like(input_ids)
    target = torch.from_numpy(targets)
    w = torch.from_numpy(weights)

    def step() -> float:
        t0 = time.perf_counter()
        logits = model(input_ids=input_ids, attention_mask=mask, use_cache=False).logits
        flat = logits.reshape(-1, logits.shape[-1]).float()
        lp = -torch.nn.functional.cross_entropy(flat, target.reshape(-1), reduction="none").view(target.shape)
        elementwise = -w * lp
        loss = elementwise.sum()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        lp.detach().numpy(), elementwise.detach().numpy()  # the outputs the server returns
        return time.perf_counter() - t0

    for _ in range(warmup):
        step()
    times = [step() for _ in range(steps)]
    return {"ms": median(times) * 1e3, "threads": torch.get_num_threads()}


def ours(
    url: str,
    api_key: str,
    model: str = MODEL,
    batch: int = BATCH,
    seq: int = SEQ,
    rank: int = RANK,
    steps: int = 10,
    warmup: int = 3,
) -> dict[str, Any]:
    from hpcai_async import ServiceClient, types
    from hpcai_async.server.models import resolve_model

    vocab = resolve_model(model).vocab_size  # the same token ids as the plain loop

    async def main() -> list[float]:
        async with ServiceClient(base_url=url, api_key=api_key) as service:
            tc = await service.create_lora_training_client_async(model, rank=rank, seed=0)
            tokens, targets, weights = _arrays(batch, seq, vocab)
            data = [
                types.Datum(
                    model_input=types.ModelInput.from_ints(tokens[i]),
                    loss_fn_inputs={"target_tokens": targets[i], "weights": weights[i]},
                )
                for i in range(batch)
            ]
            adam = types.AdamParams(learning_rate=1e-4)
            out = []
            for i in range(warmup + steps):
                t0 = time.perf_counter()
                fb = await tc.forward_backward_async(data, "cross_entropy")
                opt = await tc.optim_step_async(adam)
                result = await fb
                await opt
                if i >= warmup:
                    out.append(time.perf_counter() - t0)
                assert result.loss_fn_outputs[0]["logprobs"].to_numpy().shape == (seq,)
            return out

    times = run_async(main())
    return {"ms": median(times) * 1e3}


def run(quick: bool = False) -> list[dict[str, Any]]:
    from bench._servers import MODES, engine_server

    cfg: dict[str, Any] = {"batch": 2, "seq": 32, "steps": 2, "warmup": 1} if quick else {}
    p = _official.run_ours("engine", "plain", cfg)
    ours: dict[str, dict[str, Any]] = {}
    label = "—"
    for mode in MODES:
        try:
            with engine_server(threads=THREADS, dialect=mode) as srv:
                ours[mode] = _official.run_ours("engine", "ours", {**srv.cfg(), **cfg})
                label = srv.label.replace(f", {mode} dialect", "")
        except Exception as exc:  # no LocalServer / no built-in model yet
            ours[mode] = {"error": f"cannot start the local server: {exc!r}"}
    notes = errors(ours_hosted=ours["hosted"], ours_local=ours["local"], plain_loop=p)
    notes.append(
        f"official column = plain PyTorch loop in one process (ratios: plain loop time / ours); "
        f"hosted = JSON and plain polling, local = MessagePack and inline results; server: {label}; "
        f"torch threads: {THREADS}"
    )
    b, s = cfg.get("batch", BATCH), cfg.get("seq", SEQ)
    r = row(
        f"local server fwd_bwd + optim_step, built-in model, {b}x{s} tokens",
        "ms/step",
        ours["hosted"].get("ms"),
        p.get("ms"),
        f"local <= {TARGET_X:.2f}x the plain loop",
        None,
        note="; ".join(notes),
        local=ours["local"].get("ms"),
    )
    ms, base = r["local"], p.get("ms")
    r["ok"] = None if ms is None or base is None else ms <= TARGET_X * base
    return [r]


if __name__ == "__main__":
    report("local server engine vs plain PyTorch", run())
