"""`python tools/visualize.py ...` is `spark-det visualize ...`: see spark_det/cli/visualize.py."""

import sys

from spark_det.cli.visualize import main

if __name__ == "__main__":
    sys.exit(main())
