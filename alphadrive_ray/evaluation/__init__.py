"""Evaluation: planning metrics, reasoning caption metrics, metrics.json and the HTML report.

Cheap to import: matplotlib, pycocoevalcap and PIL are imported by the functions that use them.
"""

from alphadrive_ray.evaluation.metrics import flatten_metrics
from alphadrive_ray.evaluation.report import write_report
from alphadrive_ray.evaluation.run import evaluate

__all__ = ["evaluate", "flatten_metrics", "write_report"]
