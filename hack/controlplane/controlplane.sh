#!/usr/bin/env bash
# A real Kubernetes control plane for kubetune's end-to-end tests, built from source through the Go
# module proxy (no binary can be downloaded here): etcd, kube-apiserver, kube-controller-manager,
# kube-scheduler and kubectl, plus kwok, which plays the kubelets of fake GPU nodes, and the kubelet of
# the one real node (hack/node/node.sh starts it).
#
#   controlplane.sh build        build the binaries once into a cache outside the repo (no-op when there)
#   controlplane.sh bin-dir      print the directory the binaries are (or will be) in
#   controlplane.sh start DIR    start a control plane whose state, logs, pids and kubeconfig live in DIR
#   controlplane.sh stop DIR     stop everything that `start DIR` started (safe when half-started)
#   controlplane.sh restart DIR NAME
#                                stop one component (kube-apiserver, etcd, kwok, ...) and start it again
#                                with the same flags, port and certificates, waiting until it serves
#   controlplane.sh restart-apiserver DIR
#                                `restart DIR kube-apiserver` (the e2e fault tests)
#
# Environment:
#   KUBETUNE_CONTROLPLANE_CACHE  cache root (default: ~/.cache/kubetune/controlplane)
#   GO                           the go command (default: go on PATH, else /usr/local/go/bin/go)
#   CONTROLPLANE_START_TIMEOUT   seconds `start` waits for readiness (default: 120)
#   CONTROLPLANE_OWNER_PID       `start` only: stop the control plane by itself once this process is gone
#
# The versions are read from the wrapper modules' go.mod files next to this script, which are the
# single source of truth; the cache directory is keyed by them.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
CACHE_ROOT="${KUBETUNE_CONTROLPLANE_CACHE:-${HOME}/.cache/kubetune/controlplane}"

LOG_PREFIX=controlplane
# shellcheck source=hack/lib.sh
source "${HERE}/../lib.sh"

# The version a wrapper module requires of MODULE, e.g. `modver kubernetes k8s.io/kubernetes`.
modver() { modver_in "${HERE}/$1/go.mod" "$2"; }

K8S_VERSION="$(modver kubernetes k8s.io/kubernetes)"
ETCD_VERSION="$(modver etcd go.etcd.io/etcd/server/v3)"
KWOK_VERSION="$(modver kwok sigs.k8s.io/kwok)"
CACHE_DIR="${CACHE_ROOT}/${K8S_VERSION}-etcd${ETCD_VERSION#v}-kwok${KWOK_VERSION#v}"
BIN="${CACHE_DIR}/bin"
# setsid(1) without forking (a background job of a script is no process-group leader, so it just
# calls setsid(2) and execs: $! stays the component's pid).
SETSID="$(command -v setsid || true)"
K8S_BINARIES=(kube-apiserver kube-controller-manager kube-scheduler kubectl kubelet)
ALL_BINARIES=("${K8S_BINARIES[@]}" etcd kwok)

# ---------------------------------------------------------------------------------------------- build

