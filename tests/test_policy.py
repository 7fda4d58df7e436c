"""Threshold maths on hand-made arrays."""

from __future__ import annotations

import numpy as np
import pytest

from ee_cli.exits import policy


def test_exit_taken_uses_the_first_confident_exit():
    confidences = np.array([[0.9, 0.2, 0.5], [0.95, 0.8, 0.1]])
    np.testing.assert_array_equal(policy.exit_taken(confidences, [0.5, 0.7]), [0, 1, 0])
    np.testing.assert_array_equal(policy.exit_taken(confidences, [policy.NEVER, 0.7]), [1, 1, 2])


def test_confidence_criteria():
    p = np.array([[1.0, 0.0], [0.5, 0.5]])
    np.testing.assert_allclose(policy.confidence(p, "maxprob"), [1.0, 0.5])
    np.testing.assert_allclose(policy.confidence(p, "entropy"), [1.0, 0.0], atol=1e-9)


def test_greedy_takes_every_photo_when_the_exit_is_always_right():
    confidences = np.array([[0.9, 0.8, 0.7, 0.6]])
    correct = np.array([[1, 1, 1, 1], [1, 1, 1, 1]])
    thresholds = policy.greedy_thresholds(confidences, correct, correct[-1], policy.max_drop(0.0, 0.0))
    assert thresholds[0] == pytest.approx(0.6)


def test_greedy_stops_before_the_first_mistake_at_zero_drop():
    confidences = np.array([[0.9, 0.8, 0.7, 0.6]])
    correct = np.array([[1, 1, 0, 1], [1, 1, 1, 1]])
    thresholds = policy.greedy_thresholds(confidences, correct, correct[-1], policy.max_drop(0.0, 0.0))
    assert thresholds[0] == pytest.approx(0.8)
    # Allowing a drop of 0.25 (a quarter of the photos, one of the four here) lets the mistake through, and the right photo after it.
    loose = policy.greedy_thresholds(confidences, correct, correct[-1], policy.max_drop(0.25, 0.0))
    assert loose[0] == pytest.approx(0.6)


def test_ties_leave_together():
    confidences = np.array([[0.9, 0.7, 0.7, 0.5]])
    correct = np.array([[1, 1, 0, 1], [1, 1, 1, 1]])
    # Cutting between the two 0.7s is impossible: either both leave (one mistake) or neither.
    thresholds = policy.greedy_thresholds(confidences, correct, correct[-1], policy.max_drop(0.0, 0.0))
    assert thresholds[0] == pytest.approx(0.9)


def test_an_exit_that_is_never_confident_stays_off():
    confidences = np.array([[0.1, 0.1, 0.1], [0.99, 0.99, 0.2]])
    correct = np.array([[0, 0, 0], [1, 1, 0], [1, 1, 1]])
    thresholds = policy.greedy_thresholds(confidences, correct, correct[-1], policy.max_drop(0.0, 0.0))
    assert thresholds[0] == policy.NEVER and thresholds[1] == pytest.approx(0.99)
    taken = policy.exit_taken(confidences, thresholds)
    np.testing.assert_array_equal(taken, [1, 1, 2])


def test_an_exit_switched_off_takes_no_photo_even_when_anything_goes():
    # evaluate marks exits personalisation left off with -inf confidence; a reference every policy
    # beats (a generic model at 0 %) must still not route photos there.
    confidences = np.array([[-np.inf, -np.inf, -np.inf], [0.9, 0.6, 0.3]])
    correct = np.array([[1, 1, 1], [1, 1, 1], [1, 1, 1]])
    thresholds = policy.greedy_thresholds(confidences, correct, np.zeros(3, int), policy.at_least(0.0))
    assert thresholds[0] == policy.NEVER and thresholds[1] == pytest.approx(0.3)
    np.testing.assert_array_equal(policy.exit_taken(confidences, thresholds), [1, 1, 1])


def test_margin_makes_the_policy_more_careful():
    rng = np.random.default_rng(0)
    confidences = rng.random((1, 400))
    correct = np.vstack([rng.random(400) < confidences[0], np.ones(400)]).astype(int)
    plain = policy.greedy_thresholds(confidences, correct, correct[-1], policy.max_drop(0.05, 0.0))
    careful = policy.greedy_thresholds(confidences, correct, correct[-1], policy.max_drop(0.05, 1.645))
    assert careful[0] > plain[0]


def test_match_reference_needs_accuracy_at_least_the_reference():
    confidences = np.array([[0.9, 0.8, 0.7, 0.6]])
    correct = np.array([[1, 1, 0, 0], [1, 1, 1, 1]])
    generic = np.array([1, 1, 1, 0])  # the reference is worse than the final exit on the last photo
    thresholds = policy.greedy_thresholds(confidences, correct, generic, policy.at_least(0.0))
    taken = policy.exit_taken(confidences, thresholds)
    result = policy.outcome(taken, correct, np.array([1.0, 4.0]))
    # Three photos may leave early: the third is wrong there, but the generic model misses one too.
    assert result.accuracy >= generic.mean() and thresholds[0] == pytest.approx(0.7)


def test_oracle_leaves_at_the_earliest_right_exit():
    correct = np.array([[0, 1, 0], [1, 1, 0], [1, 0, 1]])
    result = policy.oracle(correct, np.array([1.0, 2.0, 4.0]))
    np.testing.assert_allclose(result.shares, [1 / 3, 1 / 3, 1 / 3])
    assert result.accuracy == pytest.approx(1.0) and result.mean_cost == pytest.approx(7 / 3)


