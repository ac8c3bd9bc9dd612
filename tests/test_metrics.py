"""Continual-learning metrics on small matrices whose values are worked out by hand below."""

import math

import pytest

from mil_plugins import metrics as M

approx = pytest.approx


# R[i][j] = score on stage j after training stage i; None = not evaluated.
R3 = [
    [80.0, None, None],
    [70.0, 60.0, None],
    [65.0, 55.0, 50.0],
]
# final avg   = (65 + 55 + 50) / 3                      = 56.666...
# A_1 = 80, A_2 = (70 + 60) / 2 = 65, A_3 = 56.666...
# avg incr.   = (80 + 65 + 56.666...) / 3               = 67.222...
# f_0 = max(80, 70) - 65 = 15,  f_1 = 60 - 55 = 5       -> forgetting 10
# BWT         = ((65 - 80) + (55 - 60)) / 2             = -10
# MFT         = (80 + 60 + 50) / 3                      = 63.333...


def test_3x3_lower_triangle_by_hand():
    assert M.final_average_accuracy(R3) == approx(170.0 / 3)
    assert M.average_incremental_accuracy(R3) == approx((80.0 + 65.0 + 170.0 / 3) / 3)
    assert M.average_incremental_accuracy(R3) == approx(67.2222222)
    assert M.forgetting(R3) == approx(10.0)
    assert M.per_stage_forgetting(R3) == [approx(15.0), approx(5.0), None]
    assert M.backward_transfer(R3) == approx(-10.0)
    assert M.forward_transfer(R3) is None  # no baseline
    assert M.forward_transfer(R3, baseline=[10.0, 5.0, 3.0]) is None  # upper diagonal not measured
    assert M.mft(R3) == approx(190.0 / 3)
    assert M.mfn(R3) == approx(170.0 / 3)
    assert M.maa(R3) == approx(67.2222222)


def test_compute_all_keys_and_values():
    out = M.compute_all(R3)
    assert set(out) == set(M.METRIC_KEYS) | {"per_stage_forgetting"}
    assert out["final_average_accuracy"] == approx(56.6666667)
    assert out["MFN"] == out["final_average_accuracy"]
    assert out["MAA"] == out["average_incremental_accuracy"]
    assert out["forgetting"] == approx(10.0)
    assert out["backward_transfer"] == approx(-10.0)
    assert out["forward_transfer"] is None
    assert out["MFT"] == approx(63.3333333)
    assert out["per_stage_forgetting"] == [approx(15.0), approx(5.0), None]


# Full matrix (stages also evaluated before training them) plus an untrained baseline.
R3_FULL = [
    [50.0, 99.0, 20.0],
    [60.0, 70.0, 30.0],
    [40.0, 65.0, 90.0],
]
B3 = [5.0, 4.0, 10.0]
# final avg   = (40 + 65 + 90) / 3 = 65   (upper entries of earlier rows never enter)
# A_1 = 50, A_2 = (60 + 70) / 2 = 65, A_3 = 65          -> avg incr. 60
# f_0 = max(50, 60) - 40 = 20
# f_1 = max over l in [1, 2) of R[l][1] = 70; 70 - 65 = 5  (the zero-shot 99 before training is not counted)
# forgetting  = (20 + 5) / 2 = 12.5
# BWT         = ((40 - 50) + (65 - 70)) / 2 = -7.5
# FWT         = ((R[0][1] - b_1) + (R[1][2] - b_2)) / 2 = ((99 - 4) + (30 - 10)) / 2 = 57.5
# MFT         = (50 + 70 + 90) / 3 = 70


def test_3x3_full_matrix_with_baseline_by_hand():
    out = M.compute_all(R3_FULL, baseline=B3)
    assert out["final_average_accuracy"] == approx(65.0)
    assert out["average_incremental_accuracy"] == approx(60.0)
    assert out["per_stage_forgetting"] == [approx(20.0), approx(5.0), None]
    assert out["forgetting"] == approx(12.5)
    assert out["backward_transfer"] == approx(-7.5)
    assert out["forward_transfer"] == approx(57.5)
    assert out["MFT"] == approx(70.0)
    assert out["MFN"] == approx(65.0)
    assert out["MAA"] == approx(60.0)


# 2x2 on the [0, 1] scale: the scale is kept.
R2 = [[0.9, None], [0.6, 0.8]]
# final = (0.6 + 0.8) / 2 = 0.7;  avg incr. = (0.9 + 0.7) / 2 = 0.8
# forgetting = 0.9 - 0.6 = 0.3;  BWT = 0.6 - 0.9 = -0.3;  MFT = (0.9 + 0.8) / 2 = 0.85


def test_2x2_unit_scale_by_hand():
    out = M.compute_all(R2, baseline=[0.1, 0.2])
    assert out["final_average_accuracy"] == approx(0.7)
    assert out["average_incremental_accuracy"] == approx(0.8)
    assert out["forgetting"] == approx(0.3)
    assert out["backward_transfer"] == approx(-0.3)
    assert out["forward_transfer"] is None  # R[0][1] not measured
    assert out["MFT"] == approx(0.85)
    assert out["MFN"] == approx(0.7)
    assert out["per_stage_forgetting"] == [approx(0.3), None]
    # with R[0][1] measured: FWT = R[0][1] - b_1 = 0.3 - 0.2 = 0.1
    assert M.forward_transfer([[0.9, 0.3], [0.6, 0.8]], [0.1, 0.2]) == approx(0.1)


def test_ragged_rows_equal_none_padding():
    ragged = [[80.0], [70.0, 60.0], [65.0, 55.0, 50.0]]
    assert M.compute_all(ragged) == M.compute_all(R3)


def test_single_stage():
    out = M.compute_all([[75.0]], baseline=[10.0])
    assert out["final_average_accuracy"] == 75.0
    assert out["average_incremental_accuracy"] == 75.0
    assert out["forgetting"] is None
    assert out["backward_transfer"] is None
    assert out["forward_transfer"] is None
    assert out["MFT"] == 75.0 and out["MFN"] == 75.0 and out["MAA"] == 75.0
    assert out["per_stage_forgetting"] == [None]


def test_missing_and_nan_entries_are_skipped():
    # diagonal entry of stage 0 missing: its BWT/forgetting term is left out
    R = [[None, None], [70.0, 60.0]]
    out = M.compute_all(R)
    assert out["backward_transfer"] is None
    assert out["forgetting"] is None
    assert out["final_average_accuracy"] == approx(65.0)
    assert out["average_incremental_accuracy"] == approx(65.0)  # row 0 has no entry: left out
    assert out["MFT"] == approx(60.0)
    # NaN counts as missing
    assert M.compute_all([[math.nan, None], [70.0, 60.0]]) == out
    # a partly missing last row: mean over what is there
    assert M.final_average_accuracy([[80.0, None], [None, 60.0]]) == approx(60.0)


def test_empty_matrix():
    out = M.compute_all([])
    assert all(out[k] is None for k in M.METRIC_KEYS)
    assert out["per_stage_forgetting"] == []


def test_partial_run_ignores_future_columns():
    # 2 of 3 stages trained, the third evaluated zero-shot: not part of the final average
    R = [[80.0, None, 5.0], [70.0, 60.0, 7.0]]
    assert M.final_average_accuracy(R) == approx(65.0)
    assert M.forward_transfer(R, [1.0, 2.0, 3.0]) is None  # needs R[0][1]
    assert M.forward_transfer([[80.0, 12.0, 5.0], [70.0, 60.0, 7.0]], [1.0, 2.0, 3.0]) == approx(10.0)
