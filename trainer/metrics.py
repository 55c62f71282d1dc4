"""Evaluation metrics: re-exported from vitrine.metrics (the foundation), where they live so that
pipeline/ (the synthetic world's oracle metrics) can use them without depending on trainer/."""

from vitrine.metrics import EPS, _arr, _check, auc, evaluate, gauc, group_aucs, logloss

__all__ = ["EPS", "auc", "logloss", "group_aucs", "gauc", "evaluate"]
