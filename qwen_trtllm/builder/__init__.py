"""The builder: an FT directory (or a Hugging Face checkpoint) -> a self-contained engine directory."""
