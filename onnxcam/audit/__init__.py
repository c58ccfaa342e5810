"""Audits across models: do two exports, a quantized build or a retrain of one network still predict
the same and still look at the same evidence? ``measures`` (pure NumPy agreement measures), ``compare``
(one Explainer per model over the same inputs), ``report`` (PNG panels and a self-contained HTML page)."""
from .compare import AuditedModel, InputComparison, PairSummary, run_comparison, summarize

__all__ = ["AuditedModel", "InputComparison", "PairSummary", "run_comparison", "summarize"]
