"""The ``hpcai-async`` command, run as a subprocess against a real local server."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tarfile
from dataclasses import dataclass
from pathlib import Path

import pytest

from hpcai_async import ServiceClient
from hpcai_async.server import LocalServer

BUILTIN = "hpcai-async/tiny-qwen3"


def cli(
    *args: str, server: LocalServer | None = None, cwd: Path | None = None, timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    """Run ``hpcai-async ARGS``; the server (if any) is given through HPCAI_BASE_URL / HPCAI_API_KEY."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("HPCAI_")}
    if server is not None:
        env["HPCAI_BASE_URL"], env["HPCAI_API_KEY"] = server.url, server.api_key
    return subprocess.run(
        [sys.executable, "-m", "hpcai_async.cli", *args],
        capture_output=True,
        text=True,
        env=env,
        cwd=cwd,
        timeout=timeout,
        check=False,
    )


def assert_one_line_error(proc: subprocess.CompletedProcess[str], status: int) -> str:
    assert proc.returncode == status, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("hpcai-async"), lines[0]
    assert "error" in lines[0]
    assert "Traceback" not in proc.stderr
    return lines[0]


@dataclass
class Run:
    model_id: str
    training_path: str
    sampler_path: str


def make_run(server: LocalServer) -> Run:
    with ServiceClient(base_url=server.url, api_key=server.api_key) as service:
        tc = service.create_lora_training_client(BUILTIN, rank=4)
        training = tc.save_state("cli").result().path
        sampler = tc.save_weights_for_sampler("cli").result().path
    return Run(tc.model_id, training, sampler)


# --------------------------------------------------------------------------------------------- usage


@pytest.mark.parametrize(
    "command",
    [
        [],
        ["runs"],
        ["runs", "list"],
        ["runs", "show"],
        ["checkpoints"],
        ["checkpoints", "list"],
        ["checkpoints", "delete"],
        ["checkpoints", "download"],
        ["sample"],
    ],
    ids=lambda c: " ".join(c) or "top",
)
def test_help(command: list[str]) -> None:
    proc = cli(*command, "--help")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("usage: hpcai-async")
    assert proc.stderr == ""


def test_serve_help_is_the_servers() -> None:
    proc = cli("serve", "--help")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("usage: hpcai-async serve")
    for flag in ("--host", "--port", "--store", "--api-key", "--model", "--device"):
        assert flag in proc.stdout


def test_serve_runs_the_local_server(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("HPCAI_")}
    args = ["serve", "--port", "0", "--store", str(tmp_path / "store"), "--api-key", "cli-key"]
    with subprocess.Popen(
        [sys.executable, "-m", "hpcai_async.cli", *args], stdout=subprocess.PIPE, text=True, env=env
    ) as proc:
        try:
            assert proc.stdout is not None
            first = proc.stdout.readline().strip()
            assert first.startswith("HPCAI_BASE_URL=http://127.0.0.1:"), first
            assert proc.stdout.readline().strip() == "HPCAI_API_KEY=cli-key"
            url = first.partition("=")[2]
            listed = cli("runs", "list", "--json", "--base-url", url, "--api-key", "cli-key")
            assert listed.returncode == 0, listed.stderr
            assert json.loads(listed.stdout)["training_runs"] == []
        finally:
            proc.send_signal(signal.SIGINT)
            status = proc.wait(timeout=30)
    assert status == 0
    assert (tmp_path / "store").is_dir()


@pytest.mark.parametrize(
    "command",
    [
        ["frobnicate"],
        ["runs"],
        ["runs", "list", "--limit", "0"],
        ["runs", "show"],
        ["checkpoints", "download"],
        ["checkpoints", "delete", "a", "b", "c"],
        ["checkpoints", "delete", "hpcai://not-a-checkpoint"],
        ["sample", "hello"],  # neither --base-model nor --model-path
        ["sample", "hello", "--base-model", "m", "--model-path", "hpcai://r/weights/c"],
    ],
    ids=lambda c: " ".join(c),
)
def test_usage_errors_exit_2_with_one_line(command: list[str]) -> None:
    env_server = None
    proc = cli(*command, "--api-key", "k", server=env_server)
    assert_one_line_error(proc, 2)


def test_no_command_prints_help_and_exits_2() -> None:
    proc = cli()
    assert proc.returncode == 2
    assert "usage: hpcai-async" in proc.stderr


def test_missing_api_key_is_a_usage_error() -> None:
    line = assert_one_line_error(cli("runs", "list"), 2)
    assert "API key" in line


# ----------------------------------------------------------------------------------------- against a server


