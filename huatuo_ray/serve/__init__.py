"""Stages ``serve`` (a model behind an OpenAI-compatible endpoint on Ray Serve) and ``chat``."""
