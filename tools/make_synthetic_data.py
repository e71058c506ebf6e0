"""`python tools/make_synthetic_data.py ...` is `spark-det make-data ...`: see spark_det/cli/make_data.py."""

import sys

from spark_det.cli.make_data import main

if __name__ == "__main__":
    sys.exit(main())
