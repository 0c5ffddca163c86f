#!/usr/bin/env bash
# Flower deployment on this machine: one SuperLink, N SuperNodes (each with its partition and LoRA
# rank in --node-config), `flwr run .` of the FLoRA app, then everything is stopped.
#
#   scripts/deploy_local.sh --config configs/quickstart.toml --ranks 16,8,4,4 [--work DIR] [--netns]
#                           [--node-data FILE1,FILE2,...] [--rounds N] [--out-dir DIR] [--resume]
#                           [--tls [--certs DIR]] [--auth] [--unregistered N] [--plaintext N]
#
# --ranks     one LoRA rank per SuperNode (their number is the number of SuperNodes); default: the
#             config's num_clients nodes at the config's ranks
# --node-data one data file (or `datasets` directory) per SuperNode: node k reads the k-th and nothing
#             else (--node-config data-path='FILE'); the server never reads any of them. Without it the
#             script first deals the config's data into WORK/node-data/partition-K.jsonl (a stand-in for
#             parties that each hold their own data) and gives node k the k-th
# --work      where logs, pids, the Flower home (FLWR_HOME) and the state live (default: a temp dir)
# --netns     run every SuperNode in its own network namespace joined to the SuperLink's by a veth
#             pair (separate hosts on one machine; needs root and `ip`); falls back with a message
# --tls       TLS on every connection: the SuperLink serves a certificate signed by a CA that the
#             SuperNodes and `flwr` verify; made in WORK/certs by `python -m flora.deploy_keys` unless
#             --certs DIR holds ca.crt, server.pem and server.key (valid for the SuperLink's address)
# --auth      SuperNode authentication (implies --tls): one ECDSA key pair per SuperNode in WORK/keys,
#             each public key registered with `flwr supernode register` before its node starts; the
#             SuperLink refuses nodes whose key is not registered
# --unregistered N   also start N SuperNodes whose keys were never registered (with --auth they are
#             refused and take no part: the authentication at work)
# --plaintext N      also start N SuperNodes without TLS (--insecure); with --tls the SuperLink refuses
#             them and they take no part
# Logs: WORK/logs/{superlink,supernode-K}.log; pids: WORK/pids/*.pid (tests kill nodes through them).
# On exit it stops only the processes this invocation started (pid files left in a reused --work dir by an
# earlier invocation are deleted unread: their pids may belong to anything by now).
# Offline: runtime dependency installation is disabled on the SuperLink and by the environment.
set -euo pipefail
cd "$(dirname "$0")/.."
REPO="$(pwd)"
PY="${FLORA_PYTHON:-$REPO/.venv/bin/python}"
BIN="$(dirname "$PY")"

CONFIG="" RANKS="" NODE_DATA="" WORK="" NETNS=0 ROUNDS="" OUT_DIR="" RESUME=false TLS=0 CERTS="" AUTH=0 UNREGISTERED=0 PLAINTEXT=0
while [[ $# -gt 0 ]]; do
  case "$1" in
    --config) CONFIG="$2"; shift 2 ;;
    --ranks) RANKS="$2"; shift 2 ;;
    --node-data) NODE_DATA="$2"; shift 2 ;;
    --work) WORK="$2"; shift 2 ;;
    --rounds) ROUNDS="$2"; shift 2 ;;
    --out-dir) OUT_DIR="$2"; shift 2 ;;
    --resume) RESUME=true; shift ;;
    --netns) NETNS=1; shift ;;
    --tls) TLS=1; shift ;;
    --certs) CERTS="$2"; TLS=1; shift 2 ;;
    --auth) AUTH=1; TLS=1; shift ;;
    --unregistered) UNREGISTERED="$2"; shift 2 ;;
    --plaintext) PLAINTEXT="$2"; shift 2 ;;
    -h|--help) sed -n 2,36p "$0"; exit 0 ;;
    *) echo "deploy_local.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
