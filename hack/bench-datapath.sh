#!/usr/bin/env bash
# Datapath benchmark: two network namespaces joined by a veth pair, and through each of
#   plain veth, wgmesh (release build), boringtun-cli 0.7.1 and Debian's wireguard-go
# it measures iperf3 TCP throughput (1 and 4 streams) with the sender's retransmits, ping RTT
# (p50/p99) and the CPU time the device processes spend per GB moved; then, with 1000 more
# peers set on one device (two allowed IPs and an endpoint each), how long `wg set` and
# `wg show` take, the device's memory per peer and the 1-stream throughput. It prints wgmesh's
# ratio to each other implementation and the datapath goals (docs/datapath.md) side by side.
# All figures come from the same run. Figures, not assertions.
#
# usage: hack/bench-datapath.sh [--seconds N] [--pings N] [--peers N] [--only "plain wgmesh ..."]
# needs root; installs its tools via hack/lib/deps.sh.
set -euo pipefail

SECONDS_PER_RUN=10
PINGS=200
PEERS=1000
IMPLS="plain wgmesh boringtun wireguard-go"
while (($#)); do
    case "$1" in
        --seconds) SECONDS_PER_RUN="$2"; shift 2 ;;
        --pings) PINGS="$2"; shift 2 ;;
        --peers) PEERS="$2"; shift 2 ;;
        --only) IMPLS="$2"; shift 2 ;;
        -h|--help) sed -n '2,14p' "$0"; exit 0 ;;
        *) echo "unknown argument $1" >&2; exit 2 ;;
    esac
done

if [[ $(id -u) -ne 0 ]]; then
    echo "bench-datapath: needs root (network namespaces, TUN)" >&2
    exit 1
fi

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# shellcheck source=hack/lib/deps.sh
source "$ROOT/hack/lib/deps.sh"

echo "building wgmesh-agent (release)..." >&2
cargo build --release -q -p wgmesh-agent --manifest-path "$ROOT/Cargo.toml"
TARGET_DIR="$(cargo metadata --format-version 1 --no-deps --manifest-path "$ROOT/Cargo.toml" |
    python3 -c 'import json,sys; print(json.load(sys.stdin)["target_directory"])')"
WGMESH="$TARGET_DIR/release/wgmesh-agent"
BORINGTUN="$WGMESH_BORINGTUN_CLI"

NS_A="wgbench-$$-a"
NS_B="wgbench-$$-b"
VETH_A="wbva$$"
VETH_B="wbvb$$"
UNDER_A=192.168.60.1
UNDER_B=192.168.60.2
INNER_A=10.60.0.1
INNER_B=10.60.0.2
WORK="$(mktemp -d)"
PIDS=()

cleanup() {
    set +e
    for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null; done
    for ns in "$NS_A" "$NS_B"; do
        for pid in $(ip netns pids "$ns" 2>/dev/null); do kill -9 "$pid" 2>/dev/null; done
        ip netns del "$ns" 2>/dev/null
    done
    rm -f /var/run/wireguard/wbga$$.sock /var/run/wireguard/wbgb$$.sock
    rm -rf "$WORK"
}
trap cleanup EXIT

ip netns add "$NS_A"
ip netns add "$NS_B"
ip link add "$VETH_A" netns "$NS_A" type veth peer name "$VETH_B" netns "$NS_B"
ip -n "$NS_A" addr add "$UNDER_A/24" dev "$VETH_A"
ip -n "$NS_B" addr add "$UNDER_B/24" dev "$VETH_B"
for ns in "$NS_A" "$NS_B"; do ip -n "$ns" link set lo up; done
ip -n "$NS_A" link set "$VETH_A" up
ip -n "$NS_B" link set "$VETH_B" up

# Sum of utime+stime (clock ticks) of the given pids, all threads included.
cpu_ticks() {
    local total=0 pid
    for pid in "$@"; do
        # Fields after the "(comm)" part: utime is the 12th, stime the 13th.
        read -r -a f < <(sed 's/^.*) //' "/proc/$pid/stat")
        total=$((total + f[11] + f[12]))
    done
    echo "$total"
}

wait_for_socket() {
    local sock="/var/run/wireguard/$1.sock"
    for _ in $(seq 1 200); do
        [[ -S "$sock" ]] && return 0
        sleep 0.05
    done
    echo "device $1 did not create $sock" >&2
    exit 1
}

