"""Do no harm, label-free: the check on the held-out photos, and what `ee personalise` ships when it fires."""

from __future__ import annotations

import numpy as np

from ee_cli.exits import safety


def test_a_collapse_onto_one_class_is_refused_unless_the_start_had_collapsed_too():
    start = np.arange(100) % 3
    collapsed = np.zeros(100, int)
    verdict = safety.judge(collapsed, start)
    assert verdict.harm and "100% of the held-out photos in one class" in verdict.harm and verdict.largest_share == 1.0
    assert safety.judge(collapsed, np.zeros(100, int)).harm is None  # photos of one class: the start says so too


def test_a_made_up_regression_away_from_the_start_fires_and_agreement_above_the_floor_does_not():
    start = np.arange(100) % 4
    drifted = start.copy()
    drifted[:45] = (drifted[:45] + 1) % 4  # 55 % agreement
    verdict = safety.judge(drifted, start)
    assert verdict.harm and "55%" in verdict.harm and verdict.agreement == 0.55
    drifted[:5] = start[:5]  # 60 %: at the floor, kept
    assert safety.judge(drifted, start).harm is None


def test_too_few_held_out_photos_keep_the_personalised_exit():
    assert safety.judge(np.zeros(29, int), np.arange(29) % 3).harm is None
