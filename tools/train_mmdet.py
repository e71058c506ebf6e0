"""`python tools/train_mmdet.py ...` is `spark-det train-mmdet ...`: see spark_det/mmdet/train.py."""

import sys

from spark_det.mmdet.train import main

if __name__ == "__main__":
    sys.exit(main())
