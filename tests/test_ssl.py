"""The semi-supervised pieces on hand-made logits."""

from __future__ import annotations

import math

import numpy as np
import pytest

from ee_cli.adaptation import ssl


def test_confidence_mask_and_pseudo_labels():
    probabilities = np.array([[0.96, 0.04], [0.5, 0.5], [0.05, 0.95]], np.float32)
    np.testing.assert_array_equal(ssl.confidence_mask(probabilities, 0.95).numpy(), [1.0, 0.0, 1.0])
    np.testing.assert_array_equal(ssl.pseudo_labels(probabilities).numpy(), [0, 0, 1])


def test_soft_targets_flatten_with_temperature():
    logits = np.array([[2.0, 0.0]], np.float32)
    sharp = ssl.soft_targets(logits, 1.0).numpy()[0]
    soft = ssl.soft_targets(logits, 4.0).numpy()[0]
    assert sharp[0] == pytest.approx(1 / (1 + math.exp(-2)), rel=1e-6)
    assert 0.5 < soft[0] < sharp[0]


def test_distillation_is_zero_when_student_equals_teacher_and_positive_otherwise():
    teacher = np.array([[3.0, 1.0, -1.0], [0.0, 2.0, 0.5]], np.float32)
    assert ssl.distillation_loss(teacher, teacher, 2.0).numpy() == pytest.approx(0.0, abs=1e-6)
    student = np.zeros_like(teacher)
    targets = ssl.soft_targets(teacher, 2.0).numpy()
    expected = np.mean(np.sum(targets * (np.log(targets) - np.log(1 / 3)), axis=1)) * 4
    assert ssl.distillation_loss(student, teacher, 2.0).numpy() == pytest.approx(expected, rel=1e-5)


def test_masked_cross_entropy_divides_by_the_batch_not_the_mask():
    logits = np.array([[0.0, 0.0], [0.0, 0.0]], np.float32)
    labels = np.array([0, 1], np.int32)
    loss = ssl.masked_cross_entropy(logits, labels, np.array([1.0, 0.0], np.float32)).numpy()
    assert loss == pytest.approx(math.log(2) / 2, rel=1e-6)


def test_fixmatch_targets_come_from_confident_weak_views_only():
    weak = np.array([[5.0, 0.0], [0.1, 0.0], [0.0, 6.0]], np.float32)  # confident, unsure, confident
    strong = np.array([[0.0, 0.0], [9.0, -9.0], [0.0, 0.0]], np.float32)
    loss, mask_rate = ssl.fixmatch_loss(weak, strong, 0.95)
    assert mask_rate.numpy() == pytest.approx(2 / 3)
    # The unsure photo contributes nothing; the two confident ones each cost log 2 against their weak label.
    assert loss.numpy() == pytest.approx(2 * math.log(2) / 3, rel=1e-5)


def test_a_never_confident_teacher_gives_zero_loss_and_zero_mask():
    teacher = np.zeros((4, 3), np.float32)
    loss, mask_rate = ssl.pseudo_label_loss(np.ones((4, 3), np.float32), teacher, 0.5)
    assert loss.numpy() == 0.0 and mask_rate.numpy() == 0.0
