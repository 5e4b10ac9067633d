#!/usr/bin/env bash
# A real Kubernetes control plane on this machine, for tests and the demo:
# etcd, kube-apiserver and kube-controller-manager, no containers, no nodes.
# The binaries come from Debian: etcd-server, and kube-apiserver /
# kube-controller-manager built once from the `kubernetes` source package.
# Run `hack/cluster.sh --help` for the commands.
# shellcheck source-path=SCRIPTDIR
set -euo pipefail

HACK_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
readonly HACK_DIR
# shellcheck source=lib/common.sh
source "${HACK_DIR}/lib/common.sh"
# shellcheck source=lib/install.sh
source "${HACK_DIR}/lib/install.sh"
# shellcheck source=lib/pki.sh
source "${HACK_DIR}/lib/pki.sh"

WGMESH_LOG_PREFIX="[cluster]"

# Components in start order; `down` stops them in reverse.
readonly COMPONENTS=(etcd kube-apiserver kube-controller-manager)
readonly SERVICE_CIDR=10.96.0.0/16
# Marks a directory as ours, so `down` never removes anything else.
readonly MARKER=.wgmesh-cluster

# Settings; flags override the environment, which overrides the defaults.
CLUSTER_DIR=${WGMESH_CLUSTER_DIR:-/tmp/wgmesh-cluster}
APISERVER_PORT=${WGMESH_APISERVER_PORT:-6443}
READY_TIMEOUT=${WGMESH_READY_TIMEOUT:-90}
STOP_TIMEOUT=${WGMESH_STOP_TIMEOUT:-10}
NETNS=""
ADDRESS=""
FOREGROUND=0

usage() {
	cat <<'EOF'
Usage: hack/cluster.sh COMMAND [OPTIONS]

A Kubernetes control plane on this machine: etcd, kube-apiserver (RBAC,
service-account tokens, TLS only) and kube-controller-manager (all
controllers, so garbage collection and service accounts work). No nodes.

Commands:
  install   Install the Debian packages it needs and build kube-apiserver,
            kube-controller-manager, kube-scheduler and kubelet (the last two
            for hack/nodes.sh) from Debian's `kubernetes` source package
            (once, 10-20 minutes; cached in ~/.cache/wgmesh/kube-<version>/).
            Needs root.
  up        Start the control plane (runs `install` first if needed) and
            wait until it is ready. Writes DIR/kubeconfig.
  down      Stop everything `up` started and remove DIR.
  env       Print `export KUBECONFIG=DIR/kubeconfig`.
  status    Say whether the control plane in DIR is running and ready.

Options:
  --dir DIR         State directory: kubeconfig, certificates, etcd data,
                    logs/, pids/. Default: $WGMESH_CLUSTER_DIR or
                    /tmp/wgmesh-cluster. (up, down, env, status)
  --netns NS        Run all three processes inside the existing network
                    namespace NS; needs --address. (up)
  --address IP      IPv4 address the API server binds to and advertises; must be
                    assigned in NS (or on this host without --netns).
                    Default: 127.0.0.1. (up)
  --port PORT       API server secure port. Default: $WGMESH_APISERVER_PORT
                    or 6443. Fails if the port is taken. (up)
  --timeout SECONDS How long to wait for readiness. Default:
                    $WGMESH_READY_TIMEOUT or 90. (up)
  --foreground      Stay attached; Ctrl-C (or any exit) tears the control
                    plane down. Default: start in the background and return.
                    (up)
  -h, --help        Show this help, or a command's help after the command.

Examples:
  sudo hack/cluster.sh install
  hack/cluster.sh up && eval "$(hack/cluster.sh env)" && kubectl get ns
  hack/cluster.sh up --netns wgm-cp --address 10.99.0.2 --dir /tmp/cp
  hack/cluster.sh down
EOF
}

usage_command() {
	case $1 in
	install)
		cat <<'EOF'
Usage: hack/cluster.sh install

Installs golang-go, etcd-server, dpkg-dev, openssl, curl, rsync and Debian's
reflect2/json-iterator Go sources (and kubernetes-client when there is no
kubectl), enables deb-src for the Debian entries already configured in apt
(/etc/apt/sources.list.d/wgmesh-deb-src.*), then builds kube-apiserver,
kube-controller-manager, kube-scheduler and kubelet from the `kubernetes`
source package, offline, into ~/.cache/wgmesh/kube-<source version>/bin, and
keeps the tree's build/pause sources in .../pause (hack/lib/node-images.sh
compiles the sandbox image from them). A second run finds the cache and
returns in seconds. Needs root. Set WGMESH_KEEP_BUILD=1 to keep the source
tree and build output next to the cache.
EOF
		;;
	up)
		cat <<'EOF'
