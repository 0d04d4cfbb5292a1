"""The teacher: an OpenAI-compatible client (concurrency, rate limits, retries, cache, usage and
cost), the paper's prompts (:mod:`huatuo_ray.teacher.prompts`) and the parsers of the teacher's
answers (:mod:`huatuo_ray.teacher.parsers`), and the frame every teacher stage runs in
(:mod:`huatuo_ray.teacher.stage`)."""
