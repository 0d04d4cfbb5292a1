"""Cluster files: YAML parses, KubeRay resources have their required fields, the `ray up` config
passes Ray's own schema, and every command in README, jobs/ and cluster/ names a real stage and
an existing config."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from huatuo_ray.config import load_config
from huatuo_ray.stages import STAGES

REPO = Path(__file__).resolve().parents[1]


def docs(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def test_raycluster_has_head_cpu_and_gpu_groups_and_a_private_dashboard() -> None:
    (cluster,) = docs(REPO / "cluster" / "kuberay" / "raycluster.yaml")
    assert cluster["apiVersion"] == "ray.io/v1" and cluster["kind"] == "RayCluster"
    spec = cluster["spec"]
    head = spec["headGroupSpec"]
    assert head["serviceType"] == "ClusterIP"  # reachable by port-forwarding only
    assert cluster["spec"]["authOptions"] == {"mode": "token"}  # Ray token auth stays on
    assert head["template"]["spec"]["containers"][0]["image"]
    groups = {g["groupName"]: g for g in spec["workerGroupSpecs"]}
    assert set(groups) == {"cpu-workers", "gpu-workers"}
    for group in groups.values():
        for key in ("replicas", "minReplicas", "maxReplicas", "rayStartParams", "template"):
            assert key in group
        assert group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]
    gpu = groups["gpu-workers"]["template"]["spec"]["containers"][0]["resources"]["limits"]
    assert int(gpu["nvidia.com/gpu"]) >= 1
    # The key comes from a Secret, never as a literal value.
    text = (REPO / "cluster" / "kuberay" / "raycluster.yaml").read_text()
    assert "secretKeyRef" in text and "sk-" not in text.replace("sk-...", "")


def test_rayjobs_one_per_stage() -> None:
    jobs = docs(REPO / "cluster" / "kuberay" / "rayjobs.yaml")
    names = set()
    for job in jobs:
        assert job["apiVersion"] == "ray.io/v1" and job["kind"] == "RayJob"
        assert job["spec"]["clusterSelector"] == {"ray.io/cluster": "huatuo-ray"}
        names.add(job["spec"]["metadata"]["stage"])
    assert names == set(STAGES) - {"tiny-model", "chat", "plan", "pipeline"}  # clients


def test_pipeline_rayjob_runs_the_paper_pipeline_from_the_image() -> None:
    (job,) = docs(REPO / "cluster" / "kuberay" / "pipeline.yaml")
    assert job["kind"] == "RayJob" and job["spec"]["metadata"]["stage"] == "pipeline"
    assert "--config jobs/paper/pipeline.yaml" in job["spec"]["entrypoint"]
    assert "project_dir=/app" in job["spec"]["entrypoint"]


def test_ray_up_config_passes_rays_schema() -> None:
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = yaml.safe_load((REPO / "cluster" / "aws.yaml").read_text())
    validate_config(prepare_config(config))  # as `ray up` does, with Ray's defaults filled in
    assert "--dashboard-host=127.0.0.1" in " ".join(config["head_start_ray_commands"])
    assert config["head_node_type"] in config["available_node_types"]


def test_runtime_env_holds_no_secret() -> None:
    env = yaml.safe_load((REPO / "cluster" / "runtime_env.yaml").read_text())
    assert env["working_dir"] == "." and ".venv" in env["excludes"]
    secret = re.compile(r"(_KEY|_TOKEN|SECRET|PASSWORD)$|^(OPENAI|AZURE)")
    assert not any(secret.search(k) for k in env.get("env_vars", {}))


COMMAND = re.compile(r"python -m huatuo_ray ([a-z][a-z-]*)(?: [^\n`]*?--config[ =]([^\s`]+))?")


@pytest.mark.parametrize(
    "path",
    [
        REPO / "README.md",
        *sorted((REPO / "jobs").rglob("*.yaml")),
        *sorted((REPO / "cluster").rglob("*.yaml")),
        REPO / "jobs" / "submit.sh",
    ],
    ids=lambda p: str(p.relative_to(REPO)),
)
def test_commands_name_real_stages_and_configs(path: Path) -> None:
    for stage, config in COMMAND.findall(path.read_text()):
        if stage in ("STAGE",):
            continue
        assert stage in STAGES, f"{path}: no stage {stage!r}"
        if STAGES[stage].config_names:  # `plan --config X`: X is another stage's preset
            stage = Path(config).name.split(".")[0]
        if config and "<" not in config and "$" not in config:
            config_path = REPO / config
            assert config_path.exists(), f"{path}: no config {config}"
            load_config(STAGES[stage].load()[0], str(config_path))


def test_every_ray_pod_is_scraped_and_has_a_root_on_the_shared_volume() -> None:
    """The PodMonitors of monitoring.yaml select the RayCluster's head and workers by their
    KubeRay labels and scrape a port every one of those pods names; jobs' relative paths go to
    HUATUO_ROOT on the shared volume; the head's dashboard knows where Prometheus and Grafana are."""
    (cluster,) = docs(REPO / "cluster" / "kuberay" / "raycluster.yaml")
    monitors = {m["spec"]["selector"]["matchLabels"]["ray.io/node-type"]: m
                for m in docs(REPO / "cluster" / "kuberay" / "monitoring.yaml")}  # fmt: skip
    assert set(monitors) == {"head", "worker"}
    pods = {
        "head": [cluster["spec"]["headGroupSpec"]],
        "worker": cluster["spec"]["workerGroupSpecs"],
    }
    for kind, monitor in monitors.items():
        assert monitor["kind"] == "PodMonitor" and monitor["metadata"]["labels"]["release"]
        assert monitor["spec"]["selector"]["matchLabels"]["ray.io/cluster"] == "huatuo-ray"
        (endpoint,) = monitor["spec"]["podMetricsEndpoints"]
        for pod in pods[kind]:
            container = pod["template"]["spec"]["containers"][0]
            ports = {p["name"]: p["containerPort"] for p in container["ports"]}
            assert ports[endpoint["port"]] == 8080  # KubeRay's metrics-export-port
            env = {e["name"]: e.get("value") for e in container["env"]}
            mounts = [m["mountPath"] for m in container["volumeMounts"]]
            assert any(env["HUATUO_ROOT"].startswith(m + "/") for m in mounts), env["HUATUO_ROOT"]
    head_env = {e["name"] for e in pods["head"][0]["template"]["spec"]["containers"][0]["env"]}
    assert {"RAY_PROMETHEUS_HOST", "RAY_GRAFANA_HOST", "RAY_GRAFANA_IFRAME_HOST"} <= head_env
    readme = (REPO / "README.md").read_text()
    assert "kubectl apply -f cluster/kuberay/monitoring.yaml" in readme
    assert "--from-file=cluster/grafana/huatuo.json" in readme
    assert "ray metrics launch-prometheus" in readme
