"""ReferenceClient: forward-only logprobs of a base model as it is, for KL and DPO terms (Fireworks').

Made by ``ServiceClient.create_reference_client``. It is backed either by a LoRA policy's run, whose forward
it asks for with every adapter off (``ForwardRequest.reference``, server feature ``"reference_forward"``):
each such forward takes its number in the policy run's sequence, so it runs in call order with the policy's
training and sees the base model whatever the policy trained before or after, with no second copy of the
base model; or by a frozen model of its own on the base model (a full-parameter policy, or none), which the
server refuses to train.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Final, NoReturn

from ._futures import APIFuture
from ._loop import LoopBinding, on_client_loop, submit
from .training import TrainingClient
from .types import Datum, ForwardBackwardOutput, LossFnType

__all__ = ("ReferenceClient",)

_TRAINING_ONLY: Final = frozenset(
    f"{name}{suffix}"
    for name in (
        "forward_backward",
        "forward_backward_custom",
        "optim_step",
        "save_state",
        "load_state",
        "load_state_with_optimizer",
        "save_weights_for_sampler",
        "save_weights_and_get_sampling_client",
    )
    for suffix in ("", "_async")
)


class ReferenceClient:
    """Forward passes of ``base_model`` untrained: ``forward`` / ``forward_async`` as ``TrainingClient``'s.

    ``policy`` is the LoRA TrainingClient whose run it shares (adapter off), or None when it has a frozen
    model of its own. It has no training methods: ``forward_backward``, ``optim_step``, saves and loads
    raise AttributeError.
    """

    def __init__(self, backing: TrainingClient, *, policy: TrainingClient | None = None) -> None:
        self._backing = backing
        self.policy = policy

    @property
    def _binding(self) -> LoopBinding:
        return self._backing._binding

    @property
    def model_id(self) -> str:
        """The run the forwards go to: the policy's, or the frozen model's."""
        return self._backing.model_id

    @property
    def base_model(self) -> str | None:
        return self._backing.base_model

    def __repr__(self) -> str:
        shared = "policy's run, adapter off" if self.policy is not None else "frozen model"
        return f"ReferenceClient(model_id={self.model_id!r}, base_model={self.base_model!r}, {shared})"

    def __getattr__(self, name: str) -> NoReturn:
        if name in _TRAINING_ONLY:
            raise AttributeError(
                f"ReferenceClient has no {name}: it is forward-only (the base model as it is); call "
                f"{name} on the policy's TrainingClient"
            )
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

    @on_client_loop
    async def forward_async(
        self,
        data: Sequence[Datum],
        loss_fn: LossFnType = "cross_entropy",
        loss_fn_config: dict[str, float] | None = None,
    ) -> APIFuture[ForwardBackwardOutput]:
        """The base model's forward pass: per-datum ``logprobs`` (and ``elementwise_loss``) and metrics,
        chunked and combined as ``TrainingClient.forward_async``."""
        policy = self.policy is not None
        return await self._backing._chunked("forward", data, loss_fn, loss_fn_config, reference=policy)

    forward = submit(forward_async)
