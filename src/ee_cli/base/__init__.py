"""Plumbing every stage uses: the one user-error type, the one importer of TensorFlow/tf_keras/tfmot/LiteRT
(compat, lazy, so `ee --help` is instant), atomic writes, photo folders, run folders and the commands'
config dataclasses. Imports nothing else of ee_cli."""
