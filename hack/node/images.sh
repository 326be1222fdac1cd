#!/usr/bin/env bash
# The images of the e2e node, built here with podman from the repository's Dockerfile (no registry is
# reachable): a Debian trixie base bootstrapped with mmdebstrap, then the trainer and operator images,
# and the test-only pause and faults images of tests/e2e/images/.
#
#   images.sh build          build what is missing for the current sources (a no-op when all are there)
#   images.sh check          exit 0 when every image is built for the current sources, else 1
#   images.sh names          print NAME=IMAGE for base, pause, trainer, operator, faults
#   images.sh load ADDRESS   import into the containerd at ADDRESS (namespace k8s.io) the images it
#                            lacks, and remove the kubetune images of other sources from it
#   images.sh podman ARGS    run podman on the private image store (e.g. `images.sh podman images`)
#
# Every image is named localhost/kubetune-<name>:<key>, where the key is a hash of what goes into it
# (the base recipe, the Dockerfile, pyproject.toml, uv.lock, README.md, src/, operator/, jobs/, the test
# image folder), so a change to any of them builds a new image and an unchanged tree builds nothing.
#
# Environment:
#   KUBETUNE_NODE_CACHE   cache root (default: ~/.cache/kubetune/node): podman's image store lives in
#                         it (so `rm -rf` of it resets everything and no other podman image is touched)
#   KUBETUNE_UV_CACHE     uv cache the builds share with the host (default: uv's, ~/.cache/uv);
#                         KUBETUNE_UV_CACHE=off builds without one, as a published build does
#   KUBETUNE_NODE_IMAGES  a file: `build` writes the NAME=IMAGE lines of what it built there, and
#                         `check`, `names` and `load` then take the images from it rather than from
#                         the sources as they are now (which someone may have edited since the build)
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(cd "${HERE}/../.." && pwd)"
LOG_PREFIX=images
# shellcheck source=hack/lib.sh
source "${HERE}/../lib.sh"

CACHE_ROOT="${KUBETUNE_NODE_CACHE:-${HOME}/.cache/kubetune/node}"
STORE="${CACHE_ROOT}/podman"
# podman's run-time state (locks, mounts) belongs on a tmpfs that a reboot clears.
RUNROOT="/run/kubetune-podman-$(printf '%s' "${STORE}" | sha256sum | cut -c1-8)"
IMAGES=(base pause trainer operator faults)

# The base: everything the Dockerfile needs from Debian, so that the build installs nothing from apt.
BASE_SUITE=trixie
BASE_INCLUDE=python3,python3-venv,ca-certificates
# What `podman import` cannot know about a rootfs tarball: the config of Docker Hub's debian images.
BASE_CHANGES=("ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin" 'CMD ["bash"]')

pman() { podman --root "${STORE}" --runroot "${RUNROOT}" --storage-driver overlay "$@"; }

# sha256 of FILES/FOLDERS under ROOT (names and contents), leaving out what .dockerignore leaves out
# of the build context, so that running the tests (__pycache__) never changes a key.
hash_tree() {
  (
    cd "${ROOT}"
    find "$@" \( -name __pycache__ -o -name '*.egg-info' -o -name .mypy_cache -o -name .pytest_cache \
      -o -name .ruff_cache \) -prune -o -type f ! -name '*.py[cod]' ! -name .DS_Store -print0 |
      LC_ALL=C sort -z | xargs -0 sha256sum
  ) | sha256sum | cut -c1-64
}

# key PARENT_KEY PATHS...: the key of an image made from its parent's and these files.
key() {
  local parent="$1"
  shift
  printf '%s %s\n' "${parent}" "$(hash_tree "$@")" | sha256sum | cut -c1-12
}

compute_names() {
  local base pause app faults
  base="$(printf '%s\n' "mmdebstrap --variant=minbase --include=${BASE_INCLUDE} ${BASE_SUITE}" "${BASE_CHANGES[@]}" |
    sha256sum | cut -c1-12)"
  pause="$(key "${base}" tests/e2e/images/pause)"
  app="$(key "${base}" Dockerfile .dockerignore pyproject.toml uv.lock README.md src operator/pyproject.toml operator/README.md operator/src jobs)"
  faults="$(key "${app}" tests/e2e/images/faults)"
  declare -gA NAME=(
    [base]="localhost/kubetune-base:${BASE_SUITE}-${base}"
    [pause]="localhost/kubetune-pause:${pause}"
    [trainer]="localhost/kubetune-trainer:${app}"
    [operator]="localhost/kubetune-operator:${app}"
    [faults]="localhost/kubetune-faults:${faults}"
  )
}

