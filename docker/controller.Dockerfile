# edge-fleet controller image: `fleet controller serve` as a non-root user.
#
# Build from the repository root:  docker build -f docker/controller.Dockerfile -t edge-fleet/controller:0.1.0 .
# Runs with a read-only root filesystem: state lives in /var/lib/fleet (a volume), scratch in /tmp
# (a volume in the Helm chart). Settings are FLEET_* variables (see controller/settings.py).

FROM python:3.11-slim AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
COPY pyproject.toml README.md ./
COPY core core
COPY controller controller
COPY agent agent
COPY cli cli
COPY proto proto
# A virtualenv copied whole into the runtime stage: no compilers or build files there. The
# postgres extra brings psycopg for database.type=postgresql.
RUN python -m venv /opt/fleet \
 && /opt/fleet/bin/pip install ".[postgres]"

FROM python:3.11-slim
ENV PATH=/opt/fleet/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    HOME=/tmp \
    FLEET_DATA_DIR=/var/lib/fleet \
    FLEET_HTTP_HOST=0.0.0.0 \
    FLEET_GRPC_HOST=0.0.0.0
# Fixed ids so Kubernetes' runAsUser/fsGroup (10001) match the files' owner.
RUN groupadd --system --gid 10001 fleet \
 && useradd --system --uid 10001 --gid fleet --home-dir /var/lib/fleet --no-create-home --shell /usr/sbin/nologin fleet \
 && install -d -o fleet -g fleet -m 0750 /var/lib/fleet
COPY --from=build /opt/fleet /opt/fleet
USER 10001:10001
VOLUME ["/var/lib/fleet"]
EXPOSE 8080 50051
ENTRYPOINT ["fleet"]
CMD ["controller", "serve"]
