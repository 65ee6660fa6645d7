"""The loss functions, in one registry: a loss is one function plus the loss_fn_inputs it needs.

To add a loss, write one function with the ``@loss`` decorator, naming its inputs and their wire dtypes::

    @loss("my_loss", logprobs="float32", advantages="float32")
    def my_loss(lp, batch):
        ...  # per-token terms [B, T] (zero on padding), and the loss:mean denominator

``target_tokens`` (int64) is always required: the engine turns it into ``lp`` = log p(target) per position.
``batch`` maps each input (and ``mask``, 1 on real tokens) to a [B, T] tensor, right-padded with zeros. The
engine sums the terms over tokens and datums (PROTOCOL.md §5.3) and backpropagates that sum; ``loss:mean`` is
the sum over the denominator (0.0 when it is 0). A loss with settings (a future ``loss_fn_config``: CISPO's
or DRO's constants) takes them as keyword arguments of its function.

torch is imported inside the functions: ``engine_api`` reads the registry where torch is not installed.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Final

__all__ = ("LOSSES", "PPO_CLIP", "Loss", "loss")

PPO_CLIP: Final = (0.8, 1.2)  # absolute ratio bounds, the tinker defaults (hpcai has no loss_fn_config)

LossFn = Callable[[Any, Mapping[str, Any]], tuple[Any, float]]


@dataclass(frozen=True, slots=True)
class Loss:
    """A registered loss: its name, its required loss_fn_inputs (key -> wire dtype) and its function."""

    name: str
    inputs: Mapping[str, str]
    fn: LossFn


LOSSES: dict[str, Loss] = {}


def loss(name: str, **inputs: str) -> Callable[[LossFn], LossFn]:
    """Register ``fn`` as the loss ``name`` taking ``target_tokens`` and ``inputs`` (see the module doc)."""

    def register(fn: LossFn) -> LossFn:
        LOSSES[name] = Loss(name, {"target_tokens": "int64", **inputs}, fn)
        return fn

    return register


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


@loss("ppo", logprobs="float32", advantages="float32")
def ppo(lp: Any, batch: Mapping[str, Any]) -> tuple[Any, float]:
    """``-min(r·A, clip(r, 0.8, 1.2)·A)`` with r = exp(lp - q); loss:mean = Σ terms / number of tokens."""
    import torch

    ratio, adv = _ratio(lp, batch), batch["advantages"]
    low, high = PPO_CLIP
    return _masked(-torch.minimum(ratio * adv, ratio.clamp(low, high) * adv), batch)


def _ratio(lp: Any, batch: Mapping[str, Any]) -> Any:
    import torch

    return torch.exp(lp - batch["logprobs"])


def _masked(terms: Any, batch: Mapping[str, Any]) -> tuple[Any, float]:
    import torch

    mask = batch["mask"]
    return torch.where(mask > 0, terms, torch.zeros_like(terms)), float(mask.sum())
