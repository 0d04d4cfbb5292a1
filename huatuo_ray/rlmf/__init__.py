"""Stage 3: RL from mixed feedback — sampling, teacher scoring, the reward model, PPO."""
