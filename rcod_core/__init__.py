"""rcod_core — RCOD one-step diffusion super-resolution with realism control (arXiv 2509.10122).

A standalone library (no ComfyUI import). Start with :func:`rcod_core.testing.tiny.tiny_pipeline` for an
offline smoke run, or :mod:`rcod_core.pipeline` for the engine.
"""

__version__ = "0.1.0"
