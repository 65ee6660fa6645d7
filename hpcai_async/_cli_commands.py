"""What each ``hpcai-async`` command does (``cli`` parses the command line and calls these): the runs and
checkpoints commands over a RestClient, and ``sample``; their table and JSON output."""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import msgspec

from ._progress import ProgressBar

if TYPE_CHECKING:
    from .rest import RestClient
    from .service import ServiceClient
    from .types import CheckpointsListResponse, TrainingRun, TrainingRunsResponse

T = TypeVar("T")


class UsageError(Exception):
    """A problem with the command line found after parsing (exit status 2)."""


# --------------------------------------------------------------------------------------------- plumbing


def _service(args: argparse.Namespace) -> ServiceClient:
    from .service import ServiceClient

    return ServiceClient(base_url=args.base_url, api_key=args.api_key, retry_timeout=args.timeout)


async def _with_rest(args: argparse.Namespace, body: Callable[[RestClient], Awaitable[T]]) -> T:
    async with _service(args) as service:
        return await body(service.create_rest_client())


def _print_json(obj: Any) -> None:
    print(json.dumps(msgspec.to_builtins(obj), indent=2))


def _when(value: Any) -> str:
    if value is None:
        return "-"
    text = value.isoformat(timespec="seconds") if hasattr(value, "isoformat") else str(value)
    return text.replace("+00:00", "Z")


