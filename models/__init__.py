"""The eqx-ring model zoo (video tokenizer, video-text LM, LLaMA-style presets): arriving in later releases."""
