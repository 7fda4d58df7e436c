"""The two label-free decisions, pure numpy: where photos leave the cascade (policy: thresholds, costs,
the one `decide`) and whether a personalised model may ship at all (safety: do no harm). Imports nothing
of ee_cli."""
