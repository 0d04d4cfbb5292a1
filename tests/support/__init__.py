"""Test doubles for the project's tests and benchmarks.

The teacher (ChatGPT in the HuatuoGPT recipe, or any vLLM server) is reached over the OpenAI HTTP
protocol. Tests and benchmarks cannot reach the network, and mocking the ``openai`` client would
hide exactly the behaviour that matters (status codes, ``Retry-After``, time-outs, dropped or
half-written responses). So this package provides real HTTP servers on ``127.0.0.1``:

* :class:`~tests.support.openai_servers.ScriptedOpenAIServer`, an OpenAI-compatible
  chat-completions server with scripted answers, latency, a concurrency cap and request accounting;
* :class:`~tests.support.openai_servers.FaultyProxy`, a seeded fault-injecting reverse proxy in
  front of any OpenAI-compatible base URL, which counts what was really delivered per request.

Nothing here is imported by the pipeline itself.
"""
