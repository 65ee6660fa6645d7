"""The loss functions, in one registry: a loss is one function plus the loss_fn_inputs and settings it takes.

To add a loss, write one function with the ``@loss`` decorator, naming its inputs and their wire dtypes, and
its ``loss_fn_config`` settings with their defaults::

    @loss("my_loss", logprobs="float32", advantages="float32", config={"beta": 0.1})
    def my_loss(lp, batch, *, beta):
        ...  # per-token terms [B, T] (zero on padding), and the loss:mean denominator

``target_tokens`` (int64) is always required: the engine turns it into ``lp`` = log p(target) per position.
``batch`` maps each input (and ``mask``, 1 on real tokens) to a [B, T] tensor, right-padded with zeros. The
engine sums the terms over tokens and datums (PROTOCOL.md §5.3) and backpropagates that sum; ``loss:mean`` is
the sum over the denominator (0.0 when it is 0). The function gets every setting of ``config`` as a keyword
argument: the request's ``loss_fn_config`` value or the default (``engine_api.check_batch`` refuses other
keys). ``tokens`` names the input whose non-zero entries are the loss's tokens (``num_loss_tokens``
normalisation at optim_step counts them): ``weights`` for cross_entropy, ``advantages`` for the policy losses
(prompt positions carry advantage 0 by the Tinker convention).

Formulas (q = the sampler's logprobs, r = exp(lp - q), A = advantages; Tinker docs,
https://tinker-docs.thinkingmachines.ai/tinker/losses and its pages ``/cispo``, ``/dro``; PROTOCOL.md §5.3):
cross_entropy ``-w·lp``; importance_sampling ``-r·A``; ppo ``-min(r·A, clip(r, low, high)·A)``;
cispo ``-stopgrad(clip(r, low, high))·lp·A``; dro ``-(lp·A - ½·beta·(lp - q)²)``.

torch is imported inside the functions: ``engine_api`` reads the registry where torch is not installed.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Final

__all__ = ("CISPO_CLIP", "DRO_BETA", "LOSSES", "PPO_CLIP", "Loss", "loss")

PPO_CLIP: Final = (0.8, 1.2)  # absolute ratio bounds, the tinker defaults
CISPO_CLIP: Final = (0.0, 4.0)  # the tinker defaults (PROTOCOL.md §5.3)
DRO_BETA: Final = 0.1  # PROTOCOL.md §5.3: the default of a compatible server (Tinker's docs give no default)

LossFn = Callable[..., tuple[Any, float]]


@dataclass(frozen=True, slots=True)
class Loss:
    """A registered loss: its name, its required loss_fn_inputs (key -> wire dtype), its function, its
    loss_fn_config settings (key -> default) and the input whose non-zero entries are its loss tokens."""

    name: str
    inputs: Mapping[str, str]
    fn: LossFn
    config: Mapping[str, float] = field(default_factory=dict)
    tokens: str = "advantages"


LOSSES: dict[str, Loss] = {}


def loss(
    name: str, *, config: Mapping[str, float] | None = None, tokens: str | None = None, **inputs: str
) -> Callable[[LossFn], LossFn]:
    """Register ``fn`` as the loss ``name`` taking ``target_tokens`` and ``inputs`` (see the module doc);
    ``tokens`` defaults to ``weights`` or else ``advantages`` where the loss takes them (else every token
    with a non-zero target id)."""

    def register(fn: LossFn) -> LossFn:
        present = [k for k in ("weights", "advantages") if k in inputs]
        token_key = tokens or (present[0] if present else "target_tokens")
        LOSSES[name] = Loss(name, {"target_tokens": "int64", **inputs}, fn, dict(config or {}), token_key)
        return fn

    return register


def _clip(bounds: tuple[float, float]) -> dict[str, float]:
    """The clip settings of PPO and CISPO (absolute ratio bounds), with their defaults ``bounds``."""
    return {"clip_low_threshold": bounds[0], "clip_high_threshold": bounds[1]}


@loss("cross_entropy", weights="float32")
def cross_entropy(lp: Any, batch: Mapping[str, Any]) -> tuple[Any, float]:
    """``-w·lp`` per token; loss:mean = Σ terms / Σ weights."""
    weights = batch["weights"]
    return -weights * lp * batch["mask"].to(lp.dtype), float(weights.sum())


@loss("importance_sampling", logprobs="float32", advantages="float32")
def importance_sampling(lp: Any, batch: Mapping[str, Any]) -> tuple[Any, float]:
    """``-exp(lp - q)·A`` per token; loss:mean = Σ terms / number of tokens."""
    ratio = _ratio(lp, batch)
    return _masked(-(ratio * batch["advantages"]), batch)


@loss("ppo", logprobs="float32", advantages="float32", config=_clip(PPO_CLIP))
def ppo(
    lp: Any, batch: Mapping[str, Any], *, clip_low_threshold: float, clip_high_threshold: float
) -> tuple[Any, float]:
    """``-min(r·A, clip(r, low, high)·A)`` with r = exp(lp - q); loss:mean = Σ terms / number of tokens."""
    import torch

    ratio, adv = _ratio(lp, batch), batch["advantages"]
    clipped = ratio.clamp(clip_low_threshold, clip_high_threshold)
    return _masked(-torch.minimum(ratio * adv, clipped * adv), batch)


@loss("cispo", logprobs="float32", advantages="float32", config=_clip(CISPO_CLIP))
def cispo(
    lp: Any, batch: Mapping[str, Any], *, clip_low_threshold: float, clip_high_threshold: float
) -> tuple[Any, float]:
    """``-stopgrad(clip(r, low, high))·lp·A``; loss:mean = Σ terms / number of tokens."""
    weight = _ratio(lp, batch).clamp(clip_low_threshold, clip_high_threshold).detach()
    return _masked(-(weight * lp * batch["advantages"]), batch)


@loss("dro", logprobs="float32", advantages="float32", config={"beta": DRO_BETA})
def dro(lp: Any, batch: Mapping[str, Any], *, beta: float) -> tuple[Any, float]:
    """``-(lp·A - ½·beta·(lp - q)²)``; loss:mean = Σ terms / number of tokens."""
    penalty = (lp - batch["logprobs"]) ** 2
    return _masked(-(lp * batch["advantages"] - 0.5 * beta * penalty), batch)


def _ratio(lp: Any, batch: Mapping[str, Any]) -> Any:
    import torch

    return torch.exp(lp - batch["logprobs"])


def _masked(terms: Any, batch: Mapping[str, Any]) -> tuple[Any, float]:
    import torch

    mask = batch["mask"]
    return torch.where(mask > 0, terms, torch.zeros_like(terms)), float(mask.sum())
