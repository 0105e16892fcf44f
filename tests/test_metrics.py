"""GLUE and GSM8K metrics against values computed by hand (worked out in the comments)."""
import math

import pytest

from adaprelora.training.llm.metrics import (
    GLUE_TASK_METRICS,
    accuracy,
    average_ranks,
    extract_gsm8k_answer,
    f1,
    glue_metrics,
    gsm8k_accuracy,
    matthews_correlation,
    normalize_number,
    pearson,
    spearmanr,
)

# preds vs refs: idx0 TP, idx1 FP, idx2 TN, idx3 TP, idx4 FN
PREDS = [1, 1, 0, 1, 0]
REFS = [1, 0, 0, 1, 1]


def test_accuracy_counts_equal_pairs():
    assert accuracy([1, 0, 1, 1], [1, 1, 1, 0]) == 0.5
    assert accuracy([2, 2], [2, 2]) == 1.0


def test_f1_is_two_tp_over_two_tp_plus_fp_plus_fn():
    # TP=2, FP=1, FN=1 -> 4 / 6
    assert f1(PREDS, REFS) == pytest.approx(2 / 3, abs=1e-12)


def test_f1_without_any_positive_is_zero():
    assert f1([0, 0, 0], [0, 0, 0]) == 0.0


def test_matthews_binary_matches_the_phi_formula():
    # (TP*TN - FP*FN) / sqrt((TP+FP)(TP+FN)(TN+FP)(TN+FN)) = (2*1 - 1*1) / sqrt(3*3*2*2) = 1/6
    assert matthews_correlation(PREDS, REFS) == pytest.approx(1 / 6, abs=1e-12)


def test_matthews_perfect_and_inverted():
    assert matthews_correlation([0, 1, 1, 0], [0, 1, 1, 0]) == pytest.approx(1.0)
    assert matthews_correlation([1, 0, 0, 1], [0, 1, 1, 0]) == pytest.approx(-1.0)


def test_matthews_is_zero_for_constant_predictions_or_references():
    assert matthews_correlation([1, 1, 1, 1], [0, 1, 0, 1]) == 0.0
    assert matthews_correlation([0, 1, 0, 1], [1, 1, 1, 1]) == 0.0


def test_matthews_multiclass():
    # refs [0,1,2,0], preds [0,2,2,0]: n=4, correct c=3, true counts t=(2,1,1), pred counts p=(2,0,2)
    # (c*n - t.p) / sqrt((n^2 - p.p)(n^2 - t.t)) = (12 - 6) / sqrt((16 - 8)(16 - 6)) = 6 / sqrt(80)
    assert matthews_correlation([0, 2, 2, 0], [0, 1, 2, 0]) == pytest.approx(6 / math.sqrt(80), abs=1e-12)


def test_pearson_by_hand():
    # x=[1,2,3], y=[2,4,7]: centred x=(-1,0,1), y=(-7/3,-1/3,8/3); sum xy=5, sum x^2=2, sum y^2=114/9
    assert pearson([1, 2, 3], [2, 4, 7]) == pytest.approx(5 / math.sqrt(2 * 114 / 9), abs=1e-12)


def test_pearson_of_a_constant_side_is_nan():
    assert math.isnan(pearson([3.0, 3.0, 3.0], [1.0, 2.0, 3.0]))


def test_average_ranks_share_ties():
    assert average_ranks([10, 20, 20, 5]).tolist() == [2.0, 3.5, 3.5, 1.0]


def test_spearman_with_ties_uses_average_ranks():
    # ranks x=(1,2.5,2.5,4), y=(1,2,3,4): centred (-1.5,0,0,1.5) and (-1.5,-.5,.5,1.5)
    # -> 4.5 / sqrt(4.5 * 5) = 3 / sqrt(10)
    assert spearmanr([1, 2, 2, 3], [1, 2, 3, 4]) == pytest.approx(3 / math.sqrt(10), abs=1e-12)


def test_spearman_is_one_for_any_increasing_relation():
    assert spearmanr([1, 2, 3, 4], [1, 4, 9, 100]) == pytest.approx(1.0)
    assert spearmanr([1, 2, 3, 4], [5, 3, 2, -8]) == pytest.approx(-1.0)


def test_spearman_of_constant_predictions_is_nan():
    assert math.isnan(spearmanr([0.5, 0.5, 0.5], [1.0, 2.0, 3.0]))


def test_metric_length_mismatch_is_an_error():
    with pytest.raises(ValueError, match="differ in length"):
        accuracy([1, 0], [1])


@pytest.mark.parametrize(
    "task, names",
    [
        ("cola", {"matthews_correlation"}),
        ("sst2", {"accuracy"}),
        ("mrpc", {"accuracy", "f1"}),
        ("qqp", {"accuracy", "f1"}),
        ("stsb", {"pearson", "spearmanr"}),
        ("mnli", {"accuracy"}),
        ("qnli", {"accuracy"}),
        ("rte", {"accuracy"}),
        ("wnli", {"accuracy"}),
    ],
)
def test_glue_metrics_report_the_evaluate_names(task, names):
    preds, refs = ([0.1, 0.4, 0.3], [0.0, 1.0, 0.5]) if task == "stsb" else (PREDS, REFS)
    assert set(glue_metrics(task, preds, refs)) == names
    assert set(GLUE_TASK_METRICS) == {"cola", "sst2", "mrpc", "qqp", "stsb", "mnli", "qnli", "rte", "wnli"}


def test_mrpc_values():
    assert glue_metrics("mrpc", PREDS, REFS) == pytest.approx({"accuracy": 0.6, "f1": 2 / 3})


@pytest.mark.parametrize(
    "text, expected",
    [
        ("Natalia sold 48/2 = <<48/2=24>>24 clips in May.\n#### 72", "72"),
        ("#### 1,234", "1234"),
        ("The total is $1,234,567.", "1234567"),
        ("She has $5.50 left.", "5.5"),
        ("The change is -3 degrees", "-3"),
        ("He lost -$12 on the bet", "-12"),
        ("A balance of $-7", "-7"),
        ("So 10-4 = 6", "6"),
        ("#### -0.25", "-0.25"),
        ("It is 5.0 in the end #### 5.00", "5"),
        ("The answer is 18.", "18"),
        ("Steps: 3, 4, then 12. #### 12\nQuestion: another 99", "12"),
        ("half of it is .5", "0.5"),
        ("Pay 2,50 each", "50"),  # not a thousands group: "2" and "50"
        ("no digits at all", None),
        ("####", None),
    ],
)
def test_extract_gsm8k_answer(text, expected):
    assert extract_gsm8k_answer(text) == expected


def test_normalize_number():
    assert normalize_number("$1,000") == "1000"
    assert normalize_number("-0") == "0"
    assert normalize_number("3.1400") == "3.14"
    assert normalize_number("abc") is None


def test_gsm8k_accuracy_is_exact_match_of_final_answers():
    preds = ["so she has 72 clips", "#### 1,0", "I do not know"]
    refs = ["... #### 72", "... #### 11", "... #### 3"]
    assert gsm8k_accuracy(preds, refs) == pytest.approx(1 / 3)
    assert gsm8k_accuracy(["$1,000.00"], ["#### 1000"]) == 1.0
