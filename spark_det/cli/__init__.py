"""The ``spark-det`` command: one subcommand per tool, each a thin layer over the library.

    spark-det pretrain | pack-shards | convert | visualize | study | demo | make-data | collect-env
              | train-det2 | train-mmdet

``tools/<name>.py`` runs the same code. Subcommand modules are imported only when used, so
``spark-det pretrain`` never imports a detection framework.
"""

from __future__ import annotations

import importlib
import sys
from typing import Optional, Sequence

from ..errors import EXIT_BAD_INPUT, EXIT_OK
from .common import missing_package

# subcommand -> (module, one-line description)
COMMANDS: dict[str, tuple[str, str]] = {
    "pretrain": ("spark_det.cli.pretrain", "SparK pretraining on a folder of images (torchrun for many GPUs)"),
    "convert": ("spark_det.cli.convert", "convert weights for Detectron2, MMDetection, timm or torchvision"),
    "pack-shards": ("spark_det.cli.pack_shards", "pack a folder of images into WebDataset shards for pretraining"),
    "visualize": ("spark_det.cli.visualize", "reconstruction grid from a pretraining checkpoint"),
    "study": ("spark_det.cli.study", "does SparK on my unlabeled images beat scratch / supervised weights? (report)"),
    "demo": ("spark_det.cli.demo", "the study on built-in synthetic data (what `make demo` runs)"),
    "make-data": ("spark_det.cli.make_data", "write the synthetic COCO-format data set"),
    "collect-env": ("spark_det.cli.collect_env", "print the software stack (for bug reports)"),
    "train-det2": ("spark_det.d2.train_net", "Detectron2 training / evaluation with spark-det's configs"),
    "train-mmdet": ("spark_det.mmdet.train", "MMDetection training / testing with spark-det's configs"),
}


def usage() -> str:
    width = max(map(len, COMMANDS))
    lines = ["usage: spark-det <command> [arguments]   (spark-det <command> --help for its arguments)", "",
             "commands:"]
    lines += [f"  {name:<{width}}  {description}" for name, (_, description) in COMMANDS.items()]
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return EXIT_OK if argv else EXIT_BAD_INPUT
    if argv[0] == "--version":
        from .. import __version__

        print(f"spark-det {__version__}")
        return EXIT_OK
    if argv[0] not in COMMANDS:
        print(f"error: unknown command {argv[0]!r}\n\n{usage()}", file=sys.stderr)
        return EXIT_BAD_INPUT
    try:
        module = importlib.import_module(COMMANDS[argv[0]][0])
    except ModuleNotFoundError as exc:  # train-det2 / train-mmdet import their framework
        missing = missing_package(exc)
        if missing is None:
            raise
        print(f"error: spark-det {argv[0]}: {missing}", file=sys.stderr)
        return missing.exit_code
    return module.main(argv[1:])
