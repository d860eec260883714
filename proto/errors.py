"""The one mapping from domain errors (`fleet.core.errors`) to gRPC status codes.

Both gRPC transports, the controller's agent service and the agent's inference endpoint,
translate errors through `status_for`, so a code means the same thing on every port.
"""

from __future__ import annotations

import grpc

from fleet.core.errors import FleetError

_BY_CODE: dict[str, grpc.StatusCode] = {
    "not_found": grpc.StatusCode.NOT_FOUND,
    "conflict": grpc.StatusCode.FAILED_PRECONDITION,
    "invalid_input": grpc.StatusCode.INVALID_ARGUMENT,
    "bad_inference_input": grpc.StatusCode.INVALID_ARGUMENT,
    "bad_bundle": grpc.StatusCode.INVALID_ARGUMENT,
    "unauthenticated": grpc.StatusCode.UNAUTHENTICATED,
    "permission_denied": grpc.StatusCode.PERMISSION_DENIED,
    "bad_signature": grpc.StatusCode.FAILED_PRECONDITION,
    "integrity": grpc.StatusCode.DATA_LOSS,
    "model_load": grpc.StatusCode.UNAVAILABLE,
    "storage_full": grpc.StatusCode.RESOURCE_EXHAUSTED,
}


def status_for(exc: BaseException) -> tuple[grpc.StatusCode, str]:
    """The status code and message to send for an exception raised by a handler."""
    if isinstance(exc, FleetError):
        return _BY_CODE.get(exc.code, grpc.StatusCode.INTERNAL), exc.message
    return grpc.StatusCode.INTERNAL, f"internal error: {type(exc).__name__}"
