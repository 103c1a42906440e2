#!/usr/bin/env bash
# deploy/test-services/rabbitmq-cluster.sh: a PRIVATE 3-node RabbitMQ cluster on this machine,
# for soak tests that kill broker nodes without touching the shared broker.
#
#   rabbitmq-cluster.sh start DIR [PORT1 PORT2 PORT3]
#   rabbitmq-cluster.sh stop DIR
#   rabbitmq-cluster.sh status DIR
#   rabbitmq-cluster.sh urls DIR                 (the AMQP URLs, one a line)
#   rabbitmq-cluster.sh kill-node DIR N          (kill -9 of node N's beam: a crash)
#   rabbitmq-cluster.sh start-node DIR N         (start node N again; it rejoins from its data)
#   rabbitmq-cluster.sh restart-node DIR N       (graceful stop of node N, then start)
#   rabbitmq-cluster.sh stop-app DIR N           (rabbitmqctl stop_app: the VM stays up)
#   rabbitmq-cluster.sh start-app DIR N          (rabbitmqctl start_app, waits for AMQP)
#   rabbitmq-cluster.sh ctl DIR N RABBITMQCTL-ARGS...
#
# Nodes rt1@localhost, rt2@localhost, rt3@localhost listen for AMQP on 127.0.0.1:PORTn (guest/
# guest; free ports are chosen when none are given), each with its own distribution port, all
# registered with ONE epmd of the cluster's own (a free port), all with one cookie
# (DIR/home/.erlang.cookie). Node n keeps config, mnesia, logs and pid files under DIR/nN.
# Ports live in DIR/ports ("AMQP1 AMQP2 AMQP3 DIST1 DIST2 DIST3 EPMD"). `start` boots rt1,
# then rt2 and rt3 in parallel, joins them to rt1 (join_cluster) and returns once all three
# answer an AMQP handshake and `cluster_status` lists three running nodes. On an existing DIR
# it restarts the stopped nodes with their data (no re-join). Only processes whose
# environment names DIR are ever signalled. Start timeout per step: RETOUCH_RMQ_START_TIMEOUT
# (90 s). No plugins are enabled.
set -euo pipefail

