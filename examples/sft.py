"""Supervised fine-tuning, asynchronously: teach the model facts it has never seen.

    python -m examples.sft                      # ~30 s on 2 CPU cores with the built-in model
    python -m examples.sft --steps 20 --batch-size 4

The dataset (``examples/data/facts.jsonl``) holds 32 made-up facts in the question/answer format the built-in
model was pre-trained on: "Q: What color is a blicket?\\nA: green". The made-up words never occur in its
pre-training corpus, so before training it guesses; after training its greedy answers match.

What it shows:

- pipelining: each step's ``forward_backward`` and ``optim_step`` are submitted before the previous step's
  results are awaited, so the server always has the next step queued;
- a progress bar with the loss, and a checkpoint (``save_state``) every ``--checkpoint-every`` steps;
- samples before and after (``save_weights_and_get_sampling_client``), side by side.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, TextIO

from hpcai_async import APIFuture, SamplingClient, ServiceClient, types

from . import _common
from ._common import GREEDY, Progress, decode_answer, encode, qa_prompt, sft_datum

# A submitted training step: its forward_backward and its optim_step, both in flight.
Step = tuple[APIFuture[types.ForwardBackwardOutput], APIFuture[types.OptimStepResponse]]


@dataclass
class SFTResult:
    losses: list[float]  # loss:mean of every step
    questions: list[str]
    answers: list[str]
    before: list[str]  # greedy answers of the base model
    after: list[str]  # greedy answers after training
    checkpoints: list[str] = field(default_factory=list)
    model_id: str = ""
    seconds: float = 0.0

    @property
    def accuracy_before(self) -> float:
        return _accuracy(self.before, self.answers)

    @property
    def accuracy_after(self) -> float:
        return _accuracy(self.after, self.answers)


def _accuracy(got: Sequence[str], want: Sequence[str]) -> float:
    return sum(g == w for g, w in zip(got, want, strict=True)) / max(len(want), 1)


async def greedy_answers(sampler: SamplingClient, tokenizer: Any, questions: Sequence[str]) -> list[str]:
    """The greedy answer to every question, all sampled concurrently."""
    responses = await asyncio.gather(
        *(
            sampler.sample_async(types.ModelInput.from_ints(encode(tokenizer, qa_prompt(q))), 1, GREEDY)
            for q in questions
        )
    )
    return [decode_answer(tokenizer, r.sequences[0].tokens) for r in responses]


async def train(
    base_url: str | None = None,
    api_key: str | None = None,
    *,
    base_model: str = _common.BASE_MODEL,
    steps: int = 60,
    batch_size: int = 8,
    learning_rate: float = 5e-3,
    rank: int = 16,
    checkpoint_every: int = 20,
    seed: int = 0,
    verbose: bool = True,
) -> SFTResult:
    """Fine-tune a LoRA on the facts dataset; returns the loss curve and the answers before and after."""
    started = time.perf_counter()
    facts = _common.load_facts()
    questions, answers = [q for q, _ in facts], [a for _, a in facts]
    log = print if verbose else (lambda *a, **k: None)

    async with ServiceClient(base_url=base_url, api_key=api_key) as service:
        tc = await service.create_lora_training_client_async(base_model, rank=rank, seed=seed)
        tokenizer = await tc.get_tokenizer_async()
        log(f"training run {tc.model_id} on {base_model}: {len(facts)} facts, {steps} steps of {batch_size}")

        base_sampler = service.create_sampling_client(base_model=base_model)
        before_task = asyncio.create_task(greedy_answers(base_sampler, tokenizer, questions))

        data = [sft_datum(tokenizer, qa_prompt(q), f" {a}\n") for q, a in facts]
        rng = random.Random(seed)
        order: list[int] = []
        adam = types.AdamParams(learning_rate=learning_rate)
        losses: list[float] = []
        saves: list[APIFuture[types.SaveWeightsResponse]] = []
        pending: list[Step] = []  # submitted steps whose results were not read yet

        bar = Progress(steps, "sft", enabled=verbose)
        for step in range(steps):
            if len(order) < batch_size:  # reshuffle at each epoch
                order += rng.sample(range(len(data)), len(data))
            batch, order = [data[i] for i in order[:batch_size]], order[batch_size:]
            # Submit this step (both requests are queued on the server in call order) ...
            fb = await tc.forward_backward_async(batch, "cross_entropy")
            opt = await tc.optim_step_async(adam)
            pending.append((fb, opt))
            if (step + 1) % checkpoint_every == 0 and step + 1 < steps:
                saves.append(await tc.save_state_async(f"sft-step{step + 1}"))  # queued after this step
            # ... and only then wait for the previous one: the server never sits idle between steps.
            if len(pending) > 1:
                losses.append(await _finish(*pending.pop(0)))
                bar.update(loss=losses[-1])
        while pending:
            losses.append(await _finish(*pending.pop(0)))
            bar.update(loss=losses[-1])
        bar.close()

        saves.append(await tc.save_state_async("sft-final"))
        checkpoints = [(await save).path for save in saves]
        sampler = await tc.save_weights_and_get_sampling_client_async("sft-final")
        before, after = await before_task, await greedy_answers(sampler, tokenizer, questions)

    result = SFTResult(
        losses=losses,
        questions=questions,
        answers=answers,
        before=before,
        after=after,
        checkpoints=checkpoints,
        model_id=tc.model_id,
        seconds=time.perf_counter() - started,
    )
    if verbose:
        print_comparison(result)
    return result


async def _finish(
    fb: APIFuture[types.ForwardBackwardOutput], opt: APIFuture[types.OptimStepResponse]
) -> float:
    out = await fb
    await opt
    return float(out.metrics["loss:mean"])


def print_comparison(result: SFTResult, file: TextIO | None = None) -> None:
    out = file or sys.stdout
    qw = max(len(q) for q in result.questions)
    aw = max(6, *(len(a) for a in result.before + result.answers))
    print(f"\n{'question':<{qw}}  {'before':<{aw}}  {'after':<{aw}}  {'expected':<{aw}}", file=out)
    for q, b, a, want in zip(result.questions, result.before, result.after, result.answers, strict=True):
        mark = "ok" if a == want else "--"
        print(f"{q:<{qw}}  {b:<{aw}}  {a:<{aw}}  {want:<{aw}}  {mark}", file=out)
    print(
        f"\ncorrect: {result.accuracy_before:.0%} before, {result.accuracy_after:.0%} after; "
        f"loss {result.losses[0]:.3f} -> {result.losses[-1]:.3f} in {len(result.losses)} steps "
        f"({result.seconds:.1f}s)\ncheckpoints: {', '.join(result.checkpoints)}",
        file=out,
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--learning-rate", type=float, default=5e-3)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--checkpoint-every", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--base-model", default=_common.BASE_MODEL)
    args = parser.parse_args(argv)
    with _common.endpoint() as ep:
        asyncio.run(train(ep.base_url, ep.api_key, **vars(args)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
