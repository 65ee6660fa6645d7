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
(torch for the server, transformers for the tokenizer); run and checkpoint commands stay light. This module
parses; what each command does is ``_cli_commands``.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn, TypeVar

from ._cli_commands import (
    UsageError,
    _checkpoints_delete,
    _checkpoints_download,
    _checkpoints_list,
    _runs_list,
    _runs_show,
    _sample,
)
from ._errors import ConfigurationError, HpcaiError

if TYPE_CHECKING:
    pass

__all__ = ("UsageError", "build_parser", "main")

T = TypeVar("T")
PROG = "hpcai-async"

EXIT_OK, EXIT_ERROR, EXIT_USAGE = 0, 1, 2


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
