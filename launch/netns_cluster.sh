#!/usr/bin/env bash
# A cluster on one machine: N network namespaces as nodes, joined by veth pairs to a bridge (in a
# namespace of its own, so the host's network is never touched), each node's link limited with
# `tc qdisc ... tbf`, and `torchrun --nnodes N --nproc-per-node P` in every node with a real c10d
# rendezvous. Ranks of one node talk over their namespace's own address (the kernel delivers it on
# loopback: fast); ranks of different nodes cross the limited link. Everything it made is removed on
# exit, also on failure or Ctrl-C. Needs root and iproute2 (ip, tc).
#
#   sudo launch/netns_cluster.sh --nodes 2 --nproc-per-node 2 --rate 200mbit -- \
#       examples/train_lm.py --ep-size 4 --exchange hierarchical
#
# Options (before --; everything after -- is the torchrun script and its arguments):
#   --nodes N            nodes (namespaces), default 2
#   --nproc-per-node P   ranks per node, default 2
#   --rate R             tbf rate of every node's link in each direction (e.g. 200mbit, 1gbit);
#                        "none" (default) leaves the links unlimited
#   --burst B            tbf burst, default 64kb;   --tc-latency L  tbf queue latency, default 200ms
#   --prefix X           name prefix of namespaces and links, default epc$$ (unique per run)
#   --subnet A.B.C       the nodes get A.B.C.1 .. A.B.C.N, default 10.77.0
#   --port PORT          rendezvous port on node 0, default 29500
#   --stats FILE         at the end, each node link's counters as JSON lines: bytes sent and received
#                        (the veth's statistics) and bytes sent through its root qdisc (tc -s)
#   --python PY          the interpreter that runs torchrun, default: python3 on PATH
# Each node's output is prefixed with [nodeI]. The exit status is the first failing node's.
set -euo pipefail

NODES=2 NPROC=2 RATE=none BURST=64kb TC_LATENCY=200ms PREFIX="epc$$" SUBNET=10.77.0 PORT=29500
STATS="" PY="$(command -v python3 || true)"
while [[ $# -gt 0 ]]; do
  case "$1" in
    --nodes) NODES="$2"; shift 2 ;;
    --nproc-per-node) NPROC="$2"; shift 2 ;;
    --rate) RATE="$2"; shift 2 ;;
    --burst) BURST="$2"; shift 2 ;;
    --tc-latency) TC_LATENCY="$2"; shift 2 ;;
    --prefix) PREFIX="$2"; shift 2 ;;
    --subnet) SUBNET="$2"; shift 2 ;;
    --port) PORT="$2"; shift 2 ;;
    --stats) STATS="$2"; shift 2 ;;
    --python) PY="$2"; shift 2 ;;
    --) shift; break ;;
    *) echo "netns_cluster: unknown option $1 (the script and its arguments go after --)" >&2; exit 2 ;;
  esac
