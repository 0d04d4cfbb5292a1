"""Run a short PPO on a two-node ``ray.cluster_utils.Cluster`` (run by test_ppo in its own
process, so the cluster never meets the test session's local Ray). Prints the manifest as JSON.

    python -m tests.ppo_two_nodes PROMPTS REWARD_MODEL POLICY_MODEL OUTPUT
"""

from __future__ import annotations

import json
import sys

import ray
from ray.cluster_utils import Cluster

from huatuo_ray.config import ClusterConfig
from huatuo_ray.rlmf import ppo
from huatuo_ray.rlmf.actors.group import Resources
from tests.rlmf.test_ppo import ppo_config


def main() -> None:
    prompts, reward, model, out = sys.argv[1:5]
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 2})
    cluster.add_node(num_cpus=2)
    cluster.wait_for_nodes()
    try:
        two = Resources(workers=2, num_cpus=0.25)
        config = ppo_config((prompts, reward), model, out, "hf", iterations=3, ppo_epochs=1,
                            micro_batch_size=4, cluster=ClusterConfig(address=cluster.address))  # fmt: skip
        # Two ranks in the policy (ZeRO-3: sharded weights, gathered for each sync) and critic
        # (ZeRO-2) worlds, a separate reference (ZeRO-3 has no frozen trunk to share), the reward
        # model sharing the critic's bundles, two rollout engines spread over the nodes.
        config.policy.resources = config.critic.resources = config.reward.resources = two
        config.policy.deepspeed.zero_stage, config.critic.deepspeed.zero_stage = 3, 2
        config.reference.mode = "separate"
        config.colocate = [["critic", "reward"]]
        config.rollout.resources = two
        config.rollout.strategy = "STRICT_SPREAD"
        manifest = ppo.main(config)
        manifest["nodes"] = [n["NodeID"] for n in ray.nodes() if n["Alive"]]
        print("MANIFEST " + json.dumps(manifest))
    finally:
        ray.shutdown()
        cluster.shutdown()


if __name__ == "__main__":
    main()