def test_runs_list_and_show(server: LocalServer) -> None:
    run = make_run(server)

    proc = cli("runs", "list", "--json", server=server)
    assert proc.returncode == 0, proc.stderr
    listed = json.loads(proc.stdout)
    assert run.model_id in [r["training_run_id"] for r in listed["training_runs"]]
    assert listed["cursor"]["total_count"] >= 1

    proc = cli("runs", "list", server=server)
    assert proc.returncode == 0, proc.stderr
    header, *rows = proc.stdout.splitlines()
    assert header.split()[:3] == ["RUN_ID", "BASE_MODEL", "LORA_RANK"]
    assert any(row.startswith(run.model_id) and BUILTIN in row for row in rows)

    proc = cli("runs", "show", run.model_id, server=server)
    assert proc.returncode == 0, proc.stderr
    assert run.model_id in proc.stdout and "lora rank" in proc.stdout and "4" in proc.stdout

    proc = cli("runs", "show", run.model_id, "--json", server=server)
    assert json.loads(proc.stdout)["lora_rank"] == 4


def test_flags_work_without_the_environment(server: LocalServer) -> None:
    run = make_run(server)
    proc = cli("--base-url", server.url, "runs", "show", run.model_id, "--api-key", server.api_key)
    assert proc.returncode == 0, proc.stderr
    assert run.model_id in proc.stdout


def test_checkpoints_list_download_delete(server: LocalServer, tmp_path: Path) -> None:
    run = make_run(server)

    proc = cli("checkpoints", "list", run.model_id, "--json", server=server)
    assert proc.returncode == 0, proc.stderr
    ids = {c["checkpoint_id"] for c in json.loads(proc.stdout)["checkpoints"]}
    assert ids == {"cli_training", "cli_sampler"}
    proc = cli("checkpoints", "list", run.model_id, server=server)
    assert "cli_training" in proc.stdout and run.training_path in proc.stdout

    out = tmp_path / "ckpt.tar.gz"
    proc = cli("checkpoints", "download", run.model_id, "cli_training", "-o", str(out), server=server)
    assert proc.returncode == 0, proc.stderr
    with tarfile.open(out, "r:gz") as archive:
        names = archive.getnames()
    assert any(name.endswith("adapter_model.safetensors") for name in names)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt.tar.gz"]  # nothing half-written left

    # an existing file is kept unless --force; a path names the checkpoint too; the default name is derived
    assert_one_line_error(cli("checkpoints", "download", run.training_path, "-o", str(out), server=server), 2)
    proc = cli("checkpoints", "download", run.sampler_path, server=server, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / f"{run.model_id}_cli_sampler.tar.gz").is_file()

    proc = cli("checkpoints", "delete", run.training_path, server=server)
    assert proc.returncode == 0, proc.stderr
    proc = cli("checkpoints", "list", run.model_id, "--json", server=server)
    assert {c["checkpoint_id"] for c in json.loads(proc.stdout)["checkpoints"]} == {"cli_sampler"}

    # a download that fails leaves no file behind
    missing = tmp_path / "missing.tar.gz"
    line = assert_one_line_error(
        cli("checkpoints", "download", run.model_id, "cli_training", "-o", str(missing), server=server), 1
    )
    assert "404" in line or "not found" in line.lower()
    assert not missing.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".part")]


def test_unknown_run_is_an_api_error(server: LocalServer) -> None:
    line = assert_one_line_error(cli("runs", "show", "no-such-run", server=server), 1)
    assert "404" in line


def test_bad_api_key_gives_one_line_and_exit_1(server: LocalServer) -> None:
    proc = cli("runs", "list", "--base-url", server.url, "--api-key", "wrong-key")
    line = assert_one_line_error(proc, 1)
    assert "401" in line


def test_unreachable_server_gives_one_line_and_exit_1() -> None:
    proc = cli("runs", "list", "--base-url", "http://127.0.0.1:9", "--api-key", "k", "--timeout", "0")
    assert_one_line_error(proc, 1)


def test_sample_base_model_and_saved_weights(server: LocalServer) -> None:
    prompt = "Q: What color is the sky?\nA:"
    common = ["--max-tokens", "4", "--temperature", "0", "--stop", "\n", "--json"]
    proc = cli("sample", prompt, "--base-model", BUILTIN, "-n", "2", *common, server=server)
    assert proc.returncode == 0, proc.stderr
    samples = json.loads(proc.stdout)
    assert len(samples) == 2
    assert samples[0]["text"] == samples[1]["text"]  # greedy
    assert 1 <= len(samples[0]["tokens"]) <= 4

    run = make_run(server)  # a new LoRA computes exactly the base model, so greedy answers agree
    proc = cli("sample", prompt, "--model-path", run.sampler_path, *common, server=server)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)[0]["text"] == samples[0]["text"]

    proc = cli("sample", prompt, "--base-model", BUILTIN, "--max-tokens", "4", "--seed", "1", server=server)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith(prompt)


def test_runs_and_checkpoints_do_not_import_torch(server: LocalServer) -> None:
    code = (
        "import sys\n"
        "from hpcai_async.cli import main\n"
        "status = main(['runs', 'list'])\n"
        "heavy = sorted(m for m in ('torch', 'transformers') if m in sys.modules)\n"
        "print('HEAVY', heavy, status)\n"
    )
    env = dict(os.environ, HPCAI_BASE_URL=server.url, HPCAI_API_KEY=server.api_key)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=False)
    assert proc.returncode == 0, proc.stderr
    assert "HEAVY [] 0" in proc.stdout
