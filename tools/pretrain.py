"""`python tools/pretrain.py ...` is `spark-det pretrain ...`: see spark_det/cli/pretrain.py."""

import sys

from spark_det.cli.pretrain import main

if __name__ == "__main__":
    sys.exit(main())
