"""``python -m hpcai_async.compat SCRIPT [ARGS...]``: a program for the official SDK, on hpcai_async."""

from . import main

main()
