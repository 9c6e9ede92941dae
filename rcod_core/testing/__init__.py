"""Fixtures for tests, smoke runs and benchmarks: tiny random-weight models and synthetic checkpoints
in every official layout (:mod:`.tiny`, ``rcod make-tiny``), and an exporter to the original
single-file key layout (:mod:`.ldm_export`). Library code never imports them."""
