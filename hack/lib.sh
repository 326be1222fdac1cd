# shellcheck shell=bash
# Helpers shared by hack/controlplane/controlplane.sh and hack/helm/build.sh, which build pinned tools
# from the Go module proxy. Set LOG_PREFIX before sourcing.

log() { printf '[%s] %s\n' "${LOG_PREFIX}" "$*" >&2; }
die() {
  printf '[%s] error: %s\n' "${LOG_PREFIX}" "$*" >&2
  exit 1
}

# The version GO_MOD requires of MODULE (require block or single-line require): modver_in GO_MOD MODULE
modver_in() {
  local v
  v="$(awk -v m="$2" '$1 == m && $2 ~ /^v/ { print $2; exit } $1 == "require" && $2 == m { print $3; exit }' \
    "$1")"
  [[ -n "${v}" ]] || die "no version of $2 in $1"
  printf '%s' "${v}"
}

# The Go toolchain: $GO, else `go` on PATH, else /usr/local/go/bin/go.
go_cmd() {
  if [[ -n "${GO:-}" ]]; then
    [[ -x "${GO}" ]] || command -v "${GO}" >/dev/null 2>&1 || die "GO=${GO} is not an executable"
    printf '%s' "${GO}"
  elif command -v go >/dev/null 2>&1; then
    command -v go
  elif [[ -x /usr/local/go/bin/go ]]; then
    printf '%s' /usr/local/go/bin/go
  else
    die "no Go toolchain found (set GO=/path/to/go); Go >= 1.26 is needed to build ${LOG_PREFIX}"
  fi
}
