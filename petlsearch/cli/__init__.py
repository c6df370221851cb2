"""The `petlsearch` command. Start-up imports neither torch nor transformers: each subcommand imports
what it needs. Exit codes: 0 success, 2 bad input (one line on stderr), 1 unexpected error,
130 interrupted (the run folder keeps every finished trial; continue with --resume).

`parser.py` builds the command line, `commands.py` runs each subcommand, `config.py` reads and
writes the YAML config files of a search.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from petlsearch.cli.config import config_tokens
from petlsearch.cli.parser import build_parser
from petlsearch.errors import PetlsearchError

__all__ = ["build_parser", "main"]


def _parse(argv: Sequence[str] | None) -> argparse.Namespace:
    """The command line, with a search's --config file read in front of the flags given with it."""
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(argv)
    if getattr(args, "config", None):
        at = argv.index(args.command) + 1
        tokens = config_tokens(args.config, args.search_parser)
        args = parser.parse_args(argv[:at] + tokens + argv[at:])
    return args


def main(argv: Sequence[str] | None = None) -> int:
    try:
        args = _parse(argv)
    except PetlsearchError as exc:
        print(f"petlsearch: error: {exc}", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        return args.func(args)
    except PetlsearchError as exc:
        print(f"petlsearch: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("petlsearch: interrupted; finished trials are kept, continue with --resume", file=sys.stderr)
        return 130
