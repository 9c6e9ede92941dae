"""RCOD distillation training on Hugging Face accelerate; reuses rcod_core's models and math."""
