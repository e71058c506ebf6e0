"""`python tools/pack_shards.py ...` is `spark-det pack-shards ...`: see spark_det/cli/pack_shards.py."""

import sys

from spark_det.cli.pack_shards import main

if __name__ == "__main__":
    sys.exit(main())
