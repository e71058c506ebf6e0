"""``spark-det study``: SparK pretraining on the user's unlabeled images against other initialisations
(scratch, supervised checkpoints), fine-tuned as Mask R-CNN in Detectron2 and MMDetection on the user's
COCO data, with a report. :mod:`.pipeline` runs it, :mod:`.coco` and :mod:`.inits` check its inputs,
:mod:`.finetune` builds the fine-tune commands, :mod:`.stages` runs them, :mod:`.report` writes the report.
Needs the ``demo`` extra (matplotlib, pycocotools) and the frameworks it fine-tunes in."""
