"""The semi-supervised training signal as small pure functions on logits (FixMatch, distillation).

All losses are means over the batch; masked terms divide by the batch size, not by the number of
confident photos (as FixMatch does), so a rarely confident batch contributes little.
"""

from __future__ import annotations

from dataclasses import dataclass

from ee_cli.base import compat


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


TERMS = ("distill", "pseudo", "fixmatch", "supervised")


@dataclass(frozen=True)
class Objective:
    """What the heads learn from, as `ee personalise` set it (its defaults live in PersonaliseConfig
    only): the same for the TensorFlow step and the LiteRT `train` signature."""

    learning_rate: float
    pseudo_label_confidence: float
    temperature: float
    distill_weight: float
    pseudo_weight: float
    fixmatch_weight: float
    supervised_weight: float
    exit_teacher: str  # generic (the frozen classifier) | final (the personalised final exit)

    @classmethod
    def of(cls, config) -> "Objective":
        return cls(**{name: getattr(config, name) for name in cls.__dataclass_fields__})

    def weight(self, term: str) -> float:
        return getattr(self, f"{term}_weight")


def head_terms(weak_logits, strong_logits, teacher_logits, objective: Objective, supervised=None):
    """One head's loss terms on a batch (distillation and confident hard labels from its teacher,
    FixMatch between its views, and the labelled photos' cross-entropy when given) and its mask rate."""
    fixmatch, mask_rate = fixmatch_loss(weak_logits, strong_logits, objective.pseudo_label_confidence)
    terms = {
        "distill": distillation_loss(weak_logits, teacher_logits, objective.temperature),
        "pseudo": pseudo_label_loss(strong_logits, teacher_logits, objective.pseudo_label_confidence)[0],
        "fixmatch": fixmatch,
    }
    if supervised is not None:
        terms["supervised"] = supervised
    return terms, mask_rate


def weighted_sum(terms: dict, objective: Objective):
    tf = compat.tf()
    return tf.add_n([objective.weight(term) * value for term, value in terms.items()])


def teachers(generic_logits, final_weak_logits, heads: int, objective: Objective) -> list:
    """Each head's teacher: the generic classifier for the final exit; for the early exits the same,
    or the personalised final exit on the weak view (`final`), its gradient stopped."""
    tf = compat.tf()
    early = generic_logits if objective.exit_teacher == "generic" else tf.stop_gradient(final_weak_logits())
    return [early] * (heads - 1) + [generic_logits]


def one_hot_cross_entropy(logits, labels):
    """Cross-entropy over the rows of one-hot `labels` that hold a label (a zero row holds none, as a
    static-shape engine pads its labelled slots): the mean over those rows."""
    tf = compat.tf()
    rows = tf.reduce_sum(labels)
    return tf.reduce_sum(tf.nn.softmax_cross_entropy_with_logits(labels=labels, logits=logits)) / tf.maximum(rows, 1.0)
