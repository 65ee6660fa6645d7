"""The official SDK's own programs, run against our local server two ways: ported and through the runner.

Each program is the official file itself (``examples/sft.py`` from the SDK's sdist, the recipes from its
bundled cookbook), run a few steps on a small dataset the test writes; each test asserts the run ended and
its loss fell or its reward rose, read from the program's own log (``metrics.jsonl``, or what it prints).
See ``official_programs`` for the two ways and the local set-up (served model names, HF cache, datasets).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from official_programs import (
    MODEL,
    WAYS,
    Programs,
    checkpoints,
    cookbook_file,
    metrics,
    serve,
    write_jsonl,
)

pytestmark = pytest.mark.timeout(400)

CHAT = [
    {
        "messages": [
            {"role": "user", "content": "What is two plus two?"},
            {"role": "assistant", "content": "Two plus two is four."},
        ]
    }
] * 16


@pytest.fixture
def programs(tmp_path: Path) -> Iterator[Programs]:
    server = serve(tmp_path)
    chat = {
        "train": write_jsonl(tmp_path / "data" / "chat.jsonl", CHAT),
        "test": write_jsonl(tmp_path / "data" / "chat_test.jsonl", CHAT[:4]),
    }
    datasets = {"HuggingFaceH4/no_robots": chat}
    try:
        yield Programs(server, tmp_path, datasets)
    finally:
        server.close()


def _falls(values: list[float]) -> bool:
    return len(values) >= 2 and values[-1] < values[0]


@pytest.mark.parametrize("way", WAYS)
def test_sl_loop_fresh_then_resumed(programs: Programs, way: str) -> None:
    log = programs.root / "sl_loop"
    args = [f"log_path={log}", f"model_name={MODEL}", "batch_size=4", "learning_rate=1e-3", "save_every=2"]
    args.append("lora_rank=8")
    programs.run(cookbook_file("recipes/sl_loop.py"), args, way=way)
    first = metrics(log)
    assert [m["step"] for m in first] == [0, 1, 2, 3]
    assert _falls([m["train_mean_nll"] for m in first])
    saved = checkpoints(log)
    assert [c["name"] for c in saved] == ["000002", "final"]

    # interrupted after step 3: forget the final checkpoint; the program resumes from the one of step 2
    (log / "checkpoints.jsonl").write_text(json.dumps(saved[0]) + "\n")
    programs.run(cookbook_file("recipes/sl_loop.py"), args, way=way)
    resumed = metrics(log)[len(first) :]
    assert [m["step"] for m in resumed] == [2, 3]
    # the same weights and optimizer state: step 2's loss (weights) and step 3's (after an Adam step that
    # uses the saved moments) are the first run's
    for before, after in zip(first[2:], resumed, strict=True):
        assert after["train_mean_nll"] == pytest.approx(before["train_mean_nll"], rel=1e-4)
    assert checkpoints(log)[-1]["name"] == "final"
