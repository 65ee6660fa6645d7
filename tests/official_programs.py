"""Running the official SDK's own programs against our local server: ported, or unchanged through the runner.

* **ported**: the program's ``import hpcai`` / ``from hpcai...`` lines rewritten to ``hpcai_async`` (nothing
  else), then run with this venv's python;
* **runner**: the file as shipped, run as ``python -m hpcai_async.compat FILE ARGS...``.

Both run in a subprocess of *our* interpreter with the official package installed after ours on the path
(``tests/_official_site/sitecustomize.py``), so its cookbook and the cookbook's own dependencies import while
hpcai_async is the client. The set-up a user of the hosted service has, made locally:

* the built-in model served under the names the recipes know (they pick a renderer by model name);
* a Hugging Face cache (``HF_HOME``, offline) holding the built-in tokenizer under those names, for the
  cookbook's ``get_tokenizer``;
* small datasets the test writes, read where a program asks the hub for one (nothing is downloaded).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from official_env import official_sdist, official_site_packages

from hpcai_async.server import LocalServer

TESTS = Path(__file__).resolve().parent
BUILTIN = TESTS.parent / "hpcai_async" / "server" / "builtin"
BUILTIN_NAME = "hpcai-async/tiny-qwen3"
# the names the programs ask for (each recipe's default or the one the tests pass)
MODEL = "Qwen/Qwen3-0.6B"
ALIASES = ("Qwen/Qwen3-0.6B", "Qwen/Qwen3-4B", "Qwen/Qwen3-8B", "meta-llama/Llama-3.1-8B")
_HF_REPOS = (*ALIASES, "baseten/Meta-Llama-3-tokenizer")  # the cookbook's ungated stand-in for Llama 3
_COMMIT = "0" * 40
WAYS = ("ported", "runner")

_IMPORT = re.compile(r"^(\s*)(import|from) hpcai(?=[\s.])", re.MULTILINE)


def cookbook_file(relative: str) -> Path:
    """A file of the installed official cookbook, e.g. ``recipes/sl_loop.py``."""
    return Path(official_site_packages()) / "hpcai" / "cookbook" / relative


def sdist_file(relative: str) -> Path:
    return official_sdist() / relative


def port_source(source: str) -> str:
    """The one-line change: ``import hpcai`` -> ``import hpcai_async as hpcai``, ``from hpcai.x`` -> ``from
    hpcai_async.x`` (and nothing else: a leftover ``hpcai`` import line fails the test)."""

    def swap(match: re.Match[str]) -> str:
        indent, keyword = match.group(1), match.group(2)
        return f"{indent}{keyword} hpcai_async"

    ported = re.sub(r"^(\s*)import hpcai\s*$", r"\1import hpcai_async as hpcai", source, flags=re.MULTILINE)
    ported = _IMPORT.sub(swap, ported)
    leftover = re.findall(r"^\s*(?:import|from) hpcai\b(?!_async).*$", ported, flags=re.MULTILINE)
    assert not leftover, f"import lines the port did not change: {leftover}"
    return ported


def serve(root: Path, base: Path | str = BUILTIN_NAME) -> LocalServer:
    """``base`` (the built-in model, or a model folder) under every alias, a fresh server with its own store;
    the caller closes it."""
    models = [f"{alias}={base}" for alias in ALIASES]
    server = LocalServer(models=models, store=root / "store")
    server.__enter__()
    return server


def build_warm_base(root: Path) -> Path:
    """The built-in model tuned (plain PyTorch) to answer the RL recipes' "What is 2 + 2?" prompts with
    ``\\boxed{4}`` or ``\\boxed{5}``, half and half: a base whose reward, 0.5 at the start, RL can raise.

    The built-in model cannot earn those rewards (it never writes the ``\\boxed{}`` answer their graders
    read); RL on a hosted model, too, starts from one that already follows the format. The prompts are the
    recipes' own, rendered by the official cookbook (``_warm_examples.py``); the model's folder is
    ``root / "warm-base"``, its ``examples.json`` those prompts and replies (see ``warm_examples``)."""
    import torch
    from transformers import AutoModelForCausalLM

    render = [sys.executable, str(TESTS / "_warm_examples.py"), str(cookbook_file("recipes/rl_loop.py"))]
    proc = subprocess.run(render, env=program_env(root), capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stderr[-4000:]
    examples = json.loads(proc.stdout)
    rows = [(e["prompt"], reply) for e in examples.values() for reply in e["replies"].values()]

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(BUILTIN, dtype=torch.float32)
    optimizer = torch.optim.AdamW(model.parameters(), lr=6e-3, weight_decay=0.0)
    lengths = torch.tensor([len(p) + len(r) for p, r in rows])
    ids = torch.zeros(len(rows), int(lengths.max()), dtype=torch.long)
    labels = torch.full_like(ids, -100)  # the loss is on the replies only
    for i, (prompt, reply) in enumerate(rows):
        ids[i, : lengths[i]] = torch.tensor(prompt + reply)
        labels[i, len(prompt) : lengths[i]] = ids[i, len(prompt) : lengths[i]]
    mask = torch.arange(ids.shape[1]) < lengths[:, None]
    model.train()
    for _ in range(80):
        loss = model(input_ids=ids, attention_mask=mask.long(), labels=labels).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    folder = root / "warm-base"
    model.save_pretrained(folder)
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        shutil.copyfile(BUILTIN / name, folder / name)
    (folder / "examples.json").write_text(json.dumps(examples))
    return folder


def write_hf_cache(home: Path) -> Path:
    """An offline Hugging Face cache with the built-in tokenizer under each repo name the programs load."""
    for repo in _HF_REPOS:
        folder = home / "hub" / f"models--{repo.replace('/', '--')}"
        snapshot = folder / "snapshots" / _COMMIT
        snapshot.mkdir(parents=True, exist_ok=True)
        for name in ("tokenizer.json", "tokenizer_config.json", "config.json"):
            shutil.copyfile(BUILTIN / name, snapshot / name)
        (folder / "refs").mkdir(exist_ok=True)
        (folder / "refs" / "main").write_text(_COMMIT)
    return home


def write_jsonl(path: Path, rows: Sequence[Mapping[str, Any]]) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return str(path)


def program_env(root: Path) -> dict[str, str]:
    """The environment a program runs in (no server yet): the official cookbook importable after our
    package, an offline HF cache under ``root``, no telemetry, no wandb."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HPCAI_", "HF_", "WANDB_"))}
    env.update(
        HPCAI_TELEMETRY="0",
        HF_HOME=str(write_hf_cache(root / "hf")),
        HF_HUB_OFFLINE="1",
        HF_DATASETS_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        HF_DATASETS_CACHE=str(root / "hf-datasets"),
        WANDB_MODE="disabled",
        PYTHONPATH=str(TESTS / "_official_site"),
        HPCAI_TEST_APPEND_SITE=official_site_packages(),
        TOKENIZERS_PARALLELISM="false",
    )
    return env


