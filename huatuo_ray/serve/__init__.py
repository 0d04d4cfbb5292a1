"""Serving a trained model: the ``serve`` stage (an OpenAI-compatible chat endpoint on Ray Serve)
and the ``chat`` stage (a terminal client of it)."""
