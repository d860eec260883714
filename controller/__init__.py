"""The controller: registry, devices, rollout engine, REST (FastAPI) and gRPC (grpc.aio) in one process."""
