"""What every example shares: where the service is, the prompt format, datums, a progress bar.

The examples talk to ``HPCAI_BASE_URL`` / ``HPCAI_API_KEY`` when ``HPCAI_BASE_URL`` is set, and otherwise
start the embedded local server (``hpcai_async.server.LocalServer``) with the built-in model while they run.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

from hpcai_async import types

DATA = Path(__file__).resolve().parent / "data"
BUILTIN_MODEL = "hpcai-async/tiny-qwen3"
# The built-in model locally; set HPCAI_BASE_MODEL to pick a model the remote service offers.
BASE_MODEL = os.environ.get("HPCAI_BASE_MODEL", BUILTIN_MODEL)


@dataclass(frozen=True)
class Endpoint:
    base_url: str
    api_key: str
    local: bool


@contextlib.contextmanager
def endpoint(quiet: bool = False) -> Iterator[Endpoint]:
    """The service to talk to: the environment's, or a local server started here and stopped on exit."""
    url = os.environ.get("HPCAI_BASE_URL")
    if url:
        yield Endpoint(url, os.environ.get("HPCAI_API_KEY", ""), local=False)
        return
    from hpcai_async.server import LocalServer

    started = time.perf_counter()
    with LocalServer() as server:
        if not quiet:
            print(f"local server at {server.url} (started in {time.perf_counter() - started:.1f}s)")
        yield Endpoint(server.url, server.api_key, local=True)


# ----------------------------------------------------------------------------------------- prompts and data


def qa_prompt(question: str) -> str:
    """The question/answer format of the built-in model's pre-training corpus."""
    return f"Q: {question}\nA:"


def encode(tokenizer: Any, text: str) -> list[int]:
    ids: list[int] = tokenizer.encode(text, add_special_tokens=False)
    return ids


def decode_answer(tokenizer: Any, tokens: Sequence[int]) -> str:
    """The text of a completion up to its first newline, stripped."""
    text: str = tokenizer.decode(list(tokens), skip_special_tokens=True)
    return text.split("\n", 1)[0].strip()


def load_facts(path: Path | None = None) -> list[tuple[str, str]]:
    """The (question, answer) pairs of a JSON-lines file (default: examples/data/facts.jsonl)."""
    rows = [
        json.loads(line) for line in (path or DATA / "facts.jsonl").read_text().splitlines() if line.strip()
    ]
    return [(row["question"], row["answer"]) for row in rows]


def sft_datum(tokenizer: Any, prompt: str, completion: str) -> types.Datum:
    """A cross-entropy example that trains only on the completion's tokens.

    Prompt and completion are encoded separately and joined, so the prompt tokens are exactly the ones a
    sampler is later given. Position i of the input predicts token i + 1 (inputs = tokens[:-1], targets =
    tokens[1:]); weight 1 marks the targets that belong to the completion.
    """
    prompt_ids, completion_ids = encode(tokenizer, prompt), encode(tokenizer, completion)
    tokens = prompt_ids + completion_ids
    weights = [0.0] * (len(prompt_ids) - 1) + [1.0] * len(completion_ids)
    return types.Datum(
        model_input=types.ModelInput.from_ints(tokens[:-1]),
        loss_fn_inputs={"target_tokens": tokens[1:], "weights": weights},
    )


GREEDY = types.SamplingParams(max_tokens=8, temperature=0.0, stop=["\n"])


# --------------------------------------------------------------------------------------------- output


class Progress:
    """``label [██████░░░░]  12/40  loss 1.234  5.1 it/s`` on one line, redrawn in place on a terminal.

    Off a terminal (tests, logs) it prints nothing until ``close``, which prints the final state once.
    """

    def __init__(self, total: int, label: str, stream: TextIO | None = None, enabled: bool = True) -> None:
        self.total, self.label = total, label
        self.stream = stream or sys.stderr
        self.enabled = enabled
        self.tty = enabled and self.stream.isatty()
        try:
            "█░".encode(getattr(self.stream, "encoding", None) or "ascii")
            self.unicode = True
        except (UnicodeEncodeError, LookupError):
            self.unicode = False
        self.n = 0
        self.info = ""
        self.start = time.perf_counter()
        self._drawn = 0.0

    def update(self, n: int = 1, **info: float | str) -> None:
        self.n += n
        if info:
            self.info = "  ".join(
                f"{k} {v:.3f}" if isinstance(v, float) else f"{k} {v}" for k, v in info.items()
            )
        now = time.perf_counter()
        if self.tty and (now - self._drawn > 0.05 or self.n >= self.total):
            self._drawn = now
            self.stream.write("\r" + self._line(now))
            self.stream.flush()

    def _line(self, now: float) -> str:
        width = 24
        filled = int(width * min(self.n / max(self.total, 1), 1.0))
        full, empty = ("█", "░") if self.unicode else ("#", ".")
        bar = full * filled + empty * (width - filled)
        rate = self.n / max(now - self.start, 1e-9)
        return f"{self.label} [{bar}] {self.n}/{self.total}  {self.info}  {rate:.1f} it/s "

    def close(self) -> None:
        if not self.enabled:
            return
        line = self._line(time.perf_counter())
        if self.tty:
            self.stream.write("\r" + line + "\n")
        else:
            self.stream.write(line.rstrip() + "\n")
        self.stream.flush()

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