usage() { awk 'NR > 1 && !/^#/ {exit} NR > 1' "$0" | sed 's/^# \{0,1\}//' >&2; exit 2; }
[ $# -ge 2 ] || usage
cmd=$1 dir=$2
shift 2

# shellcheck source=deploy/test-services/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

mkdir -p "$dir"
dir=$(cd "$dir" && pwd)
start_timeout=${RETOUCH_RMQ_START_TIMEOUT:-90}
log() { printf '[rabbitmq-cluster] %s\n' "$*" >&2; }

pick_port() { python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }

amqp=() dist=() epmd_port=""
load_ports() {
  [ -s "$dir/ports" ] || return 1
  local a1 a2 a3 d1 d2 d3 e
  read -r a1 a2 a3 d1 d2 d3 e < "$dir/ports"
  amqp=("" "$a1" "$a2" "$a3") dist=("" "$d1" "$d2" "$d3") epmd_port=$e
}

choose_ports() {
  local chosen=() p i
  if [ $# -eq 3 ]; then chosen=("$@"); fi
  # 7 distinct free ports (AMQP ports as given)
  local all=" ${chosen[*]:-} "
  while [ ${#chosen[@]} -lt 7 ]; do
    p=$(pick_port)
    case $all in *" $p "*) continue ;; esac
    chosen+=("$p") all+="$p "
  done
  for i in 0 1 2; do
    if rt_port_open "${chosen[$i]}"; then log "AMQP port ${chosen[$i]} is already in use"; exit 1; fi
  done
  printf '%s\n' "${chosen[*]}" > "$dir/ports"
  load_ports
}

nd() { echo "$dir/n$1"; }
node_name() { echo "rt$1@localhost"; }

# node_env N: an environment pointing every RabbitMQ/Erlang setting of node N at its directory,
# with the cluster's shared HOME (one Erlang cookie) (lib.sh).
node_env() { rt_rabbitmq_node_env "$(nd "$1")" "$dir/home" "$(node_name "$1")" "${amqp[$1]}" "${dist[$1]}" "$epmd_port"; }

prepare() {
  local n d
  mkdir -p "$dir/home"
  if [ ! -s "$dir/home/.erlang.cookie" ]; then
    (umask 077 && head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n' > "$dir/home/.erlang.cookie")
  fi
  chmod 400 "$dir/home/.erlang.cookie"
  for n in 1 2 3; do
    d=$(nd "$n")
    mkdir -p "$d/etc" "$d/mnesia" "$d/log" "$d/run"
    : > "$d/etc/rabbitmq-env.conf"
    cat > "$d/etc/rabbitmq.conf" <<EOF
# Private cluster node $(node_name "$n") (written by rabbitmq-cluster.sh)
listeners.tcp.1 = 127.0.0.1:${amqp[$n]}
loopback_users.guest = true
log.console = false
log.file.level = info
cluster_partition_handling = pause_minority
EOF
    echo '[].' > "$d/etc/enabled_plugins"
  done
}

read_pid() { cat "$(nd "$1")/run/$2" 2>/dev/null || true; }

is_ours() {  # is_ours PID N
  local pid=$1 n=$2
  [ -n "$pid" ] && [ -r "/proc/$pid/environ" ] || return 1
  tr '\0' '\n' < "/proc/$pid/environ" 2>/dev/null | grep -qx "RABBITMQ_MNESIA_BASE=$(nd "$n")/mnesia"
}

beam_pid() {
  local n=$1 pid
  pid=$(read_pid "$n" rabbitmq.pid)
  if is_ours "$pid" "$n"; then echo "$pid"; return 0; fi
  pid=$(read_pid "$n" wrapper.pid)
  if is_ours "$pid" "$n"; then
    pid=$(pgrep -P "$pid" -x beam.smp 2>/dev/null | head -n1 || true)
    if [ -n "$pid" ]; then echo "$pid"; fi
  fi
  return 0
}

running() { [ -n "$(beam_pid "$1")" ] || is_ours "$(read_pid "$1" wrapper.pid)" "$1"; }

epmd_ours() {
  local pid
  pid=$(cat "$dir/epmd.pid" 2>/dev/null || true)
  [ -n "$pid" ] && tr '\0' ' ' < "/proc/$pid/cmdline" 2>/dev/null | grep -q -- "epmd .*-port $epmd_port "
}

start_epmd() {
  epmd_ours && return 0
  if rt_port_open "$epmd_port"; then log "epmd port $epmd_port is already in use"; exit 1; fi
  setsid epmd -port "$epmd_port" -address 127.0.0.1 >>"$dir/epmd.log" 2>&1 </dev/null &
  echo $! > "$dir/epmd.pid"
  for _ in $(seq 1 50); do rt_port_open "$epmd_port" && return 0; sleep 0.1; done
}

ctl() { local n=$1; shift; (node_env "$n"; exec "$RT_RABBITMQ_BIN/rabbitmqctl" -n "$(node_name "$n")" "$@"); }

# spawn N: starts node N's VM (foreground mode under setsid) without waiting.
spawn() {
  local n=$1 d
  d=$(nd "$n")
  running "$n" && return 0
  if rt_port_open "${amqp[$n]}"; then log "port ${amqp[$n]} is already in use"; exit 1; fi
  (node_env "$n"; exec setsid "$RT_RABBITMQ_BIN/rabbitmq-server") >>"$d/log/console.log" 2>&1 </dev/null &
  echo $! > "$d/run/wrapper.pid"
}

# wait_amqp N: until node N answers an AMQP handshake.
wait_amqp() {
  local n=$1 deadline out
  deadline=$((SECONDS + start_timeout))
  until out=$(rt_amqp_probe 127.0.0.1 "${amqp[$n]}" guest guest / 3 2>&1); do
    if [ "$SECONDS" -ge "$deadline" ] || ! running "$n"; then
      log "$(node_name "$n") did not answer AMQP on ${amqp[$n]}: $out"
      tail -n 30 "$(nd "$n")/log/console.log" "$(nd "$n")/log/$(node_name "$n").log" >&2 2>/dev/null || true
      return 1
    fi
    sleep 0.25
  done
}

# wait_booted N: until rabbitmqctl reaches node N's VM (await_startup may need the app).
wait_vm() {
  local n=$1 deadline
  deadline=$((SECONDS + start_timeout))
  until ctl "$n" -q status >/dev/null 2>&1 || ctl "$n" -q eval 'ok.' >/dev/null 2>&1; do
    if [ "$SECONDS" -ge "$deadline" ] || ! running "$n"; then log "$(node_name "$n") did not come up"; return 1; fi
    sleep 0.5
  done
}

stop_node() {
  local n=$1 beam wrapper
  running "$n" || return 0
  beam=$(beam_pid "$n")
  wrapper=$(read_pid "$n" wrapper.pid)
  is_ours "$wrapper" "$n" || wrapper=""
  kill -TERM "${beam:-$wrapper}" 2>/dev/null || true
  if ! rt_wait_gone 60 "$beam" "$wrapper"; then
    kill -9 "$beam" "$wrapper" 2>/dev/null || true
    rt_wait_gone 10 "$beam" "$wrapper" || true
  fi
  rm -f "$(nd "$n")/run/rabbitmq.pid" "$(nd "$n")/run/wrapper.pid"
}

kill_node() {
  local n=$1 beam wrapper
  beam=$(beam_pid "$n")
  [ -n "$beam" ] || { log "$(node_name "$n") is not running"; exit 1; }
  wrapper=$(read_pid "$n" wrapper.pid)
  is_ours "$wrapper" "$n" || wrapper=""
  kill -9 "$beam"
  rt_wait_gone 10 "$beam" || true
  # The wrapper exits with its VM; make sure nothing of this node is left.
  [ -n "$wrapper" ] && { rt_wait_gone 5 "$wrapper" || kill -9 "$wrapper" 2>/dev/null || true; }
  rm -f "$(nd "$n")/run/rabbitmq.pid" "$(nd "$n")/run/wrapper.pid"
  log "killed -9 $(node_name "$n") (beam pid $beam)"
}

start_node() {
  local n=$1 t0
  t0=$(rt_now)
  start_epmd
  spawn "$n"
  wait_amqp "$n" || exit 1
  log "$(node_name "$n") up on ${amqp[$n]} in $(rt_since "$t0") s"
}

do_start() {
  local t0 n fresh=0
  t0=$(rt_now)
  if ! load_ports; then choose_ports "$@"; fresh=1; fi
  [ -x "$RT_RABBITMQ_BIN/rabbitmq-server" ] || { log "no $RT_RABBITMQ_BIN/rabbitmq-server"; exit 1; }
  prepare
  start_epmd
  if [ "$fresh" = 0 ]; then
    for n in 1 2 3; do spawn "$n"; done
    for n in 1 2 3; do wait_amqp "$n" || { do_stop; exit 1; }; done
    log "restarted cluster in $(rt_since "$t0") s: AMQP ${amqp[1]} ${amqp[2]} ${amqp[3]}"
    return 0
  fi
  spawn 1
  spawn 2
  spawn 3
  wait_amqp 1 || { do_stop; exit 1; }
  for n in 2 3; do
    wait_amqp "$n" || { do_stop; exit 1; }
    ctl "$n" -q stop_app >/dev/null
    ctl "$n" -q join_cluster "$(node_name 1)" >/dev/null || { log "join_cluster of rt$n failed"; do_stop; exit 1; }
    ctl "$n" -q start_app >/dev/null
  done
  for n in 1 2 3; do wait_amqp "$n" || { do_stop; exit 1; }; done
  local running_nodes
  running_nodes=$(ctl 1 -q eval 'length(rabbit_nodes:all_running()).' 2>/dev/null || echo "?")
  [ "$running_nodes" = 3 ] || { log "cluster has $running_nodes running nodes, expected 3"; do_stop; exit 1; }
  if [ -n "${RETOUCH_TEST_RABBITMQ_CLUSTER_REGISTRY:-}" ]; then echo "$dir" >> "$RETOUCH_TEST_RABBITMQ_CLUSTER_REGISTRY"; fi
  log "started 3-node cluster in $(rt_since "$t0") s: AMQP ${amqp[1]} ${amqp[2]} ${amqp[3]} (epmd $epmd_port, dir $dir)"
}

do_stop() {
  local n pid
  load_ports || { log "no cluster in $dir"; return 0; }
  for n in 3 2 1; do stop_node "$n" & done
  wait
  pid=$(cat "$dir/epmd.pid" 2>/dev/null || true)
  if epmd_ours; then kill "$pid" 2>/dev/null || true; fi
  rm -f "$dir/epmd.pid"
  log "stopped (data kept in $dir)"
}

need_n() { case ${1:-} in 1|2|3) ;; *) log "N must be 1, 2 or 3"; exit 2 ;; esac; }

case $cmd in
  start) do_start "$@" ;;
  stop) do_stop ;;
  status)
    load_ports || { echo "no cluster in $dir"; exit 3; }
    for n in 1 2 3; do
      if ! running "$n"; then echo "rt$n: stopped"
      elif rt_amqp_probe 127.0.0.1 "${amqp[$n]}" guest guest / 3 >/dev/null 2>&1; then echo "rt$n: running on ${amqp[$n]}"
      else echo "rt$n: VM up, AMQP not answering"; fi
    done ;;
  urls) load_ports; for n in 1 2 3; do echo "amqp://guest:guest@127.0.0.1:${amqp[$n]}/%2f"; done ;;
  kill-node) need_n "${1:-}"; load_ports; kill_node "$1" ;;
  start-node) need_n "${1:-}"; load_ports; start_node "$1" ;;
  restart-node) need_n "${1:-}"; load_ports; stop_node "$1"; start_node "$1" ;;
  stop-app) need_n "${1:-}"; load_ports; ctl "$1" -q stop_app >/dev/null; log "stop_app rt$1" ;;
  start-app)
    need_n "${1:-}"; load_ports; t0=$(rt_now)
    ctl "$1" -q start_app >/dev/null; wait_amqp "$1" || exit 1; log "start_app rt$1 in $(rt_since "$t0") s" ;;
  ctl) need_n "${1:-}"; load_ports; n=$1; shift; ctl "$n" "$@" ;;
  *) usage ;;
esac