@dataclass
class Programs:
    """Runs programs for one test: a server, an HF cache, local datasets, a work folder."""

    server: LocalServer
    root: Path
    datasets: dict[str, dict[str, str]]

    def env(self) -> dict[str, str]:
        env = program_env(self.root)
        env.update(
            HPCAI_BASE_URL=self.server.url,
            HPCAI_API_KEY=self.server.api_key,
            HPCAI_TEST_DATASETS=json.dumps(self.datasets),
        )
        return env

    def run(
        self,
        program: Path,
        args: Sequence[str] = (),
        *,
        way: str,
        cwd: Path | None = None,
        edit: Mapping[str, str] | None = None,
        timeout: float = 150,
    ) -> subprocess.CompletedProcess[str]:
        """Run ``program`` one of the two ways; ``edit`` replaces lines a user fills in (never imports)."""
        source = program.read_text()
        for old, new in (edit or {}).items():
            assert old in source, f"{program.name} has no line {old!r}"
            source = source.replace(old, new)
        cwd = cwd or self.root
        cwd.mkdir(parents=True, exist_ok=True)
        if way == "ported":
            target = cwd / f"ported_{program.name}"
            target.write_text(port_source(source))
            command = [sys.executable, str(target), *args]
        else:
            target = program
            if edit:
                target = cwd / program.name
                target.write_text(source)
            command = [sys.executable, "-m", "hpcai_async.compat", str(target), *args]
        # no stdin: a program that asks (cli_utils.check_log_dir "ask" on an existing folder) fails at once
        proc = subprocess.run(
            command,
            env=self.env(),
            cwd=cwd,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
        assert proc.returncode == 0, (
            f"{way} {program.name} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"
        )
        return proc


def metrics(log_path: Path) -> list[dict[str, Any]]:
    """The cookbook's own per-step log (``ml_log`` writes ``metrics.jsonl`` in the run's log folder)."""
    lines = (log_path / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines if line.strip()]


def checkpoints(log_path: Path) -> list[dict[str, Any]]:
    """The cookbook's ``checkpoints.jsonl``: one line per saved checkpoint (name, paths, loop state)."""
    lines = (log_path / "checkpoints.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines if line.strip()]


CHAT = [
    {
        "messages": [
            {"role": "user", "content": "What is two plus two?"},
            {"role": "assistant", "content": "Two plus two is four."},
        ]
    }
] * 16
GSM8K = [{"question": "What is 2 + 2?", "answer": "2 + 2 = 4\n#### 4"}] * 4


@contextmanager
def open_programs(tmp_path: Path, base: Path | str = BUILTIN_NAME) -> Iterator[Programs]:
    """What the ``programs`` fixture of the test modules yields: a server of ``base``, datasets written."""
    server = serve(tmp_path, base)
    chat = {
        "train": write_jsonl(tmp_path / "data" / "chat.jsonl", CHAT),
        "test": write_jsonl(tmp_path / "data" / "chat_test.jsonl", CHAT[:4]),
    }
    quiz = {"quiz": "A says B lies. B says A lies. Who lies?", "solution_text": "Exactly one of them lies."}
    datasets = {
        "openai/gsm8k": {  # the cookbook's Gsm8kDatasetBuilder loads both splits
            "train": write_jsonl(tmp_path / "data" / "gsm8k.jsonl", GSM8K),
            "test": write_jsonl(tmp_path / "data" / "gsm8k_test.jsonl", GSM8K[:1]),
        },
        "HuggingFaceH4/no_robots": chat,
        "K-and-K/knights-and-knaves": {"train": write_jsonl(tmp_path / "data" / "kk.jsonl", [quiz] * 96)},
    }
    try:
        yield Programs(server, tmp_path, datasets)
    finally:
        server.close()


def falls(values: list[float]) -> bool:
    return len(values) >= 2 and values[-1] < values[0]


def warm_examples(base: Path) -> dict[str, Any]:
    """``build_warm_base``'s examples: name -> {"prompt": tokens, "replies": {"right": ..., "wrong": ...}}."""
    examples: dict[str, Any] = json.loads((base / "examples.json").read_text())
    return examples


def reply_logprobs(server: LocalServer, example: Mapping[str, Any], **model: str) -> dict[str, float]:
    """The logprob of each of the example's replies after its prompt, exactly (prompt logprobs, no
    sampling), under ``model_path=`` saved weights or a ``base_model=``: read with our client."""
    from hpcai_async import ModelInput, ServiceClient

    prompt = example["prompt"]
    with ServiceClient(base_url=server.url, api_key=server.api_key) as service:
        sampler = service.create_sampling_client(**model)
        logprob = {}
        for kind, reply in example["replies"].items():
            logprobs = sampler.compute_logprobs(ModelInput.from_ints(prompt + reply)).result()
            logprob[kind] = sum(logprobs[len(prompt) :])
    return logprob


def interrupted_after_the_first_checkpoint(log: Path) -> dict[str, object]:
    """Forget every checkpoint after the first, as if the run had been stopped there; return that one."""
    saved = checkpoints(log)
    (log / "checkpoints.jsonl").write_text(json.dumps(saved[0]) + "\n")
    return saved[0]
