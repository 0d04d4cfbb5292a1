"""Generation, shared by sampling, PPO's rollouts, the benchmark, consultations and serving:
sampling from a model folder with vLLM, or Hugging Face ``generate`` where vLLM cannot run
(:mod:`~huatuo_ray.inference.generation`); offline generation over Ray Data
(:mod:`~huatuo_ray.inference.batch`); asynchronous engines for serving
(:mod:`~huatuo_ray.inference.engines`) behind the OpenAI chat API
(:mod:`~huatuo_ray.inference.openai_api`), served from a Ray actor
(:mod:`~huatuo_ray.inference.server_actor`); and vLLM's own OpenAI-compatible server as a child
process (:mod:`~huatuo_ray.inference.openai_server`)."""
