"""GRPO, asynchronously: reinforcement learning on small-number addition with a verifiable reward.

    python -m examples.grpo                              # about a minute on 2 CPU cores, built-in model
    python -m examples.grpo --iterations 10 --group-size 4 --loss-fn importance_sampling

The problems are "Q: What is a+b?\\nA:" for a, b in 0..9 (the built-in model's pre-training format; it answers
about two thirds of them right). Each iteration samples a group of ``--group-size`` answers to every problem,
each sample as its own request: 800 sample calls in flight at once by default. The reward is 1 when the first
number of an answer is a+b. Advantages are normalised inside each group (reward minus the group mean, over the
group's standard deviation), so a group whose samples all got the same reward teaches nothing and is left
out. The update is a ``ppo`` (or ``importance_sampling``) forward_backward over the sampled tokens -- target
tokens, the sampler's logprobs, and the advantage on every completion token, zeros on the prompt -- and an
optim_step, twice per iteration on two halves of the batch; then new sampler weights
(``save_weights_and_get_sampling_client``) for the next iteration. The mean reward rises as the run goes on.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import re
import statistics
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from hpcai_async import SamplingClient, ServiceClient, types

from . import _common
from ._common import Progress, encode, qa_prompt

Problem = tuple[int, int]
_NUMBER = re.compile(r"-?\d+")


@dataclass
class GRPOResult:
    rewards: list[float]  # mean reward of every iteration (of the samples drawn before its update)
    losses: list[float] = field(default_factory=list)
    greedy_before: float | None = None  # greedy accuracy on every problem, before and after training
    greedy_after: float | None = None
    samples: int = 0  # sample requests made
    seconds: float = 0.0
    model_id: str = ""


def reward(answer: str, a: int, b: int) -> float:
    """1.0 if the first integer in ``answer`` is a+b, else 0.0."""
    match = _NUMBER.search(answer)
    return 1.0 if match is not None and int(match.group()) == a + b else 0.0


def all_problems(max_operand: int = 9) -> list[Problem]:
    return [(a, b) for a in range(max_operand + 1) for b in range(max_operand + 1)]


def group_advantages(rewards: Sequence[float]) -> list[float]:
    """GRPO's advantages: reward minus the group mean, over the group's standard deviation (0 if it is 0)."""
    mean = statistics.fmean(rewards)
    std = statistics.pstdev(rewards)
    if std < 1e-6:
        return [0.0] * len(rewards)
    return [(r - mean) / std for r in rewards]


def rl_datum(prompt: list[int], sequence: types.SampledSequence, advantage: float) -> types.Datum:
    """One sampled completion as a policy-gradient example.

    The model input is prompt + completion minus the last token; targets are shifted by one. Per target token
    the datum carries the sampler's logprob and the advantage, with zeros on prompt positions (not trained).
    """
    tokens = prompt + list(sequence.tokens)
    n_prompt = len(prompt) - 1
    n_completion = len(sequence.tokens)
    sampled = list(sequence.logprobs or [0.0] * n_completion)
    return types.Datum(
        model_input=types.ModelInput.from_ints(tokens[:-1]),
        loss_fn_inputs={
            "target_tokens": tokens[1:],
            "logprobs": [0.0] * n_prompt + sampled,
            "advantages": [0.0] * n_prompt + [advantage] * n_completion,
        },
    )


async def greedy_accuracy(sampler: SamplingClient, tokenizer: Any, problems: Sequence[Problem]) -> float:
    """Share of problems whose greedy answer is right (all sampled concurrently)."""
    responses = await asyncio.gather(
        *(
            sampler.sample_async(
                types.ModelInput.from_ints(encode(tokenizer, _prompt(a, b))), 1, _common.GREEDY
            )
            for a, b in problems
        )
    )
    answers = [tokenizer.decode(r.sequences[0].tokens) for r in responses]
    return statistics.fmean(reward(ans, a, b) for ans, (a, b) in zip(answers, problems, strict=True))


def _prompt(a: int, b: int) -> str:
    return qa_prompt(f"What is {a}+{b}?")


async def train(
    base_url: str | None = None,
    api_key: str | None = None,
    *,
    base_model: str = _common.BASE_MODEL,
    iterations: int = 30,
    max_operand: int = 9,
    prompts: int | None = None,
    group_size: int = 8,
    updates_per_iteration: int = 2,
    learning_rate: float = 3e-3,
    rank: int = 16,
    loss_fn: types.LossFnType = "ppo",
    temperature: float = 1.0,
    max_tokens: int = 4,
    evaluate: bool = True,
    seed: int = 0,
    verbose: bool = True,
) -> GRPOResult:
    """Run GRPO on a+b with a, b in 0..max_operand; returns the mean reward of every iteration.

    ``prompts`` problems are drawn per iteration (None: every problem, every iteration: the same prompts each
    time, so the reward curve shows learning rather than which problems happened to be drawn).
    """
    started = time.perf_counter()
    rng = random.Random(seed)
    problems = all_problems(max_operand)
    params = types.SamplingParams(max_tokens=max_tokens, temperature=temperature, stop=["\n"])
    adam = types.AdamParams(learning_rate=learning_rate)
    result = GRPOResult(rewards=[])
    log = print if verbose else (lambda *a, **k: None)

    async with ServiceClient(base_url=base_url, api_key=api_key) as service:
        tc = await service.create_lora_training_client_async(base_model, rank=rank, seed=seed)
        result.model_id = tc.model_id
        tokenizer = await tc.get_tokenizer_async()
        n_prompts = prompts or len(problems)
        log(
            f"training run {tc.model_id} on {base_model}: {iterations} iterations of {n_prompts} problems x "
            f"{group_size} samples = {n_prompts * group_size} sample requests each; {loss_fn}, "
            f"{updates_per_iteration} updates per iteration"
        )
        sampler = await tc.save_weights_and_get_sampling_client_async("grpo-0")
        if evaluate:
            result.greedy_before = await greedy_accuracy(sampler, tokenizer, problems)

        bar = Progress(iterations, "grpo", enabled=verbose)
        for it in range(iterations):
            batch = rng.sample(problems, prompts) if prompts else problems
            prompt_ids = [encode(tokenizer, _prompt(a, b)) for a, b in batch]
            model_inputs = [types.ModelInput.from_ints(p) for p in prompt_ids]
            # Every sample is its own request, all in flight together: len(batch) x group_size calls.
            responses = await asyncio.gather(
                *(sampler.sample_async(mi, 1, params) for mi in model_inputs for _ in range(group_size))
            )
            result.samples += len(responses)

            data: list[types.Datum] = []
            iteration_rewards: list[float] = []
            for i, (a, b) in enumerate(batch):
                group = [r.sequences[0] for r in responses[i * group_size : (i + 1) * group_size]]
                rewards = [reward(tokenizer.decode(seq.tokens), a, b) for seq in group]
                iteration_rewards += rewards
                for seq, adv in zip(group, group_advantages(rewards), strict=True):
                    if adv != 0.0 and seq.tokens:
                        data.append(rl_datum(prompt_ids[i], seq, adv))
            result.rewards.append(statistics.fmean(iteration_rewards))

            # A few optimizer steps per batch of samples, each on its own share of it, all queued at once. The
            # later ones are slightly off-policy, which the importance ratio (clipped, with ppo) accounts for.
            rng.shuffle(data)
            shares = [data[k::updates_per_iteration] for k in range(updates_per_iteration)]
            submitted = []
            for share in shares:
                if share:
                    fb = await tc.forward_backward_async(share, loss_fn)
                    submitted.append((fb, await tc.optim_step_async(adam)))
            if submitted:
                # ordered after the updates: these weights include them
                sampler = await tc.save_weights_and_get_sampling_client_async(f"grpo-{it + 1}")
            for fb, opt in submitted:
                result.losses.append((await fb).metrics["loss:mean"])
                await opt
            bar.update(reward=result.rewards[-1], trained=str(len(data)))
        bar.close()

        if evaluate:
            result.greedy_after = await greedy_accuracy(sampler, tokenizer, problems)
    result.seconds = time.perf_counter() - started
    if verbose:
        print_summary(result, max_operand)
    return result


def print_summary(result: GRPOResult, max_operand: int = 9) -> None:
    rewards = result.rewards
    k = max(1, len(rewards) // 4)
    print("\nmean reward per iteration: " + " ".join(f"{r:.2f}" for r in rewards))
    print(
        f"mean reward: first {k} iterations {statistics.fmean(rewards[:k]):.2f} -> last {k} "
        f"{statistics.fmean(rewards[-k:]):.2f}  ({result.samples} samples in {result.seconds:.1f}s)"
    )
    if result.greedy_before is not None and result.greedy_after is not None:
        print(
            f"greedy accuracy on every a+b with a, b in 0..{max_operand}: "
            f"{result.greedy_before:.0%} -> {result.greedy_after:.0%}"
        )


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--iterations", type=int, default=30)
    parser.add_argument("--max-operand", type=int, default=9, help="problems are a+b with a, b in 0..N")
    parser.add_argument("--prompts", type=int, default=None, help="problems per iteration (default: all)")
    parser.add_argument("--group-size", type=int, default=8, help="samples per problem")
    parser.add_argument("--updates-per-iteration", type=int, default=2)
    parser.add_argument("--learning-rate", type=float, default=3e-3)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--loss-fn", choices=["importance_sampling", "ppo"], default="ppo")
    parser.add_argument("--no-eval", action="store_true", help="skip the greedy accuracy before and after")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--base-model", default=_common.BASE_MODEL)
    args = parser.parse_args(argv)
    options = vars(args)
    options["evaluate"] = not options.pop("no_eval")
    with _common.endpoint() as ep:
        asyncio.run(train(ep.base_url, ep.api_key, **options))
    return 0


if __name__ == "__main__":
    sys.exit(main())
