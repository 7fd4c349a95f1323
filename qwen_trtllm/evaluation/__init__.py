"""Evaluation: teacher-forced logit comparison, ROUGE against Hugging Face, per-layer comparison."""
