#!/usr/bin/env bash
# Builds helm (helm.sh/helm/v3/cmd/helm) from the Go module proxy, once, into the same cache root as
# the test control plane (hack/controlplane/controlplane.sh), and prints the binary's path.
#
#   hack/helm/build.sh            build if missing (a no-op when present), print the path of helm
#   hack/helm/build.sh path       print the path only (built or not)
#   hack/helm/build.sh version    print the pinned helm version
#
# Environment:
#   KUBETUNE_CONTROLPLANE_CACHE  cache root (default: ~/.cache/kubetune/controlplane)
#   GO                           the go command (default: go on PATH, else /usr/local/go/bin/go)
#
# The version is the helm.sh/helm/v3 line of go.mod next to this script (the single source of truth;
# move it with `go get -tool helm.sh/helm/v3/cmd/helm@vX && go mod tidy`). The binary is stamped the
# way helm's own Makefile stamps releases: `helm version` reports that version, and the Kubernetes
# version helm assumes without a cluster (`helm template`, `helm lint`) follows the client-go it embeds.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
CACHE_ROOT="${KUBETUNE_CONTROLPLANE_CACHE:-${HOME}/.cache/kubetune/controlplane}"

LOG_PREFIX=helm
# shellcheck source=hack/lib.sh
source "${HERE}/../lib.sh"

# The version go.mod requires of MODULE.
modver() { modver_in "${HERE}/go.mod" "$1"; }

HELM_VERSION="$(modver helm.sh/helm/v3)"
CLIENT_GO_VERSION="$(modver k8s.io/client-go)"
BIN="${CACHE_ROOT}/helm-${HELM_VERSION}/bin"
HELM="${BIN}/helm"

cmd_build() {
  if [[ -x "${HELM}" ]]; then
    printf '%s\n' "${HELM}"
    return 0
  fi
  local go
  go="$(go_cmd)"
  mkdir -p "${BIN}"
  # Two builds at once (two test sessions on a cold cache) would only repeat each other.
  if command -v flock >/dev/null 2>&1; then
    exec {lock_fd}>"${BIN}/../.build.lock"
    if ! flock -n "${lock_fd}"; then
      log "another build is running; waiting for it"
      flock "${lock_fd}"
      if [[ -x "${HELM}" ]]; then
        printf '%s\n' "${HELM}"
        return 0
      fi
    fi
  fi
  log "building helm ${HELM_VERSION} with $("${go}" version); a few minutes cold, cached in ${BIN}"
  local tmp start=${SECONDS}
  tmp="$(mktemp -d "${BIN}/../build.XXXXXX")"
  # shellcheck disable=SC2064
  trap "rm -rf '${tmp}'" EXIT

  # As helm's Makefile: the version, and the Kubernetes version of its default capabilities taken
  # from the client-go it is built with (v0.37.x -> 1.37).
  local k8s_minor ldflags
  k8s_minor="${CLIENT_GO_VERSION#v0.}"
  k8s_minor="${k8s_minor%%.*}"
  ldflags="-s -w -X helm.sh/helm/v3/internal/version.version=${HELM_VERSION}"
  ldflags+=" -X helm.sh/helm/v3/internal/version.gitTreeState=clean"
  for p in helm.sh/helm/v3/pkg/lint/rules helm.sh/helm/v3/pkg/chartutil; do
    ldflags+=" -X ${p}.k8sVersionMajor=1 -X ${p}.k8sVersionMinor=${k8s_minor}"
  done
  (cd "${HERE}" && CGO_ENABLED=0 "${go}" build -trimpath -ldflags "${ldflags}" -o "${tmp}/helm" \
    helm.sh/helm/v3/cmd/helm)
  mv -f "${tmp}/helm" "${HELM}" # atomic: a half-finished build never counts as present
  log "built helm ${HELM_VERSION} in $((SECONDS - start)) s: $(du -h "${HELM}" | cut -f1)"
  printf '%s\n' "${HELM}"
}

case "${1:-build}" in
  build) cmd_build ;;
  path) printf '%s\n' "${HELM}" ;;
  version) printf '%s\n' "${HELM_VERSION}" ;;
  -h | --help | help) sed -n '2,/^set -euo/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//' ;;
  *)
    sed -n '2,/^set -euo/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//' >&2
    exit 2
    ;;
esac