def _table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    widths = [max([len(h)] + [len(r[i]) for r in rows]) for i, h in enumerate(headers)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True)).rstrip()]
    lines += ["  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in rows]
    return "\n".join(lines)


def _checkpoint_target(parts: Sequence[str]) -> tuple[str, str]:
    """(run_id, checkpoint_id) from ``RUN_ID CHECKPOINT_ID`` or one ``hpcai://RUN/KIND/CHECKPOINT`` path."""
    if len(parts) == 2:
        return parts[0], parts[1]
    if len(parts) == 1 and parts[0].startswith("hpcai://"):
        from .rest import parse_checkpoint_path

        parsed = parse_checkpoint_path(parts[0])  # ConfigurationError (exit 2) if it is not one
        return parsed.training_run_id, parsed.checkpoint_id
    raise UsageError("expected RUN_ID CHECKPOINT_ID, or one hpcai://RUN_ID/KIND/CHECKPOINT_ID path")


# --------------------------------------------------------------------------------------------- commands


async def _runs_list(args: argparse.Namespace) -> None:
    async def body(rest: RestClient) -> TrainingRunsResponse:
        return await rest.list_training_runs_async(limit=args.limit, offset=args.offset)

    response = await _with_rest(args, body)
    if args.json:
        _print_json(response)
        return
    rows = [
        [
            run.training_run_id,
            run.base_model,
            str(run.lora_rank) if run.is_lora else "full",
            _when(run.last_request_time),
            run.last_checkpoint.checkpoint_id if run.last_checkpoint else "-",
        ]
        for run in response.training_runs
    ]
    print(_table(["RUN_ID", "BASE_MODEL", "LORA_RANK", "LAST_REQUEST", "LAST_CHECKPOINT"], rows))
    cursor = response.cursor
    shown = f"{cursor.offset + 1}-{cursor.offset + len(rows)}" if rows else "none"
    print(f"({shown} of {cursor.total_count} runs)")


async def _runs_show(args: argparse.Namespace) -> None:
    async def body(rest: RestClient) -> tuple[TrainingRun, CheckpointsListResponse]:
        run = await rest.get_training_run_async(args.run_id)
        checkpoints = await rest.list_checkpoints_async(args.run_id)
        return run, checkpoints

    run, checkpoints = await _with_rest(args, body)
    if args.json:
        _print_json(run)
        return
    fields = [
        ("run", run.training_run_id),
        ("base model", run.base_model),
        ("owner", run.model_owner),
        ("lora rank", str(run.lora_rank) if run.is_lora else "full fine-tune"),
        ("last request", _when(run.last_request_time)),
        ("corrupted", "yes" if run.corrupted else "no"),
        ("last checkpoint", run.last_checkpoint.checkpoint_path if run.last_checkpoint else "-"),
        ("last sampler", run.last_sampler_checkpoint.checkpoint_path if run.last_sampler_checkpoint else "-"),
        ("checkpoints", str(len(checkpoints.checkpoints))),
    ]
    width = max(len(k) for k, _ in fields)
    for key, val in fields:
        print(f"{key:<{width}}  {val}")


async def _checkpoints_list(args: argparse.Namespace) -> None:
    async def body(rest: RestClient) -> CheckpointsListResponse:
        return await rest.list_checkpoints_async(args.run_id)

    response = await _with_rest(args, body)
    if args.json:
        _print_json(response)
        return
    rows = [
        [c.checkpoint_id, c.checkpoint_type, _when(c.time), c.checkpoint_path] for c in response.checkpoints
    ]
    print(_table(["CHECKPOINT_ID", "TYPE", "TIME", "PATH"], rows))


async def _checkpoints_delete(args: argparse.Namespace) -> None:
    run_id, checkpoint_id = _checkpoint_target(args.target)

    async def body(rest: RestClient) -> None:
        await rest.delete_checkpoint_async(run_id, checkpoint_id)

    await _with_rest(args, body)
    print(f"deleted {checkpoint_id} of {run_id}")


def _download_target(args: argparse.Namespace, run_id: str, checkpoint_id: str) -> Path:
    out: Path = args.output or Path(f"{run_id}_{checkpoint_id}.tar.gz".replace("/", "_"))
    if out.is_dir():
        out = out / f"{run_id}_{checkpoint_id}.tar.gz".replace("/", "_")
    if out.exists() and not args.force:
        raise UsageError(f"{out} exists (use --force to overwrite)")
    if not out.parent.is_dir():
        raise UsageError(f"no such directory: {out.parent}")
    return out


async def _checkpoints_download(args: argparse.Namespace) -> None:
    run_id, checkpoint_id = _checkpoint_target(args.target)
    out = _download_target(args, run_id, checkpoint_id)
    bar = ProgressBar(out.name, sys.stderr, enabled=not args.quiet, tty_only=True)

    # The client streams the archive to a temporary file beside ``out`` and renames it when complete, so an
    # interrupted or failed download never leaves a file under the final name.
    async def body(rest: RestClient) -> Path:
        path = await rest.download_checkpoint_archive_async(run_id, checkpoint_id, out, progress=bar)
        assert isinstance(path, Path)  # given a destination, it streams to that file
        return path

    try:
        path = await _with_rest(args, body)
    finally:
        bar.close()
    print(f"{path}  ({bar.written} bytes)")


async def _sample(args: argparse.Namespace) -> None:
    from . import types
    from ._tokenizer import load_tokenizer

    prompt_text = sys.stdin.read() if args.prompt == "-" else args.prompt
    params = types.SamplingParams(
        max_tokens=args.max_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        seed=args.seed,
        stop=args.stop,
    )
    async with _service(args) as service:
        base_model: str | None = args.base_model
        if base_model is None:  # sampler weights: their run says which base model (and tokenizer) they need
            run = await service.create_rest_client().get_training_run_by_checkpoint_path_async(
                args.model_path
            )
            base_model = run.base_model
        tokenizer = await asyncio.to_thread(load_tokenizer, base_model)
        sampler = service.create_sampling_client(model_path=args.model_path, base_model=base_model)
        prompt = types.ModelInput.from_ints(tokenizer.encode(prompt_text, add_special_tokens=False))
        response = await sampler.sample_async(prompt, args.num_samples, params)
    texts = [tokenizer.decode(seq.tokens, skip_special_tokens=True) for seq in response.sequences]
    if args.json:
        _print_json(
            [
                {"text": text, "tokens": seq.tokens, "logprobs": seq.logprobs, "stop_reason": seq.stop_reason}
                for text, seq in zip(texts, response.sequences, strict=True)
            ]
        )
        return
    for i, (text, seq) in enumerate(zip(texts, response.sequences, strict=True)):
        if len(texts) > 1:
            print(f"--- sample {i + 1} ({seq.stop_reason}, {len(seq.tokens)} tokens)")
        print((prompt_text + text).removesuffix("\n"))
