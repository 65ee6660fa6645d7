"""The ``hpcai-async`` command: serve locally, list runs, manage checkpoints, sample.

    hpcai-async serve [--host H] [--port P] [--store DIR] [--api-key K] [--model PATH] [--device D]
    hpcai-async runs list [--limit N] [--offset N] [--json]
    hpcai-async runs show RUN_ID [--json]
    hpcai-async checkpoints list RUN_ID [--json]
    hpcai-async checkpoints delete (RUN_ID CHECKPOINT_ID | hpcai://PATH)
    hpcai-async checkpoints download (RUN_ID CHECKPOINT_ID | hpcai://PATH) [-o FILE]
    hpcai-async sample PROMPT (--base-model NAME | --model-path hpcai://PATH) [--num-samples N]
                       [--max-tokens N] [--temperature T] [--seed S] [--json]

The service is ``--base-url`` / ``HPCAI_BASE_URL`` with ``--api-key`` / ``HPCAI_API_KEY``; ``--timeout``
bounds the retrying of one request (60 s), so an unreachable service fails in time. Exit status: 0 on success,
1 when the service or the transport reported an error (or a file could not be written), 2 for a usage error.
Errors are one line on stderr, never a traceback. Only ``serve`` and ``sample`` import the heavy libraries
(torch for the server, transformers for the tokenizer); run and checkpoint commands stay light. (Over 400
lines: one parser function and one handler per command, nothing shared to split out.)
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn, TypeVar

import msgspec

from ._errors import ConfigurationError, HpcaiError
from ._progress import ProgressBar

if TYPE_CHECKING:
    from .rest import RestClient
    from .service import ServiceClient
    from .types import CheckpointsListResponse, TrainingRun, TrainingRunsResponse

__all__ = ("UsageError", "build_parser", "main")

T = TypeVar("T")
PROG = "hpcai-async"

EXIT_OK, EXIT_ERROR, EXIT_USAGE = 0, 1, 2


class UsageError(Exception):
    """A problem with the command line found after parsing (exit status 2)."""


# --------------------------------------------------------------------------------------------- parser


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line on stderr (with where to find help) and exit status 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see `{self.prog} --help`)\n")


def _connection_options(parser: argparse.ArgumentParser, *, top: bool) -> None:
    # Accepted both before and after the subcommand; SUPPRESS keeps a subcommand's parser from overwriting a
    # value given at the top level with its default.
    default = None if top else argparse.SUPPRESS
    group = parser.add_argument_group("connection")
    group.add_argument(
        "--base-url",
        default=default,
        metavar="URL",
        help="the service (default: $HPCAI_BASE_URL, else the hosted one)",
    )
    group.add_argument(
        "--api-key", default=default, metavar="KEY", help="the API key (default: $HPCAI_API_KEY)"
    )
    group.add_argument(
        "--timeout",
        type=_non_negative_float,
        default=60.0 if top else argparse.SUPPRESS,
        metavar="SECONDS",
        help="give up retrying a request after this long (default 60)",
    )


def _json_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog=PROG,
        description="Command line for the HPC-AI fine-tuning API and the hpcai_async local server.",
        epilog="Run `hpcai-async COMMAND --help` for the options of a command. Exit status: 0 ok, 1 API or "
        "server error, 2 usage error.",
    )
    _connection_options(parser, top=True)
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)

    # `serve` hands its arguments to the server's own parser (see main); this entry is for the listing only.
    commands.add_parser(
        "serve",
        help="run the local server (--host --port --store --api-key --model --device; see `serve --help`)",
        add_help=False,
    )

    _add_runs(commands)
    _add_checkpoints(commands)
    _add_sample(commands)
    return parser


def _add_runs(commands: Any) -> None:
    """The `runs list|show` command."""
    runs = commands.add_parser("runs", help="list and inspect training runs", description="Training runs.")
    runs_sub = runs.add_subparsers(dest="action", metavar="ACTION", parser_class=_Parser, required=True)
    p = runs_sub.add_parser(
        "list", help="list training runs, newest first", description="List training runs."
    )
    p.add_argument("--limit", type=_positive_int, default=20, help="how many runs (default 20)")
    p.add_argument("--offset", type=_non_negative_int, default=0, help="skip this many runs first")
    _json_option(p)
    _connection_options(p, top=False)
    p.set_defaults(handler=_runs_list)
    p = runs_sub.add_parser("show", help="show one training run", description="Show one training run.")
    p.add_argument("run_id", metavar="RUN_ID")
    _json_option(p)
    _connection_options(p, top=False)
    p.set_defaults(handler=_runs_show)


def _add_checkpoints(commands: Any) -> None:
    """The `checkpoints list|delete|download` command."""
    ckpt = commands.add_parser(
        "checkpoints",
        help="list, delete and download checkpoints",
        description="Checkpoints of a training run.",
    )
    ckpt_sub = ckpt.add_subparsers(dest="action", metavar="ACTION", parser_class=_Parser, required=True)
    p = ckpt_sub.add_parser(
        "list", help="list the checkpoints of a run", description="List a run's checkpoints."
    )
    p.add_argument("run_id", metavar="RUN_ID")
    _json_option(p)
    _connection_options(p, top=False)
    p.set_defaults(handler=_checkpoints_list)
    p = ckpt_sub.add_parser(
        "delete",
        help="delete a checkpoint",
        description="Delete a checkpoint, named by RUN_ID CHECKPOINT_ID or by its hpcai:// path.",
    )
    p.add_argument("target", nargs="+", metavar="RUN_ID CHECKPOINT_ID | PATH")
    _connection_options(p, top=False)
    p.set_defaults(handler=_checkpoints_delete)
    p = ckpt_sub.add_parser(
        "download",
        help="download a checkpoint as a .tar.gz",
        description="Download a checkpoint archive (.tar.gz), named by RUN_ID CHECKPOINT_ID or by its "
        "hpcai:// path. The file appears only once it is complete.",
    )
    p.add_argument("target", nargs="+", metavar="RUN_ID CHECKPOINT_ID | PATH")
    p.add_argument(
        "-o",
        "--output",
        type=Path,
        metavar="FILE",
        help="where to write (default: ./<run>_<checkpoint>.tar.gz)",
    )
    p.add_argument("--force", action="store_true", help="overwrite FILE if it exists")
    p.add_argument("--quiet", "-q", action="store_true", help="no progress bar")
    _connection_options(p, top=False)
    p.set_defaults(handler=_checkpoints_download)


def _add_sample(commands: Any) -> None:
    """The `sample` command."""
    p = commands.add_parser(
        "sample",
        help="sample completions of a prompt",
        description="Sample completions of PROMPT (use - to read it from stdin) from a base model or from "
        "sampler weights.",
    )
    p.add_argument("prompt", metavar="PROMPT")
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument(
        "--base-model", metavar="NAME", help="sample the base model, e.g. hpcai-async/tiny-qwen3"
    )
    which.add_argument("--model-path", metavar="PATH", help="sample saved weights (hpcai://RUN/...)")
    p.add_argument(
        "-n", "--num-samples", type=_positive_int, default=1, help="completions to draw (default 1)"
    )
    p.add_argument("--max-tokens", type=_positive_int, default=32, help="tokens per completion (default 32)")
    p.add_argument("--temperature", type=_non_negative_float, default=1.0, help="0 = greedy (default 1.0)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus probability (default 1.0)")
    p.add_argument("--seed", type=int, default=None, help="random seed, for reproducible samples")
    p.add_argument("--stop", action="append", metavar="TEXT", help="stop at TEXT (repeatable)")
    _json_option(p)
    _connection_options(p, top=False)
    p.set_defaults(handler=_sample)


def _positive_int(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be positive, got {text}")
    return value


def _non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {text}")
    return value


def _non_negative_float(text: str) -> float:
    value = float(text)
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {text}")
    return value


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


# --------------------------------------------------------------------------------------------- main


def _serve(argv: list[str]) -> int:
    """``serve``: the server's own command line (``python -m hpcai_async.server``), under this name."""
    from .server.__main__ import main as serve

    return serve(argv, prog=f"{PROG} serve")


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return " ".join(text.split())


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit status (0 ok, 1 API or server error, 2 usage error)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["serve"]:
        return _serve(argv[1:])

    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help(sys.stderr)
        return EXIT_USAGE
    if args.command == "serve":  # `hpcai-async --some-option serve`: connection options mean nothing there
        return _serve([])
    try:
        asyncio.run(args.handler(args))
    except (UsageError, ConfigurationError) as exc:  # found before anything was sent
        print(f"{PROG}: error: {_one_line(exc)}", file=sys.stderr)
        return EXIT_USAGE
    # APIError: the service refused or could not be reached; OSError: a file could not be written
    except (HpcaiError, OSError) as exc:
        print(f"{PROG}: error: {_one_line(exc)}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
