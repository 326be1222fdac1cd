"""The operator's only door to the API server: a few calls, plain dicts in and out, every request counted."""

from __future__ import annotations

import itertools
import json
import logging
from collections.abc import Iterator
from typing import Any

from kubernetes import client, config, watch
from kubernetes.client.rest import ApiException

from kubetune.api.v1alpha1 import GROUP, PLURAL, VERSION
from kubetune.contract import PROGRESS_TAIL_BYTES, PROGRESS_TAIL_LINES

log = logging.getLogger("kubetune.operator")

FIELD_MANAGER = "kubetune-operator"


def load_client(kubeconfig: str | None = None) -> client.ApiClient:
    if kubeconfig:
        cfg = client.Configuration()
        config.load_kube_config(config_file=str(kubeconfig), client_configuration=cfg)
    else:
        try:
            cfg = client.Configuration()
            config.load_incluster_config(client_configuration=cfg)
        except config.ConfigException:
            cfg = client.Configuration()
            config.load_kube_config(client_configuration=cfg)
    return client.ApiClient(cfg)


class CountingApiClient:
    """Wraps `ApiClient.call_api` to count requests (the load test reports requests per object)."""

    def __init__(self, api_client: client.ApiClient) -> None:
        self.api_client = api_client
        self._count = itertools.count()
        self.requests = 0
        original = api_client.call_api

        def counted(*args: Any, **kwargs: Any) -> Any:
            self.requests = next(self._count) + 1
            return original(*args, **kwargs)

        api_client.call_api = counted


def _json(resp: Any) -> Any:
    return json.loads(resp.data)


def is_status(exc: Exception, *codes: int) -> bool:
    return isinstance(exc, ApiException) and exc.status in codes


def api_message(exc: ApiException) -> str:
    """The API server's own words from a refused request (its Status object's message)."""
    try:
        body = json.loads(exc.body or "")
    except (TypeError, ValueError):
        body = None
    if isinstance(body, dict) and body.get("message"):
        return str(body["message"])[:2000]
    return f"{exc.status} {exc.reason}"


# A metadata-only GET: the API server answers with a PartialObjectMetadata, never the object's data.
METADATA_ONLY = "application/json;as=PartialObjectMetadata;g=meta.k8s.io;v=v1"
# A log read must never hold a worker up: the API server proxies it to the node's kubelet.
LOG_TIMEOUT_SECONDS = 5


