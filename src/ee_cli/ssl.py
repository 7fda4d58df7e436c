"""The semi-supervised training signal as small pure functions on logits (FixMatch, distillation).

All losses are means over the batch; masked terms divide by the batch size, not by the number of
confident photos (as FixMatch does), so a rarely confident batch contributes little.
"""

from __future__ import annotations

from ee_cli import compat


def soft_targets(teacher_logits, temperature: float):
    tf = compat.tf()
    return tf.nn.softmax(tf.cast(teacher_logits, tf.float32) / temperature, axis=-1)


def confidence_mask(probabilities, threshold: float):
    """1.0 where the most likely class reaches `threshold`, else 0.0."""
    tf = compat.tf()
    return tf.cast(tf.reduce_max(probabilities, axis=-1) >= threshold, tf.float32)


def pseudo_labels(probabilities):
    tf = compat.tf()
    return tf.argmax(probabilities, axis=-1, output_type=tf.int32)


def distillation_loss(student_logits, teacher_logits, temperature: float):
    """KL(teacher || student) at a temperature, scaled by T^2 so gradients keep their size (Hinton)."""
    tf = compat.tf()
    targets = soft_targets(teacher_logits, temperature)
    log_student = tf.nn.log_softmax(student_logits / temperature, axis=-1)
    log_targets = tf.math.log(tf.maximum(targets, 1e-12))
    kl = tf.reduce_sum(targets * (log_targets - log_student), axis=-1)
    return tf.reduce_mean(kl) * temperature**2


def masked_cross_entropy(logits, labels, mask):
    tf = compat.tf()
    per_photo = tf.nn.sparse_softmax_cross_entropy_with_logits(labels=labels, logits=logits)
    return tf.reduce_mean(per_photo * mask)


def cross_entropy(logits, labels):
    tf = compat.tf()
    return tf.reduce_mean(tf.nn.sparse_softmax_cross_entropy_with_logits(labels=labels, logits=logits))


def pseudo_label_loss(student_logits, teacher_logits, threshold: float):
    """Hard teacher labels where the teacher is confident. Returns (loss, mask rate)."""
    tf = compat.tf()
    probabilities = tf.nn.softmax(tf.stop_gradient(teacher_logits), axis=-1)
    mask = confidence_mask(probabilities, threshold)
    return masked_cross_entropy(student_logits, pseudo_labels(probabilities), mask), tf.reduce_mean(mask)


def fixmatch_loss(weak_logits, strong_logits, threshold: float):
    """A confident prediction on the weak view is the target for the strong view. Returns (loss, mask rate)."""
    return pseudo_label_loss(strong_logits, weak_logits, threshold)
