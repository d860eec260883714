# edge-fleet device agent image: `fleet agent run` as a non-root user.
#
# Build from the repository root:  docker build -f docker/agent.Dockerfile -t edge-fleet/agent:0.1.0 .
# Multi-arch (Jetson, Raspberry Pi): docker buildx build --platform linux/amd64,linux/arm64 ...
# Runs with a read-only root filesystem: state (identity, model slots, spool) lives in
# /var/lib/fleet-agent (a hostPath in the Helm chart), scratch in /tmp. Settings are FLEET_*
# variables and `fleet agent run` options (see `fleet agent run --help`).

FROM python:3.11-slim AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
COPY pyproject.toml README.md ./
COPY core core
COPY controller controller
COPY agent agent
COPY cli cli
COPY proto proto
RUN python -m venv /opt/fleet \
 && /opt/fleet/bin/pip install .

FROM python:3.11-slim
ENV PATH=/opt/fleet/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    HOME=/tmp \
    FLEET_AGENT_DATA_DIR=/var/lib/fleet-agent \
    FLEET_INFERENCE_ADDR=0.0.0.0:8001
RUN groupadd --system --gid 10001 fleet \
 && useradd --system --uid 10001 --gid fleet --home-dir /var/lib/fleet-agent --no-create-home --shell /usr/sbin/nologin fleet \
 && install -d -o fleet -g fleet -m 0750 /var/lib/fleet-agent
COPY --from=build /opt/fleet /opt/fleet
USER 10001:10001
VOLUME ["/var/lib/fleet-agent"]
EXPOSE 8001
ENTRYPOINT ["fleet"]
CMD ["agent", "run"]
