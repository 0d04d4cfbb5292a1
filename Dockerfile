# The image every huatuo-ray node runs: CUDA, Python, the project with its `gpu` extra (vLLM, which
# brings the CUDA build of torch), DeepSpeed, Ray. KubeRay (cluster/kuberay/*.yaml) and `ray up`
# (cluster/aws.yaml) both start Ray inside it.
#   docker build -t huatuo-ray:0.1.0 .
# Push it to a registry your nodes pull from and put that name in the manifests' `image:` and in
# cluster/aws.yaml's `docker.image` (README, "Running the paper recipe").
# The base image's CUDA is the one the pinned torch was built for: the `gpu` extra's vllm==0.33.0
# pins torch==2.14.0, whose wheels are built for CUDA 13.0 (cuda-toolkit==13.0.3, nvidia-*-cu13).
# DeepSpeed compiles its CUDA ops with this image's nvcc on first use and refuses a CUDA that
# differs from torch's (for CUDA 13, major and minor); tests/test_cluster_images.py checks the pair.
FROM nvidia/cuda:13.0.3-cudnn-devel-ubuntu24.04

ENV DEBIAN_FRONTEND=noninteractive \
    PYTHONUNBUFFERED=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH \
    DS_BUILD_OPS=0 \
    TOKENIZERS_PARALLELISM=false

# wget: KubeRay's probes; git, build-essential: DeepSpeed's JIT-built ops; rsync, openssh: `ray up`.
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv python3-dev git wget curl \
       ca-certificates build-essential rsync openssh-client \
    && rm -rf /var/lib/apt/lists/*

RUN python3 -m venv $VIRTUAL_ENV && pip install --no-cache-dir --upgrade pip

WORKDIR /app
# Dependencies first (a layer that changes rarely), then the project itself.
COPY pyproject.toml README.md ./
COPY huatuo_ray ./huatuo_ray
RUN pip install --no-cache-dir ".[gpu,lora,eval]"
COPY jobs ./jobs
COPY cluster ./cluster

# Ray runs as an unprivileged user; its home holds ~/.ray (the auth token) and the model cache.
RUN useradd --create-home --uid 1000 ray && chown -R ray /app
USER ray
ENV HUATUO_MODEL_CACHE=/home/ray/.cache/huatuo/models
