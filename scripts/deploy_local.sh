#!/usr/bin/env bash
# Flower deployment on this machine: one SuperLink, N SuperNodes (each with its partition and LoRA
# rank in --node-config), `flwr run .` of the FLoRA app, then everything is stopped.
#
#   scripts/deploy_local.sh --config configs/quickstart.toml --ranks 16,8,4,4 [--work DIR] [--netns]
#                           [--rounds N] [--out-dir DIR] [--resume]
#
# --ranks     one LoRA rank per SuperNode (their number is the number of SuperNodes); default: the
#             config's num_clients nodes at the config's ranks
# --work      where logs, pids, the Flower home (FLWR_HOME) and the state live (default: a temp dir)
# --netns     run every SuperNode in its own network namespace joined to the SuperLink's by a veth
#             pair (separate hosts on one machine; needs root and `ip`); falls back with a message
# Logs: WORK/logs/{superlink,supernode-K}.log; pids: WORK/pids/*.pid (tests kill nodes through them).
# Offline: runtime dependency installation is disabled on the SuperLink and by the environment.
set -euo pipefail
cd "$(dirname "$0")/.."
REPO="$(pwd)"
PY="${FLORA_PYTHON:-$REPO/.venv/bin/python}"
BIN="$(dirname "$PY")"

CONFIG="" RANKS="" WORK="" NETNS=0 ROUNDS="" OUT_DIR="" RESUME=false
while [[ $# -gt 0 ]]; do
  case "$1" in
    --config) CONFIG="$2"; shift 2 ;;
    --ranks) RANKS="$2"; shift 2 ;;
    --work) WORK="$2"; shift 2 ;;
    --rounds) ROUNDS="$2"; shift 2 ;;
    --out-dir) OUT_DIR="$2"; shift 2 ;;
    --resume) RESUME=true; shift ;;
    --netns) NETNS=1; shift ;;
    -h|--help) sed -n 2,15p "$0"; exit 0 ;;
    *) echo "deploy_local.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
done
[[ -n "$CONFIG" && -f "$CONFIG" ]] || { echo "deploy_local.sh: --config FILE is required (got '$CONFIG')" >&2; exit 2; }
CONFIG="$(cd "$(dirname "$CONFIG")" && pwd)/$(basename "$CONFIG")"
WORK="${WORK:-$(mktemp -d -t flora-deploy.XXXXXX)}"
mkdir -p "$WORK/logs" "$WORK/pids" "$WORK/flwr-home"
WORK="$(cd "$WORK" && pwd)"

if [[ -z "$RANKS" ]]; then  # the config's own client count and ranks
  RANKS="$("$PY" -c "import sys; from flora.config import load_config; c = load_config(sys.argv[1]); \
print(','.join(str(c.client_rank(k)) for k in range(c.num_clients)))" "$CONFIG")"
fi
IFS=',' read -r -a RANK_LIST <<< "$RANKS"
NODES=${#RANK_LIST[@]}

export FLWR_TELEMETRY_ENABLED=0 FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
export FLWR_HOME="$WORK/flwr-home"
export PATH="$BIN:$PATH"
BASE_PORT="${FLORA_BASE_PORT:-19090}"
LINK_PORT=$BASE_PORT  # Flower 1.42: one HTTP API for SuperNodes, the CLI and the ServerApp
LINK_HOST=127.0.0.1

stop_all() {
  for pidfile in "$WORK"/pids/*.pid; do
    [[ -f "$pidfile" ]] && kill "$(cat "$pidfile")" 2>/dev/null || true
  done
  sleep 1
  for pidfile in "$WORK"/pids/*.pid; do
    [[ -f "$pidfile" ]] && kill -9 "$(cat "$pidfile")" 2>/dev/null || true
  done
  if [[ $NETNS == 1 ]]; then
    for k in $(seq 0 $((NODES - 1))); do ip netns del "flora-node$k" 2>/dev/null || true; done
    ip link del flora-br0 2>/dev/null || true
  fi
}
trap stop_all EXIT

if [[ $NETNS == 1 ]]; then
  if [[ $(id -u) != 0 ]] || ! command -v ip >/dev/null || ! ip netns add flora-probe 2>/dev/null; then
    echo "deploy_local.sh: --netns needs root and working 'ip netns'; running all nodes on localhost" >&2
    NETNS=0
  else
    ip netns del flora-probe
    # a bridge in the root namespace (the SuperLink's "host" 10.77.0.1), one veth per SuperNode "host"
    ip link add flora-br0 type bridge && ip addr add 10.77.0.1/24 dev flora-br0 && ip link set flora-br0 up
    LINK_HOST=10.77.0.1
  fi
fi

# The SuperLink connection `flwr run` submits to (Flower >= 1.42 keeps it in FLWR_HOME/config.toml).
cat > "$FLWR_HOME/config.toml" <<EOF
[superlink]
default = "flora-deploy"

[superlink.flora-deploy]
address = "$LINK_HOST:$LINK_PORT"
insecure = true
EOF

echo "[deploy] SuperLink on $LINK_HOST:$LINK_PORT; $NODES SuperNodes, ranks $RANKS; work dir $WORK"
flower-superlink --insecure --disable-runtime-dependency-installation --host "$LINK_HOST" --port "$LINK_PORT" \
  --database "$WORK/state.db" > "$WORK/logs/superlink.log" 2>&1 &
echo $! > "$WORK/pids/superlink.pid"

for k in $(seq 0 $((NODES - 1))); do
  node_config="partition-id=$k num-partitions=$NODES lora-rank=${RANK_LIST[$k]}"
  cmd=(flower-supernode --insecure --superlink "$LINK_HOST:$LINK_PORT" --port $((BASE_PORT + 10 + k))
       --node-config "$node_config")
  if [[ $NETNS == 1 ]]; then
    ns="flora-node$k"
    ip netns add "$ns"
    ip link add "veth$k" type veth peer name eth0 netns "$ns"
    ip link set "veth$k" master flora-br0 up
    ip -n "$ns" addr add "10.77.0.$((k + 10))/24" dev eth0
    ip -n "$ns" link set eth0 up && ip -n "$ns" link set lo up
    cmd=(ip netns exec "$ns" env "PATH=$PATH" "${cmd[@]}")
  fi
  "${cmd[@]}" > "$WORK/logs/supernode-$k.log" 2>&1 &
  echo $! > "$WORK/pids/supernode-$k.pid"
  echo "[deploy] SuperNode $k: $node_config (pid $!)"
done

run_config="config-file='$CONFIG' resume=$RESUME"
[[ -n "$ROUNDS" ]] && run_config+=" rounds=$ROUNDS"
[[ -n "$OUT_DIR" ]] && run_config+=" out-dir='$(mkdir -p "$OUT_DIR" && cd "$OUT_DIR" && pwd)'"
sleep 3
echo "[deploy] flwr run . flora-deploy --run-config \"$run_config\""
flwr run . flora-deploy --stream --run-config "$run_config"