# start_device <impl> <ns> <iface>: prints the device pid.
start_device() {
    local impl="$1" ns="$2" iface="$3"
    case "$impl" in
        wgmesh)
            ip netns exec "$ns" "$WGMESH" device "$iface" --foreground >"$WORK/$iface.log" 2>&1 &
            ;;
        boringtun)
            WG_SUDO=1 ip netns exec "$ns" "$BORINGTUN" "$iface" --foreground \
                --disable-drop-privileges -v error >"$WORK/$iface.log" 2>&1 &
            ;;
        wireguard-go)
            WG_PROCESS_FOREGROUND=1 LOG_LEVEL=error ip netns exec "$ns" wireguard-go "$iface" \
                >"$WORK/$iface.log" 2>&1 &
            ;;
    esac
    echo $!
}

stop_devices() {
    for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
    for pid in "${PIDS[@]}"; do
        for _ in $(seq 1 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.05; done
        kill -9 "$pid" 2>/dev/null || true
    done
    PIDS=()
    rm -f /var/run/wireguard/wbga$$.sock /var/run/wireguard/wbgb$$.sock
}

# setup_tunnel <impl>: devices on both sides, peered, addressed, up.
setup_tunnel() {
    local impl="$1" ka kb pa pb
    local ia="wbga$$" ib="wbgb$$"
    PIDS=("$(start_device "$impl" "$NS_A" "$ia")" "$(start_device "$impl" "$NS_B" "$ib")")
    wait_for_socket "$ia"
    wait_for_socket "$ib"
    ka="$(wg genkey)"; kb="$(wg genkey)"
    pa="$(wg pubkey <<<"$ka")"; pb="$(wg pubkey <<<"$kb")"
    echo "$ka" >"$WORK/ka"; echo "$kb" >"$WORK/kb"
    ip netns exec "$NS_A" wg set "$ia" private-key "$WORK/ka" listen-port 51820 \
        peer "$pb" allowed-ips "$INNER_B/32" endpoint "$UNDER_B:51821"
    ip netns exec "$NS_B" wg set "$ib" private-key "$WORK/kb" listen-port 51821 \
        peer "$pa" allowed-ips "$INNER_A/32" endpoint "$UNDER_A:51820"
    ip -n "$NS_A" addr add "$INNER_A/24" dev "$ia"
    ip -n "$NS_B" addr add "$INNER_B/24" dev "$ib"
    ip -n "$NS_A" link set "$ia" mtu 1420 up
    ip -n "$NS_B" link set "$ib" mtu 1420 up
    # Handshake before measuring.
    ip netns exec "$NS_A" ping -c 1 -W 5 "$INNER_B" >/dev/null
}

# iperf_server_start: an iperf3 server in namespace B, returning once it listens.
iperf_server_start() {
    ip netns exec "$NS_B" iperf3 -s -D -I "$WORK/iperf-server.pid" >/dev/null
    for _ in $(seq 1 100); do
        if [[ -n "$(ip netns exec "$NS_B" ss -Hltn 'sport = :5201')" ]]; then return 0; fi
        sleep 0.05
    done
    echo "iperf3 server did not start listening" >&2
    exit 1
}

iperf_server_stop() {
    kill "$(cat "$WORK/iperf-server.pid")" 2>/dev/null || true
    rm -f "$WORK/iperf-server.pid"
}

# iperf_run <target> <streams>: prints "<bits/s> <bytes> <retransmits>".
iperf_run() {
    local target="$1" streams="$2"
    ip netns exec "$NS_A" iperf3 -c "$target" -t "$SECONDS_PER_RUN" -P "$streams" -J >"$WORK/iperf.json"
    python3 - "$WORK/iperf.json" <<'PY'
import json, sys
end = json.load(open(sys.argv[1]))["end"]
d = end["sum_received"]
print(d["bits_per_second"], d["bytes"], end["sum_sent"].get("retransmits", 0))
PY
}

# now: seconds since the epoch, with nanoseconds.
now() { date +%s.%N; }

# rss_kib <pid>: resident memory of the process.
rss_kib() { awk '/^VmRSS:/ {print $2}' "/proc/$1/status"; }

# peers_run <iface> <pid>: sets $PEERS more peers on device A with one `wg set`, reads them back
# with `wg show dump`; prints "<set s> <show s> <KiB per peer>".
peers_run() {
    local iface="$1" pid="$2" before after t0 t1 t2 shown
    python3 - "$PEERS" >"$WORK/peers.args" <<'PY'
import base64, os, sys
for i in range(int(sys.argv[1])):
    key = base64.b64encode(os.urandom(32)).decode()
    print(f"peer\n{key}\nallowed-ips\n10.{64 + i // 256}.{i % 256}.0/24,fd99:{i:x}::/64"
          f"\nendpoint\n192.168.60.{100 + i % 100}:{20000 + i}")
PY
    mapfile -t args <"$WORK/peers.args"
    before="$(rss_kib "$pid")"
    t0="$(now)"
    ip netns exec "$NS_A" wg set "$iface" "${args[@]}"
    t1="$(now)"
    shown="$(ip netns exec "$NS_A" wg show "$iface" dump | wc -l)"
    t2="$(now)"
    after="$(rss_kib "$pid")"
    if ((shown != PEERS + 2)); then
        echo "wg show listed $((shown - 1)) peers, expected $((PEERS + 1))" >&2
    fi
    python3 -c "print(f'{$t1-$t0:.3f} {$t2-$t1:.3f} {($after-$before)/$PEERS:.1f}')"
}

# ping_run <target>: prints "<p50 ms> <p99 ms>".
ping_run() {
    ip netns exec "$NS_A" ping -c "$PINGS" -i 0.01 -W 1 "$1" >"$WORK/ping.txt" || true
    python3 - "$WORK/ping.txt" <<'PY'
import re, sys
rtts = sorted(float(m) for m in re.findall(r"time=([0-9.]+) ms", open(sys.argv[1]).read()))
if not rtts:
    print("nan nan"); sys.exit()
pick = lambda q: rtts[min(len(rtts) - 1, int(q * len(rtts)))]
print(f"{pick(0.50):.3f} {pick(0.99):.3f}")
PY
}

TICKS="$(getconf CLK_TCK)"
declare -A R
for impl in $IMPLS; do
    echo "measuring $impl..." >&2
    if [[ "$impl" == plain ]]; then
        target="$UNDER_B"
    else
        setup_tunnel "$impl"
        target="$INNER_B"
    fi
    iperf_server_start
    for streams in 1 4; do
        before=0; after=0
        if ((${#PIDS[@]})); then before="$(cpu_ticks "${PIDS[@]}")"; fi
        read -r bps bytes retr < <(iperf_run "$target" "$streams")
        R[$impl,retr$streams]="$retr"
        if ((${#PIDS[@]})); then after="$(cpu_ticks "${PIDS[@]}")"; fi
        R[$impl,gbps$streams]="$(python3 -c "print(f'{$bps/1e9:.2f}')")"
        if ((${#PIDS[@]})); then
            R[$impl,cpu$streams]="$(python3 -c "print(f'{($after-$before)/$TICKS/($bytes/1e9):.2f}')")"
        else
            R[$impl,cpu$streams]="-"
        fi
    done
    iperf_server_stop
    read -r p50 p99 < <(ping_run "$target")
    R[$impl,p50]="$p50"
    R[$impl,p99]="$p99"
    R[$impl,set]="-"; R[$impl,show]="-"; R[$impl,kib]="-"; R[$impl,gbpsN]="-"
    if [[ "$impl" != plain ]] && ((PEERS > 0)); then
        read -r pset pshow pkib < <(peers_run "wbga$$" "${PIDS[0]}")
        R[$impl,set]="$pset"; R[$impl,show]="$pshow"; R[$impl,kib]="$pkib"
        iperf_server_start
        read -r bps _ _ < <(iperf_run "$target" 1)
        R[$impl,gbpsN]="$(python3 -c "print(f'{$bps/1e9:.2f}')")"
        iperf_server_stop
    fi
    stop_devices
    if [[ "$impl" != plain ]]; then
        ip -n "$NS_A" link del "wbga$$" 2>/dev/null || true
        ip -n "$NS_B" link del "wbgb$$" 2>/dev/null || true
    fi
done

echo
echo "datapath benchmark: $(nproc) cores, $(uname -r), ${SECONDS_PER_RUN}s per iperf3 run, ${PINGS} pings at 10 ms"
echo "CPU s/GB: utime+stime of both device processes per GB received (lower is better)"
echo "retr: TCP retransmits the sender counted in the run"
printf '%-14s %10s %10s %8s %8s %10s %10s %12s %12s\n' implementation "1x Gbit/s" "4x Gbit/s" \
    "retr 1x" "retr 4x" "p50 ms" "p99 ms" "CPU s/GB 1x" "CPU s/GB 4x"
for impl in $IMPLS; do
    printf '%-14s %10s %10s %8s %8s %10s %10s %12s %12s\n' "$impl" "${R[$impl,gbps1]}" \
        "${R[$impl,gbps4]}" "${R[$impl,retr1]}" "${R[$impl,retr4]}" "${R[$impl,p50]}" \
        "${R[$impl,p99]}" "${R[$impl,cpu1]}" "${R[$impl,cpu4]}"
done
if ((PEERS > 0)); then
    echo
    echo "with $PEERS more peers on one device (2 allowed IPs and an endpoint each)"
    printf '%-14s %12s %12s %14s %12s\n' implementation "wg set s" "wg show s" "KiB per peer" "1x Gbit/s"
    for impl in $IMPLS; do
        [[ "$impl" == plain ]] && continue
        printf '%-14s %12s %12s %14s %12s\n' "$impl" "${R[$impl,set]}" "${R[$impl,show]}" \
            "${R[$impl,kib]}" "${R[$impl,gbpsN]}"
    done
fi
if [[ " $IMPLS " == *" wgmesh "* ]]; then
    echo
    echo "wgmesh relative to each (throughput: >1 is faster; RTT and CPU/GB: <1 is better)"
    printf '%-14s %10s %10s %10s %10s %12s %12s\n' "vs" "1x" "4x" "p50" "p99" "CPU/GB 1x" "CPU/GB 4x"
    for impl in $IMPLS; do
        [[ "$impl" == wgmesh ]] && continue
        python3 - "$impl" "${R[wgmesh,gbps1]}" "${R[$impl,gbps1]}" "${R[wgmesh,gbps4]}" "${R[$impl,gbps4]}" \
            "${R[wgmesh,p50]}" "${R[$impl,p50]}" "${R[wgmesh,p99]}" "${R[$impl,p99]}" \
            "${R[wgmesh,cpu1]}" "${R[$impl,cpu1]}" "${R[wgmesh,cpu4]}" "${R[$impl,cpu4]}" <<'PY'
import sys
name, *v = sys.argv[1:]
def ratio(a, b):
    try:
        return f"{float(a) / float(b):.2f}"
    except (ValueError, ZeroDivisionError):
        return "-"
cells = [ratio(v[i], v[i + 1]) for i in range(0, len(v), 2)]
print(f"{name:<14} {cells[0]:>10} {cells[1]:>10} {cells[2]:>10} {cells[3]:>10} {cells[4]:>12} {cells[5]:>12}")
PY
    done
fi

if [[ " $IMPLS " == *" wgmesh "* && " $IMPLS " == *" plain "* && " $IMPLS " == *" boringtun "* ]]; then
    echo
    echo "goals (docs/datapath.md)"
    python3 - "${R[wgmesh,gbps1]}" "${R[boringtun,gbps1]}" "${R[plain,gbps1]}" "${R[wgmesh,gbps4]}" \
        "${R[wgmesh,cpu1]}" "${R[wgmesh,p50]}" "${R[plain,p50]}" "${R[wgmesh,set]}" "${R[wgmesh,show]}" \
        "${R[wgmesh,retr1]}" "${R[plain,retr1]}" <<'PY'
import sys
w1, b1, p1, w4, cpu, wp50, pp50, wset, wshow, wretr, pretr = sys.argv[1:]
def f(x):
    try:
        return float(x)
    except ValueError:
        return float("nan")
rows = [
    ("wgmesh / boringtun-cli, 1 stream", f(w1) / f(b1), ">=", 6),
    ("wgmesh / plain veth, 1 stream", f(w1) / f(p1), ">=", 0.25),
    ("wgmesh 4 streams / 1 stream", f(w4) / f(w1), ">=", 1.3),
    ("wgmesh CPU s/GB, both devices", f(cpu), "<=", 1.5),
    ("wgmesh added p50 RTT over plain, ms", f(wp50) - f(pp50), "<=", 0.05),
    ("wgmesh wg set of the peers, s", f(wset), "<", 1),
    ("wgmesh wg show of the peers, s", f(wshow), "<", 1),
]
print(f"{'figure':<40} {'value':>8} {'goal':>8} {'met':>5}")
for name, v, op, goal in rows:
    met = {">=": v >= goal, "<=": v <= goal, "<": v < goal}[op]
    print(f"{name:<40} {v:>8.2f} {op + ' ' + str(goal):>8} {'yes' if met else 'no':>5}")
print(f"retransmits, 1 stream: wgmesh {wretr}, plain veth {pretr}")
PY
fi
