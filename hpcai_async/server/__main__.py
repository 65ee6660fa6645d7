"""``python -m hpcai_async.server``: run the server in the foreground (also ``hpcai-async serve``)."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

__all__ = ("build_parser", "main")


def build_parser(prog: str = "python -m hpcai_async.server") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog,
        description=(
            "Serve the HPC-AI fine-tuning API locally (training, sampling, checkpoints) with a PyTorch LoRA "
            "engine. "
            "Prints HPCAI_BASE_URL=... and HPCAI_API_KEY=... lines to paste into a shell; Ctrl-C stops it."
        ),
    )
    parser.add_argument(
        "--host", default="127.0.0.1", help="address to bind (default 127.0.0.1, this machine only)"
    )
    parser.add_argument("--port", type=int, default=8000, help="port (default 8000; 0 picks a free one)")
    parser.add_argument(
        "--store",
        default=".store",
        metavar="DIR",
        help="folder for runs and checkpoints, kept across restarts (default ./.store)",
    )
    parser.add_argument(
        "--api-key", metavar="KEY", help="the key clients must send (default: a generated one)"
    )
    parser.add_argument(
        "--model",
        action="append",
        default=[],
        metavar="NAME_OR_DIR",
        help="also serve this base model: a local Hugging Face model folder or a repo id already in the HF "
        "cache "
        "(repeatable; the built-in hpcai-async/tiny-qwen3 is always served); ALIAS=NAME_OR_DIR serves it "
        "under another name, e.g. Qwen/Qwen3-0.6B=hpcai-async/tiny-qwen3",
    )
    parser.add_argument(
        "--device", default="cpu", help="torch device for the engine: cpu, cuda, cuda:1 ... (default cpu)"
    )
    parser.add_argument(
        "--null",
        action="store_true",
        help="use the null engine: instant zero answers, no model (for measuring client overhead only)",
    )
    parser.add_argument(
        "--long-poll", type=float, default=25.0, metavar="S", help="retrieve_future hold time (25)"
    )
    parser.add_argument(
        "--dialect",
        choices=("local", "hosted"),
        default="local",
        help="local: advertise our protocol extensions (default); hosted: advertise none, as the hosted "
        "service does",
    )
    parser.add_argument(
        "--max-body-mb",
        type=float,
        default=256,
        metavar="MB",
        help="largest request body in MiB, after gzip inflation (default 256); larger requests get a 413",
    )
    parser.add_argument("--log-level", default="WARNING", help="server log level (default WARNING)")
    return parser


def main(argv: Sequence[str] | None = None, prog: str = "python -m hpcai_async.server") -> int:
    args = build_parser(prog).parse_args(argv)
    if not 0 <= args.port <= 65535:
        print(f"error: --port must be 0..65535, got {args.port}", file=sys.stderr)
        return 2
    if not (args.device == "cpu" or args.device.startswith(("cuda", "mps"))):
        print(f"error: --device must be cpu or cuda[:N], got {args.device!r}", file=sys.stderr)
        return 2
    if not args.max_body_mb > 0:
        print(f"error: --max-body-mb must be positive, got {args.max_body_mb}", file=sys.stderr)
        return 2
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(name)s %(levelname)s %(message)s")
    from . import NullEngine, serve

    try:
        serve(
            host=args.host,
            port=args.port,
            store=args.store,
            api_key=args.api_key,
            models=args.model,
            device=args.device,
            engine=NullEngine if args.null else None,
            long_poll_s=args.long_poll,
            dialect=args.dialect,
            max_body_bytes=int(args.max_body_mb * 2**20),
        )
    except (OSError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
