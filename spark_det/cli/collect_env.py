"""Print the software stack spark-det runs on; paste its output into bug reports.

    spark-det collect-env
"""

from __future__ import annotations

import sys
from typing import Optional, Sequence

from ..errors import EXIT_OK
from .common import make_parser, run_tool


def _main(argv: Optional[Sequence[str]]) -> int:
    from ..env import collect_env, format_env

    make_parser("spark-det collect-env", __doc__).parse_args(argv)
    print(format_env(collect_env()))
    return EXIT_OK


def main(argv: Optional[Sequence[str]] = None) -> int:
    return run_tool(_main, argv)


if __name__ == "__main__":
    sys.exit(main())
