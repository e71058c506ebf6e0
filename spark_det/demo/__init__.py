"""Built-in data and the end-to-end demo: synthetic COCO-format scenes (:mod:`.synthetic`) and
``make demo`` (:mod:`.pipeline`), which is ``spark-det study`` (:mod:`spark_det.study`) on that data.
Needs the ``demo`` extra (matplotlib, pycocotools)."""
