#!/usr/bin/env bash
# Installs from Debian what the e2e node and its image builds need, when it is missing: podman and
# buildah (image builds), mmdebstrap (the Debian base), containerd and runc (the node's runtime), the
# CNI plugins (pod networking), and the small tools the scripts use. Needs root (apt-get); a no-op
# when everything is there. CI runs it (.ci/run); on a workstation, run it once with sudo.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
LOG_PREFIX=node-deps
# shellcheck source=hack/lib.sh
source "${HERE}/../lib.sh"

# package: a command (or a file) it installs, to tell whether it is there without asking dpkg.
declare -A PACKAGES=(
  [podman]=podman
  [buildah]=buildah
  [mmdebstrap]=mmdebstrap
  [containerd]=containerd
  [runc]=runc
  [containernetworking-plugins]=/usr/lib/cni/bridge
  [iproute2]=ip
  [openssl]=openssl
  [curl]=curl
  [util-linux]=flock
  [procps]=pgrep
)

missing=()
for package in "${!PACKAGES[@]}"; do
  probe="${PACKAGES[${package}]}"
  if [[ "${probe}" == /* ]]; then
    [[ -e "${probe}" ]] || missing+=("${package}")
  else
    command -v "${probe}" >/dev/null 2>&1 || missing+=("${package}")
  fi
done
if [[ ${#missing[@]} -eq 0 ]]; then
  log "all present: ${!PACKAGES[*]}"
  exit 0
fi
[[ ${EUID} -eq 0 ]] || die "missing ${missing[*]}; run as root: sudo $0"
command -v apt-get >/dev/null 2>&1 || die "missing ${missing[*]}, and this is not a Debian-like system (no apt-get)"

start=${SECONDS}
log "installing ${missing[*]}"
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
# With podman's recommendations (fuse-overlayfs, slirp4netns, uidmap...), as on the machines this was
# measured on. No service is started: there is no systemd on our machines, and where there is,
# policy-rc.d keeps Debian's containerd.service from starting a containerd nobody asked for.
policy=/usr/sbin/policy-rc.d
created_policy=0
if [[ ! -e "${policy}" ]]; then
  printf '#!/bin/sh\nexit 101\n' >"${policy}"
  chmod 755 "${policy}"
  created_policy=1
fi
trap '[[ ${created_policy} -eq 0 ]] || rm -f "${policy}"' EXIT
apt-get install -y -qq "${missing[@]}" >/dev/null
log "installed in $((SECONDS - start)) s"
