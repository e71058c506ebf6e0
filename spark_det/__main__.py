"""``python -m spark_det <command> ...``: the same as the ``spark-det`` console script."""

import sys

from .cli import main

sys.exit(main())
