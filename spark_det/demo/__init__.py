"""Built-in data and the end-to-end demo: synthetic COCO-format scenes (:mod:`.synthetic`), the
pipeline behind ``make demo`` (:mod:`.pipeline`) and its report (:mod:`.report`). Needs the
``demo`` extra (matplotlib, pycocotools)."""
