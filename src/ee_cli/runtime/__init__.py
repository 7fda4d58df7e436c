"""LiteRT: the cascade engine and runner (litert), the measured re-choice of exits at export (deploy),
quantisation-aware heads (qat), the float hand-off between stages (handoff), and on-device training
(ondevice: personalise.tflite; litert_trainer: its TensorFlow-free child). Imports the stages below."""
