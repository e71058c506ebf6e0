"""`python tools/convert_weights.py ...` is `spark-det convert ...`: see spark_det/cli/convert.py."""

import sys

from spark_det.cli.convert import main

if __name__ == "__main__":
    sys.exit(main())
