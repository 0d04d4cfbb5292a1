"""Serving models: vLLM's OpenAI-compatible server for a model artifact (the demo's local teacher)."""
