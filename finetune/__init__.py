"""medct.finetune: supervised tasks on pretrained or fresh encoders (installed inside the medct namespace).

segmentation.py    SegmentationTask (Dice + CE, sliding-window validation, model cards)
classification.py  ClassificationTask (volume-level labels, accuracy / AUC, linear probe)
"""
