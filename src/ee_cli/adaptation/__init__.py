"""Personalisation on a frozen backbone: BatchNorm statistics, the class mix and prior, and the BN depth
(adapt, stepping), the label-free baselines (baselines), augmentation and the feature cache, the
semi-supervised objective (ssl) and the head trainer (training). Imports the stages below."""
