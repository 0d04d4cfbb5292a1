"""Images and cluster files that run: every image, Secret and volume a manifest uses is defined
or documented; README's cluster commands, on a machine with no token anywhere, start a head whose
job API refuses a request without the token and accepts ``jobs/submit.sh`` with it."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import yaml

from tests.ray_head import _kill_leftovers, environment, free_port

REPO = Path(__file__).resolve().parents[1]
MANIFESTS = sorted((REPO / "cluster" / "kuberay").glob("*.yaml"))


def _docs() -> list[dict]:
    return [d for p in MANIFESTS for d in yaml.safe_load_all(p.read_text()) if d]


def _walk(node, key: str):
    if isinstance(node, dict):
        for k, v in node.items():
            if k == key:
                yield v
            yield from _walk(v, key)
    elif isinstance(node, list):
        for v in node:
            yield from _walk(v, key)


def test_every_image_is_the_projects_dockerfile_built_as_readme_says() -> None:
    dockerfile = (REPO / "Dockerfile").read_text()
    assert re.search(r"^FROM nvidia/cuda:\S+", dockerfile, re.M)  # a CUDA base
    assert re.search(r'pip install [^\n]*"\.\[gpu[,\]]', dockerfile)  # the project, gpu extra
    built = set(re.findall(r"docker build -t (\S+) \.", (REPO / "README.md").read_text()))
    images = set(_walk(_docs(), "image"))
    aws = yaml.safe_load((REPO / "cluster" / "aws.yaml").read_text())
    images.add(aws["docker"]["image"])
    assert images and images <= built, images - built


def test_every_secret_and_volume_is_defined_or_documented() -> None:
    docs = _docs()
    defined = {(d["kind"], d["metadata"]["name"]) for d in docs}
    documented = (REPO / "README.md").read_text() + "".join(p.read_text() for p in MANIFESTS)
    for ref in _walk(docs, "secretKeyRef"):
        name = ref["name"]
        assert ("Secret", name) in defined or re.search(
            rf"kubectl create secret generic {name} --from-literal={ref['key']}=", documented
        ), name
    for claim in _walk(docs, "persistentVolumeClaim"):
        assert ("PersistentVolumeClaim", claim["claimName"]) in defined, claim
    for volumes in _walk(docs, "volumes"):  # every mounted volume is declared in its pod
        names = {v["name"] for v in volumes}
        assert names
    for spec in _walk(docs, "containers"):
        for container in spec:
            for mount in container.get("volumeMounts", []):
                assert mount["name"] in {"shared", "dshm"}, mount


def test_every_pod_that_may_run_a_teacher_actor_gets_the_key() -> None:
    (cluster,) = yaml.safe_load_all((REPO / "cluster/kuberay/raycluster.yaml").read_text())
    pods = [cluster["spec"]["headGroupSpec"]] + cluster["spec"]["workerGroupSpecs"]
    for pod in pods:
        container = pod["template"]["spec"]["containers"][0]
        env = {e["name"]: e for e in container.get("env", [])}
        assert env["OPENAI_API_KEY"]["valueFrom"]["secretKeyRef"]["name"] == "huatuo-teacher"
    for job in yaml.safe_load_all((REPO / "cluster/kuberay/rayjobs.yaml").read_text()):
        if job:
            env = yaml.safe_load(job["spec"]["runtimeEnvYAML"])
            assert env["working_dir"] == "/app" and "OPENAI_API_KEY" not in str(env)


def test_ray_up_starts_every_node_with_token_auth() -> None:
    aws = yaml.safe_load((REPO / "cluster" / "aws.yaml").read_text())
    assert aws["file_mounts"]["~/.ray/auth_token"] == "~/.ray/auth_token"
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        start = [c for c in aws[key] if "ray start" in c]
        assert start and all("export RAY_AUTH_MODE=token;" in c for c in start), key


def _readme_cluster_block() -> list[str]:
    text = (REPO / "README.md").read_text()
    block = next(b for b in re.findall(r"```bash\n(.*?)```", text, re.S) if "get-auth-token" in b)
    return [line.split("  #")[0].strip() for line in block.splitlines() if line.strip()]


def _status(url: str, token: str | None) -> int:
    request = urllib.request.Request(url)
    if token is not None:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status
    except urllib.error.HTTPError as e:
        return e.code


PORT_FLAGS = (
    "--port",
    "--dashboard-port",
    "--dashboard-agent-listen-port",
    "--ray-client-server-port",
)


@pytest.mark.slow
@pytest.mark.cluster
@pytest.mark.timeout(360)
def test_readme_commands_on_a_fresh_home_start_a_head_with_token_auth(
    tmp_path: Path, cluster_head
) -> None:
    """README's block as written, from a fresh HOME, on a node where another Ray cluster runs:
    the head takes the ports README names (each mapped to a free one: on a shared machine no
    fixed number is sure to be free), `jobs/submit.sh` says where it sends and the job lands on
    this cluster, not the other, and the job commands README gives work by `RAY_ADDRESS` alone."""
    from ray.job_submission import JobSubmissionClient

    home = tmp_path / "home"
    home.mkdir()
    temp_dir = tempfile.mkdtemp(prefix="hr-auth-", dir="/tmp")  # short: Ray's socket paths
    block = _readme_cluster_block()
    (start,) = [line for line in block if line.startswith("ray start --head")]
    documented = {flag: re.search(rf"{flag} (\d+)", start)[1] for flag in PORT_FLAGS}
    free = {number: str(free_port()) for number in documented.values()}
    dash = free[documented["--dashboard-port"]]
    extra = f" --node-ip-address 127.0.0.1 --num-cpus 1 --temp-dir {temp_dir} --disable-usage-stats"
    lines = []
    for line in block:
        if line.startswith("source "):
            continue  # the test's PATH already names the venv
        line = re.sub(r"\b\d{4,5}\b", lambda m: free.get(m[0], m[0]), line)
        if line.startswith("ray start --head"):
            line += extra
        if line.startswith("jobs/submit.sh"):
            lines.append(f"curl -s -o /dev/null -w '%{{http_code}}' http://127.0.0.1:{dash}/api/jobs/ > {tmp_path / 'no-token'}")  # fmt: skip
        lines.append(line)
    # The job commands of the text, for the job just submitted.
    text = (REPO / "README.md").read_text()
    job_commands = sorted(set(re.findall(r"`(ray job (?:status|logs|stop) ID)`", text)))
    assert len(job_commands) == 3, job_commands
    lines.append("ID=$(ray job list | grep -o 'raysubmit_[A-Za-z0-9]*' | head -1)")
    lines += [c.replace(" ID", " $ID") for c in job_commands]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "HUATUO_"))}
    env |= {"HOME": str(home), "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}  # fmt: skip
    started = time.time()
    other = cluster_head  # the other cluster on this node: the tests' shared head
    try:
        run = subprocess.run(["bash", "-euo", "pipefail", "-c", "\n".join(lines)], cwd=REPO,
                             env=env, capture_output=True, text=True, timeout=300)  # fmt: skip
        token = (home / ".ray" / "auth_token").read_text().strip()
        url = f"http://127.0.0.1:{dash}/api/jobs/"
        without, wrong, right = _status(url, None), _status(url, "x" * 64), _status(url, token)
    finally:
        _kill_leftovers(temp_dir)
        shutil.rmtree(temp_dir, ignore_errors=True)
    with environment(other.env):
        others_jobs = [j for j in JobSubmissionClient(other.dashboard_url).list_jobs()
                       if "plan" in j.entrypoint]  # fmt: skip
    print(f"README cluster commands: {time.time() - started:.0f} s")
    out = run.stdout + run.stderr
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert (tmp_path / "no-token").read_text() == "401"  # refused before the job was sent
    assert (without, wrong, right) == (401, 403, 200)  # no token; a wrong one
    assert f"sending plan to the Ray cluster at http://127.0.0.1:{dash} (RAY_ADDRESS)" in out
    assert "Job 'raysubmit_" in out and "succeeded" in out
    assert "critic+reward" in run.stdout  # the job's own output: `plan` sized the PPO preset
    assert "SUCCEEDED" in out and "multiple active Ray instances" not in out  # ray job status
    assert others_jobs == []  # nothing went to the other cluster
    assert oct((home / ".ray" / "auth_token").stat().st_mode & 0o777) == "0o600"
    assert token not in run.stdout + run.stderr  # the token is never printed


def test_readme_recipe_commands_name_files_stages_and_configs_that_exist() -> None:
    """The paper-recipe walk-through: every file it applies, every stage and config it submits
    (its `python -m huatuo_ray` commands are loaded by test_cluster_configs)."""
    from huatuo_ray.config import load_config
    from huatuo_ray.stages import STAGES

    text = (REPO / "README.md").read_text()
    recipe = text[text.index("## Running the paper recipe") : text.index("## What to watch")]
    applied = re.findall(r"kubectl (?:apply|delete) -f (\S+?)`?(?:\s|$)", recipe)
    assert {"cluster/kuberay/storage.yaml", "cluster/kuberay/raycluster.yaml",
            "cluster/kuberay/pipeline.yaml"} <= set(applied)  # fmt: skip
    for path in applied:
        assert (REPO / path).exists(), path
    submitted = re.findall(r"jobs/submit\.sh ([a-z-]+) (\S+?)`", recipe)
    assert submitted
    for stage, config in submitted:
        load_config(STAGES[stage].load()[0], str(REPO / config))
    assert "python -m huatuo_ray pipeline --config jobs/paper/pipeline.yaml --dry-run" in recipe
    assert "apply_delta" in recipe and "Ziya-LLaMA-13B-Pretrain-v1" in recipe


#: torch release -> the CUDA (major.minor) of its PyPI Linux wheels, read from each wheel's
#: requirements (nvidia-*-cu12 / cuda-toolkit==13.0.x); no download at test time.
TORCH_CUDA = {"2.9": "12.8", "2.10": "12.8", "2.11": "13.0", "2.14": "13.0"}
#: vllm release -> the torch it pins (its wheel's requirements).
VLLM_TORCH = {"0.24.0": "2.11.0", "0.33.0": "2.14.0"}
#: CUDA majors whose minor versions DeepSpeed 0.19's op builder accepts mixed (op_builder/builder.py,
#: cuda_minor_mismatch_ok); for any other major, nvcc's major.minor must equal torch's.
DEEPSPEED_MINOR_TOLERANT = {"10", "11", "12"}


def test_the_images_cuda_is_the_one_its_torch_was_built_for() -> None:
    """The Dockerfile's base tag against the `gpu` extra's pins: DeepSpeed builds its CUDA ops with
    the image's nvcc and refuses one that differs from the CUDA torch was built with."""
    import tomllib

    base = re.search(
        r"^FROM nvidia/cuda:(\d+)\.(\d+)\.\d+-\S+", (REPO / "Dockerfile").read_text(), re.M
    )
    assert base, "the Dockerfile's base is not an nvidia/cuda:X.Y.Z-... image"
    image_cuda = f"{base[1]}.{base[2]}"
    extras = tomllib.loads((REPO / "pyproject.toml").read_text())["project"][
        "optional-dependencies"
    ]
    pins = dict(re.match(r"([\w-]+)==([\w.]+)", p).groups() for p in extras["gpu"] if "==" in p)
    torch = pins.get("torch") or VLLM_TORCH.get(pins.get("vllm", ""))
    assert torch, f"add the torch that vllm=={pins.get('vllm')} pins to VLLM_TORCH"
    minor = ".".join(torch.split(".")[:2])
    assert minor in TORCH_CUDA, f"add the CUDA of torch {torch}'s wheels to TORCH_CUDA"
    torch_cuda = TORCH_CUDA[minor]
    if base[1] in DEEPSPEED_MINOR_TOLERANT:
        assert image_cuda.split(".")[0] == torch_cuda.split(".")[0], (image_cuda, torch, torch_cuda)
    else:
        assert image_cuda == torch_cuda, (
            f"the image has CUDA {image_cuda}, torch {torch} was built for CUDA {torch_cuda}"
        )