class Kube:
    def __init__(self, api_client: client.ApiClient) -> None:
        self.counter = CountingApiClient(api_client)
        self.core = client.CoreV1Api(api_client)
        self.batch = client.BatchV1Api(api_client)
        self.custom = client.CustomObjectsApi(api_client)

    @property
    def requests(self) -> int:
        return self.counter.requests

    # FineTuneJobs ------------------------------------------------------------------------------------

    def get_ftj(self, namespace: str, name: str) -> dict[str, Any] | None:
        try:
            return self.custom.get_namespaced_custom_object(  # type: ignore[no-any-return]
                GROUP, VERSION, namespace, PLURAL, name
            )
        except ApiException as e:
            if e.status == 404:
                return None
            raise

    def list_ftj(self, namespace: str | None, **kwargs: Any) -> dict[str, Any]:
        if namespace:
            return self.custom.list_namespaced_custom_object(  # type: ignore[no-any-return]
                GROUP, VERSION, namespace, PLURAL, **kwargs
            )
        return self.custom.list_cluster_custom_object(GROUP, VERSION, PLURAL, **kwargs)  # type: ignore[no-any-return]

    def patch_ftj_status(self, namespace: str, name: str, status: dict[str, Any]) -> None:
        self.custom.patch_namespaced_custom_object_status(
            GROUP, VERSION, namespace, PLURAL, name, {"status": status}, field_manager=FIELD_MANAGER
        )

    # Children ------------------------------------------------------------------------------------------

    def list_jobs(self, namespace: str, selector: str) -> list[dict[str, Any]]:
        resp = self.batch.list_namespaced_job(namespace, label_selector=selector, _preload_content=False)
        return list(_json(resp)["items"])

    def list_pods(self, namespace: str, selector: str) -> list[dict[str, Any]]:
        resp = self.core.list_namespaced_pod(namespace, label_selector=selector, _preload_content=False)
        return list(_json(resp)["items"])

    def get(self, kind: str, namespace: str, name: str) -> dict[str, Any] | None:
        read = {"PersistentVolumeClaim": self.core.read_namespaced_persistent_volume_claim}[kind]
        try:
            return _json(read(name, namespace, _preload_content=False))  # type: ignore[no-any-return]
        except ApiException as e:
            if e.status == 404:
                return None
            raise

    def secret_exists(self, namespace: str, name: str) -> bool:
        """Whether the Secret exists, from its metadata alone (its data never reaches the operator)."""
        try:
            resp = self.core.read_namespaced_secret(
                name, namespace, _headers={"Accept": METADATA_ONLY}, _preload_content=False
            )
        except ApiException as e:
            if e.status == 404:
                return False
            raise
        # Discarded unread: even metadata may carry a Secret's data (kubectl apply's last-applied annotation).
        resp.drain_conn()
        return True

    def pod_log(self, namespace: str, pod: str, container: str) -> str:
        """The end of a container's log: the last PROGRESS_TAIL_LINES lines, at most
        PROGRESS_TAIL_BYTES, within LOG_TIMEOUT_SECONDS."""
        resp = self.core.read_namespaced_pod_log(
            pod,
            namespace,
            container=container,
            tail_lines=PROGRESS_TAIL_LINES,
            limit_bytes=PROGRESS_TAIL_BYTES,
            _request_timeout=LOG_TIMEOUT_SECONDS,
            _preload_content=False,
        )
        return bytes(resp.data).decode("utf-8", errors="replace")

    def create(self, obj: dict[str, Any]) -> dict[str, Any] | None:
        """Create `obj`; None when it already exists (creation is idempotent by name)."""
        ns, kind = obj["metadata"]["namespace"], obj["kind"]
        create = {
            "ConfigMap": self.core.create_namespaced_config_map,
            "Service": self.core.create_namespaced_service,
            "PersistentVolumeClaim": self.core.create_namespaced_persistent_volume_claim,
            "Job": self.batch.create_namespaced_job,
        }[kind]
        try:
            resp = create(ns, obj, field_manager=FIELD_MANAGER, _preload_content=False)
        except ApiException as e:
            if e.status == 409:
                return None
            raise
        return _json(resp)  # type: ignore[no-any-return]

    def patch(self, kind: str, namespace: str, name: str, patch: dict[str, Any]) -> None:
        """A JSON merge patch (lists, such as ownerReferences, are replaced whole)."""
        call = {
            "Job": self.batch.patch_namespaced_job,
            "PersistentVolumeClaim": self.core.patch_namespaced_persistent_volume_claim,
        }[kind]
        call(
            name,
            namespace,
            patch,
            field_manager=FIELD_MANAGER,
            _content_type="application/merge-patch+json",
            _preload_content=False,
        ).drain_conn()

    def delete(self, kind: str, namespace: str, name: str) -> bool:
        """Delete, with the children (pods) going in the background; False when it was not there."""
        body = client.V1DeleteOptions(propagation_policy="Background")
        delete = {
            "ConfigMap": self.core.delete_namespaced_config_map,
            "Service": self.core.delete_namespaced_service,
            "PersistentVolumeClaim": self.core.delete_namespaced_persistent_volume_claim,
            "Job": self.batch.delete_namespaced_job,
        }[kind]
        try:
            delete(name, namespace, body=body, _preload_content=False).drain_conn()
        except ApiException as e:
            if e.status != 404:
                raise
            return False
        return True

    def event(self, ftj: dict[str, Any], type_: str, reason: str, message: str, now: str) -> None:
        meta = ftj["metadata"]
        body = {
            "metadata": {"generateName": f"{meta['name']}.", "namespace": meta["namespace"]},
            "involvedObject": {
                "apiVersion": ftj["apiVersion"],
                "kind": ftj["kind"],
                "name": meta["name"],
                "namespace": meta["namespace"],
                "uid": meta["uid"],
                "resourceVersion": meta.get("resourceVersion"),
            },
            "type": type_,
            "reason": reason,
            "message": message[:1024],
            "source": {"component": FIELD_MANAGER},
            "reportingComponent": FIELD_MANAGER,
            "reportingInstance": FIELD_MANAGER,
            "firstTimestamp": now,
            "lastTimestamp": now,
            "count": 1,
        }
        self.core.create_namespaced_event(meta["namespace"], body)

    # The policy ConfigMap (kubetune.policy): listed and watched by name, a metadata.name field
    # selector, so that RBAC can grant list and watch on that one object (resourceNames).

    def list_config_map(self, namespace: str, name: str) -> dict[str, Any]:
        resp = self.core.list_namespaced_config_map(
            namespace, field_selector=f"metadata.name={name}", _preload_content=False
        )
        return _json(resp)  # type: ignore[no-any-return]

    # Watches -------------------------------------------------------------------------------------------

    def stream(
        self,
        kind: str,
        namespace: str | None,
        selector: str | None,
        resource_version: str,
        timeout: int,
        field_selector: str | None = None,
    ) -> Iterator[dict[str, Any]]:
        """Raw watch events ({"type", "object"}) from `resource_version` on."""
        kwargs: dict[str, Any] = {
            "resource_version": resource_version,
            "timeout_seconds": timeout,
            "allow_watch_bookmarks": True,
        }
        if selector:
            kwargs["label_selector"] = selector
        if field_selector:
            kwargs["field_selector"] = field_selector
        if kind == "ConfigMap":  # the policy ConfigMap only (list_config_map)
            func: Any = self.core.list_namespaced_config_map
            args: tuple[Any, ...] = (namespace,)
        elif kind == "FineTuneJob":
            if namespace:
                func = self.custom.list_namespaced_custom_object
                args = (GROUP, VERSION, namespace, PLURAL)
            else:
                func, args = self.custom.list_cluster_custom_object, (GROUP, VERSION, PLURAL)
        elif kind == "Job":
            func = self.batch.list_namespaced_job if namespace else self.batch.list_job_for_all_namespaces
            args = (namespace,) if namespace else ()
        else:
            func = self.core.list_namespaced_pod if namespace else self.core.list_pod_for_all_namespaces
            args = (namespace,) if namespace else ()
        w = watch.Watch()
        try:
            for event in w.stream(func, *args, **kwargs):
                # raw_object: the JSON as sent, before the client turns it into model classes.
                yield {"type": event["type"], "object": event.get("raw_object") or event["object"]}
        finally:
            w.stop()

    def list_raw(self, kind: str, namespace: str | None, selector: str | None) -> dict[str, Any]:
        kwargs: dict[str, Any] = {"label_selector": selector} if selector else {}
        if kind == "FineTuneJob":
            return self.list_ftj(namespace, **kwargs)
        if kind == "Job":
            if namespace:
                resp = self.batch.list_namespaced_job(namespace, _preload_content=False, **kwargs)
            else:
                resp = self.batch.list_job_for_all_namespaces(_preload_content=False, **kwargs)
        elif namespace:
            resp = self.core.list_namespaced_pod(namespace, _preload_content=False, **kwargs)
        else:
            resp = self.core.list_pod_for_all_namespaces(_preload_content=False, **kwargs)
        return _json(resp)  # type: ignore[no-any-return]
