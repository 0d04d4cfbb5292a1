"""Stage 2 and the reward model: Ray Train recipes whose workers run DeepSpeed engines."""
