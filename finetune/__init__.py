"""medct.finetune: supervised tasks on pretrained or fresh encoders (installed inside the medct namespace).

segmentation.py    SegmentationTask (Dice + CE or focal Tversky, deep supervision, sliding-window validation, model cards)
classification.py  ClassificationTask (volume-level labels, accuracy / AUC, linear probe)
losses.py          focal Tversky loss (Turbolift's)
turbolift.py       Turbolift chains of stages (CT -> CBCT -> ...), resume, forgetting matrix
safeguards.py      continual-learning safeguards: L2 / EWC anchors, Fisher diagonal, slow-learner groups
tta.py             test-time adaptation loop and collapse guard (`medct segment --adapt`), with
tent.py, cotta.py, psmt.py   one adaptation method each
"""
