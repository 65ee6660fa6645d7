"""The official SDK's own programs, run against our local server two ways: ported and through the runner.

Each program is the official file itself (``examples/sft.py`` from the SDK's sdist, the recipes from its
bundled cookbook), run a few steps on a small dataset the test writes; each test asserts the run ended and
its loss fell or, for the RL recipes, its reward rose, read from the program's own log (``metrics.jsonl``, or
what it prints).
See ``official_programs`` for the two ways and the local set-up (served model names, HF cache, datasets).
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from official_programs import (
    CHAT,
    GSM8K,
    MODEL,
    WAYS,
    Programs,
    build_warm_base,
    checkpoints,
    cookbook_file,
    falls,
    interrupted_after_the_first_checkpoint,
    metrics,
    open_programs,
    reply_logprobs,
    sdist_file,
    warm_examples,
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


# The RL recipes (rl_loop, rl_basic, math_rl on gsm8k) run on a warm base (``build_warm_base``): the built-in
# model tuned to answer their own "What is 2 + 2?" prompts with \boxed{4} or \boxed{5}, half and half, so
# its reward is about 0.5 and RL can raise it. 12 steps of 8 groups of 8 rollouts; the run must end with every
# step logged and
# - its reward up: the mean of the last 6 steps above the base's expected reward, the probability that the
#   base writes the right reply (exact: prompt logprobs, no sampling; about 0.51);
# - its final weights preferring the right answer more than the base does: the log-odds of \boxed{4} over
#   \boxed{5} (exact too; the base's is about 0.07) up by more than 0.3.
# Measured while writing this, in 12 runs: the last steps' mean reward 0.62 to 0.78, the log-odds up by 0.83
# to 2.4. At twice this learning rate the reward rises faster, but Adam's first, sign-sized updates break the
# reply format in about one run of six (a reward near 0 at step 3), and in one of 24 for good.
RL_STEPS, RL_GROUPS, RL_GROUP_SIZE = 12, 8, 8
RL_ARGS = ["max_tokens=16", "lora_rank=8", "learning_rate=4e-3"]


@pytest.fixture(scope="module")
def warm_base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_warm_base(tmp_path_factory.mktemp("warm"))


@pytest.fixture
def warm(tmp_path: Path, warm_base: Path) -> Iterator[Programs]:
    with open_programs(tmp_path, warm_base) as running:
        running.datasets["openai/gsm8k"]["train"] = write_jsonl(
            tmp_path / "data" / "gsm8k_rl.jsonl", GSM8K[:1] * (RL_STEPS * RL_GROUPS)
        )
        yield running


def assert_learned(programs: Programs, log: Path, reward: str, example: dict[str, Any], base: str) -> None:
    logged = metrics(log)
    assert [m["step"] for m in logged] == list(range(RL_STEPS))
    final = checkpoints(log)[-1]
    assert final["name"] == "final"
    before = reply_logprobs(programs.server, example, base_model=base)
    after = reply_logprobs(programs.server, example, model_path=final["sampler_path"])
    rewards = [m[reward] for m in logged]
    assert sum(rewards[RL_STEPS // 2 :]) / (RL_STEPS // 2) > math.exp(before["right"]), (before, rewards)
    odds_before, odds_after = (lp["right"] - lp["wrong"] for lp in (before, after))
    assert odds_after > odds_before + 0.3, (before, after, rewards)


@pytest.mark.parametrize("way", WAYS)
def test_rl_loop(warm: Programs, warm_base: Path, way: str) -> None:
    # its create_sampling_client(model_path=...) leaves out base_model, which the official SDK requires
    log = warm.root / "rl_loop"
    args = [f"log_path={log}", f"model_name={MODEL}", f"batch_size={RL_GROUPS}", "save_every=0"]
    warm.run(cookbook_file("recipes/rl_loop.py"), [*args, f"group_size={RL_GROUP_SIZE}", *RL_ARGS], way=way)
    assert_learned(warm, log, "reward/total", warm_examples(warm_base)["rl_loop"], MODEL)


@pytest.mark.parametrize("way", WAYS)
def test_rl_basic(warm: Programs, warm_base: Path, way: str) -> None:
    # its dataset builder is fixed in the recipe (Llama-3.1-8B, a base model: the role_colon renderer; 128
    # questions of 16 rollouts a batch); chz replaces it from the command line, by its class's name
    llama = "meta-llama/Llama-3.1-8B"
    builder = ["dataset_builder=Gsm8kDatasetBuilder", f"dataset_builder.batch_size={RL_GROUPS}"]
    builder += [f"dataset_builder.group_size={RL_GROUP_SIZE}", "dataset_builder.renderer_name=role_colon"]
    builder.append(f"dataset_builder.model_name_for_tokenizer={llama}")
    log = warm.root / "rl_basic"
    warm.run(cookbook_file("recipes/rl_basic.py"), [f"log_path={log}", *RL_ARGS, *builder], way=way)
    assert_learned(warm, log, "env/all/reward/total", warm_examples(warm_base)["math_role_colon"], llama)
    step = metrics(log)[-1]
    assert step["env/all/total_episodes"] == RL_GROUPS * RL_GROUP_SIZE
    # trained on what it sampled: the training pass's logprobs of the rollouts are the sampler's
    assert step["optim/entropy"] > 0 and abs(step["optim/kl_sample_train_v1"]) < 1e-4


@pytest.mark.parametrize("way", WAYS)
def test_math_rl_on_gsm8k(warm: Programs, warm_base: Path, way: str) -> None:
    log = warm.root / "math_rl"
    args = [f"log_path={log}", f"model_name={MODEL}", "env=gsm8k", f"group_size={RL_GROUP_SIZE}"]
    args += [f"groups_per_batch={RL_GROUPS}", "eval_every=0", "save_every=0"]
    warm.run(cookbook_file("recipes/math_rl/train.py"), [*args, *RL_ARGS], way=way)
    assert_learned(warm, log, "env/all/reward/total", warm_examples(warm_base)["math_qwen3"], MODEL)


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
    # on the built-in model, which knows sums up to 20 + 20 where this environment asks up to 100 + 100: no
    # reward to earn in a few steps, so this checks that the run ends with every batch trained and logged
    log = programs.root / "math_rl"
    args = [f"log_path={log}", f"model_name={MODEL}", "env=arithmetic", "group_size=2", "groups_per_batch=1"]
    args += ["max_tokens=2", "lora_rank=8", "eval_every=0", "save_every=0", "learning_rate=1e-3"]
    programs.run(cookbook_file("recipes/math_rl/train.py"), args, way=way, timeout=300)
    logged = metrics(log)
    assert [m["step"] for m in logged] == list(range(100))  # the recipe's arithmetic set: 100 batches
    assert all(m["env/all/total_episodes"] == 2 and "env/all/reward/total" in m for m in logged)
    assert checkpoints(log)[-1]["name"] == "final"
