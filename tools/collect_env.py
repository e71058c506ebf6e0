"""`python tools/collect_env.py ...` is `spark-det collect-env ...`: see spark_det/cli/collect_env.py."""

import sys

from spark_det.cli.collect_env import main

if __name__ == "__main__":
    sys.exit(main())
