"""The ``tinydiff`` command: ``tinydiff info`` (and, as the pipeline grows, train, sample, eval).

The CLI is where output happens: the library reports progress through callbacks and raises
exceptions with clear messages; here they become progress bars and one-line errors.
"""

from __future__ import annotations

import argparse
import platform
import sys

from . import __version__


class CLIError(Exception):
    """An expected failure (bad input, missing files): printed as one line, exit status 2."""


def cmd_info(args) -> int:
    import numpy
    import scipy

    from . import backend

    print(f"tinydiff {__version__}")
    print(f"python   {platform.python_version()} ({sys.executable})")
    print(f"numpy    {numpy.__version__}, BLAS: {backend.blas_info()}")
    print(f"scipy    {scipy.__version__}")
    print(f"backend  {backend.get_backend()} (set TINYDIFF_BACKEND=numpy|cupy or --backend)")
    print(f"cupy     {backend.cupy_status()}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tinydiff",
        description="Stable Diffusion in miniature, from scratch in NumPy.",
    )
    parser.add_argument("--version", action="version", version=f"tinydiff {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    info = sub.add_parser("info", help="print versions, the array backend, BLAS and whether CuPy/a GPU is usable")
    info.set_defaults(func=cmd_info)
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 0
    try:
        return args.func(args)
    except CLIError as err:
        print(f"tinydiff: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("tinydiff: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
