"""Training steps on a run's weights (its LoRA adapter, or every weight of a full-parameter run): the
forward/backward pass, the AdamW step, and the finiteness guard.

Losses are sum-reduced over tokens and datums (PROTOCOL.md §5.3); ``elementwise_loss`` is the per-token term
of the loss (``losses``). ``loss:mean`` = Σ elementwise / the loss's denominator; 0.0 when it is 0.

optim_step: parameters without a gradient (no forward_backward since the last step) count as zero gradients,
so every call is one AdamW step (decoupled ``weight_decay``, as ``torch.optim.AdamW``) and ``step:max``
counts calls. The gradient summed over the forward_backward calls since the last step is first divided as
its ``grad_accumulation_normalization`` says (Fireworks' GradAccNormalization): ``num_loss_tokens`` by the
loss tokens of those calls (non-zero entries of the loss's ``tokens`` input: cross_entropy's weights, the
policy losses' advantages), ``num_sequences`` by their datums with at least one loss token, ``none`` (the
default) not at all; a count of 0 leaves it as it is. Then ``grad_clip_norm > 0`` clips the global norm.
``recent_loss:mean`` is the loss:mean over the forward_backward calls since the previous step.

Guard: a step that would leave a weight, a gradient or an Adam moment NaN or infinite (or a weight so large
that the LoRA product B·A overflows float32) is refused (``engine_api.non_finite``) and leaves the run bit
for bit as it was. One fused max-abs reduction (``torch._foreach_norm(·, inf)``) per step checks it;
optim_step keeps a copy of the run's state (LoRA-sized; model-sized for a full-parameter run) to put back when
it refuses.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Final

import numpy as np

from ... import types
from ..engine_api import AdamStep, Batch, non_finite
from .adapters import Base, Run
from .losses import LOSSES

__all__ = ("MAX_WEIGHT", "adam_moments", "forward_pass", "optim_step", "target_logprobs")

# |B·A x| overflows float32 (max 3.4e38) once both factors reach ~sqrt(3.4e38) = 1.8e19 = 2**64
MAX_WEIGHT: Final = 2.0**64


def pad_batch(batch: Batch, pad_id: int, device: Any) -> dict[str, Any]:
    """Right-padded [B, T] tensors of every field plus the attention ``mask``."""
    import torch

    seqs = batch.fields["input_ids"]
    width = max(len(s) for s in seqs)
    out: dict[str, Any] = {}
    mask = np.zeros((len(seqs), width), dtype=np.int64)
    for i, s in enumerate(seqs):
        mask[i, : len(s)] = 1
    out["mask"] = torch.from_numpy(mask).to(device)
    for key, values in batch.fields.items():
        dtype = np.int64 if key in ("input_ids", "target_tokens") else np.float32
        fill = pad_id if key == "input_ids" else 0
        arr = np.full((len(seqs), width), fill, dtype=dtype)
        for i, v in enumerate(values):
            arr[i, : len(v)] = v
        out[key] = torch.from_numpy(arr).to(device)
    return out


def target_logprobs(logits: Any, targets: Any) -> Any:
    """log_softmax(logits)[target] per position in float32 (cross_entropy: no full log-softmax kept)."""
    import torch

    flat = logits.reshape(-1, logits.shape[-1]).float()
    lp = -torch.nn.functional.cross_entropy(flat, targets.reshape(-1), reduction="none")
    return lp.view(targets.shape)


def _max_abs(tensors: list[Any]) -> float:
    """The largest |value| over ``tensors`` (NaN if any is NaN): one fused reduction, one device sync."""
    import torch

    if not tensors:
        return 0.0
    with torch.no_grad():
        return float(torch.stack(torch._foreach_norm(tensors, math.inf)).max())


def forward_pass(
    run: Run, batch: Batch, *, backward: bool, model: Base | None = None
) -> types.ForwardBackwardOutput:
    """Logprobs and losses of ``batch``; with ``backward`` the gradient of the summed loss is added to the
    run's ``.grad`` (refused, with nothing added, when the loss or the gradients are not finite).

    ``model``: compute with this shared base model, every adapter off, instead of the run's weights (the
    reference forward; no backward)."""
    import torch

    base = model or run.base
    if model is not None:
        base.activate((), train=False)
    elif run.adapter is not None:
        base.activate((run.adapter,), train=True)
    tensors = pad_batch(batch, base.loaded.pad_token_id, base.loaded.device)
    pending = [p.grad for _, p in run.params]
    with torch.enable_grad() if backward else torch.inference_mode():
        logits = base.module(
            input_ids=tensors["input_ids"], attention_mask=tensors["mask"], use_cache=False
        ).logits
        lp = target_logprobs(logits, tensors["target_tokens"])
        del logits
        elementwise, denom = LOSSES[batch.loss_fn].fn(lp, tensors, **batch.config)
        total = elementwise.sum()
        loss_sum = float(total.detach())
        if backward:
            _backward(run, total, loss_sum, pending, batch.loss_fn)
            run.loss_sum += loss_sum
            run.weight_sum += denom
            per_datum = [int(np.count_nonzero(v)) for v in batch.fields[LOSSES[batch.loss_fn].tokens]]
            run.loss_tokens += sum(per_datum)
            run.loss_sequences += sum(1 for n in per_datum if n)
    return _output(run, batch, lp, elementwise, loss_sum / denom if denom else 0.0)


def _backward(run: Run, total: Any, loss_sum: float, pending: list[Any], loss_fn: str) -> None:
    """``total.backward()`` into fresh gradients, then added to the pending ones if everything is finite."""
    inputs = ", ".join(k for k in LOSSES[loss_fn].inputs if k != "target_tokens")
    if not math.isfinite(loss_sum):
        raise non_finite(
            f"forward_backward refused: the {loss_fn} loss is {loss_sum} (beyond float32); check "
            f"loss_fn_inputs ({inputs}) for extreme values. Nothing was applied"
        )
    params = [p for _, p in run.params]
    for p in params:
        p.grad = None
    total.backward()
    summed = []
    for old, g in zip(pending, [p.grad for p in params], strict=True):
        if g is not None and old is not None:
            g.add_(old)  # fresh + pending: the same sum autograd's accumulation makes, in place on the fresh
        summed.append(old if g is None else g)
    peak = _max_abs([g for g in summed if g is not None])
    if not peak < math.inf:  # NaN compares False
        for p, old in zip(params, pending, strict=True):
            p.grad = old
        raise non_finite(
            f"forward_backward refused: the gradient of the {loss_fn} loss is not finite (NaN or beyond "
            f"float32); check loss_fn_inputs ({inputs}) for extreme values. Nothing was applied"
        )
    for p, g in zip(params, summed, strict=True):
        p.grad = g


def _output(run: Run, batch: Batch, lp: Any, elementwise: Any, mean: float) -> types.ForwardBackwardOutput:
    import torch

    lp_np = lp.detach().to("cpu", torch.float32).numpy()
    el_np = elementwise.detach().to("cpu", torch.float32).numpy()
    outputs = []
    for i, tokens in enumerate(batch.fields["input_ids"]):
        n = len(tokens)
        outputs.append(
            {
                "logprobs": types.TensorData(data=lp_np[i, :n], dtype="float32", shape=[n]),
                "elementwise_loss": types.TensorData(data=el_np[i, :n], dtype="float32", shape=[n]),
            }
        )
    return types.ForwardBackwardOutput(
        loss_fn_output_type=batch.loss_fn,
        loss_fn_outputs=outputs,
        metrics={"loss:mean": mean, "num_examples:sum": float(len(batch)), "step:max": float(run.steps)},
    )


def adam_moments(run: Run) -> tuple[dict[str, Any], int]:
    """(the AdamW moments by ``<param>.exp_avg`` / ``.exp_avg_sq``, on the CPU, and the step) of the run,
    as a training checkpoint saves them; empty before the first optim_step."""
    state = run.optimizer.state if run.optimizer is not None else {}
    moments: dict[str, Any] = {}
    step = 0
    for key, p in run.params:
        s = state.get(p)
        if s:
            moments[f"{key}.exp_avg"] = s["exp_avg"].detach().to("cpu").contiguous()
            moments[f"{key}.exp_avg_sq"] = s["exp_avg_sq"].detach().to("cpu").contiguous()
            step = int(s["step"])
    return moments, step


def new_optimizer(params: list[Any]) -> Any:
    import torch

    return torch.optim.AdamW(params, lr=0.0, betas=(0.9, 0.95), eps=1e-12, weight_decay=0.0)


def optim_step(run: Run, adam: AdamStep) -> types.OptimStepResponse:
    """One AdamW step on the accumulated gradients (missing gradients count as zero), then clear them;
    refused, with the run as it was, when it would leave a weight or an Adam moment non-finite."""
    import torch

    params = [p for _, p in run.params]
    saved = _save_state(run)
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    if run.optimizer is None:
        run.optimizer = new_optimizer(params)
    for group in run.optimizer.param_groups:
        group.update(lr=adam.learning_rate, betas=adam.betas, eps=adam.eps, weight_decay=adam.weight_decay)
    count = {"num_loss_tokens": run.loss_tokens, "num_sequences": run.loss_sequences}.get(adam.normalization)
    if count:
        torch._foreach_div_([p.grad for p in params], float(count))
    if adam.grad_clip_norm > 0:
        torch.nn.utils.clip_grad_norm_(params, adam.grad_clip_norm)
    run.optimizer.step()
    state = run.optimizer.state
    moments = [state[p][k] for p in params for k in ("exp_avg", "exp_avg_sq")]
    if not (_max_abs(params) < MAX_WEIGHT and _max_abs(moments) < math.inf):
        _restore_state(run, saved)
        raise non_finite(
            f"optim_step refused: with learning_rate {adam.learning_rate:g} the update would make the "
            f"weights or the Adam moments non-finite (or weights beyond {MAX_WEIGHT:.3g}, where "
            "the LoRA product overflows float32); lower the learning rate or set grad_clip_norm. "
            "Nothing was applied"
        )
    for p in params:
        p.grad = None
    run.steps += 1
    recent = run.loss_sum / run.weight_sum if run.weight_sum else 0.0
    run.loss_sum = run.weight_sum = 0.0
    run.loss_tokens = run.loss_sequences = 0
    return types.OptimStepResponse(
        metrics={
            "step:max": float(run.steps),
            "learning_rate:mean": adam.learning_rate,
            "recent_loss:mean": recent,
        }
    )


@dataclass(slots=True)
class _Saved:
    """What optim_step changes, copied: the optimizer and its settings, weights, gradients, Adam state."""

    optimizer: Any
    groups: list[dict[str, Any]]
    weights: list[Any]
    grads: list[Any]
    state: dict[Any, dict[str, Any]]


def _save_state(run: Run) -> _Saved:
    params = [p for _, p in run.params]
    opt = run.optimizer
    state: dict[Any, dict[str, Any]] = {}
    for p in params if opt is not None else ():
        if opt.state.get(p):
            state[p] = {k: v.clone() for k, v in opt.state[p].items()}
    return _Saved(
        optimizer=opt,
        groups=[{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups] if opt else [],
        weights=[p.detach().clone() for p in params],
        grads=[None if p.grad is None else p.grad.clone() for p in params],
        state=state,
    )


def _restore_state(run: Run, saved: _Saved) -> None:
    import torch

    params = [p for _, p in run.params]
    with torch.no_grad():
        for p, w, g in zip(params, saved.weights, saved.grads, strict=True):
            p.copy_(w)
            p.grad = g
    run.optimizer = opt = saved.optimizer
    if opt is not None:
        for group, settings in zip(opt.param_groups, saved.groups, strict=True):
            group.update(settings)
        opt.state.clear()
        opt.state.update(saved.state)
