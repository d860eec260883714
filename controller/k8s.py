"""The thin Kubernetes adapter behind the GitOps loop: exactly three API calls, nothing else.

Rule: everything the controller knows about Kubernetes goes through `KubeApi`, a protocol with
the three calls the GitOps loop makes on `ModelRollout` objects: list them (with the list's
resourceVersion), watch them from a resourceVersion, and patch the status subresource. The loop's
logic (`fleet.controller.gitops`) is tested against an in-process double of this protocol; the
only code that needs a real API server is `KubernetesApi` below, kept small enough to read in
one sitting. Custom objects travel as the plain JSON dicts the API server sends.

Errors are translated once, here: an expired resourceVersion (HTTP 410 Gone, as an error
response or as an ERROR watch event) becomes `GoneError`, so the loop relists; anything else
becomes `KubeApiError` with the HTTP status, so the loop backs off and retries.

The `kubernetes` package is imported only when `KubernetesApi` is built, so a controller with
GitOps disabled never loads it.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Protocol

GROUP = "fleet.edge-fleet.dev"
VERSION = "v1alpha1"
PLURAL = "modelrollouts"
KIND = "ModelRollout"
HTTP_GONE = 410
HTTP_NOT_FOUND = 404


class KubeApiError(Exception):
    """A Kubernetes API call failed; `status` is the HTTP status when there was a response."""

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


class GoneError(KubeApiError):
    """The resourceVersion a watch started from is too old: list again, then watch from the list."""

    def __init__(self, message: str) -> None:
        super().__init__(message, HTTP_GONE)


@dataclass(frozen=True)
class WatchEvent:
    """One watch event: ADDED, MODIFIED, DELETED or BOOKMARK, and the object (a plain dict)."""

    type: str
    object: dict[str, Any]

    @property
    def resource_version(self) -> str:
        return str((self.object.get("metadata") or {}).get("resourceVersion") or "")


class KubeApi(Protocol):
    """The calls the GitOps loop makes. `namespace=None` means every namespace."""

    def list_rollouts(self, namespace: str | None) -> tuple[list[dict[str, Any]], str]:
        """Every ModelRollout, and the list's resourceVersion to watch from."""
        ...

    def watch_rollouts(
        self, namespace: str | None, resource_version: str, timeout_s: int
    ) -> Iterator[WatchEvent]:
        """Changes after `resource_version`; the stream ends after about `timeout_s` seconds.

        Raises GoneError when `resource_version` has expired.
        """
        ...

    def patch_status(self, namespace: str, name: str, status: dict[str, Any]) -> dict[str, Any]:
        """Merge-patch `.status` of one ModelRollout (status subresource); returns the object."""
        ...


class KubernetesApi:
    """`KubeApi` on the official client: `CustomObjectsApi` and `watch.Watch`.

    Loads the in-cluster service-account config when running in a pod, else the kubeconfig
    (`KUBECONFIG` or `~/.kube/config`, optionally a named `context`).
    """

    def __init__(self, context: str | None = None) -> None:
        from kubernetes import client, config

        try:
            config.load_incluster_config()
        except config.ConfigException:
            try:
                config.load_kube_config(context=context)
            except (config.ConfigException, OSError) as exc:
                raise KubeApiError(
                    "GitOps is enabled but no Kubernetes configuration was found: run the controller in a pod "
                    f"with a service account, or set KUBECONFIG ({exc})"
                ) from exc
        self._api = client.CustomObjectsApi()

    def _translate(self, exc: Exception, what: str) -> KubeApiError:
        from kubernetes.client.exceptions import ApiException

        if isinstance(exc, ApiException):
            status = int(exc.status) if exc.status is not None else None
            text = f"{what}: HTTP {status} {exc.reason or ''}".strip()
            if status == HTTP_GONE:
                return GoneError(text)
            return KubeApiError(text, status)
        return KubeApiError(f"{what}: {exc}")

    def list_rollouts(self, namespace: str | None) -> tuple[list[dict[str, Any]], str]:
        try:
            if namespace:
                result = self._api.list_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL)
            else:
                result = self._api.list_cluster_custom_object(GROUP, VERSION, PLURAL)
        except Exception as exc:
            raise self._translate(exc, f"listing {PLURAL}.{GROUP}") from exc
        # Custom objects have no generated model: the client returns the JSON as a dict.
        body: dict[str, Any] = dict(result)  # type: ignore[call-overload]
        items = [dict(item) for item in body.get("items") or []]
        return items, str((body.get("metadata") or {}).get("resourceVersion") or "")

    def watch_rollouts(
        self, namespace: str | None, resource_version: str, timeout_s: int
    ) -> Iterator[WatchEvent]:
        from kubernetes import watch

        kwargs: dict[str, Any] = {
            "resource_version": resource_version, "timeout_seconds": max(1, int(timeout_s)),
            "allow_watch_bookmarks": True,
        }
        if namespace:
            func: Any = self._api.list_namespaced_custom_object
            args: tuple[Any, ...] = (GROUP, VERSION, namespace, PLURAL)
        else:
            func = self._api.list_cluster_custom_object
            args = (GROUP, VERSION, PLURAL)
        w = watch.Watch()
        try:
            # With timeout_seconds set, Watch raises ApiException(410) on an expired version instead of
            # retrying on its own; the loop relists.
            for raw in w.stream(func, *args, **kwargs):
                obj = raw.get("raw_object") or raw.get("object") or {}
                yield WatchEvent(str(raw.get("type") or ""), dict(obj))
        except Exception as exc:
            raise self._translate(exc, f"watching {PLURAL}.{GROUP}") from exc
        finally:
            w.stop()

    def patch_status(self, namespace: str, name: str, status: dict[str, Any]) -> dict[str, Any]:
        try:
            result = self._api.patch_namespaced_custom_object_status(
                GROUP, VERSION, namespace, PLURAL, name, {"status": status}
            )
        except Exception as exc:
            raise self._translate(exc, f"patching status of {KIND} {namespace}/{name}") from exc
        return dict(result)  # type: ignore[call-overload]
