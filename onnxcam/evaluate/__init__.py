"""Evaluate CAM methods by numbers: faithfulness (Average Drop, Increase in Confidence, Deletion and
Insertion AUC) and localisation against boxes (pointing game, energy, loc1 / loc5)."""
from .evaluator import FAITHFULNESS, LOCALISATION, METRICS, Evaluator, GroundTruth, SampleResult

__all__ = ["Evaluator", "GroundTruth", "SampleResult", "METRICS", "FAITHFULNESS", "LOCALISATION"]
