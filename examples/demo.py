"""The demo behind ``make demo``: one local server, the quickstart, SFT and GRPO, then the curves.

    python -m examples.demo                  # a few minutes on 2 CPU cores
    python -m examples.demo --quick          # a shorter run of each part
    python -m examples.demo --out out/demo.png

It starts the embedded local server once (the built-in model ``hpcai-async/tiny-qwen3``), runs the three
examples against it, and ends with the SFT loss curve and the GRPO reward curve: drawn in the terminal, and
written as a PNG with matplotlib (the ``examples`` extra, which ``make demo`` installs; its path is printed).
Without matplotlib the terminal charts are all there is.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from . import _plot, grpo, quickstart, sft
from ._common import BUILTIN_MODEL

DEFAULT_OUT = Path("out") / "demo.png"


@dataclass
class DemoResult:
    sft: sft.SFTResult
    grpo: grpo.GRPOResult
    png: Path | None  # None: matplotlib is not installed, only the terminal charts were drawn
    seconds: dict[str, float]


def banner(title: str) -> None:
    print(f"\n{'=' * 100}\n{title}\n{'=' * 100}", flush=True)


def run(
    base_url: str,
    api_key: str,
    *,
    out: Path = DEFAULT_OUT,
    sft_steps: int = 60,
    grpo_iterations: int = 30,
    grpo_prompts: int | None = None,
    grpo_group_size: int = 8,
    verbose: bool = True,
) -> DemoResult:
    seconds: dict[str, float] = {}

    banner("1/3  quickstart: the reference walkthrough, synchronous")
    t = time.perf_counter()
    quickstart.run(base_url, api_key, base_model=BUILTIN_MODEL, show=verbose)
    seconds["quickstart"] = time.perf_counter() - t

    banner("2/3  supervised fine-tuning: 32 made-up facts, pipelined forward_backward + optim_step")
    t = time.perf_counter()
    sft_result = asyncio.run(
        sft.train(base_url, api_key, base_model=BUILTIN_MODEL, steps=sft_steps, verbose=verbose)
    )
    seconds["sft"] = time.perf_counter() - t

    banner("3/3  GRPO on addition: a group of samples per problem, every sample its own request")
    t = time.perf_counter()
    grpo_result = asyncio.run(
        grpo.train(
            base_url,
            api_key,
            base_model=BUILTIN_MODEL,
            iterations=grpo_iterations,
            prompts=grpo_prompts,
            group_size=grpo_group_size,
            verbose=verbose,
        )
    )
    seconds["grpo"] = time.perf_counter() - t

    png = _plot.render_png(
        out,
        [
            _plot.Panel("SFT loss", sft_result.losses, xlabel="step", smooth=0.8),
            _plot.Panel(
                "GRPO mean reward",
                grpo_result.rewards,
                xlabel="iteration",
                color=_plot.ORANGE,
                markers=True,
                ylim=(0.0, 1.0),
            ),
        ],
    )
    return DemoResult(sft_result, grpo_result, png, seconds)


def print_summary(result: DemoResult) -> None:
    banner("results")
    s, g = result.sft, result.grpo
    print(_plot.braille_chart(s.losses, "SFT loss", width=60, height=8, xlabel="step"))
    print()
    print(_plot.braille_chart(g.rewards, "GRPO mean reward", width=60, height=8, xlabel="iteration"))
    k = max(1, len(g.rewards) // 4)
    print(
        f"\nSFT:  loss {s.losses[0]:.3f} -> {s.losses[-1]:.3f}; "
        f"facts answered correctly {s.accuracy_before:.0%} -> {s.accuracy_after:.0%}"
    )
    line = (
        f"GRPO: mean reward {statistics.fmean(g.rewards[:k]):.2f} (first {k} iterations) -> "
        f"{statistics.fmean(g.rewards[-k:]):.2f} (last {k})"
    )
    if g.greedy_before is not None and g.greedy_after is not None:
        line += f"; greedy answers right {g.greedy_before:.0%} -> {g.greedy_after:.0%}"
    print(line)
    times = ", ".join(f"{name} {sec:.0f}s" for name, sec in result.seconds.items())
    print(f"time: {times}")
    if result.png is not None:
        print(f"curves written to {result.png}")
    else:
        print("no PNG: matplotlib is not installed (pip install 'hpcai_async[examples]', or make demo)")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument(
        "--out", type=Path, default=DEFAULT_OUT, help=f"the PNG to write (default {DEFAULT_OUT})"
    )
    parser.add_argument("--quick", action="store_true", help="a shorter run of each part")
    parser.add_argument("--sft-steps", type=int, default=None)
    parser.add_argument("--grpo-iterations", type=int, default=None)
    args = parser.parse_args(argv)
    sft_steps = args.sft_steps or (20 if args.quick else 60)
    grpo_iterations = args.grpo_iterations or (8 if args.quick else 30)

    from hpcai_async.server import LocalServer

    started = time.perf_counter()
    with LocalServer() as server:
        print(
            f"local server at {server.url} with {BUILTIN_MODEL} (up in {time.perf_counter() - started:.1f}s)"
        )
        result = run(
            server.url, server.api_key, out=args.out, sft_steps=sft_steps, grpo_iterations=grpo_iterations
        )
    result.seconds["total"] = time.perf_counter() - started
    print_summary(result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