Usage: hack/cluster.sh up [--dir DIR] [--netns NS --address IP] [--port PORT]
                          [--timeout SECONDS] [--foreground]

Starts etcd (loopback, free port), kube-apiserver and kube-controller-manager,
waits for /readyz and for the `default` ServiceAccount (proof that the
controllers run), writes DIR/kubeconfig (user in system:masters) and returns.
Logs: DIR/logs/*.log. PIDs: DIR/pids/*.pid. If a healthy control plane from
DIR is already running, says so and succeeds.

  --dir DIR          state directory (default $WGMESH_CLUSTER_DIR or /tmp/wgmesh-cluster)
  --netns NS         run inside network namespace NS (needs root and --address)
  --address IP       bind and advertise this IPv4 address (default 127.0.0.1)
  --port PORT        API server secure port (default $WGMESH_APISERVER_PORT or 6443)
  --timeout SECONDS  readiness deadline (default $WGMESH_READY_TIMEOUT or 90)
  --foreground       stay attached; tear everything down on exit or Ctrl-C
EOF
		;;
	down)
		cat <<'EOF'
Usage: hack/cluster.sh down [--dir DIR]

Stops the processes recorded in DIR/pids (TERM, then KILL after
$WGMESH_STOP_TIMEOUT or 10 seconds) and removes DIR. Does nothing if DIR
does not exist; refuses to remove a directory `up` did not create.
EOF
		;;
	env)
		cat <<'EOF'
Usage: hack/cluster.sh env [--dir DIR]

Prints `export KUBECONFIG=DIR/kubeconfig`; use as: eval "$(hack/cluster.sh env)".
EOF
		;;
	status)
		cat <<'EOF'
Usage: hack/cluster.sh status [--dir DIR]

Exits 0 and prints the API server URL if the control plane in DIR is running
and ready; exits 1 otherwise.
EOF
		;;
	*) usage ;;
	esac
}

# --- state directory ------------------------------------------------------

pid_file() { printf '%s/pids/%s.pid\n' "${CLUSTER_DIR}" "$1"; }
log_file() { printf '%s/logs/%s.log\n' "${CLUSTER_DIR}" "$1"; }

# running_pid NAME prints the PID of component NAME if it is alive and still
# ours: its command line must mention the state directory, which guards
# against a recycled PID.
running_pid() {
	local file pid cmdline
	file=$(pid_file "$1")
	[[ -r ${file} ]] || return 1
	read -r pid <"${file}" || return 1
	[[ ${pid} =~ ^[0-9]+$ ]] || return 1
	cmdline=$(tr '\0' ' ' 2>/dev/null <"/proc/${pid}/cmdline") || return 1
	[[ ${cmdline} == *"${CLUSTER_DIR}/"* ]] || return 1
	printf '%s\n' "${pid}"
}

# save_state / load_state keep what `status` and a second `up` need to know.
save_state() {
	printf 'NETNS=%s\nADDRESS=%s\nPORT=%s\n' "${NETNS}" "${ADDRESS}" "${APISERVER_PORT}" \
		>"${CLUSTER_DIR}/cluster.env"
}

load_state() {
	local key value
	STATE_NETNS="" STATE_ADDRESS="" STATE_PORT=""
	[[ -r ${CLUSTER_DIR}/cluster.env ]] || return 1
	while IFS='=' read -r key value; do
		case ${key} in
		NETNS) STATE_NETNS=${value} ;;
		ADDRESS) STATE_ADDRESS=${value} ;;
		PORT) STATE_PORT=${value} ;;
		esac
	done <"${CLUSTER_DIR}/cluster.env"
}

# in_netns runs a command in namespace $1 ("" means this one).
in_netns() {
	local ns=$1
	shift
	if [[ -n ${ns} ]]; then
		ip netns exec "${ns}" "$@"
	else
		"$@"
	fi
}

# api_get NS ADDRESS PORT PATH: GET as the admin, from inside the namespace
# the API server runs in (the host may have no route to it).
api_get() {
	local ns=$1 address=$2 port=$3 path=$4 pki=${CLUSTER_DIR}/pki
	in_netns "${ns}" curl -fsS --max-time 5 --cacert "${pki}/ca.crt" \
		--cert "${pki}/admin.crt" --key "${pki}/admin.key" \
		"https://${address}:${port}${path}"
}

# cluster_ready succeeds when the control plane recorded in DIR is alive and
# its API server answers /readyz with "ok".
cluster_ready() {
	local name
	load_state || return 1
	for name in "${COMPONENTS[@]}"; do
		running_pid "${name}" >/dev/null || return 1
	done
	[[ $(api_get "${STATE_NETNS}" "${STATE_ADDRESS}" "${STATE_PORT}" /readyz 2>/dev/null) == ok ]]
}

# stop_component NAME: TERM, wait up to STOP_TIMEOUT seconds, then KILL.
stop_component() {
	local name=$1 pid waited=0
	pid=$(running_pid "${name}") || return 0
	log "stopping ${name} (pid ${pid})"
	kill -TERM "${pid}" 2>/dev/null || return 0
	while kill -0 "${pid}" 2>/dev/null; do
		if ((waited >= STOP_TIMEOUT * 10)); then
			log "${name} ignored TERM for ${STOP_TIMEOUT}s; sending KILL"
			kill -KILL "${pid}" 2>/dev/null || true
			break
		fi
		sleep 0.1
		waited=$((waited + 1))
	done
}

stop_all() {
	local i
	for ((i = ${#COMPONENTS[@]} - 1; i >= 0; i--)); do
		stop_component "${COMPONENTS[i]}"
	done
}

# remove_state deletes DIR, but only if `up` created it.
remove_state() {
	[[ -e ${CLUSTER_DIR} ]] || return 0
	[[ -e ${CLUSTER_DIR}/${MARKER} ]] ||
		die "${CLUSTER_DIR} was not created by hack/cluster.sh up; not removing it"
	rm -rf -- "${CLUSTER_DIR}"
}

# --- starting ---------------------------------------------------------------

# port_taken PORT: is anything listening on PORT (any address) in NETNS?
port_taken() {
	[[ -n $(in_netns "${NETNS}" ss -Hltn "sport = :$1") ]]
}

# free_port FROM [EXCEPT]: the first port >= FROM nobody listens on.
free_port() {
	local port=$1 except=${2:-}
	for ((; port < $1 + 200; port++)); do
		[[ ${port} == "${except}" ]] && continue
		port_taken "${port}" || {
			printf '%s\n' "${port}"
			return 0
		}
	done
	die "no free port in $1-$(($1 + 199))"
}

# start_component NAME COMMAND...: start in the background, in NETNS, in
# its own session (so it outlives this shell and a Ctrl-C in the terminal
# does not reach it: teardown is ours, in order), logging to logs/NAME.log.
start_component() {
	local name=$1 pidfile tries=0
	shift
	pidfile=$(pid_file "${name}")
	local -a ns=()
	[[ -z ${NETNS} ]] || ns=(ip netns exec "${NETNS}")
	# The wrapper records its own PID and then execs, so the PID on file is
	# the component's (ip netns exec execs too).
	# shellcheck disable=SC2016 # expanded by the inner bash, on purpose
	setsid bash -c 'echo "$$" >"$0" && exec "$@"' "${pidfile}" "${ns[@]}" "$@" \
		</dev/null >"$(log_file "${name}")" 2>&1 &
	until [[ -s ${pidfile} ]]; do
		((++tries < 50)) || die "${name} did not start; see $(log_file "${name}")"
		sleep 0.1
	done
}

# fail_component NAME MESSAGE: report with the tail of NAME's log and exit.
fail_component() {
	local name=$1 message=$2
	{
		printf '%s error: %s\n' "${WGMESH_LOG_PREFIX}" "${message}"
		printf -- '--- last lines of %s ---\n' "$(log_file "${name}")"
		tail -n 25 "$(log_file "${name}")" 2>/dev/null || true
		printf -- '---\n'
	} >&2
	exit 1
}

# await NAME WHAT CHECK...: poll CHECK until it succeeds, failing early if
# component NAME exits and at the READY_TIMEOUT deadline.
await() {
	local name=$1 what=$2 deadline
	shift 2
	deadline=$((SECONDS + READY_TIMEOUT))
	until "$@" >/dev/null 2>&1; do
		running_pid "${name}" >/dev/null || fail_component "${name}" "${name} exited while waiting for ${what}"
		((SECONDS < deadline)) || fail_component "${name}" "timed out after ${READY_TIMEOUT}s waiting for ${what}"
		sleep 0.5
	done
}

# shellcheck disable=SC2317 # called through await
etcd_healthy() {
	[[ $(in_netns "${NETNS}" curl -fsS --max-time 2 "http://127.0.0.1:$1/health") == *'"health":"true"'* ]]
}

# shellcheck disable=SC2317 # called through await
apiserver_ready() {
	[[ $(api_get "${NETNS}" "${ADDRESS}" "${APISERVER_PORT}" /readyz) == ok ]]
}

# The serviceaccount controller creates `default` in every namespace: its
# arrival shows the controller manager is connected and running controllers.
# shellcheck disable=SC2317 # called through await
controllers_running() {
	api_get "${NETNS}" "${ADDRESS}" "${APISERVER_PORT}" /api/v1/namespaces/default/serviceaccounts/default
}

# check_up_args validates the options before anything is started.
check_up_args() {
	if [[ -n ${NETNS} ]]; then
		need_root "up --netns"
		[[ -n ${ADDRESS} ]] || die "--netns needs --address (an address assigned in ${NETNS})"
		ip netns list | awk -v ns="${NETNS}" '$1 == ns { found = 1 } END { exit !found }' ||
			die "network namespace ${NETNS} does not exist (ip netns add ${NETNS})"
		# etcd listens on the namespace's loopback.
		[[ $(ip -n "${NETNS}" -o link show lo) == *[\<,]UP[,\>]* ]] ||
			die "loopback is down in netns ${NETNS} (ip -n ${NETNS} link set lo up)"
	fi
	ADDRESS=${ADDRESS:-127.0.0.1}
	if [[ ! ${APISERVER_PORT} =~ ^[0-9]+$ ]] || ((APISERVER_PORT == 0 || APISERVER_PORT > 65535)); then
		die "--port must be a TCP port number, not '${APISERVER_PORT}'"
	fi
	[[ ${READY_TIMEOUT} =~ ^[0-9]+$ ]] || die "--timeout must be whole seconds, not '${READY_TIMEOUT}'"
	if [[ ${ADDRESS} != 127.0.0.1 ]] && ! in_netns "${NETNS}" ip -o addr show |
		awk -v a="${ADDRESS}" '{ split($4, p, "/"); if (p[1] == a) found = 1 } END { exit !found }'; then
		die "${ADDRESS} is not assigned to any interface${NETNS:+ in netns ${NETNS}}"
	fi
}

# handle_existing_state decides what to do with a DIR left from before:
# reuse a healthy control plane, refuse a half-alive one, clear a dead one.
# Returns 0 when a healthy one is running.
handle_existing_state() {
	local name
	[[ -e ${CLUSTER_DIR} ]] || return 1
	if [[ ! -e ${CLUSTER_DIR}/${MARKER} ]]; then
		[[ -z $(ls -A "${CLUSTER_DIR}") ]] ||
			die "${CLUSTER_DIR} exists and was not created by hack/cluster.sh; choose another --dir"
		return 1
	fi
	if cluster_ready; then
		if [[ ${STATE_NETNS} != "${NETNS}" || ${STATE_ADDRESS} != "${ADDRESS}" || ${STATE_PORT} != "${APISERVER_PORT}" ]]; then
			die "a control plane with other settings runs from ${CLUSTER_DIR} (https://${STATE_ADDRESS}:${STATE_PORT}${STATE_NETNS:+ in netns ${STATE_NETNS}}); run down first"
		fi
		return 0
	fi
	for name in "${COMPONENTS[@]}"; do
		if running_pid "${name}" >/dev/null; then
			die "the control plane in ${CLUSTER_DIR} is running but not ready (see ${CLUSTER_DIR}/logs); run: hack/cluster.sh down --dir ${CLUSTER_DIR}"
		fi
	done
	log "removing stale state in ${CLUSTER_DIR}"
	remove_state
	return 1
}

print_usage_hint() {
	cat <<EOF
Control plane ready: https://${ADDRESS}:${APISERVER_PORT}${NETNS:+ (in netns ${NETNS})}
Logs: ${CLUSTER_DIR}/logs/   Stop: hack/cluster.sh down --dir ${CLUSTER_DIR}
Use it with:
  export KUBECONFIG=${CLUSTER_DIR}/kubeconfig
EOF
}

# on_up_exit stops whatever a failed `up` started; the logs stay for reading.
# shellcheck disable=SC2317 # called from the EXIT trap
on_up_exit() {
	local status=$?
	((status == 0)) && return 0
	stop_all
	log "logs kept in ${CLUSTER_DIR}/logs; remove with: hack/cluster.sh down --dir ${CLUSTER_DIR}"
}

cmd_up() {
	local bin etcd_port etcd_peer_port pki server started=${SECONDS}
	check_up_args
	if handle_existing_state; then
		log "already running from ${CLUSTER_DIR}"
		print_usage_hint
		((FOREGROUND == 0)) || die "--foreground: it was started by another up; use down to stop it"
		return 0
	fi

	# Not `|| cmd_install`: errexit is off in the left side of || and in
	# everything called from there.
	if ! bin=$(kube_bin_dir) || ! have etcd || ! have openssl || ! have curl; then
		log "binaries or packages missing; running install"
		cmd_install
		bin=$(kube_bin_dir) || die "install finished but the binaries are not in the cache"
	fi

	if port_taken "${APISERVER_PORT}"; then
		die "port ${APISERVER_PORT} is already in use${NETNS:+ in netns ${NETNS}}; pick another with --port or WGMESH_APISERVER_PORT"
	fi
	etcd_port=$(free_port 2379 "${APISERVER_PORT}")
	etcd_peer_port=$(free_port $((etcd_port + 1)) "${APISERVER_PORT}")

	mkdir -p "${CLUSTER_DIR}"/{pids,logs,etcd}
	touch "${CLUSTER_DIR}/${MARKER}"
	chmod 700 "${CLUSTER_DIR}/etcd"
	save_state
	trap on_up_exit EXIT

	pki=${CLUSTER_DIR}/pki
	make_pki "${pki}" "${ADDRESS}"
	server="https://${ADDRESS}:${APISERVER_PORT}"
	write_kubeconfig "${CLUSTER_DIR}/kubeconfig" "${server}" "${pki}/ca.crt" "${pki}/admin.crt" "${pki}/admin.key"
	write_kubeconfig "${CLUSTER_DIR}/controller-manager.kubeconfig" "${server}" "${pki}/ca.crt" \
		"${pki}/controller-manager.crt" "${pki}/controller-manager.key"

	# etcd listens on loopback only (inside NETNS when given): nothing but the
	# API server may talk to it, and it has no TLS.
	log "starting etcd on 127.0.0.1:${etcd_port}${NETNS:+ in netns ${NETNS}}"
	start_component etcd etcd --name wgmesh --data-dir "${CLUSTER_DIR}/etcd" --logger zap \
		--listen-client-urls "http://127.0.0.1:${etcd_port}" \
		--advertise-client-urls "http://127.0.0.1:${etcd_port}" \
		--listen-peer-urls "http://127.0.0.1:${etcd_peer_port}" \
		--initial-advertise-peer-urls "http://127.0.0.1:${etcd_peer_port}" \
		--initial-cluster "wgmesh=http://127.0.0.1:${etcd_peer_port}"
	await etcd "etcd /health" etcd_healthy "${etcd_port}"

	# The `kubernetes` Service endpoint is the advertised address; Endpoints
	# may not hold loopback addresses, so on loopback nothing reconciles it.
	local reconciler=lease
	[[ ${ADDRESS} != 127.* ]] || reconciler=none
	log "starting kube-apiserver on ${server}"
	start_component kube-apiserver "${bin}/kube-apiserver" \
		--etcd-servers "http://127.0.0.1:${etcd_port}" \
		--bind-address "${ADDRESS}" --advertise-address "${ADDRESS}" \
		--secure-port "${APISERVER_PORT}" \
		--cert-dir "${pki}" \
		--tls-cert-file "${pki}/apiserver.crt" --tls-private-key-file "${pki}/apiserver.key" \
		--client-ca-file "${pki}/ca.crt" \
		--authorization-mode Node,RBAC \
		--service-account-key-file "${pki}/sa.pub" \
		--service-account-signing-key-file "${pki}/sa.key" \
		--service-account-issuer https://kubernetes.default.svc.cluster.local \
		--service-cluster-ip-range "${SERVICE_CIDR}" \
		--endpoint-reconciler-type "${reconciler}" \
		--kubelet-client-certificate "${pki}/apiserver-kubelet-client.crt" \
		--kubelet-client-key "${pki}/apiserver-kubelet-client.key" \
		--kubelet-preferred-address-types InternalIP \
		--allow-privileged \
		--enable-aggregator-routing=true
	await kube-apiserver "kube-apiserver /readyz" apiserver_ready

	# --port 0 --secure-port 0: no health/metrics endpoints, so nothing to
	# collide with (1.20 still opens insecure 10252 unless told not to).
	log "starting kube-controller-manager"
	start_component kube-controller-manager "${bin}/kube-controller-manager" \
		--kubeconfig "${CLUSTER_DIR}/controller-manager.kubeconfig" \
		--controllers '*' \
		--use-service-account-credentials \
		--service-account-private-key-file "${pki}/sa.key" \
		--root-ca-file "${pki}/ca.crt" \
		--cluster-signing-cert-file "${pki}/ca.crt" --cluster-signing-key-file "${pki}/ca.key" \
		--service-cluster-ip-range "${SERVICE_CIDR}" \
		--leader-elect=false --port 0 --secure-port 0
	await kube-controller-manager "the controllers (default ServiceAccount)" controllers_running

	trap - EXIT
	log "up in $((SECONDS - started))s"
	print_usage_hint
	((FOREGROUND)) && run_foreground
	return 0
}

# run_foreground keeps `up --foreground` attached until Ctrl-C or until a
# component exits, and tears everything down either way.
run_foreground() {
	local name
	trap 'stop_all; remove_state; log "stopped; removed ${CLUSTER_DIR}"' EXIT
	trap 'exit 130' INT TERM
	log "running in the foreground; Ctrl-C stops it"
	while true; do
		# The components are this shell's children: wait returns when one
		# exits, or when a trapped signal arrives.
		wait -n || true
		for name in "${COMPONENTS[@]}"; do
			running_pid "${name}" >/dev/null || fail_component "${name}" "${name} exited"
		done
	done
}

cmd_down() {
	if [[ ! -e ${CLUSTER_DIR} ]]; then
		log "nothing to stop: ${CLUSTER_DIR} does not exist"
		return 0
	fi
	[[ -e ${CLUSTER_DIR}/${MARKER} ]] ||
		die "${CLUSTER_DIR} was not created by hack/cluster.sh up; not touching it"
	stop_all
	remove_state
	log "stopped; removed ${CLUSTER_DIR}"
}

cmd_env() {
	[[ -r ${CLUSTER_DIR}/kubeconfig ]] ||
		die "no control plane in ${CLUSTER_DIR}; start one with: hack/cluster.sh up --dir ${CLUSTER_DIR}"
	printf 'export KUBECONFIG=%q\n' "${CLUSTER_DIR}/kubeconfig"
}

cmd_status() {
	if cluster_ready; then
		printf 'ready: https://%s:%s%s (%s)\n' "${STATE_ADDRESS}" "${STATE_PORT}" \
			"${STATE_NETNS:+ in netns ${STATE_NETNS}}" "${CLUSTER_DIR}"
		return 0
	fi
	printf 'not running: %s\n' "${CLUSTER_DIR}"
	return 1
}

cmd_install() {
	need_root install
	install_kube
}

# --- command line -------------------------------------------------------------

main() {
	local command=${1:-}
	[[ -n ${command} ]] || {
		usage >&2
		exit 2
	}
	shift
	case ${command} in
	-h | --help | help)
		usage
		return 0
		;;
	install | up | down | env | status) ;;
	*) die "unknown command '${command}' (try --help)" ;;
	esac

	while (($# > 0)); do
		case $1 in
		-h | --help)
			usage_command "${command}"
			return 0
			;;
		--dir | --netns | --address | --port | --timeout)
			(($# >= 2)) || die "$1 needs a value"
			case $1 in
			--dir) CLUSTER_DIR=$2 ;;
			--netns) NETNS=$2 ;;
			--address) ADDRESS=$2 ;;
			--port) APISERVER_PORT=$2 ;;
			--timeout) READY_TIMEOUT=$2 ;;
			esac
			shift 2
			;;
		--foreground)
			FOREGROUND=1
			shift
			;;
		*) die "unknown option '$1' for ${command} (try: hack/cluster.sh ${command} --help)" ;;
		esac
	done
	# Canonical, because running_pid matches it in the processes' arguments.
	CLUSTER_DIR=$(realpath -m -- "${CLUSTER_DIR}")
	[[ ${CLUSTER_DIR} != / ]] || die "--dir may not be /"

	case ${command} in
	install) cmd_install ;;
	up) cmd_up ;;
	down) cmd_down ;;
	env) cmd_env ;;
	status) cmd_status ;;
	esac
}

# On one line with main: bash reads a script as it runs, so nothing after
# this line is read even if the file is edited while a long install runs.
main "$@"; exit
