"""Training the project's encoders on a closed world it generates itself.

This package does file I/O and runs subprocesses (espeak-ng), so it lives
outside the pure ``encoders`` core; it never imports ``node``. It builds the
corpus (:mod:`training.corpus`), trains the shard (:mod:`training.trainer`),
calibrates δ (:mod:`training.calibration`), evaluates (:mod:`training.evaluation`)
and exposes ``train``, ``eval`` and ``embed`` to the CLI
(:mod:`training.commands`).
"""
