"""PPO's Ray actor groups, one job each: rollout (generate), policy and critic (train),
reference and reward (frozen scoring). :mod:`.group` places them on the cluster."""