cmd_build() {
  local missing=() b
  for b in "${ALL_BINARIES[@]}"; do
    [[ -x "${BIN}/${b}" ]] || missing+=("${b}")
  done
  if [[ ${#missing[@]} -eq 0 ]]; then
    log "binaries present in ${BIN}"
    return 0
  fi

  # Every staging module must be replaced with the release that matches k8s.io/kubernetes.
  local staging="v0.${K8S_VERSION#v1.}" stale
  stale="$(awk -v want="${staging}" '$2 == "=>" && $1 ~ /^k8s\.io\// && $4 != want { print $1 " " $4 }' \
    "${HERE}/kubernetes/go.mod")"
  [[ -z "${stale}" ]] || die "kubernetes/go.mod pins ${K8S_VERSION} but replaces with other versions than ${staging}: ${stale}"

  local go
  go="$(go_cmd)"
  mkdir -p "${CACHE_DIR}"
  # Two builds at once (two test sessions on a cold cache) would only repeat each other: the second
  # waits for the first, then finds the binaries there.
  if command -v flock >/dev/null 2>&1; then
    exec {lock_fd}>"${CACHE_DIR}/.build.lock"
    if ! flock -n "${lock_fd}"; then
      log "another build is running; waiting for it"
      flock "${lock_fd}"
      missing=()
      for b in "${ALL_BINARIES[@]}"; do
        [[ -x "${BIN}/${b}" ]] || missing+=("${b}")
      done
      [[ ${#missing[@]} -gt 0 ]] || {
        log "binaries present in ${BIN}"
        return 0
      }
    fi
  fi
  log "building ${missing[*]} (kubernetes ${K8S_VERSION}, etcd ${ETCD_VERSION}, kwok ${KWOK_VERSION}) with $("${go}" version)"
  log "a cold build takes about 15 minutes on 2 cores; the result is cached in ${BIN}"
  mkdir -p "${BIN}"
  local tmp
  tmp="$(mktemp -d "${CACHE_DIR}/build.XXXXXX")"
  # shellcheck disable=SC2064
  trap "rm -rf '${tmp}'" EXIT
  local start=${SECONDS}

  # Static, stripped, path-trimmed binaries, as the upstream release build makes them
  # (kubernetes' hack/lib/golang.sh: -trimpath, -s -w, tags selinux,notest,grpcnotrace).
  export CGO_ENABLED=0

  local want_k8s=() p
  for b in "${K8S_BINARIES[@]}"; do
    [[ " ${missing[*]} " == *" ${b} "* ]] && want_k8s+=("k8s.io/kubernetes/cmd/${b}")
  done
  if [[ ${#want_k8s[@]} -gt 0 ]]; then
    # Stamp the release like hack/lib/version.sh does, or /version says v0.0.0-master. The build date
    # is the release's publication time from the module proxy, so rebuilds are reproducible.
    local minor build_date ldflags=() key val
    minor="${K8S_VERSION#v1.}"
    minor="${minor%%.*}"
    build_date="$(cd "${HERE}/kubernetes" && "${go}" list -m -f '{{if .Time}}{{.Time.UTC.Format "2006-01-02T15:04:05Z"}}{{end}}' k8s.io/kubernetes)"
    build_date="${build_date:-$(date -u +%Y-%m-%dT%H:%M:%SZ)}"
    for p in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
      for key in gitVersion gitMajor gitMinor gitTreeState buildDate gitCommit; do
        case "${key}" in
          gitVersion) val="${K8S_VERSION}" ;;
          gitMajor) val=1 ;;
          gitMinor) val="${minor}" ;;
          gitTreeState) val=clean ;;
          buildDate) val="${build_date}" ;;
          gitCommit) val="" ;; # the module proxy does not say which commit a tag is
        esac
        ldflags+=("-X ${p}.${key}=${val}")
      done
    done
    (cd "${HERE}/kubernetes" && "${go}" build -trimpath -tags selinux,notest,grpcnotrace \
      -ldflags "-s -w ${ldflags[*]}" -o "${tmp}/" "${want_k8s[@]}")
    log "kubernetes binaries built after $((SECONDS - start)) s"
  fi
  if [[ " ${missing[*]} " == *" etcd "* ]]; then
    (cd "${HERE}/etcd" && "${go}" build -trimpath -tags grpcnotrace -ldflags "-s -w" \
      -o "${tmp}/etcd" go.etcd.io/etcd/server/v3)
    log "etcd built after $((SECONDS - start)) s"
  fi
  if [[ " ${missing[*]} " == *" kwok "* ]]; then
    (cd "${HERE}/kwok" && "${go}" build -trimpath -tags grpcnotrace -ldflags "-s -w" \
      -o "${tmp}/kwok" sigs.k8s.io/kwok/cmd/kwok)
    log "kwok built after $((SECONDS - start)) s"
  fi
  for b in "${missing[@]}"; do
    mv -f "${tmp}/${b}" "${BIN}/${b}" # atomic: a half-finished build never counts as present
  done
  log "built in $((SECONDS - start)) s (cold build time): $(cd "${BIN}" && du -h "${missing[@]}" | awk '{printf "%s %s; ", $2, $1}')"
}

# ---------------------------------------------------------------------------------------------- start

# openssl helpers: EC P-256 keys (fast to make), certificates signed by the test CA.
new_key() { openssl ecparam -name prime256v1 -genkey -noout 2>/dev/null | openssl pkey -out "$1" 2>/dev/null; }
new_ca() { # new_ca PKI NAME CN
  new_key "$1/$2.key"
  openssl req -x509 -new -key "$1/$2.key" -subj "/CN=$3" -days 30 -sha256 \
    -addext "basicConstraints=critical,CA:TRUE" -addext "keyUsage=critical,keyCertSign,cRLSign,digitalSignature" \
    -out "$1/$2.crt" 2>/dev/null
}
sign_cert() { # sign_cert PKI CA NAME SUBJECT EXTENSIONS
  local pki="$1" ca="$2" name="$3" subj="$4" ext="$5"
  new_key "${pki}/${name}.key"
  openssl req -new -key "${pki}/${name}.key" -subj "${subj}" -out "${pki}/${name}.csr" 2>/dev/null
  printf '%b\n' "${ext}" >"${pki}/${name}.ext"
  openssl x509 -req -in "${pki}/${name}.csr" -CA "${pki}/${ca}.crt" -CAkey "${pki}/${ca}.key" \
    -set_serial "0x$(openssl rand -hex 12)" -days 30 -sha256 -extfile "${pki}/${name}.ext" \
    -out "${pki}/${name}.crt" 2>/dev/null
  rm -f "${pki}/${name}.csr" "${pki}/${name}.ext"
}

make_pki() {
  local pki="$1"
  mkdir -p "${pki}"
  new_ca "${pki}" ca kubetune-e2e-ca
  local client="basicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature,keyEncipherment\nextendedKeyUsage=clientAuth"
  sign_cert "${pki}" ca apiserver "/CN=kube-apiserver" \
    "basicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature,keyEncipherment\nextendedKeyUsage=serverAuth\nsubjectAltName=IP:127.0.0.1,IP:${SERVICE_IP},DNS:localhost,DNS:kubernetes,DNS:kubernetes.default,DNS:kubernetes.default.svc,DNS:kubernetes.default.svc.cluster.local"
  sign_cert "${pki}" ca admin "/O=system:masters/CN=kubetune-admin" "${client}"
  sign_cert "${pki}" ca kube-controller-manager "/CN=system:kube-controller-manager" "${client}"
  sign_cert "${pki}" ca kube-scheduler "/CN=system:kube-scheduler" "${client}"
  # kwok plays every kubelet: it patches pod and node status, deletes pods, writes events and leases.
  sign_cert "${pki}" ca kwok "/O=system:masters/CN=kwok" "${client}"
  # The front proxy (aggregation layer) gets a CA of its own, so that no ordinary client certificate
  # can assert identities through X-Remote-User headers. Without it, kube-controller-manager and
  # kube-scheduler keep logging errors about the missing requestheader CA bundle.
  new_ca "${pki}" front-proxy-ca kubetune-e2e-front-proxy-ca
  sign_cert "${pki}" front-proxy-ca front-proxy-client "/CN=front-proxy-client" "${client}"
  # Service-account tokens: the API server signs (TokenRequest) and verifies with this key pair;
  # kube-controller-manager signs the legacy token secrets with the same private key.
  new_key "${pki}/sa.key"
  openssl pkey -in "${pki}/sa.key" -pubout -out "${pki}/sa.pub" 2>/dev/null
}

write_kubeconfig() { # write_kubeconfig FILE USER(cert name)
  local file="$1" user="$2" pki="${DIR}/pki"
  cat >"${file}" <<EOF
apiVersion: v1
kind: Config
clusters:
- name: kubetune-e2e
  cluster:
    server: ${SERVER}
    certificate-authority-data: $(base64 -w0 <"${pki}/ca.crt")
users:
- name: ${user}
  user:
    client-certificate-data: $(base64 -w0 <"${pki}/${user}.crt")
    client-key-data: $(base64 -w0 <"${pki}/${user}.key")
contexts:
- name: kubetune-e2e
  context:
    cluster: kubetune-e2e
    user: ${user}
    namespace: default
current-context: kubetune-e2e
EOF
  chmod 600 "${file}"
}

# launch NAME BINARY ARGS...: start a component in the background, logging to DIR/logs/NAME.log and
# recording "NAME PID" in DIR/pids before anything else can fail, so `stop` always finds it.
# Each runs in a session of its own (setsid), out of the caller's process group: a signal to the test
# runner's group (`timeout`, Ctrl-C) must not kill etcd under a still-running API server, which then
# hangs in its shutdown; `stop` (or the watcher) takes them down in order instead.
# The command line is kept in DIR/components/NAME.cmd (NUL-separated) for `restart`.
launch() {
  local name="$1" bin="$2"
  shift 2
  printf '%s\0' "${bin}" "$@" >"${DIR}/components/${name}.cmd"
  ${SETSID} "${bin}" "$@" </dev/null >"${DIR}/logs/${name}.log" 2>&1 &
  printf '%s %s\n' "${name}" "$!" >>"${DIR}/pids"
}

kubectl_admin() { "${BIN}/kubectl" --kubeconfig "${DIR}/kubeconfig" --request-timeout=5s "$@"; }

# wait_for DESCRIPTION COMMAND...: poll COMMAND every 0.2 s until it succeeds, the deadline passes
# (then fail with the logs), or a component dies.
wait_for() {
  local what="$1"
  shift
  local name pid
  while true; do
    if "$@" >/dev/null 2>&1; then
      return 0
    fi
    while read -r name pid; do
      live_pid "${pid}" "${name}" >/dev/null || start_failed "${name} exited while waiting for ${what}"
    done <"${DIR}/pids"
    ((SECONDS < DEADLINE)) || start_failed "timed out after ${START_TIMEOUT} s waiting for ${what}"
    sleep 0.2
  done
}

start_failed() {
  printf '[controlplane] error: %s; the last log lines:\n' "$1" >&2
  local f
  for f in "${DIR}"/logs/*.log; do
    [[ -s "${f}" ]] || continue
    printf -- '--- %s\n' "${f}" >&2
    tail -n 15 "${f}" >&2
  done
  cmd_stop "${DIR}"
  exit 1
}

cmd_start() {
  DIR="$(mkdir -p "$1" && cd "$1" && pwd)"
  local b
  for b in "${ALL_BINARIES[@]}"; do
    [[ -x "${BIN}/${b}" ]] || die "${BIN}/${b} is missing: run '$0 build' first"
  done
  command -v openssl >/dev/null || die "openssl is needed to make the control plane's certificates"
  command -v python3 >/dev/null || die "python3 is needed to pick free ports"
  command -v curl >/dev/null || die "curl is needed to check the scheduler and controller manager"
  if [[ -s "${DIR}/pids" ]]; then
    local name pid
    while read -r name pid; do
      live_pid "${pid}" "${name}" >/dev/null && die "a control plane is already running in ${DIR} (${name} pid ${pid}); stop it first"
    done <"${DIR}/pids"
  fi
  rm -rf "${DIR}/pids" "${DIR}/logs" "${DIR}/etcd" "${DIR}/pki" "${DIR}/kubeconfig" "${DIR}/components"
  mkdir -p "${DIR}/logs" "${DIR}/components" "${DIR}/kwok-home"
  : >"${DIR}/pids"

  START_TIMEOUT="${CONTROLPLANE_START_TIMEOUT:-120}"
  DEADLINE=$((SECONDS + START_TIMEOUT))
  local t0=${SECONDS} t0ns
  t0ns="$(date +%s%N)"

  local etcd_port peer_port api_port kcm_port sched_port
  local ports
  ports="$(free_ports 5)"
  read -r etcd_port peer_port api_port kcm_port sched_port <<<"${ports}"
  [[ -n "${sched_port}" ]] || die "could not pick free ports"
  SERVICE_IP=10.96.0.1
  SERVER="https://127.0.0.1:${api_port}"
  local pki="${DIR}/pki"
  make_pki "${pki}"
  write_kubeconfig "${DIR}/kubeconfig" admin
  write_kubeconfig "${DIR}/components/kube-controller-manager.kubeconfig" kube-controller-manager
  write_kubeconfig "${DIR}/components/kube-scheduler.kubeconfig" kube-scheduler
  write_kubeconfig "${DIR}/components/kwok.kubeconfig" kwok
  {
    printf 'server=%s\nca=%s\n' "${SERVER}" "${pki}/ca.crt"
    printf 'etcd=http://127.0.0.1:%s\n' "${etcd_port}"
    printf 'kubernetes=%s\netcd_version=%s\nkwok_version=%s\nbin=%s\n' "${K8S_VERSION}" "${ETCD_VERSION}" "${KWOK_VERSION}" "${BIN}"
  } >"${DIR}/env"

  launch etcd "${BIN}/etcd" \
    --name=kubetune-e2e \
    --data-dir="${DIR}/etcd" \
    --listen-client-urls="http://127.0.0.1:${etcd_port}" \
    --advertise-client-urls="http://127.0.0.1:${etcd_port}" \
    --listen-peer-urls="http://127.0.0.1:${peer_port}" \
    --initial-advertise-peer-urls="http://127.0.0.1:${peer_port}" \
    --initial-cluster="kubetune-e2e=http://127.0.0.1:${peer_port}" \
    --unsafe-no-fsync \
    --log-level=warn

  # --endpoint-reconciler-type=none: the reconciler that publishes the API server's address as the
  # endpoints of Service "kubernetes" refuses a loopback address, and nothing here reaches the API
  # server through that Service (there is no pod network).
  # TaintNodesByCondition is off: it taints every new node node.kubernetes.io/not-ready, which only
  # node-lifecycle-controller removes, and that controller is left out on purpose (it would mark the
  # fake nodes NotReady and evict their pods whenever kwok's heartbeat runs late on a busy machine).
  # --kubelet-preferred-address-types: the real node (hack/node/) registers as "localhost", which
  # resolves to the loopback its kubelet listens on; its InternalIP is eth0's, where nothing listens.
  # Audit: every write (who, with which user agent, when), so that a test can prove which client
  # wrote after some moment (tests/e2e/test_operator_runtime.py: a paused leader must not). Metadata
  # only, no bodies; the node heartbeats (kube-node-lease) are left out.
  rm -f "${DIR}"/audit*.log
  cat >"${DIR}/components/audit-policy.yaml" <<'POLICY'
apiVersion: audit.k8s.io/v1
kind: Policy
omitStages: [RequestReceived]
rules:
  - level: None
    namespaces: [kube-node-lease]
  - level: Metadata
    verbs: [create, update, patch, delete, deletecollection]
  - level: None
POLICY
  launch kube-apiserver "${BIN}/kube-apiserver" \
    --audit-policy-file="${DIR}/components/audit-policy.yaml" \
    --audit-log-path="${DIR}/audit.log" \
    --audit-log-maxsize=200 \
    --audit-log-maxbackup=2 \
    --etcd-servers="http://127.0.0.1:${etcd_port}" \
    --bind-address=127.0.0.1 \
    --advertise-address=127.0.0.1 \
    --endpoint-reconciler-type=none \
    --secure-port="${api_port}" \
    --cert-dir="${pki}" \
    --tls-cert-file="${pki}/apiserver.crt" \
    --tls-private-key-file="${pki}/apiserver.key" \
    --client-ca-file="${pki}/ca.crt" \
    --service-cluster-ip-range=10.96.0.0/16 \
    --allow-privileged=true \
    --authorization-mode=Node,RBAC \
    --service-account-issuer=https://kubernetes.default.svc.cluster.local \
    --service-account-key-file="${pki}/sa.pub" \
    --service-account-signing-key-file="${pki}/sa.key" \
    --requestheader-client-ca-file="${pki}/front-proxy-ca.crt" \
    --requestheader-allowed-names=front-proxy-client \
    --requestheader-username-headers=X-Remote-User \
    --requestheader-group-headers=X-Remote-Group \
    --requestheader-extra-headers-prefix=X-Remote-Extra- \
    --proxy-client-cert-file="${pki}/front-proxy-client.crt" \
    --proxy-client-key-file="${pki}/front-proxy-client.key" \
    --disable-admission-plugins=TaintNodesByCondition \
    --kubelet-preferred-address-types=Hostname,InternalIP,ExternalIP \
    --profiling=false

  wait_for "kube-apiserver /readyz" kubectl_admin get --raw /readyz
  local t_api=$((SECONDS - t0))

  # The fake nodes can be created before kwok runs: it picks them up when it starts.
  kubectl_admin apply -f "${HERE}/nodes.yaml" >/dev/null

  local controllers=(
    job-controller
    garbage-collector-controller
    namespace-controller
    ttl-after-finished-controller
    serviceaccount-controller
    serviceaccount-token-controller
    pod-garbage-collector-controller
    root-ca-certificate-publisher-controller
    clusterrole-aggregation-controller
    # PersistentVolumeClaims: binding (to the PVs the e2e provisioner makes, tests/e2e/node.py) and
    # the finalizers that keep a claim or volume in use from going away.
    persistentvolume-binder-controller
    persistentvolume-protection-controller
    persistentvolumeclaim-protection-controller
  )
  local kcm_kubeconfig="${DIR}/components/kube-controller-manager.kubeconfig"
  # --use-service-account-credentials: each controller runs as its own service account under its
  # bootstrap RBAC role (system:controller:job-controller, ...), as on a kubeadm cluster.
  launch kube-controller-manager "${BIN}/kube-controller-manager" \
    --kubeconfig="${kcm_kubeconfig}" \
    --authentication-kubeconfig="${kcm_kubeconfig}" \
    --authorization-kubeconfig="${kcm_kubeconfig}" \
    --bind-address=127.0.0.1 \
    --secure-port="${kcm_port}" \
    --leader-elect=false \
    --controllers="$(IFS=,; printf '%s' "${controllers[*]}")" \
    --use-service-account-credentials=true \
    --service-account-private-key-file="${pki}/sa.key" \
    --root-ca-file="${pki}/ca.crt" \
    --profiling=false

  local sched_kubeconfig="${DIR}/components/kube-scheduler.kubeconfig"
  launch kube-scheduler "${BIN}/kube-scheduler" \
    --kubeconfig="${sched_kubeconfig}" \
    --authentication-kubeconfig="${sched_kubeconfig}" \
    --authorization-kubeconfig="${sched_kubeconfig}" \
    --bind-address=127.0.0.1 \
    --secure-port="${sched_port}" \
    --leader-elect=false \
    --profiling=false

  local stage_args=() s
  for s in "${HERE}"/stages/*.yaml; do
    stage_args+=("--config=${s}")
  done
  # HOME points at a private folder so that a ~/.kwok/kwok.yaml of the user's is never loaded.
  launch kwok env HOME="${DIR}/kwok-home" "${BIN}/kwok" \
    --kubeconfig="${DIR}/components/kwok.kubeconfig" \
    --manage-all-nodes=false \
    --manage-nodes-with-annotation-selector=kwok.x-k8s.io/node=fake \
    --cidr=10.244.0.0/16 \
    "${stage_args[@]}"

  wait_for "the fake nodes to be Ready" kubectl_admin wait --for=condition=Ready node --all --timeout=1s
  wait_for "the default ServiceAccount" kubectl_admin get serviceaccount default --namespace default
  wait_for "kube-scheduler /readyz" curl -fsk --noproxy "*" "https://127.0.0.1:${sched_port}/readyz"
  wait_for "kube-controller-manager /healthz" curl -fsk --noproxy "*" "https://127.0.0.1:${kcm_port}/healthz"

  if [[ -n "${CONTROLPLANE_OWNER_PID:-}" ]]; then
    ${SETSID} bash "${HERE}/controlplane.sh" watch "${DIR}" "${CONTROLPLANE_OWNER_PID}" \
      </dev/null >>"${DIR}/logs/watch.log" 2>&1 &
    printf '%s\n' "$!" >"${DIR}/watch.pid"
  fi

  local ms=$((($(date +%s%N) - t0ns) / 1000000))
  log "control plane ${K8S_VERSION} up in ${ms} ms (API server ready after ${t_api} s): ${SERVER}"
  log "kubeconfig: ${DIR}/kubeconfig   logs: ${DIR}/logs/   stop: $0 stop ${DIR}"
}

# ---------------------------------------------------------------------------------------------- stop

cmd_stop() {
  local dir="$1"
  # The watcher (see cmd_watch) goes first, unless it is the one stopping the control plane.
  local watcher
  if [[ -s "${dir}/watch.pid" ]]; then
    watcher="$(<"${dir}/watch.pid")"
    if [[ "${watcher}" != "${BASHPID}" ]] && tr '\0' ' ' <"/proc/${watcher}/cmdline" 2>/dev/null | grep -q "controlplane.sh watch"; then
      kill -TERM "${watcher}" 2>/dev/null || true
    fi
    rm -f "${dir}/watch.pid"
  fi
  [[ -f "${dir}/pids" ]] || {
    log "nothing to stop in ${dir}"
    return 0
  }
  # One at a time, in reverse start order: kwok, the scheduler and the controller manager exit in
  # milliseconds, then kube-apiserver (about 1 s, while etcd is still there to answer it: stopped
  # together, it waits ~10 s on etcd), then etcd. Whatever ignores SIGTERM for 10 s is killed.
  local name pid n=0 deadline
  while read -r name pid; do
    [[ -n "${pid}" ]] || continue
    pid="$(live_pid "${pid}" "${name}")" || continue
    kill -TERM "${pid}" 2>/dev/null || true
    n=$((n + 1))
    deadline=$((SECONDS + 10))
    while live_pid "${pid}" "${name}" >/dev/null && ((SECONDS < deadline)); do
      sleep 0.05
    done
    if live_pid "${pid}" "${name}" >/dev/null; then
      log "${name} (pid ${pid}) ignored SIGTERM for 10 s; killing it"
      kill -KILL "${pid}" 2>/dev/null || true
    fi
  done < <(tac "${dir}/pids")
  : >"${dir}/pids"
  log "stopped ${n} process(es) in ${dir}"
}

# -------------------------------------------------------------------------------------------- restart

# restart DIR NAME: SIGTERM one component (SIGKILL after 10 s), start it again from the command line
# `launch` kept (same flags, port, certificates, data), append to its log, and put the new pid in the
# old one's place in DIR/pids, so `stop` still goes in reverse start order. Waits for kube-apiserver's
# /readyz (or etcd's /health); other components are only started.
cmd_restart() {
  DIR="$(cd "$1" && pwd)"
  local name="$2" cmdfile="${DIR}/components/$2.cmd"
  [[ -s "${cmdfile}" ]] || die "no command line for ${name} in ${DIR}/components (was it started by 'start'?)"
  local old="" n p
  while read -r n p; do
    [[ "${n}" == "${name}" ]] && old="${p}"
  done <"${DIR}/pids"
  [[ -n "${old}" ]] || die "${name} is not in ${DIR}/pids"
  local exe
  exe="$(head -z -n1 "${cmdfile}" | tr -d '\0')"
  [[ "${exe}" == env ]] && exe="kwok" # kwok runs under env(1), which execs it
  local pid deadline
  if pid="$(live_pid "${old}" "$(basename "${exe}")")"; then
    kill -TERM "${pid}" 2>/dev/null || true
    deadline=$((SECONDS + 10))
    while live_pid "${pid}" "$(basename "${exe}")" >/dev/null && ((SECONDS < deadline)); do
      sleep 0.05
    done
    if live_pid "${pid}" "$(basename "${exe}")" >/dev/null; then
      log "${name} (pid ${pid}) ignored SIGTERM for 10 s; killing it"
      kill -KILL "${pid}" 2>/dev/null || true
    fi
  fi
  local args=()
  mapfile -d '' -t args <"${cmdfile}"
  printf '\n--- restarted at %s\n' "$(date -u +%Y-%m-%dT%H:%M:%SZ)" >>"${DIR}/logs/${name}.log"
  ${SETSID} "${args[@]}" </dev/null >>"${DIR}/logs/${name}.log" 2>&1 &
  local new=$!
  awk -v n="${name}" -v p="${new}" '$1 == n { $2 = p } { print }' "${DIR}/pids" >"${DIR}/pids.tmp"
  mv -f "${DIR}/pids.tmp" "${DIR}/pids"
  START_TIMEOUT="${CONTROLPLANE_START_TIMEOUT:-120}"
  DEADLINE=$((SECONDS + START_TIMEOUT))
  case "${name}" in
    kube-apiserver) wait_for "kube-apiserver /readyz" kubectl_admin get --raw /readyz ;;
    etcd) wait_for "etcd /health" curl -fs --noproxy "*" "$(sed -n 's/^etcd=//p' "${DIR}/env")/health" ;;
  esac
  log "${name} restarted (pid ${old} -> ${new})"
}

# ---------------------------------------------------------------------------------------------- watch

# ---------------------------------------------------------------------------------------------- watch

# watch DIR PID: stop the control plane in DIR once process PID is gone. `start` runs it in the
# background when CONTROLPLANE_OWNER_PID is set (the pytest fixture sets its own pid), so that a test
# run killed without its teardown (SIGTERM from `timeout`, SIGKILL) leaves no control plane behind.
cmd_watch() {
  local dir="$1" owner="$2"
  while pid_running "${owner}"; do
    sleep 1
  done
  log "owner pid ${owner} is gone; stopping the control plane in ${dir}"
  cmd_stop "${dir}"
}

# ---------------------------------------------------------------------------------------------- main

usage() { sed -n '2,/^set -euo/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//'; }

main() {
  local cmd="${1:-}"
  [[ $# -gt 0 ]] && shift
  case "${cmd}" in
    build) cmd_build "$@" ;;
    bin-dir) printf '%s\n' "${BIN}" ;;
    start)
      [[ $# -eq 1 ]] || die "usage: $0 start DIR"
      cmd_start "$1"
      ;;
    watch)
      [[ $# -eq 2 ]] || die "usage: $0 watch DIR PID"
      cmd_watch "$1" "$2"
      ;;
    stop)
      [[ $# -eq 1 ]] || die "usage: $0 stop DIR"
      cmd_stop "$1"
      ;;
    restart)
      [[ $# -eq 2 ]] || die "usage: $0 restart DIR NAME"
      cmd_restart "$1" "$2"
      ;;
    restart-apiserver)
      [[ $# -eq 1 ]] || die "usage: $0 restart-apiserver DIR"
      cmd_restart "$1" kube-apiserver
      ;;
    -h | --help | help) usage ;;
    *)
      usage >&2
      exit 2
      ;;
  esac
}

main "$@"