done
[[ -n "$CONFIG" && -f "$CONFIG" ]] || { echo "deploy_local.sh: --config FILE is required (got '$CONFIG')" >&2; exit 2; }
CONFIG="$(cd "$(dirname "$CONFIG")" && pwd)/$(basename "$CONFIG")"
WORK="${WORK:-$(mktemp -d -t flora-deploy.XXXXXX)}"
mkdir -p "$WORK/logs" "$WORK/pids" "$WORK/flwr-home"
WORK="$(cd "$WORK" && pwd)"
rm -f "$WORK"/pids/*.pid  # an earlier invocation's: never read, never killed
STARTED=()  # pids of the processes this invocation started (the only ones it stops)

if [[ -z "$RANKS" ]]; then  # the config's own client count and ranks
  RANKS="$("$PY" -c "import sys; from flora.config import load_config; c = load_config(sys.argv[1]); \
print(','.join(str(c.client_rank(k)) for k in range(c.num_clients)))" "$CONFIG")"
fi
IFS=',' read -r -a RANK_LIST <<< "$RANKS"
NODES=${#RANK_LIST[@]}
if [[ -n "$NODE_DATA" ]]; then  # checked before anything starts
  IFS=',' read -r -a DATA_LIST <<< "$NODE_DATA"
  if [[ ${#DATA_LIST[@]} != "$NODES" ]]; then
    echo "deploy_local.sh: --node-data names ${#DATA_LIST[@]} files for $NODES SuperNodes (ranks $RANKS); expected one per SuperNode" >&2
    exit 2
  fi
  for k in "${!DATA_LIST[@]}"; do
    f="${DATA_LIST[$k]}"
    [[ -e "$f" ]] || { echo "deploy_local.sh: --node-data file $((k + 1)) (SuperNode $k): $f not found" >&2; exit 2; }
    [[ "$f" != *"'"* ]] || { echo "deploy_local.sh: --node-data file $f: a path with a single quote is not supported" >&2; exit 2; }
    DATA_LIST[$k]="$(cd "$(dirname "$f")" && pwd)/$(basename "$f")"
  done
else  # deal the config's data out to one file per node
  mkdir -p "$WORK/node-data"
  NODE_DATA="$("$PY" -m flora.data.node split "$CONFIG" "$WORK/node-data" "$NODES")" \
    || { echo "deploy_local.sh: splitting the config's data into $NODES node files failed" >&2; exit 2; }
  IFS=',' read -r -a DATA_LIST <<< "$NODE_DATA"
fi

export FLWR_TELEMETRY_ENABLED=0 FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
export FLWR_HOME="$WORK/flwr-home"
export PATH="$BIN:$PATH"
BASE_PORT="${FLORA_BASE_PORT:-19090}"
LINK_PORT=$BASE_PORT  # Flower 1.42: one HTTP API for SuperNodes, the CLI and the ServerApp
LINK_HOST=127.0.0.1

started() {  # started NAME: remember the last background job's pid (and write it for the tests)
  STARTED+=("$!")
  echo "$!" > "$WORK/pids/$1.pid"
}

ours() {  # ours PID: PID is still a child of this script (not exited, not reused by another process)
  local stat rest
  stat="$(cat "/proc/$1/stat" 2>/dev/null)" || return 1
  rest="${stat##*) }"  # after "pid (comm) ": state ppid ...
  set -- $rest
  [[ "${2:-}" == "$$" ]]
}

stop_all() {
  local pid
  for pid in "${STARTED[@]+"${STARTED[@]}"}"; do
    if ours "$pid"; then kill "$pid" 2>/dev/null || true; fi
  done
  sleep 1
  for pid in "${STARTED[@]+"${STARTED[@]}"}"; do
    if ours "$pid"; then kill -9 "$pid" 2>/dev/null || true; fi
  done
  if [[ $NETNS == 1 ]]; then
    for k in $(seq 0 $((NODES + UNREGISTERED + PLAINTEXT - 1))); do ip netns del "flora-node$k" 2>/dev/null || true; done
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

# Transport security: plain (--insecure) or TLS with a CA that the nodes and the CLI verify.
LINK_SECURITY=(--insecure) NODE_SECURITY=(--insecure) CLI_SECURITY="insecure = true"
if [[ $TLS == 1 ]]; then
  if [[ -z "$CERTS" ]]; then
    CERTS="$WORK/certs"
    "$PY" -m flora.deploy_keys tls "$CERTS" --host "$LINK_HOST" --host localhost > /dev/null
  fi
  CERTS="$(cd "$CERTS" && pwd)"
  for f in ca.crt server.pem server.key; do
    [[ -f "$CERTS/$f" ]] || { echo "deploy_local.sh: --certs $CERTS lacks $f (need ca.crt, server.pem, server.key)" >&2; exit 2; }
  done
  LINK_SECURITY=(--ssl-ca-certfile "$CERTS/ca.crt" --ssl-certfile "$CERTS/server.pem" --ssl-keyfile "$CERTS/server.key")
  NODE_SECURITY=(--root-certificates "$CERTS/ca.crt")
  CLI_SECURITY="root-certificates = \"$CERTS/ca.crt\""
fi
[[ $AUTH == 1 ]] && LINK_SECURITY+=(--enable-supernode-auth)

# The SuperLink connection `flwr run` submits to (Flower >= 1.42 keeps it in FLWR_HOME/config.toml).
cat > "$FLWR_HOME/config.toml" <<EOF
[superlink]
default = "flora-deploy"

[superlink.flora-deploy]
address = "$LINK_HOST:$LINK_PORT"
$CLI_SECURITY
EOF

SECURITY_NOTE="insecure"
[[ $TLS == 1 ]] && SECURITY_NOTE="TLS, CA $CERTS/ca.crt"
[[ $AUTH == 1 ]] && SECURITY_NOTE+=", SuperNode authentication"
echo "[deploy] SuperLink on $LINK_HOST:$LINK_PORT ($SECURITY_NOTE); $NODES SuperNodes, ranks $RANKS; work dir $WORK"
flower-superlink "${LINK_SECURITY[@]}" --disable-runtime-dependency-installation --host "$LINK_HOST" \
  --port "$LINK_PORT" --database "$WORK/state.db" > "$WORK/logs/superlink.log" 2>&1 &
started superlink

for _ in $(seq 1 90); do  # until the SuperLink answers (it takes a while on a busy machine)
  flwr supernode list flora-deploy > /dev/null 2>&1 && break
  sleep 1
done

if [[ $AUTH == 1 ]]; then  # register every SuperNode's public key before the node starts
  for k in $(seq 0 $((NODES - 1))); do
    "$PY" -m flora.deploy_keys node "$WORK/keys" "supernode-$k" > /dev/null
    flwr supernode register "$WORK/keys/supernode-$k.pub" flora-deploy > "$WORK/logs/register-$k.log" 2>&1 \
      || { echo "deploy_local.sh: registering SuperNode $k failed:" >&2; cat "$WORK/logs/register-$k.log" >&2; exit 1; }
  done
  echo "[deploy] registered $NODES SuperNode public keys ($WORK/keys/supernode-*.pub)"
fi

start_node() {  # start_node INDEX NODE_CONFIG NAME [extra flower-supernode arguments]
  local k=$1 node_config=$2 name=$3
  shift 3
  local security=("${NODE_SECURITY[@]}")
  [[ $name == plaintext-* ]] && security=(--insecure)
  local cmd=(flower-supernode "${security[@]}" --superlink "$LINK_HOST:$LINK_PORT" --port $((BASE_PORT + 10 + k))
             --node-config "$node_config" "$@")
  if [[ $NETNS == 1 ]]; then
    ns="flora-node$k"
    ip netns add "$ns"
    ip link add "veth$k" type veth peer name eth0 netns "$ns"
    ip link set "veth$k" master flora-br0 up
    ip -n "$ns" addr add "10.77.0.$((k + 10))/24" dev eth0
    ip -n "$ns" link set eth0 up && ip -n "$ns" link set lo up
    cmd=(ip netns exec "$ns" env "PATH=$PATH" "${cmd[@]}")
  fi
  "${cmd[@]}" > "$WORK/logs/$name.log" 2>&1 &
  started "$name"
  echo "[deploy] $name: $node_config (pid $!)"
}

for k in $(seq 0 $((NODES - 1))); do
  key=()
  [[ $AUTH == 1 ]] && key=(--auth-supernode-private-key "$WORK/keys/supernode-$k")
  start_node "$k" "partition-id=$k num-partitions=$NODES lora-rank=${RANK_LIST[$k]} data-path='${DATA_LIST[$k]}'" \
    "supernode-$k" "${key[@]}"
done
for j in $(seq 1 "$UNREGISTERED"); do  # node 0's partition: were it let in, it would take part
  k=$((NODES + j - 1))
  key=()
  if [[ $AUTH == 1 ]]; then
    "$PY" -m flora.deploy_keys node "$WORK/keys-unregistered" "rogue-$j" > /dev/null
    key=(--auth-supernode-private-key "$WORK/keys-unregistered/rogue-$j")
  fi
  start_node "$k" "partition-id=0 num-partitions=$NODES lora-rank=${RANK_LIST[0]} data-path='${DATA_LIST[0]}'" \
    "unregistered-$j" "${key[@]}"
done
for j in $(seq 1 "$PLAINTEXT"); do  # node 0's partition, no TLS: were it let in, it would take part
  k=$((NODES + UNREGISTERED + j - 1))
  start_node "$k" "partition-id=0 num-partitions=$NODES lora-rank=${RANK_LIST[0]} data-path='${DATA_LIST[0]}'" \
    "plaintext-$j"
done

run_config="config-file='$CONFIG' resume=$RESUME"
[[ -n "$ROUNDS" ]] && run_config+=" rounds=$ROUNDS"
[[ -n "$OUT_DIR" ]] && run_config+=" out_dir='$(mkdir -p "$OUT_DIR" && cd "$OUT_DIR" && pwd)'"
sleep 3
echo "[deploy] flwr run . flora-deploy --run-config \"$run_config\""
flwr run . flora-deploy --stream --run-config "$run_config"
