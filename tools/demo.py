"""`python tools/demo.py ...` is `spark-det demo ...`: see spark_det/cli/demo.py."""

import sys

from spark_det.cli.demo import main

if __name__ == "__main__":
    sys.exit(main())
