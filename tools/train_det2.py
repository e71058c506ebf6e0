"""`python tools/train_det2.py ...` is `spark-det train-det2 ...`: see spark_det/d2/train_net.py."""

import sys

from spark_det.d2.train_net import main

if __name__ == "__main__":
    sys.exit(main())
