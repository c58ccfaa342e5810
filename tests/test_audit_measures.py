"""The audit's agreement measures on hand-made arrays whose values are worked out by hand (in comments),
and the per-pair summary and threshold gates on hand-made per-input rows."""
import math

import numpy as np
import pytest

from onnxcam.audit import measures
from onnxcam.audit.compare import (AuditedModel, InputComparison, parse_thresholds, summarize,
                                   summary_keys)
from onnxcam.errors import OnnxcamError
from onnxcam.files import InputItem


def test_pearson_by_hand():
    assert measures.pearson([1, 2, 3], [2, 4, 6]) == pytest.approx(1.0, abs=1e-15)
    assert measures.pearson([1, 2, 3], [3, 2, 1]) == pytest.approx(-1.0, abs=1e-15)
    # deviations (-1.5, -.5, .5, 1.5) and (-1.5, .5, -.5, 1.5): 4 / sqrt(5 * 5)
    assert measures.pearson([1, 2, 3, 4], [1, 3, 2, 4]) == pytest.approx(0.8, abs=1e-15)
    assert measures.pearson(np.ones((3, 3)), np.full((3, 3), 2.0)) == 1.0     # two constants
    assert measures.pearson(np.ones((3, 3)), np.eye(3)) == 0.0                # one constant
    with pytest.raises(ValueError):
        measures.pearson(np.ones(3), np.ones(4))


def test_ranks_and_spearman_by_hand():
    np.testing.assert_array_equal(measures.rank_data([10, 20, 20, 30]), [1, 2.5, 2.5, 4])
    np.testing.assert_array_equal(measures.rank_data([[3, 1], [2, 1]]), [4, 1.5, 3, 1.5])
    # monotone but not linear: Spearman 1, Pearson below
    assert measures.spearman([1, 2, 3, 4], [1, 8, 27, 64]) == pytest.approx(1.0, abs=1e-15)
    assert measures.pearson([1, 2, 3, 4], [1, 8, 27, 64]) < 0.99
    # ranks (1, 2.5, 2.5, 4) vs (1, 2, 3, 4): 4.5 / sqrt(4.5 * 5) = 3 / sqrt(10)
    assert measures.spearman([1, 2, 2, 3], [5, 6, 7, 8]) == pytest.approx(3 / math.sqrt(10), abs=1e-15)


def test_top_region_and_iou_by_hand():
    a = np.arange(10.0)
    np.testing.assert_array_equal(np.flatnonzero(measures.top_region(a)), [8, 9])   # ceil(0.2 * 10) = 2
    b = np.array([0, 1, 2, 3, 4, 5, 6, 9, 8, 7.0])                                  # top-2 at 7, 8
    assert measures.iou_top(a, b) == pytest.approx(1 / 3, abs=1e-15)                 # {8} / {7, 8, 9}
    assert measures.iou_top(a, a) == 1.0
    assert measures.iou_top(a, a[::-1]) == 0.0
    # ties at the threshold are in: one hot pixel in 25, the 5th largest value is 0, so everything
    spike = np.zeros((5, 5))
    spike[2, 2] = 1
    assert measures.top_region(spike).all()
    # 11 pixels: k = ceil(2.2) = 3
    assert measures.top_region(np.arange(11.0)).sum() == 3


def test_peak_distance_by_hand():
    a, b = np.zeros((5, 5)), np.zeros((5, 5))
    a[0, 0], b[4, 4] = 1, 1
    assert measures.peak_distance(a, b) == pytest.approx(1.0, abs=1e-15)           # opposite corners
    b = np.zeros((5, 5))
    b[0, 4] = 1
    assert measures.peak_distance(a, b) == pytest.approx(4 / math.sqrt(32), abs=1e-15)
    assert measures.peak_distance(a, a) == 0.0
    line = np.zeros(11)
    line[10] = 1
    assert measures.peak_distance(np.eye(1, 11, 0)[0], line) == 1.0                 # 1D: end to end
    assert measures.peak_distance(np.ones((1, 1)), np.ones((1, 1))) == 0.0


