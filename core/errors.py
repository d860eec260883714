"""One error hierarchy for the whole system.

Every domain error ends in `Error` and derives from `FleetError`. Each transport maps the
hierarchy to its status codes in one place (FastAPI exception handlers, a gRPC helper), so a
handler raises the domain error and never builds a status code itself.
"""

from __future__ import annotations


class FleetError(Exception):
    """Base of every error the system raises on purpose. `code` is a stable machine name."""

    code = "internal"

    def __init__(self, message: str, **details: object) -> None:
        super().__init__(message)
        self.message = message
        self.details = details

    def __str__(self) -> str:
        return self.message


class NotFoundError(FleetError):
    code = "not_found"


class ConflictError(FleetError):
    """The request is valid but clashes with the current state (version exists, model in use)."""

    code = "conflict"


class InvalidInputError(FleetError):
    """The request itself is malformed or out of range."""

    code = "invalid_input"


class AuthenticationError(FleetError):
    code = "unauthenticated"


class PermissionDeniedError(FleetError):
    code = "permission_denied"


class BundleError(FleetError):
    """A bundle archive or its manifest is malformed, unsafe or inconsistent."""

    code = "bad_bundle"


class SignatureError(FleetError):
    """Signed metadata does not verify: wrong key, too few signatures, tampered bytes, expired."""

    code = "bad_signature"


class IntegrityError(FleetError):
    """Downloaded bytes do not match the signed length or hashes."""

    code = "integrity"


class ModelLoadError(FleetError):
    """The model file could not be opened by the runtime or does not match its manifest."""

    code = "model_load"


class InferenceInputError(FleetError):
    """An inference request does not fit the model's input signature."""

    code = "bad_inference_input"


class StorageFullError(FleetError):
    code = "storage_full"
