"""Resume training from a checkpoint, optimizer state included, and check that nothing was lost.

    python -m examples.resume
    python -m examples.resume --steps 12 --resume-at 6

A run trains ``--resume-at`` steps and saves its state (``save_state``: LoRA weights *and* AdamW moments).
Then three runs take the same remaining batches:

- the original run simply goes on (the uninterrupted reference);
- a new run from ``create_training_client_from_state_with_optimizer(path)``: its losses are the reference's;
- a new run from ``create_training_client_from_state(path)`` (weights only, a fresh optimizer): it starts at
  the same loss, then drifts, because AdamW's moments restarted from zero.

All three continue concurrently on the same server.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass

from hpcai_async import ServiceClient, TrainingClient, types

from . import _common
from ._common import qa_prompt, sft_datum


@dataclass
class ResumeResult:
    before: list[float]  # losses of the steps before the checkpoint
    reference: list[float]  # the original run, going on
    resumed: list[float]  # a new run from the checkpoint, with its optimizer state
    weights_only: list[float]  # a new run from the checkpoint's weights, with a fresh optimizer
    checkpoint: str
    seconds: float = 0.0

    @property
    def max_difference(self) -> float:
        return max((abs(a - b) for a, b in zip(self.resumed, self.reference, strict=True)), default=0.0)


async def _train(
    tc: TrainingClient, batches: Sequence[list[types.Datum]], adam: types.AdamParams
) -> list[float]:
    """Train on ``batches`` (all submitted up front, in order); returns every step's loss."""
    submitted = []
    for batch in batches:
        fb = await tc.forward_backward_async(batch, "cross_entropy")
        opt = await tc.optim_step_async(adam)
        submitted.append((fb, opt))
    losses = []
    for fb, opt in submitted:
        losses.append((await fb).metrics["loss:mean"])
        await opt
    return losses


async def run(
    base_url: str | None = None,
    api_key: str | None = None,
    *,
    base_model: str = _common.BASE_MODEL,
    steps: int = 16,
    resume_at: int = 8,
    batch_size: int = 8,
    learning_rate: float = 5e-3,
    rank: int = 8,
    seed: int = 0,
    verbose: bool = True,
) -> ResumeResult:
    started = time.perf_counter()
    if not 0 < resume_at < steps:
        raise ValueError(f"resume_at must be between 1 and steps - 1, got {resume_at} of {steps}")
    facts = _common.load_facts()
    rng = random.Random(seed)
    adam = types.AdamParams(learning_rate=learning_rate)

    async with ServiceClient(base_url=base_url, api_key=api_key) as service:
        tc = await service.create_lora_training_client_async(base_model, rank=rank, seed=seed)
        tokenizer = await tc.get_tokenizer_async()
        data = [sft_datum(tokenizer, qa_prompt(q), f" {a}\n") for q, a in facts]
        batches = [rng.sample(data, batch_size) for _ in range(steps)]

        before = await _train(tc, batches[:resume_at], adam)
        checkpoint = (await (await tc.save_state_async("resume-here"))).path
        if verbose:
            print(f"trained {resume_at} steps on run {tc.model_id}, saved {checkpoint}")

        async def resumed(with_optimizer: bool) -> list[float]:
            if with_optimizer:
                new = await service.create_training_client_from_state_with_optimizer_async(checkpoint)
            else:
                new = await service.create_training_client_from_state_async(checkpoint)
            return await _train(new, batches[resume_at:], adam)

        reference, with_opt, weights_only = await asyncio.gather(
            _train(tc, batches[resume_at:], adam), resumed(True), resumed(False)
        )

    result = ResumeResult(
        before, reference, with_opt, weights_only, checkpoint, time.perf_counter() - started
    )
    if verbose:
        print_curves(result)
    return result


def print_curves(result: ResumeResult) -> None:
    print(f"\n{'step':>4}  {'uninterrupted':>13}  {'resumed':>13}  {'weights only':>13}")
    for i, loss in enumerate(result.before):
        print(f"{i + 1:>4}  {loss:>13.5f}")
    print(f"{'':>4}  {'-- checkpoint --':^45}")
    offset = len(result.before)
    for i, (ref, res, wo) in enumerate(
        zip(result.reference, result.resumed, result.weights_only, strict=True)
    ):
        print(f"{offset + i + 1:>4}  {ref:>13.5f}  {res:>13.5f}  {wo:>13.5f}")
    drift = max(abs(a - b) for a, b in zip(result.weights_only, result.reference, strict=True))
    print(
        f"\nresumed with optimizer vs uninterrupted: max |difference| {result.max_difference:.2e}\n"
        f"resumed with weights only vs uninterrupted: max |difference| {drift:.2e}  ({result.seconds:.1f}s)"
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--steps", type=int, default=16)
    parser.add_argument("--resume-at", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--learning-rate", type=float, default=5e-3)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--base-model", default=_common.BASE_MODEL)
    args = parser.parse_args(argv)
    with _common.endpoint() as ep:
        asyncio.run(run(ep.base_url, ep.api_key, **vars(args)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
