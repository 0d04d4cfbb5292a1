"""Polish on a two-node ``ray.cluster_utils.Cluster`` while the worker node is removed mid-run
(run by test_cluster_nodes in its own process). Prints a JSON line ``RESULT {...}``.

    python -m tests.stage1_node_loss INPUT OUTPUT
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time
from pathlib import Path

import ray
from ray.cluster_utils import Cluster

from huatuo_ray.config import ClusterConfig
from huatuo_ray.distill.polish import PolishConfig
from huatuo_ray.distill.polish import main as polish_main
from huatuo_ray.teacher.cache import ResponseCache
from huatuo_ray.teacher.stage import CACHE_DIR, WorkersConfig
from tests.conftest import TEACHER_KEY, TEACHER_KEY_ENV, teacher_config
from tests.support.openai_servers import ScriptedOpenAIServer
from tests.support.scripted_teacher import medical_responder


def main() -> None:
    source, out = sys.argv[1:3]
    os.environ[TEACHER_KEY_ENV] = TEACHER_KEY
    # The head can hold the stage's actors once the worker node is gone.
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 2})
    worker = cluster.add_node(num_cpus=2)
    cluster.wait_for_nodes()
    results = {}
    try:
        ray.init(address=cluster.address)
        with ScriptedOpenAIServer(medical_responder, latency_s=1.0, max_concurrency=8,
                                  require_api_key=TEACHER_KEY) as server:  # fmt: skip
            manifests = []

            def run() -> None:
                manifests.append(polish_main(PolishConfig(
                    input=source, output=out,
                    teacher=teacher_config(server.base_url, timeout_s=5.0),
                    workers=WorkersConfig(num_workers=2, batch_size=4, max_parse_retries=1),
                    cluster=ClusterConfig(address=cluster.address))))  # fmt: skip

            thread = threading.Thread(target=run)
            thread.start()
            cache = Path(out) / CACHE_DIR
            deadline = time.time() + 120
            while len(ResponseCache(str(cache))) < 6:
                assert time.time() < deadline and thread.is_alive()
                time.sleep(0.1)
            results["answers_before_removal"] = len(ResponseCache(str(cache)))
            nodes_before = len([n for n in ray.nodes() if n["Alive"]])
            cluster.remove_node(worker)
            results["nodes_before"] = nodes_before
            thread.join(timeout=300)
            assert not thread.is_alive(), "polish did not finish after the node loss"
            results["nodes_after"] = len([n for n in ray.nodes() if n["Alive"]])
            results["manifests"] = [{k: m[k] for k in ("rows", "rejects")} for m in manifests]
            stats = server.stats
            results["paid"] = stats.succeeded
            results["distinct"] = stats.distinct_answered
            results["paid_twice"] = len(stats.answered_more_than_once)
        print("RESULT " + json.dumps(results, default=str))
    finally:
        ray.shutdown()
        cluster.shutdown()


if __name__ == "__main__":
    main()