done
[[ $# -ge 1 ]] || { echo "netns_cluster: no script given (… -- script.py args)" >&2; exit 2; }
[[ "$(id -u)" == 0 ]] || { echo "netns_cluster: needs root (network namespaces, tc)" >&2; exit 2; }
command -v ip >/dev/null && command -v tc >/dev/null || { echo "netns_cluster: needs iproute2 (ip, tc)" >&2; exit 2; }
[[ "$NODES" =~ ^[0-9]+$ && "$NODES" -ge 1 && "$NODES" -le 200 ]] || { echo "netns_cluster: --nodes must be 1..200" >&2; exit 2; }
[[ "$NPROC" =~ ^[0-9]+$ && "$NPROC" -ge 1 ]] || { echo "netns_cluster: --nproc-per-node must be >= 1" >&2; exit 2; }
[[ -n "$PY" ]] || { echo "netns_cluster: no python3 on PATH (use --python)" >&2; exit 2; }

SWITCH="${PREFIX}sw"
node_ns() { echo "${PREFIX}n$1"; }
if ip netns list | grep -q "^${PREFIX}"; then  # never take over (or later delete) someone else's
  echo "netns_cluster: network namespaces named ${PREFIX}* exist already (another run, or left over:" \
       "ip netns list); choose another --prefix" >&2
  exit 2
fi
PGIDS=() CREATED=()

cleanup() {
  local status=$?
  trap - EXIT INT TERM
  # The node's shell, torchrun and the prefixer; torchrun starts its workers in sessions of their
  # own, so they are reached below, through their namespace.
  for pgid in ${PGIDS[@]+"${PGIDS[@]}"}; do kill -TERM -- "-$pgid" 2>/dev/null || true; done
  sleep 0.5
  for pgid in ${PGIDS[@]+"${PGIDS[@]}"}; do kill -KILL -- "-$pgid" 2>/dev/null || true; done
  for ns in ${CREATED[@]+"${CREATED[@]}"}; do  # only what this run made
    ip netns pids "$ns" 2>/dev/null | xargs -r kill -KILL 2>/dev/null || true
    ip netns del "$ns" 2>/dev/null || true   # takes its veth end, and so the pair, with it
  done
  exit "$status"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

tbf() {  # tbf on a link's egress: $1 namespace, $2 device
  [[ "$RATE" == none ]] || ip netns exec "$1" tc qdisc add dev "$2" root tbf rate "$RATE" burst "$BURST" latency "$TC_LATENCY"
}

ip netns add "$SWITCH" && CREATED+=("$SWITCH")
ip -n "$SWITCH" link add br0 type bridge
ip -n "$SWITCH" link set br0 up
for ((i = 0; i < NODES; i++)); do
  ns="$(node_ns "$i")"
  ip netns add "$ns" && CREATED+=("$ns")
  # made inside the namespaces directly: the pair never appears in the host's network
  ip link add eth0 netns "$ns" type veth peer name "${PREFIX}s$i" netns "$SWITCH"
  ip -n "$ns" addr add "$SUBNET.$((i + 1))/24" dev eth0
  ip -n "$ns" link set eth0 up
  ip -n "$ns" link set lo up
  ip -n "$SWITCH" link set "${PREFIX}s$i" master br0
  ip -n "$SWITCH" link set "${PREFIX}s$i" up
  tbf "$ns" eth0                   # what the node sends
  tbf "$SWITCH" "${PREFIX}s$i"     # what the node receives
done

RDZV_ID="netns-$PREFIX-$RANDOM"
for ((i = 0; i < NODES; i++)); do
  ns="$(node_ns "$i")"
  # setsid: each node's shell, torchrun and prefixer in a process group of their own.
  setsid bash -c 'set -o pipefail; ip netns exec "$1" env GLOO_SOCKET_IFNAME=eth0 NCCL_SOCKET_IFNAME=eth0 \
      "$2" -m torch.distributed.run --nnodes "$3" --nproc-per-node "$4" --rdzv-backend c10d \
      --rdzv-endpoint "$5:$6" --rdzv-id "$7" --rdzv-conf "is_host=$8" --local-addr "$9" "${@:11}" 2>&1 \
      | sed -u "s/^/[node${10}] /"' _ "$ns" "$PY" "$NODES" "$NPROC" "$SUBNET.1" "$PORT" "$RDZV_ID" \
      "$([[ $i == 0 ]] && echo 1 || echo 0)" "$SUBNET.$((i + 1))" "$i" "$@" &
  PGIDS+=("$!")
done

status=0
for pid in "${PGIDS[@]}"; do
  wait "$pid" || { rc=$?; [[ $status != 0 ]] || status=$rc; }
done
if [[ -n "$STATS" ]]; then
  : > "$STATS"
  for ((i = 0; i < NODES; i++)); do
    sent=$(ip netns exec "$(node_ns "$i")" cat /sys/class/net/eth0/statistics/tx_bytes)
    recv=$(ip netns exec "$(node_ns "$i")" cat /sys/class/net/eth0/statistics/rx_bytes)
    qdisc=$(ip netns exec "$(node_ns "$i")" tc -s qdisc show dev eth0 | awk '/Sent/ {print $2; exit}')
    echo "{\"node\": $i, \"tx_bytes\": $sent, \"rx_bytes\": $recv, \"tc_sent_bytes\": ${qdisc:-0}, \"rate\": \"$RATE\"}" >> "$STATS"
  done
fi
exit "$status"
