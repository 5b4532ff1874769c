# GPU image: vLLM rollout engines, DeepSpeed learners on CUDA, flash-attention, the package.
# The cluster launcher (cluster/aws.yaml, cluster/gcp.yaml) and KubeRay (cluster/kuberay-*.yaml)
# run it on every node, the CPU head included (one image: Ray and Python versions must match).
#
#   docker build -f docker/gpu.Dockerfile -t alphadrive-ray:gpu .
#   docker tag alphadrive-ray:gpu ghcr.io/your-org/alphadrive-ray:gpu && docker push ghcr.io/your-org/alphadrive-ray:gpu
FROM nvidia/cuda:12.8.1-cudnn-devel-ubuntu24.04

# Ray must be the same version on every node and on the machine that submits jobs (KubeRay's
# rayVersion in cluster/ says the same).
ARG RAY_VERSION=2.60.0
ENV DEBIAN_FRONTEND=noninteractive
# Python 3.12 with headers (flash-attn compiles), Java for METEOR, and what the cluster
# launcher runs inside the container (ssh, rsync)
RUN apt-get update && apt-get install -y --no-install-recommends \
        python3 python3-venv python3-dev build-essential git \
        default-jre-headless openssh-client rsync ca-certificates \
    && rm -rf /var/lib/apt/lists/*
RUN mkdir -p /etc/alphadrive && echo "ray==${RAY_VERSION}" > /etc/alphadrive/constraints.txt
ENV PIP_CONSTRAINT=/etc/alphadrive/constraints.txt \
    PIP_NO_CACHE_DIR=1 \
    TOKENIZERS_PARALLELISM=false

WORKDIR /opt/alphadrive
COPY . .
RUN python3 -m venv .venv
ENV PATH=/opt/alphadrive/.venv/bin:$PATH
# the package with its [gpu] extra, versions read from pyproject.toml (docker/install-gpu.sh)
RUN ./docker/install-gpu.sh
CMD ["alphadrive-ray", "--help"]