def test_prediction_measures_by_hand():
    reference = np.array([[0.0, math.log(3.0)]])        # p = (1/4, 3/4)
    candidate = np.array([[0.0, 0.0]])                  # q = (1/2, 1/2)
    row = measures.prediction_measures(reference, candidate)
    assert row["prob_max_abs"][0] == pytest.approx(0.25, abs=1e-15)
    kl = 0.25 * math.log(0.25 / 0.5) + 0.75 * math.log(0.75 / 0.5)
    assert row["kl"][0] == pytest.approx(kl, abs=1e-15)
    assert row["top1_agreement"][0] == 0.0               # p's top-1 is 1; q's tie goes to index 0
    same = measures.prediction_measures(reference, reference)
    assert same["kl"][0] == 0.0 and same["prob_max_abs"][0] == 0.0
    logits = np.arange(10.0)[None]                       # top-5: 9 8 7 6 5
    moved = logits.copy()
    moved[0, [9, 0]] = moved[0, [0, 9]]                  # 9 falls to the bottom, 0 rises: 0 8 7 6 5
    assert measures.top_k_overlap(logits, moved)[0] == pytest.approx(0.8)
    assert measures.top1_agreement(logits, moved)[0] == 0.0
    with pytest.raises(ValueError):
        measures.prediction_measures(np.zeros((1, 3)), np.zeros((1, 4)))


def test_top1_ties_take_the_lower_index():
    assert measures.top1_agreement(np.array([[0.0, 0.0]]), np.array([[1.0, 0.0]]))[0] == 1.0
    assert measures.top1_agreement(np.array([[0.0, 0.0]]), np.array([[0.0, 1.0]]))[0] == 0.0


def _row(pearson, top1=1.0, prob=0.0):
    return {"top1_agreement": top1, "top5_overlap": 1.0, "prob_max_abs": prob, "kl": 0.0,
            "pearson": pearson, "spearman": pearson, "iou_top20": 1.0, "peak_distance": 0.0}


def _inputs(rows):
    return [InputComparison(InputItem(f"in{i}", np.zeros(0), None), [], [], [r]) for i, r in enumerate(rows)]


def test_summary_and_gates():
    models = [AuditedModel("ref.onnx", None, None), AuditedModel("cand.onnx", None, None)]
    inputs = _inputs([_row(0.9, prob=0.01), _row(0.7, top1=0.0, prob=0.2), _row(1.0)])
    (pair,) = summarize(models, inputs, {"pearson_min": 0.8}, {"prob_max_abs": 0.1})
    assert pair.values["pearson_mean"] == pytest.approx((0.9 + 0.7 + 1.0) / 3)
    assert pair.values["pearson_min"] == 0.7
    assert pair.values["top1_agreement"] == pytest.approx(2 / 3)
    assert pair.values["prob_max_abs"] == 0.2 and pair.values["prob_max_abs_mean"] == pytest.approx(0.07)
    assert pair.failures == ["pearson_min 0.7 < 0.8", "prob_max_abs 0.2 > 0.1"] and not pair.passed
    (ok,) = summarize(models, inputs, {"pearson_min": 0.7, "top1_agreement": 0.6}, {})
    assert ok.passed
    assert sorted(inputs, key=InputComparison.sort_key)[0].path == "in1"         # worst first
    assert {"top1_agreement", "pearson_mean", "pearson_min", "iou_top20_mean", "prob_max_abs"} <= set(summary_keys())


def test_threshold_parsing():
    assert parse_thresholds(["pearson_min=0.9,top1_agreement=0.99", "iou_top20_mean=.5"], True,
                            "--fail-under") == {"pearson_min": 0.9, "top1_agreement": 0.99, "iou_top20_mean": 0.5}
    assert parse_thresholds(["prob_max_abs=0.05"], False, "--fail-over") == {"prob_max_abs": 0.05}
    with pytest.raises(OnnxcamError, match="unknown measure 'pearson'"):
        parse_thresholds(["pearson=0.9"], True, "--fail-under")
    with pytest.raises(OnnxcamError, match="gate it with --fail-over"):
        parse_thresholds(["prob_max_abs=0.1"], True, "--fail-under")
    with pytest.raises(OnnxcamError, match="KEY=NUMBER"):
        parse_thresholds(["pearson_min=high"], True, "--fail-under")
