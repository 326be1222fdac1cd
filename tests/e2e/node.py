"""The real e2e node and the e2e volume provisioner, driven through hack/node/{images,node}.sh.

`images.sh build` makes the trainer, operator, faults and pause images from the repository with podman
(cached by content under ~/.cache/kubetune/node; minutes cold, a no-op after); `node.sh start DIR` runs
containerd and a kubelet against the control plane in DIR and imports the images. The node is
`localhost`, tainted and labelled kubetune.io/e2e-node=real: only pods that carry `RealNode.placement`
land on it.

`VolumeProvisioner` plays a dynamic provisioner for the default StorageClass `kubetune-local`: a
hostPath PersistentVolume per claim, pre-bound through its claimRef, in a directory owned by the
trainer's uid. hostPath volumes without node affinity also bind for pods on the KWOK nodes.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from controlplane import ROOT, ControlPlane, ControlPlaneError, _env, _run_script, _tail

NODE_SCRIPT = ROOT / "hack" / "node" / "node.sh"
IMAGES_SCRIPT = ROOT / "hack" / "node" / "images.sh"
INSTALL_SCRIPT = ROOT / "hack" / "node" / "install-deps.sh"

# A cold image build downloads the trainer stack (~5 GB) and writes it twice; a cold import unpacks it.
IMAGES_TIMEOUT_S = float(os.environ.get("KUBETUNE_E2E_IMAGES_TIMEOUT", 3600))
START_TIMEOUT_S = 900.0

LABEL_KEY, LABEL_VALUE = "kubetune.io/e2e-node", "real"
TRAINER_UID = 1000  # the images' USER (Dockerfile)

STORAGE_CLASS = "kubetune-local"
PROVISIONER = "kubetune.io/e2e-local"
STORAGE_CLASS_OBJECT: dict[str, Any] = {
    "apiVersion": "storage.k8s.io/v1",
    "kind": "StorageClass",
    "metadata": {
        "name": STORAGE_CLASS,
        "annotations": {"storageclass.kubernetes.io/is-default-class": "true"},
    },
    "provisioner": PROVISIONER,
    "reclaimPolicy": "Delete",
    "volumeBindingMode": "Immediate",
}

# What the node needs on the host, as (how to find it, the Debian package that has it).
PREREQUISITES = (
    ("podman", "podman"),
    ("mmdebstrap", "mmdebstrap"),
    ("containerd", "containerd"),
    ("ctr", "containerd"),
    ("runc", "runc"),
    ("ip", "iproute2"),
    ("/usr/lib/cni/bridge", "containernetworking-plugins"),
)


class NodeError(ControlPlaneError):
    """The real node could not be built, started or used."""


def missing_prerequisites() -> list[str]:
    """What is missing for the real node, each as a sentence that says what to install."""
    missing: list[str] = []
    if os.geteuid() != 0:
        missing.append("root (containerd, runc, mounts and network namespaces need it)")
    packages = sorted(
        {
            package
            for probe, package in PREREQUISITES
            if not (os.path.exists(probe) if probe.startswith("/") else shutil.which(probe))
        }
    )
    if packages:
        missing.append(
            f"the Debian packages {' '.join(packages)} "
            f"(`{INSTALL_SCRIPT.relative_to(ROOT)}` installs them; `make node-deps`)"
        )
    return missing


def images_built() -> bool:
    return _run_script("check", timeout=120, script=IMAGES_SCRIPT).returncode == 0


def build_images(names: Path, *, stream: bool = False) -> None:
    """Build the images that are missing for the current sources, and write their names to `names`
    (what `start` then runs: the sources may change meanwhile). stream=True shows the build."""
    cmd = ["bash", str(IMAGES_SCRIPT), "build"]
    env = {"KUBETUNE_NODE_IMAGES": str(names)}
    if stream:
        try:
            rc = subprocess.run(
                cmd, stdin=subprocess.DEVNULL, env={**_env(), **env}, timeout=IMAGES_TIMEOUT_S
            ).returncode
        except subprocess.TimeoutExpired as e:
            raise NodeError(f"{shlex.join(cmd)} timed out after {IMAGES_TIMEOUT_S:.0f} s") from e
        if rc != 0:
            raise NodeError(f"`{IMAGES_SCRIPT.relative_to(ROOT)} build` failed (exit {rc}, output above)")
    else:
        proc = _run_script("build", timeout=IMAGES_TIMEOUT_S, env=env, script=IMAGES_SCRIPT)
        if proc.returncode != 0:
            raise NodeError(
                f"`{IMAGES_SCRIPT.relative_to(ROOT)} build` failed (exit {proc.returncode}):\n"
                f"{_tail(proc.stdout + proc.stderr)}"
            )


def start(cp: ControlPlane, images: Path, *, owner_pid: int | None = None, stream: bool = False) -> RealNode:
    """Start containerd and a kubelet for the control plane `cp` (state under cp.dir/node) with the
    images named in `images` (build_images wrote it), and wait for the node to be Ready; with
    owner_pid, it stops by itself once that process is gone.

    stream=True lets the script's progress through (the first import into containerd takes minutes).
    """
    owner = {"KUBETUNE_NODE_IMAGES": str(images)}
    if owner_pid:
        owner["NODE_OWNER_PID"] = str(owner_pid)
    cmd = ["bash", str(NODE_SCRIPT), "start", str(cp.dir)]
    if stream:
        try:
            rc = subprocess.run(
                cmd, stdin=subprocess.DEVNULL, env={**_env(), **owner}, timeout=START_TIMEOUT_S
            ).returncode
        except subprocess.TimeoutExpired as e:
            stop(cp.dir)
            raise NodeError(f"{shlex.join(cmd)} timed out after {START_TIMEOUT_S:.0f} s") from e
        output = ""
    else:
        try:
            proc = _run_script("start", str(cp.dir), timeout=START_TIMEOUT_S, env=owner, script=NODE_SCRIPT)
        except ControlPlaneError as e:  # timed out: what it started must not outlive the session
            stop(cp.dir)
            raise NodeError(str(e)) from e
        rc, output = proc.returncode, proc.stderr
    if rc != 0:
        stop(cp.dir)
        raise NodeError(
            f"`node.sh start` failed (exit {rc}){':' if output else ' (output above)'}\n{_tail(output)}"
        )
    env = dict(
        line.split("=", 1) for line in (cp.dir / "node" / "env").read_text().splitlines() if "=" in line
    )
    return RealNode(
        cp=cp,
        name=env["name"],
        dir=cp.dir / "node",
        volumes=Path(env["volumes"]),
        trainer_image=env["image_trainer"],
        operator_image=env["image_operator"],
        faults_image=env["image_faults"],
        pause_image=env["image_pause"],
        start_log=output,
    )


def stop(directory: Path) -> None:
    proc = _run_script("stop", str(directory), timeout=180, script=NODE_SCRIPT)
    if proc.returncode != 0:
        raise NodeError(
            f"`node.sh stop` failed (exit {proc.returncode}):\n{_tail(proc.stdout + proc.stderr)}"
        )


@dataclass
class RealNode:
    """The one real node: what a test needs to run pods there and look at what they did."""

    cp: ControlPlane = field(repr=False)
    name: str
    dir: Path
    volumes: Path
    trainer_image: str
    operator_image: str
    faults_image: str
    pause_image: str
    start_log: str = field(default="", repr=False)

    @property
    def tolerations(self) -> list[dict[str, str]]:
        """Tolerate the node's taint: a FineTuneJob's `spec.resources.tolerations` (or a pod's)."""
        return [{"key": LABEL_KEY, "operator": "Equal", "value": LABEL_VALUE, "effect": "NoSchedule"}]

    @property
    def node_selector(self) -> dict[str, str]:
        """Select the node: a FineTuneJob's `spec.resources.nodeSelector` (or a pod's)."""
        return {LABEL_KEY: LABEL_VALUE}

    @property
    def placement(self) -> dict[str, Any]:
        """Both, to merge into a FineTuneJob's spec.resources or a pod's spec."""
        return {"tolerations": self.tolerations, "nodeSelector": self.node_selector}

    @property
    def log_dir(self) -> Path:
        """containerd.log and kubelet.log."""
        return self.dir / "logs"

    def logs(self, namespace: str, pod: str, *, container: str | None = None, previous: bool = False) -> str:
        """A container's log as `kubectl logs` reads it: API server -> kubelet -> containerd's file."""
        args = ["logs", pod, f"--namespace={namespace}"]
        if container:
            args.append(f"--container={container}")
        if previous:
            args.append("--previous")
        return self.cp.kubectl(*args, check=True).stdout

    def evict(self, namespace: str, pod: str, *, grace_period_seconds: int | None = None) -> None:
        """Evict through the Eviction API (what `kubectl drain` and the cluster autoscaler do): the pod
        gets a DisruptionTarget condition and its containers SIGTERM, with its own grace period unless
        one is given."""
        body: dict[str, Any] = {
            "apiVersion": "policy/v1",
            "kind": "Eviction",
            "metadata": {"name": pod, "namespace": namespace},
        }
        if grace_period_seconds is not None:
            body["deleteOptions"] = {"gracePeriodSeconds": grace_period_seconds}
        self.cp.kubectl(
            "create",
            "--raw",
            f"/api/v1/namespaces/{namespace}/pods/{pod}/eviction",
            "-f",
            "-",
            input=json.dumps(body),
            check=True,
        )

    def volume_dir(self, namespace: str, claim: str) -> Path:
        """The host directory behind a bound PersistentVolumeClaim (to read what a pod wrote there)."""
        pvc = self.cp.get("pvc", claim, f"--namespace={namespace}")
        volume = pvc["spec"].get("volumeName")
        if not volume:
            raise NodeError(
                f"PVC {namespace}/{claim} is not bound (phase {pvc.get('status', {}).get('phase')})"
            )
        path = self.cp.get("pv", volume)["spec"].get("hostPath", {}).get("path")
        if not path:
            raise NodeError(f"PV {volume} of {namespace}/{claim} is not a hostPath volume")
        return Path(path)

    def dump(self, lines: int = 40) -> str:
        """The node's conditions, its containers, and the last lines of the kubelet's and containerd's
        logs, for failure messages."""
        parts = [self.cp.kubectl("describe", "node", self.name).stdout[-3000:]]
        for name in ("kubelet", "containerd"):
            log = self.log_dir / f"{name}.log"
            text = log.read_text(errors="replace") if log.exists() else "(no log)"
            parts.append(f"--- {name}.log\n{_tail(text, lines)}")
        return "\n".join(parts)


class VolumeProvisioner:
    """A dynamic provisioner for StorageClass kubetune-local, for the whole test session.

    Level-triggered: every `interval` seconds it lists the claims and volumes, creates a hostPath PV
    (pre-bound through claimRef; the binder controller does the rest) for each pending claim of the
    class, and deletes the PV and its directory once the claim is gone (reclaim policy Delete).
    The directory is owned by uid/gid 1000: fsGroup does not apply to hostPath volumes.
    """

    def __init__(self, cp: ControlPlane, root: Path, *, interval: float = 0.5) -> None:
        from kubernetes import client, config

        self.cp = cp
        self.root = root
        self.interval = interval
        self.errors: list[str] = []
        # The Python client, not kubectl: two lists every half second cost the API server and this
        # process next to nothing, where two kubectl processes would cost a core a tenth of its time.
        self._api = client.CoreV1Api(config.new_client_from_config(config_file=str(cp.kubeconfig)))
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="e2e-volume-provisioner", daemon=True)

    def install(self) -> None:
        """Create the StorageClass (the default one) and start provisioning."""
        self.root.mkdir(parents=True, exist_ok=True)
        self.cp.apply(STORAGE_CLASS_OBJECT)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=30)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.reconcile()
            except Exception as e:  # the API server may be busy or restarting: try again next round
                self.errors = [*self.errors[-9:], repr(e)]
            self._stop.wait(self.interval)

    @staticmethod
    def _items(response: Any) -> list[dict[str, Any]]:
        items: list[dict[str, Any]] = json.loads(response.data)["items"]
        return items

    def reconcile(self) -> None:
        claims = self._items(
            self._api.list_persistent_volume_claim_for_all_namespaces(_preload_content=False)
        )
        ours = {
            pv["metadata"]["name"]: pv
            for pv in self._items(self._api.list_persistent_volume(_preload_content=False))
            if (pv["metadata"].get("annotations") or {}).get("pv.kubernetes.io/provisioned-by") == PROVISIONER
        }
        for claim in claims:
            spec, meta = claim["spec"], claim["metadata"]
            if spec.get("storageClassName") != STORAGE_CLASS or spec.get("volumeName"):
                continue
            if meta.get("deletionTimestamp") or f"pvc-{meta['uid']}" in ours:
                continue
            self._provision(claim)
        live = {c["metadata"]["uid"] for c in claims}
        for name, pv in ours.items():
            ref = pv["spec"].get("claimRef") or {}
            if ref.get("uid") not in live or (pv.get("status") or {}).get("phase") == "Released":
                self._delete(name, pv)

    def _provision(self, claim: dict[str, Any]) -> None:
        from kubernetes.client import ApiException

        meta, spec = claim["metadata"], claim["spec"]
        name = f"pvc-{meta['uid']}"
        path = self.root / name
        path.mkdir(parents=True, exist_ok=True)
        os.chown(path, TRAINER_UID, TRAINER_UID)
        path.chmod(0o775)
        requests = (spec.get("resources") or {}).get("requests") or {}
        volume = {
            "apiVersion": "v1",
            "kind": "PersistentVolume",
            "metadata": {"name": name, "annotations": {"pv.kubernetes.io/provisioned-by": PROVISIONER}},
            "spec": {
                "capacity": {"storage": requests.get("storage", "1Gi")},
                "accessModes": spec.get("accessModes") or ["ReadWriteOnce"],
                "volumeMode": spec.get("volumeMode") or "Filesystem",
                "persistentVolumeReclaimPolicy": "Delete",
                "storageClassName": STORAGE_CLASS,
                "hostPath": {"path": str(path), "type": "Directory"},
                "claimRef": {
                    "apiVersion": "v1",
                    "kind": "PersistentVolumeClaim",
                    "namespace": meta["namespace"],
                    "name": meta["name"],
                    "uid": meta["uid"],
                },
            },
        }
        try:
            self._api.create_persistent_volume(volume, _preload_content=False)
        except ApiException as e:
            if e.status != 409:  # already there: made in an earlier round
                raise

    def _delete(self, name: str, pv: dict[str, Any]) -> None:
        from kubernetes.client import ApiException

        try:
            self._api.delete_persistent_volume(name, _preload_content=False)
        except ApiException as e:
            if e.status != 404:
                raise
        path = Path((pv["spec"].get("hostPath") or {}).get("path", ""))
        if path.parent == self.root:  # never anything outside our own folder
            shutil.rmtree(path, ignore_errors=True)