# The names of the last build (KUBETUNE_NODE_IMAGES), else those of the current sources.
load_names() {
  local file="${KUBETUNE_NODE_IMAGES:-}" n image
  if [[ -z "${file}" || ! -s "${file}" ]]; then
    compute_names
    return 0
  fi
  declare -gA NAME=()
  while IFS='=' read -r n image; do
    [[ -n "${n}" ]] && NAME[${n}]="${image}"
  done <"${file}"
  for n in "${IMAGES[@]}"; do
    [[ -n "${NAME[${n}]:-}" ]] || die "${file} names no ${n} image"
  done
}

write_names() {
  [[ -n "${KUBETUNE_NODE_IMAGES:-}" ]] || return 0
  local n
  for n in "${IMAGES[@]}"; do
    printf '%s=%s\n' "${n}" "${NAME[${n}]}"
  done >"${KUBETUNE_NODE_IMAGES}"
}

exists() { pman image exists "$1"; }

require() {
  local missing=() c
  for c in "$@"; do
    command -v "${c}" >/dev/null 2>&1 || missing+=("${c}")
  done
  [[ ${#missing[@]} -eq 0 ]] || die "missing: ${missing[*]}; run hack/node/install-deps.sh (as root)"
}

size_of() { pman image inspect --format '{{.Size}}' "$1" | awk '{ printf "%.0f MB", $1 / 1e6 }'; }

build_base() {
  local name="$1" tmp start=${SECONDS}
  tmp="$(mktemp -d "${CACHE_ROOT}/base.XXXXXX")"
  log "bootstrapping ${name}: mmdebstrap --variant=minbase --include=${BASE_INCLUDE} ${BASE_SUITE}"
  mmdebstrap --quiet --variant=minbase --include="${BASE_INCLUDE}" "${BASE_SUITE}" "${tmp}/rootfs.tar"
  local changes=() c
  for c in "${BASE_CHANGES[@]}"; do
    changes+=(--change "${c}")
  done
  pman import --quiet "${changes[@]}" "${tmp}/rootfs.tar" "${name}" >/dev/null
  rm -rf "${tmp}"
  log "base ${name} in $((SECONDS - start)) s ($(size_of "${name}"))"
}

# podman_build NAME CONTEXT ARGS...: the settings every build here needs.
podman_build() {
  local name="$1" context="$2" start=${SECONDS} nofile nproc
  shift 2
  read -r nofile nproc <<<"$(container_rlimits)"
  local args=(
    # The host's network: the build reaches PyPI the way the host does, and podman sets up no bridge
    # or NAT rules of its own.
    --network=host
    # podman's default rlimits are higher than runc may set here (see container_rlimits).
    --ulimit "nofile=${nofile}:${nofile}" --ulimit "nproc=${nproc}:${nproc}"
    # The host's CA bundle over the image's, for the build steps only (not committed): a machine
    # whose egress goes through a TLS proxy trusts that proxy's CA there.
    --volume "${SSL_CERT_FILE:-/etc/ssl/certs/ca-certificates.crt}:/etc/ssl/certs/ca-certificates.crt:ro"
    --layers --force-rm --tag "${name}"
  )
  log "building ${name}"
  pman build "${args[@]}" "$@" "${context}"
  log "built ${name} in $((SECONDS - start)) s ($(size_of "${name}"))"
}

cmd_build() {
  require podman mmdebstrap
  [[ ${EUID} -eq 0 ]] || die "building needs root (podman's store is shared with the root-only node)"
  compute_names
  mkdir -p "${CACHE_ROOT}"
  exec {lock_fd}>"${CACHE_ROOT}/.build.lock"
  if ! flock -n "${lock_fd}"; then
    log "another build is running; waiting for it"
    flock "${lock_fd}"
  fi
  local todo=() n
  for n in "${IMAGES[@]}"; do
    exists "${NAME[${n}]}" || todo+=("${n}")
  done
  if [[ ${#todo[@]} -eq 0 ]]; then
    log "images present: ${NAME[trainer]} (and ${NAME[operator]}, ${NAME[faults]}, ${NAME[pause]})"
    write_names
    return 0
  fi
  local start=${SECONDS}
  log "building ${todo[*]} (cached in ${STORE}); a cold build downloads ~5 GB from PyPI and takes ~5 min"
  exists "${NAME[base]}" || build_base "${NAME[base]}"
  exists "${NAME[pause]}" || podman_build "${NAME[pause]}" "${ROOT}/tests/e2e/images/pause" \
    --build-arg BASE_IMAGE="${NAME[base]}"

  local uv=()
  if [[ "${KUBETUNE_UV_CACHE:-}" != off ]]; then
    local uv_cache="${KUBETUNE_UV_CACHE:-${UV_CACHE_DIR:-${XDG_CACHE_HOME:-${HOME}/.cache}/uv}}"
    mkdir -p "${uv_cache}"
    uv=(--volume "${uv_cache}:/uv-cache" --build-arg UV_NO_CACHE=0 --build-arg UV_CACHE_DIR=/uv-cache)
  fi
  for n in operator trainer; do
    exists "${NAME[${n}]}" || podman_build "${NAME[${n}]}" "${ROOT}" --file "${ROOT}/Dockerfile" \
      --target "${n}" --build-arg BASE_IMAGE="${NAME[base]}" "${uv[@]}"
  done
  exists "${NAME[faults]}" || podman_build "${NAME[faults]}" "${ROOT}/tests/e2e/images/faults" \
    --build-arg TRAINER_IMAGE="${NAME[trainer]}"
  prune_podman
  write_names
  log "images built in $((SECONDS - start)) s"
}

# Other keys' images go once they are 6 hours old (their layers that newer images share stay): a
# younger one may belong to a test session that built it a moment ago and is importing it now.
# Intermediate build stages stay: they are the layer cache that keeps a source change from
# reinstalling torch.
prune_podman() {
  local keep=" ${NAME[*]} " old
  while read -r old; do
    [[ "${keep}" == *" ${old} "* ]] || pman rmi --force "${old}" >/dev/null 2>&1 || true
  done < <(pman images --filter until=6h --format '{{.Repository}}:{{.Tag}}' | grep '^localhost/kubetune-' || true)
}

cmd_check() {
  load_names
  local n
  for n in "${IMAGES[@]}"; do
    exists "${NAME[${n}]}" || return 1
  done
}

cmd_names() {
  load_names
  local n
  for n in "${IMAGES[@]}"; do
    printf '%s=%s\n' "${n}" "${NAME[${n}]}"
  done
}

cmd_load() {
  local address="$1"
  require ctr podman
  load_names
  ctr_() { ctr --address "${address}" --namespace k8s.io "$@"; }
  local have want=() n
  have=" $(ctr_ images ls --quiet | tr '\n' ' ') "
  for n in pause trainer operator faults; do
    [[ "${have}" == *" ${NAME[${n}]} "* ]] || want+=("${NAME[${n}]}")
  done
  if [[ ${#want[@]} -gt 0 ]]; then
    local start=${SECONDS}
    for n in "${want[@]}"; do
      exists "${n}" || die "${n} is not built: run '$0 build' first"
    done
    log "importing ${want[*]} into containerd"
    # A pipe, not a file: no second copy of the 5 GB on disk. containerd stores each layer once.
    pman save --quiet --format docker-archive --multi-image-archive "${want[@]}" |
      ctr_ images import - >/dev/null
    log "imported in $((SECONDS - start)) s"
  fi
  # containerd keeps what podman keeps (see prune_podman), with the sha256:<id> references the CRI
  # plugin adds for each image; its garbage collector then frees what only the others used.
  local keep=" " name
  while read -r name; do
    keep+="${name} $(pman image inspect --format 'sha256:{{.Id}}' "${name}") "
  done < <(pman images --format '{{.Repository}}:{{.Tag}}' | grep '^localhost/kubetune-')
  local stale=() old
  while read -r old; do
    [[ "${keep}" == *" ${old} "* ]] || stale+=("${old}")
  done < <(ctr_ images ls --quiet | grep -E '^(localhost/kubetune-|sha256:)' || true)
  [[ ${#stale[@]} -eq 0 ]] || ctr_ images rm "${stale[@]}" >/dev/null
}

usage() { sed -n '2,/^set -euo/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//'; }

main() {
  local cmd="${1:-}"
  [[ $# -gt 0 ]] && shift
  case "${cmd}" in
    build) cmd_build ;;
    check) cmd_check ;;
    names) cmd_names ;;
    load)
      [[ $# -eq 1 ]] || die "usage: $0 load CONTAINERD_ADDRESS"
      cmd_load "$1"
      ;;
    podman) pman "$@" ;;
    -h | --help | help) usage ;;
    *)
      usage >&2
      exit 2
      ;;
  esac
}

main "$@"
