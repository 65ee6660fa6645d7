"""Official programs whose runs do not end yet on hpcai_async; pytest does not collect them (no test_ name).

``sl_basic``, ``chat_sl`` and ``math_rl`` end in the cookbook's ``UnloadContextManager``, whose ``__exit__``
calls ``training_client.unload_model().result()`` inside ``async def`` code, on the event loop the client
is bound to; ``APIFuture.result()`` there raises (``hpcai_async/_loop.py``, "Sync and async", rule 4)
instead of completing as the official SDK does. Everything before that line works (these tests passed with
that ``result()`` made not to raise). Once it completes, run them with
``pytest tests/official_programs_pending.py`` and move them into ``test_official_programs.py``.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from official_programs import (
    CHAT,
    MODEL,
    WAYS,
    Programs,
    checkpoints,
    cookbook_file,
    falls,
    interrupted_after_the_first_checkpoint,
    metrics,
    open_programs,
    write_jsonl,
)

pytestmark = pytest.mark.timeout(400)


@pytest.fixture
def programs(tmp_path: Path) -> Iterator[Programs]:
    with open_programs(tmp_path) as running:
        yield running


@pytest.mark.parametrize("way", WAYS)
def test_sl_basic(programs: Programs, way: str) -> None:
    # its dataset builder is fixed in the recipe (Qwen/Qwen3-4B, batch 32): 64 rows are 2 steps
    chat = programs.datasets["HuggingFaceH4/no_robots"]
    chat["train"] = write_jsonl(programs.root / "data" / "chat64.jsonl", CHAT * 4)
    log = programs.root / "sl_basic"
    programs.run(cookbook_file("recipes/sl_basic.py"), [f"log_path={log}", "learning_rate=1e-3"], way=way)
    logged = metrics(log)
    assert [m["step"] for m in logged] == [0, 1]
    assert falls([m["train_mean_nll"] for m in logged])


@pytest.mark.parametrize("way", WAYS)
def test_chat_sl_fresh_resumed_and_from_a_checkpoint(programs: Programs, way: str) -> None:
    data = programs.datasets["HuggingFaceH4/no_robots"]["train"]
    common = [f"model_name={MODEL}", f"dataset={data}", "batch_size=4", "learning_rate=1e-3", "lora_rank=8"]
    common += ["save_every=2", "eval_every=0", "max_length=256"]
    log = programs.root / "chat_sl"
    train = cookbook_file("recipes/chat_sl/train.py")
    programs.run(train, [*common, f"log_path={log}"], way=way)
    first = metrics(log)
    assert [m["step"] for m in first] == [0, 1, 2, 3]
    assert falls([m["train_mean_nll"] for m in first])

    # the recipe pipelines: step 2's checkpoint is saved once step 3 was submitted, so it holds the weights
    # after 4 updates and says "resume at batch 2" (its loop state); the rows are all alike, so a run on
    # those weights starts where the first run ended, below its last loss
    saved = interrupted_after_the_first_checkpoint(log)
    programs.run(train, [*common, f"log_path={log}", "behavior_if_log_dir_exists=resume"], way=way)
    resumed = metrics(log)[len(first) :]
    assert [m["step"] for m in resumed] == [2, 3]
    assert resumed[0]["train_mean_nll"] < first[-1]["train_mean_nll"]

    # a new run from that checkpoint's weights (load_checkpoint_path: a fresh optimizer) starts from the
    # same loss as the resumed one
    other = programs.root / "chat_sl_loaded"
    load = f"load_checkpoint_path={saved['state_path']}"
    programs.run(train, [*common, f"log_path={other}", load], way=way)
    loaded = metrics(other)
    assert [m["step"] for m in loaded] == [0, 1, 2, 3]
    assert loaded[0]["train_mean_nll"] == pytest.approx(resumed[0]["train_mean_nll"], rel=1e-4)
    assert falls([m["train_mean_nll"] for m in loaded])


@pytest.mark.parametrize("way", WAYS)
def test_math_rl_on_the_arithmetic_environment(programs: Programs, way: str) -> None:
    log = programs.root / "math_rl"
    args = [f"log_path={log}", f"model_name={MODEL}", "env=arithmetic", "group_size=2", "groups_per_batch=1"]
    args += ["max_tokens=2", "lora_rank=8", "eval_every=0", "save_every=0", "learning_rate=1e-3"]
    programs.run(cookbook_file("recipes/math_rl/train.py"), args, way=way, timeout=300)
    logged = metrics(log)
    assert [m["step"] for m in logged] == list(range(100))  # the recipe's arithmetic set: 100 batches
    assert all(m["env/all/total_episodes"] == 2 and "env/all/reward/total" in m for m in logged)
    assert checkpoints(log)[-1]["name"] == "final"