def test_calibration_and_report_splits_are_disjoint_and_cover_everything():
    calibrate, report = policy.split(1001, 0.5, seed=3)
    assert len(np.intersect1d(calibrate, report)) == 0
    assert len(calibrate) + len(report) == 1001 and set(calibrate) | set(report) == set(range(1001))
    again, _ = policy.split(1001, 0.5, seed=3)
    np.testing.assert_array_equal(calibrate, again)


def test_bootstrap_interval_brackets_the_mean():
    differences = np.array([0.0] * 90 + [1.0] * 10)
    low, high = policy.bootstrap_interval(differences)
    assert low < 0.1 < high and high - low < 0.15


def _always_right(exits: int, photos: int = 40) -> policy.Evidence:
    confidences = np.tile(np.linspace(0.99, 0.6, photos), (exits, 1))
    correct = np.ones((exits + 1, photos), np.int8)
    return policy.Evidence(confidences, correct, correct[-1])


def test_the_cost_model_charges_only_the_heads_that_run():
    costs = policy.StageCosts(np.array([10.0, 20.0, 30.0]), np.array([1.0, 2.0]), "ms")
    np.testing.assert_allclose(costs.leaving(np.array([True, True])), [11, 33, 63])
    np.testing.assert_allclose(costs.leaving(np.array([False, True])), [10, 32, 62])
    assert costs.plain == 60 and policy.StageCosts(costs.segments, costs.heads, "ms", plain_cost=55).plain == 55


def test_cheap_exits_that_are_always_right_take_every_photo():
    costs = policy.StageCosts(np.array([10.0, 20.0, 30.0]), np.array([1.0, 1.0]), "ms")
    choice = policy.cheapest_cascade(_always_right(2), policy.max_drop(0.0, 0.0), costs)
    assert choice.thresholds[0] < policy.NEVER and choice.shares[0] == 1.0
    assert choice.expected_cost == pytest.approx(11.0) and choice.speedup == pytest.approx(60 / 11)


def test_no_exit_is_used_when_every_exit_costs_more_than_it_saves():
    # Made-up runtime profile: a stage boundary and head so dear that even letting every photo out
    # at the first exit costs more than the plain model (as exit_2 at 32 px int8 cost 105 %).
    costs = policy.StageCosts(np.array([50.0, 45.0, 5.0]), np.array([60.0, 60.0]), "ms", plain_cost=100.0)
    choice = policy.cheapest_cascade(_always_right(2), policy.max_drop(0.0, 0.0), costs)
    assert (choice.thresholds == policy.NEVER).all() and choice.expected_cost == 100.0 and choice.shares[-1] == 1.0


def test_an_exit_that_costs_more_than_it_saves_is_dropped_and_the_other_kept():
    # exit_0 is cheap and right on half the photos; exit_1 is right on all, but reaching it (head included)
    # costs 106 % of the plain model, so letting the other half out there loses time.
    photos = 40
    confidences = np.vstack([np.linspace(0.99, 0.6, photos), np.linspace(0.99, 0.6, photos)])
    correct = np.ones((3, photos), np.int8)
    correct[0, photos // 2 :] = 0
    evidence = policy.Evidence(confidences, correct, correct[-1])
    costs = policy.StageCosts(np.array([20.0, 75.0, 5.0]), np.array([1.0, 10.0]), "ms", plain_cost=100.0)
    choice = policy.cheapest_cascade(evidence, policy.max_drop(0.0, 0.0), costs)
    assert choice.thresholds[0] < policy.NEVER and choice.thresholds[1] == policy.NEVER
    assert choice.shares[0] == pytest.approx(0.5) and choice.expected_cost < 100.0
    greedy_with_both = policy.greedy_thresholds(confidences, correct, correct[-1], policy.max_drop(0.0, 0.0))
    assert greedy_with_both[1] < policy.NEVER  # the MACs-blind greedy would have kept exit_1


def test_a_recorded_constraint_spec_gives_the_same_constraint():
    mean, se = np.array([-0.004, -0.006, 0.001]), np.array([0.0, 0.0, 0.002])
    np.testing.assert_array_equal(policy.constraint_from({"kind": "max_drop", "drop": 0.005, "z": 1.645})(mean, se), policy.max_drop(0.005, 1.645)(mean, se))
    np.testing.assert_array_equal(policy.constraint_from({"kind": "at_least", "z": 1.0})(mean, se), [False, False, False])
    np.testing.assert_array_equal(policy.constraint_from({"kind": "at_least", "z": 0.0})(mean, se), [False, False, True])


def test_every_command_decides_the_same_way_and_says_why():
    costs = policy.StageCosts(np.array([10.0, 20.0, 30.0]), np.array([1.0, 1.0]), "ms")
    spec = {"kind": "max_drop", "drop": 0.0, "z": 0.0}
    few = policy.Evidence(np.full((2, 29), 0.99), np.ones((3, 29), np.int8), np.ones(29, np.int8))
    off = policy.decide(few, costs, spec, ["exit_0", "exit_1"], "held-out photos", "fewer ms")
    assert off.choice is None and off.reason == "29 held-out photos: thresholds need at least 30, so every exit stays off"
    assert policy.decide(None, costs, spec, ["exit_0", "exit_1"], "held-out photos", "fewer ms").choice is None
    on = policy.decide(_always_right(2), costs, spec, ["exit_0", "exit_1"], "held-out photos", "fewer ms")
    assert on.choice.thresholds[0] < policy.NEVER and on.reason.startswith(f"exit_0 on: predicted {60 / 11:.2f}× fewer ms, on ")
    dear = policy.StageCosts(np.array([50.0, 45.0, 5.0]), np.array([60.0, 60.0]), "ms", plain_cost=100.0)
    assert policy.decide(_always_right(2), dear, spec, ["exit_0", "exit_1"], "photos", "faster").reason.startswith("no exit lets enough of")
