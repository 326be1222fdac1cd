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

    def create(self, obj: dict[str, Any]) -> dict[str, Any] | None:
        """Create `obj`; None when it already exists (creation is idempotent by name)."""
        ns, kind = obj["metadata"]["namespace"], obj["kind"]
        create = {
            "ConfigMap": self.core.create_namespaced_config_map,
            "Service": self.core.create_namespaced_service,
            "Job": self.batch.create_namespaced_job,
        }[kind]
        try:
            resp = create(ns, obj, field_manager=FIELD_MANAGER, _preload_content=False)
        except ApiException as e:
            if e.status == 409:
                return None
            raise
        return _json(resp)  # type: ignore[no-any-return]

    def patch_job(self, namespace: str, name: str, patch: dict[str, Any]) -> None:
        self.batch.patch_namespaced_job(name, namespace, patch, field_manager=FIELD_MANAGER)

    def delete(self, kind: str, namespace: str, name: str) -> None:
        """Delete, with the children (pods) going in the background; a missing object is fine."""
        body = client.V1DeleteOptions(propagation_policy="Background")
        delete = {
            "ConfigMap": self.core.delete_namespaced_config_map,
            "Service": self.core.delete_namespaced_service,
            "Job": self.batch.delete_namespaced_job,
        }[kind]
        try:
            delete(name, namespace, body=body)
        except ApiException as e:
            if e.status != 404:
                raise

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

    # Watches -------------------------------------------------------------------------------------------

    def stream(
        self, kind: str, namespace: str | None, selector: str | None, resource_version: str, timeout: int
    ) -> Iterator[dict[str, Any]]:
        """Raw watch events ({"type", "object"}) from `resource_version` on."""
        kwargs: dict[str, Any] = {
            "resource_version": resource_version,
            "timeout_seconds": timeout,
            "allow_watch_bookmarks": True,
        }
        if selector:
            kwargs["label_selector"] = selector
        if kind == "FineTuneJob":
            if namespace:
                func: Any = self.custom.list_namespaced_custom_object
                args: tuple[Any, ...] = (GROUP, VERSION, namespace, PLURAL)
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
