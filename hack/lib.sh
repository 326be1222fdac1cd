# shellcheck shell=bash
# Helpers shared by hack/controlplane/controlplane.sh and hack/helm/build.sh, which build pinned tools
# from the Go module proxy, and by hack/node/ (the e2e node and its images): logging, versions, the Go
# toolchain, container rlimits, free ports and pids. Set LOG_PREFIX before sourcing.

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

# The rlimits a container may have here, as "NOFILE NPROC": runc sets them in the container without
# CAP_SYS_RESOURCE, so never above this process's hard limits; and on our machines setrlimit(NPROC)
# fails with EPERM above kernel.pid_max too (measured: 32768 works, 32769 does not).
container_rlimits() {
  local nofile nproc pid_max
  nofile="$(ulimit -Hn)"
  nproc="$(ulimit -Hu)"
  pid_max="$(cat /proc/sys/kernel/pid_max 2>/dev/null || printf '%s' "${nproc}")"
  [[ "${nofile}" == unlimited ]] && nofile=1048576
  [[ "${nproc}" == unlimited || "${nproc}" -gt "${pid_max}" ]] && nproc="${pid_max}"
  printf '%s %s' "${nofile}" "${nproc}"
}

# N free TCP ports on 127.0.0.1, all distinct (held open together while they are picked). The kernel
# hands out ports at random, so two control planes (or nodes) started at once do not pick the same ones.
free_ports() {
  python3 - "$1" <<'EOF'
import socket, sys
socks = []
for _ in range(int(sys.argv[1])):
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    socks.append(s)
print(" ".join(str(s.getsockname()[1]) for s in socks))
EOF
}

# The pid of a component if it is still alive AND still the binary we started (pids get reused; a
# zombie has no exe link, so it counts as gone).
live_pid() {
  local pid="$1" name="$2" exe
  [[ -d "/proc/${pid}" ]] || return 1
  exe="$(readlink "/proc/${pid}/exe" 2>/dev/null || true)"
  [[ "${exe}" == */"${name}" || "${exe}" == */"${name} (deleted)" ]] || return 1
  printf '%s' "${pid}"
}

# Alive and not a zombie (this machine's init may never reap an orphan's zombie).
pid_running() {
  local stat
  stat="$(cat "/proc/$1/stat" 2>/dev/null)" || return 1
  stat="${stat##*) }"
  [[ "${stat:0:1}" != Z ]]
}
