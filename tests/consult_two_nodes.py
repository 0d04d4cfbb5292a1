"""``consult`` on a two-node ``ray.cluster_utils.Cluster`` with the doctor model served by a Ray
actor that only the second node can hold (run by test_evaluation in its own process, so the
cluster never meets the test session's local Ray). Prints the manifest and the nodes as JSON.

    python -m tests.consult_two_nodes CASES DOCTOR_MODEL OUTPUT
"""

from __future__ import annotations

import json
import sys

import ray
from ray.cluster_utils import Cluster

from huatuo_ray.config import ClusterConfig, TeacherConfig
from huatuo_ray.eval import consult
from huatuo_ray.inference.generation import EngineConfig
from huatuo_ray.inference.server_actor import ModelServerConfig
from huatuo_ray.teacher.stage import WorkersConfig
from tests.support.openai_servers import ScriptedOpenAIServer
from tests.support.scripted_teacher import medical_responder


def main() -> None:
    cases, model, out = sys.argv[1:4]
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 2})
    second = cluster.add_node(num_cpus=2, resources={"doctor_node": 1})
    cluster.wait_for_nodes()
    try:
        with ScriptedOpenAIServer(medical_responder) as patient:
            config = consult.ConsultConfig(
                cases=cases, output=out, name="tiny", limit=3, max_turns=2,
                doctor_model=model,
                doctor_server=ModelServerConfig(
                    engine=EngineConfig(backend="vllm", dtype="float32", enforce_eager=True,
                                        gpu_memory_utilization=0.1, max_model_len=1024),
                    num_cpus=1, resources={"doctor_node": 1}),
                doctor=TeacherConfig(max_tokens=16, timeout_s=60, max_retries=1),
                teacher=TeacherConfig(base_url=patient.base_url, model="scripted-teacher",
                                      api_key_env="", timeout_s=30),
                workers=WorkersConfig(num_workers=1, batch_size=3),
                cluster=ClusterConfig(address=cluster.address),
            )  # fmt: skip
            manifest = consult.main(config)
        manifest["second_node"] = second.node_id
        print("MANIFEST " + json.dumps(manifest, default=str))
    finally:
        ray.shutdown()
        cluster.shutdown()


if __name__ == "__main__":
    main()
