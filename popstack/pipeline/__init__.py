"""Orchestration of the training pipeline: stage manifests, the stages themselves, reports and W&B logging.

`train.py` and `predict.py` stay short and call into this package; the rooms (`datamodules`, `features`,
`lightning_modules`, `stacking`) never import it.
"""
