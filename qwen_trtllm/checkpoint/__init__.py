"""Checkpoints: Hugging Face Qwen (v1) directories, the FT-style per-rank directory, random checkpoints."""
