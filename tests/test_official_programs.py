"""The official SDK's own programs, run against our local server two ways: ported and through the runner.

Each program is the official file itself (``examples/sft.py`` from the SDK's sdist, the recipes from its
bundled cookbook), run a few steps on a small dataset the test writes; each test asserts the run ended and
its loss fell (the RL recipes: every step trained and logged its reward), read from the program's own log
(``metrics.jsonl``, or what it prints).
See ``official_programs`` for the two ways and the local set-up (served model names, HF cache, datasets).
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import pytest
from official_programs import (
    CHAT,
    GSM8K,
    MODEL,
    WAYS,
    Programs,
    checkpoints,
    cookbook_file,
    falls,
    interrupted_after_the_first_checkpoint,
    metrics,
    open_programs,
    sdist_file,
    write_jsonl,
)

pytestmark = pytest.mark.timeout(400)


@pytest.fixture
def programs(tmp_path: Path) -> Iterator[Programs]:
    with open_programs(tmp_path) as running:
        yield running


@pytest.mark.parametrize("way", WAYS)
def test_the_sft_example(programs: Programs, way: str) -> None:
    # the two lines the example asks its user to fill in; 96 rows of batch 32: 3 steps
    edit = {
        'BASE_URL = "https://www.hpc-ai.com/finetunesdk"': f'BASE_URL = "{programs.server.url}"',
        'API_KEY = "Your_API_Key_Here"': f'API_KEY = "{programs.server.api_key}"',
    }
    proc = programs.run(sdist_file("examples/sft.py"), way=way, edit=edit)
    steps = re.findall(r"^Step (\d+)/3 \| Loss: ([\d.]+)", proc.stdout, flags=re.MULTILINE)
    assert [int(step) for step, _ in steps] == [1, 2, 3], proc.stdout[-2000:]
    assert falls([float(loss) for _, loss in steps])


@pytest.mark.parametrize("way", WAYS)
def test_sl_loop_fresh_then_resumed(programs: Programs, way: str) -> None:
    log = programs.root / "sl_loop"
    args = [f"log_path={log}", f"model_name={MODEL}", "batch_size=4", "learning_rate=1e-3", "save_every=2"]
    args.append("lora_rank=8")
    programs.run(cookbook_file("recipes/sl_loop.py"), args, way=way)
    first = metrics(log)
    assert [m["step"] for m in first] == [0, 1, 2, 3]
    assert falls([m["train_mean_nll"] for m in first])
    assert [c["name"] for c in checkpoints(log)] == ["000002", "final"]

    interrupted_after_the_first_checkpoint(log)  # the program resumes from step 2's checkpoint
    programs.run(cookbook_file("recipes/sl_loop.py"), args, way=way)
    resumed = metrics(log)[len(first) :]
    assert [m["step"] for m in resumed] == [2, 3]
    # the same weights and optimizer state: step 2's loss (weights) and step 3's (after an Adam step that
    # uses the saved moments) are the first run's
    for before, after in zip(first[2:], resumed, strict=True):
        assert after["train_mean_nll"] == pytest.approx(before["train_mean_nll"], rel=1e-4)
    assert checkpoints(log)[-1]["name"] == "final"


# The RL recipes (rl_loop, rl_basic, math_rl): the built-in model cannot earn their rewards (it never writes
# the `\boxed{}` answer that gsm8k's grader needs, and knows sums only up to 20 + 20 where the arithmetic
# environment asks up to 100 + 100), so these tests check that each run ends with every step trained and its
# reward logged: rl_loop's 0 for a wrong answer, rl_basic's -0.1 (the format penalty of the cookbook's
# MathEnv).


@pytest.mark.parametrize("way", WAYS)
def test_rl_loop(programs: Programs, way: str) -> None:
    # its create_sampling_client(model_path=...) leaves out base_model, which the official SDK requires
    log = programs.root / "rl_loop"
    args = [f"log_path={log}", f"model_name={MODEL}", "batch_size=2", "group_size=2", "max_tokens=4"]
    programs.run(cookbook_file("recipes/rl_loop.py"), [*args, "lora_rank=8", "save_every=0"], way=way)
    logged = metrics(log)
    assert [m["step"] for m in logged] == [0, 1]  # 4 questions, 2 a batch
    assert all(m["reward/total"] == 0.0 for m in logged)
    assert checkpoints(log)[-1]["name"] == "final"


@pytest.mark.parametrize("way", WAYS)
def test_rl_basic(programs: Programs, way: str) -> None:
    # its dataset builder is fixed in the recipe (Llama-3.1-8B, 128 questions of 16 rollouts a batch) and chz
    # takes no `dataset_builder.batch_size=` for a builder given as an instance: 128 rows are one step
    gsm8k = programs.datasets["openai/gsm8k"]
    gsm8k["train"] = write_jsonl(programs.root / "data" / "gsm8k128.jsonl", GSM8K * 32)
    log = programs.root / "rl_basic"
    programs.run(cookbook_file("recipes/rl_basic.py"), [f"log_path={log}", "max_tokens=8"], way=way)
    (step,) = metrics(log)
    assert step["step"] == 0 and step["progress/done_frac"] == 1.0
    assert step["env/all/total_episodes"] == 128 * 16
    assert 0 < step["env/all/ac_tokens_per_turn"] <= 8
    # no `\boxed{}` answer: every rollout gets the format penalty alone, 0.1 * (0 - 1)
    assert step["env/all/format"] == 0.0 and step["env/all/correct"] == 0.0
    assert step["env/all/reward/total"] == pytest.approx(-0.1)
    # trained on what it sampled: the training pass's logprobs of the 2048 rollouts are the sampler's
    assert step["optim/entropy"] > 0 and abs(step["optim/kl_sample_train_v1"]) < 1e-4
    assert [(c["name"], c["batch"]) for c in checkpoints(log)] == [("final", 1)]


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
