# CPU image: the embedded demo, the test suite and CPU-only Ray clusters. It installs with the
# README's own set-up script (scripts/setup.sh), so a fresh machine and the image cannot drift.
#
#   docker build -f docker/cpu.Dockerfile -t alphadrive-ray:cpu .
#   docker run --rm alphadrive-ray:cpu alphadrive-ray train jobs/quickstart_cpu.yaml
#   docker run --rm alphadrive-ray:cpu python -m pytest -q
FROM python:3.11-slim-bookworm

# Ray must be the same version on every node and on the machine that submits jobs; the
# constraint holds pip (inside scripts/setup.sh too) to it.
ARG RAY_VERSION=2.60.0
RUN mkdir -p /etc/alphadrive /usr/share/man/man1 \
    && echo "ray==${RAY_VERSION}" > /etc/alphadrive/constraints.txt
ENV PIP_CONSTRAINT=/etc/alphadrive/constraints.txt \
    PIP_NO_CACHE_DIR=1 \
    TOKENIZERS_PARALLELISM=false

WORKDIR /opt/alphadrive
COPY . .
# Java (METEOR), .venv, torch + torchvision, the package: exactly the README's first step.
RUN ./scripts/setup.sh
# `python`, `ray` and `alphadrive-ray` are the venv's, for users and for Ray job entrypoints
ENV PATH=/opt/alphadrive/.venv/bin:$PATH
CMD ["alphadrive-ray", "--help"]
