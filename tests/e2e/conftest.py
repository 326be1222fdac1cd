"""Fixtures for the end-to-end tests against a real control plane (see tests/e2e/controlplane.py), and
its one real node (tests/e2e/node.py).

The first run builds the binaries from the Go module proxy (about 10 minutes on 2 cores; cached outside
the repository after), and the first test that asks for `real_node` builds the images (minutes more).
Without Go, or without what the node needs, the tests FAIL, loudly: set KUBETUNE_SKIP_E2E=1 to skip
them instead.
"""

from __future__ import annotations

import contextlib
import os
import re
import secrets
import sys
from collections.abc import Generator, Iterator
from pathlib import Path

import node
import pytest
from controlplane import ControlPlane, ControlPlaneError, build, is_built, poll, start, stop
from node import RealNode, VolumeProvisioner

SKIP = os.environ.get("KUBETUNE_SKIP_E2E") == "1"
E2E_DIR = Path(__file__).resolve().parent


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        "e2e: runs against a real Kubernetes control plane built from source (KUBETUNE_SKIP_E2E=1 skips)",
    )


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if not SKIP:
        return
    skip = pytest.mark.skip(reason="KUBETUNE_SKIP_E2E=1")
    for item in items:
        if E2E_DIR in Path(str(item.fspath)).resolve().parents:
            item.add_marker(skip)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    """On an e2e failure, attach the cluster's state and the components' last log lines."""
    report = yield
    if report.when == "call" and report.failed:
        funcargs = getattr(item, "funcargs", {})
        cp = funcargs.get("control_plane")
        if isinstance(cp, ControlPlane):
            ns = funcargs.get("namespace")
            try:
                report.sections.append(("control plane", cp.dump([ns] if isinstance(ns, str) else [])))
            except Exception as e:  # a dump must never hide the failure itself
                report.sections.append(("control plane", f"could not dump the cluster: {e!r}"))
        real = funcargs.get("real_node")
        if isinstance(real, RealNode):
            try:
                report.sections.append(("real node", real.dump()))
            except Exception as e:
                report.sections.append(("real node", f"could not dump the node: {e!r}"))
    return report


def _shown(pytestconfig: pytest.Config) -> contextlib.AbstractContextManager[object]:
    """Lets a long step's own output through to the terminal, rather than seem hung."""
    capture = pytestconfig.pluginmanager.getplugin("capturemanager")
    return capture.global_and_fixture_disabled() if capture else contextlib.nullcontext()


@pytest.fixture(autouse=True)
def _hub_offline(monkeypatch: pytest.MonkeyPatch) -> None:
    """No e2e test reaches the real Hub: the in-process operator's fit check would fetch config.json of
    the jobs' models from it (tests/e2e/test_operator_unfit.py starts its operator as a process, with a
    stand-in Hub). Per test, and as the attribute huggingface_hub reads at each request: it reads the
    variable once, at import, so the import comes first (imported under the variable, it would stay
    offline for the unit tests of the same session, which talk to stand-ins)."""
    try:
        import huggingface_hub.constants
    except ImportError:
        pass
    else:
        monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # for the operators the tests start as processes


@pytest.fixture(scope="session")
def control_plane(
    tmp_path_factory: pytest.TempPathFactory, pytestconfig: pytest.Config
) -> Iterator[ControlPlane]:
    """One control plane for the whole session: etcd, kube-apiserver, kube-controller-manager,
    kube-scheduler and kwok with fake GPU nodes gpu-a100-0/1 (8 x nvidia.com/gpu each, tainted
    nvidia.com/gpu=present:NoSchedule) and cpu-0."""
    try:
        if is_built():
            build()
        else:
            # A cold build takes about 10 minutes on 2 cores: show its progress rather than seem hung.
            with _shown(pytestconfig):
                print("\nbuilding the e2e control plane from source (once; cached after)", file=sys.stderr)
                build(stream=True)
    except ControlPlaneError as e:
        pytest.fail(
            f"cannot build the e2e control plane (set KUBETUNE_SKIP_E2E=1 to skip): {e}", pytrace=False
        )
    directory = tmp_path_factory.mktemp("controlplane")
    try:
        cp = start(directory, owner_pid=os.getpid())
    except ControlPlaneError as e:
        pytest.fail(str(e), pytrace=False)
    # The default StorageClass and its provisioner, for the whole session: PVCs bind for pods on the
    # KWOK nodes and on the real node alike (hostPath volumes under the real node's folder).
    provisioner = VolumeProvisioner(cp, directory / "node" / "volumes")
    try:
        provisioner.install()
        yield cp
    finally:
        provisioner.stop()
        stop(directory)


@pytest.fixture(scope="session")
def real_node(control_plane: ControlPlane, pytestconfig: pytest.Config) -> Iterator[RealNode]:
    """The one real node, `localhost`: containerd and a kubelet running the trainer, operator and
    faults images built from this checkout (RealNode.trainer_image...). Only pods that carry
    RealNode.placement (its tolerations and node_selector) land there; the KWOK nodes keep the rest."""
    missing = node.missing_prerequisites()
    if missing:
        pytest.fail(
            f"the real e2e node needs {'; and '.join(missing)} (set KUBETUNE_SKIP_E2E=1 to skip)",
            pytrace=False,
        )
    # The images this session built or found: what the node runs, even if someone edits src/ meanwhile.
    names = control_plane.dir / "node-images.env"
    try:
        if node.images_built():
            node.build_images(names)
        else:
            # A cold build downloads and installs the trainer stack (~5 GB): minutes, shown as it goes.
            with _shown(pytestconfig):
                print(
                    "\nbuilding the e2e node's images (once per source change; cached after)", file=sys.stderr
                )
                node.build_images(names, stream=True)
    except ControlPlaneError as e:  # NodeError, or a timeout
        pytest.fail(
            f"cannot build the e2e node's images (set KUBETUNE_SKIP_E2E=1 to skip): {e}", pytrace=False
        )
    try:
        # Shown: the first import of the images into containerd takes minutes.
        with _shown(pytestconfig):
            real = node.start(control_plane, names, owner_pid=os.getpid(), stream=True)
    except ControlPlaneError as e:
        pytest.fail(str(e), pytrace=False)
    try:
        yield real
    finally:
        node.stop(control_plane.dir)


CRD = Path(__file__).resolve().parents[2] / "manifests" / "crd" / "kubetune.io_finetunejobs.yaml"


@pytest.fixture(scope="session")
def crd(control_plane: ControlPlane) -> None:
    """The FineTuneJob CRD, installed as a user would (server-side apply) and Established."""
    control_plane.kubectl("apply", "--server-side", "-f", str(CRD), check=True)
    control_plane.kubectl(
        "wait", "--for=condition=Established", "--timeout=60s", "crd/finetunejobs.kubetune.io", check=True
    )


@pytest.fixture
def namespace(control_plane: ControlPlane, request: pytest.FixtureRequest) -> Iterator[str]:
    """A fresh namespace per test, with its default ServiceAccount (pods need it); deleted afterwards
    without waiting."""
    slug = re.sub(r"[^a-z0-9]+", "-", request.node.name.lower()).strip("-")[:40].strip("-")
    name = f"e2e-{slug}-{secrets.token_hex(3)}"
    control_plane.kubectl("create", "namespace", name, check=True)
    poll(
        lambda: (
            control_plane.kubectl("get", "serviceaccount", "default", f"--namespace={name}").returncode == 0
        ),
        timeout=30,
        what=f"the default ServiceAccount in {name}",
    )
    try:
        yield name
    finally:
        control_plane.kubectl("delete", "namespace", name, "--wait=false", "--ignore-not-found")
