#!/usr/bin/env bash
# deploy/test-services/rabbitmq-node.sh: a PRIVATE RabbitMQ node for tests that must restart
# a broker mid-run without touching the shared one.
#
#   rabbitmq-node.sh start|stop|restart|status DIR PORT
#   rabbitmq-node.sh ctl DIR PORT RABBITMQCTL-ARGS...    (rabbitmqctl against this node)
#
# The node is `retouch-test-PORT@localhost`, listens for AMQP on 127.0.0.1:PORT (guest/guest),
# uses distribution port PORT+20000 and its OWN epmd on PORT+21000 when those are free and
# valid, else free ephemeral ports (force with RETOUCH_RMQ_DIST_PORT / RETOUCH_RMQ_EPMD_PORT;
# recorded in DIR/run/ports), all on 127.0.0.1. Any free PORT works. Config, Erlang cookie
# (HOME), mnesia, logs and pid files live under DIR; no plugins are enabled. It runs the
# RabbitMQ scripts directly ($RETOUCH_RABBITMQ_BIN, default /usr/lib/rabbitmq/bin) as the
# calling user: the Debian /usr/sbin wrapper would switch to user rabbitmq and to
# /var/lib/rabbitmq.
#
# start:   returns once an AMQP handshake succeeds (timeout RETOUCH_RMQ_START_TIMEOUT, 90 s);
#          a no-op if the node already runs. Keeps existing data, so durable queues and
#          persistent messages survive stop+start.
# stop:    graceful (SIGTERM to this node's beam, which RabbitMQ handles as a clean stop),
#          then kills this node's own epmd. Data stays. Only processes whose environment
#          names DIR are signalled; the shared broker and the shared epmd are never touched.
# restart: stop, then start.
# status:  rc 0 running and AMQP answers; rc 1 running but AMQP does not answer; rc 3 stopped.
#
# If RETOUCH_TEST_RABBITMQ_NODE_REGISTRY names a file, `start` appends "DIR PORT" to it;
# tests/run stops every node listed there when the run ends, in case a test forgot.
set -euo pipefail

usage() { awk 'NR > 1 && !/^#/ {exit} NR > 1' "$0" | sed 's/^# \{0,1\}//' >&2; exit 2; }
[ $# -ge 3 ] || usage
cmd=$1 dir=$2 port=$3
shift 3
case $port in ''|*[!0-9]*) echo "rabbitmq-node.sh: PORT must be a number: $port" >&2; exit 2 ;; esac

# shellcheck source=deploy/test-services/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

mkdir -p "$dir"
dir=$(cd "$dir" && pwd)
node="retouch-test-$port@localhost"
start_timeout=${RETOUCH_RMQ_START_TIMEOUT:-90}
# Distribution and epmd ports are chosen at start and recorded in DIR/run/ports, which stop,
# status and ctl read. Clients only ever see PORT, so these may differ between restarts.
dist_port="" epmd_port=""
if [ -s "$dir/run/ports" ]; then read -r dist_port epmd_port < "$dir/run/ports"; fi
log() { printf '[rabbitmq-node %s] %s\n' "$port" "$*" >&2; }

# node_env: an environment that points every RabbitMQ/Erlang setting at DIR (lib.sh).
node_env() { rt_rabbitmq_node_env "$dir" "$dir/home" "$node" "$port" "$dist_port" "$epmd_port"; }

# free_port PREFERRED: PREFERRED if it is a valid port nobody listens on, else any free port.
free_port() {
  if [ "$1" -le 65535 ] && ! rt_port_open "$1"; then echo "$1"; return 0; fi
  python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

# choose_ports: RETOUCH_RMQ_DIST_PORT / RETOUCH_RMQ_EPMD_PORT if set, else PORT+20000 /
# PORT+21000 when free, else free ephemeral ports; an epmd of ours that still runs keeps its
# port. Records them in DIR/run/ports.
choose_ports() {
  dist_port=${RETOUCH_RMQ_DIST_PORT:-$(free_port $((port + 20000)))}
  if [ -n "$epmd_port" ] && is_ours "$(read_pid epmd.pid)" epmd; then
    :
  else
    epmd_port=${RETOUCH_RMQ_EPMD_PORT:-$(free_port $((port + 21000)))}
  fi
  while [ "$epmd_port" = "$dist_port" ] || [ "$epmd_port" = "$port" ]; do
    epmd_port=$(free_port 65536)
  done
  printf '%s %s\n' "$dist_port" "$epmd_port" > "$dir/run/ports"
}

# prepare: write the node's files once (config is rewritten each start; cookie kept).
prepare() {
  mkdir -p "$dir/etc" "$dir/home" "$dir/mnesia" "$dir/log" "$dir/run"
  : > "$dir/etc/rabbitmq-env.conf"
  cat > "$dir/etc/rabbitmq.conf" <<EOF
# Private test node $node (written by rabbitmq-node.sh)
listeners.tcp.1 = 127.0.0.1:$port
loopback_users.guest = true
log.console = false
log.file.level = info
EOF
  echo '[].' > "$dir/etc/enabled_plugins"
  if [ ! -s "$dir/home/.erlang.cookie" ]; then
    (umask 077 && head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n' > "$dir/home/.erlang.cookie")
  fi
  chmod 400 "$dir/home/.erlang.cookie"
}

# is_ours PID [WHAT]: PID is alive and belongs to this node (beam/wrapper: its environment
# names our mnesia base; epmd: its command line carries our epmd port).
is_ours() {
  local pid=$1 what=${2:-node}
  [ -n "$pid" ] && [ -r "/proc/$pid/environ" ] || return 1
  if [ "$what" = epmd ]; then
    tr '\0' ' ' < "/proc/$pid/cmdline" 2>/dev/null | grep -q -- "epmd .*-port $epmd_port "
  else
    tr '\0' '\n' < "/proc/$pid/environ" 2>/dev/null | grep -qx "RABBITMQ_MNESIA_BASE=$dir/mnesia"
  fi
}

read_pid() { cat "$dir/run/$1" 2>/dev/null || true; }

# beam_pid: the node's Erlang VM, from RabbitMQ's pid file or the wrapper's child.
beam_pid() {
  local pid
  pid=$(read_pid rabbitmq.pid)
  if is_ours "$pid"; then echo "$pid"; return 0; fi
  pid=$(read_pid wrapper.pid)
  if is_ours "$pid"; then pgrep -P "$pid" -x beam.smp 2>/dev/null | head -n1 || true; fi
}

running() {
  local pid
  pid=$(beam_pid)
  [ -n "$pid" ] || is_ours "$(read_pid wrapper.pid)"
}

stop_epmd() {
  local pid
  pid=$(read_pid epmd.pid)
  if is_ours "$pid" epmd; then kill "$pid" 2>/dev/null || true; rt_wait_gone 10 "$pid" || kill -9 "$pid" 2>/dev/null || true; fi
  rm -f "$dir/run/epmd.pid"
}

do_stop() {
  local t0 beam wrapper
  t0=$(rt_now)
  if ! running; then
    stop_epmd
    log "not running ($node)"
    return 0
  fi
  beam=$(beam_pid)
  wrapper=$(read_pid wrapper.pid)
  is_ours "$wrapper" || wrapper=""
  log "stopping $node (beam pid ${beam:-?})"
  kill -TERM "${beam:-$wrapper}" 2>/dev/null || true
  if ! rt_wait_gone 60 "$beam" "$wrapper"; then
    log "still running after 60 s; killing it"
    kill -9 "$beam" "$wrapper" 2>/dev/null || true
    rt_wait_gone 10 "$beam" "$wrapper" || true
  fi
  stop_epmd
  rm -f "$dir/run/rabbitmq.pid" "$dir/run/wrapper.pid"
  log "stopped in $(rt_since "$t0") s (data kept in $dir/mnesia)"
}

# wait_amqp T0 PID: wait until the node answers an AMQP handshake; on timeout or if PID
# (the wrapper) dies, show the logs, stop what started and fail.
wait_amqp() {
  local t0=$1 pid=$2 deadline out
  deadline=$((SECONDS + start_timeout))
  until out=$(rt_amqp_probe 127.0.0.1 "$port" guest guest / 3 2>&1); do
    if ! kill -0 "$pid" 2>/dev/null || [ "$SECONDS" -ge "$deadline" ]; then
      log "node did not come up (waited $(rt_since "$t0") s): $out"
      tail -n 30 "$dir/log/console.log" "$dir/log/$node.log" >&2 2>/dev/null || true
      do_stop || true
      exit 1
    fi
    sleep 0.25
  done
  printf '%s\n' "$out"
}

do_start() {
  local t0 pid out
  t0=$(rt_now)
  if running; then
    pid=$(read_pid wrapper.pid)
    is_ours "$pid" || pid=$(beam_pid)
    out=$(wait_amqp "$t0" "$pid")
    log "already running: $node ($out)"
    return 0
  fi
  [ -x "$RT_RABBITMQ_BIN/rabbitmq-server" ] \
    || { log "no $RT_RABBITMQ_BIN/rabbitmq-server (apt-get install rabbitmq-server)"; exit 1; }
  if rt_port_open "$port"; then log "port $port on 127.0.0.1 is already in use"; exit 1; fi
  prepare
  choose_ports
  if rt_port_open "$dist_port"; then log "distribution port $dist_port is already in use"; exit 1; fi

  # Own epmd, on its own port, so that stopping this node never affects the shared epmd and
  # the shared broker never depends on an epmd we kill.
  if ! is_ours "$(read_pid epmd.pid)" epmd; then
    if rt_port_open "$epmd_port"; then log "epmd port $epmd_port is already in use"; exit 1; fi
    setsid epmd -port "$epmd_port" -address 127.0.0.1 >>"$dir/log/epmd.log" 2>&1 </dev/null &
    echo $! > "$dir/run/epmd.pid"
    for _ in $(seq 1 50); do rt_port_open "$epmd_port" && break; sleep 0.1; done
  fi

  # Foreground mode under setsid: the wrapper turns SIGTERM into a clean stop, and Ctrl-C in
  # the caller's terminal does not reach the node. node_env only in the child: this script
  # keeps its own HOME (pyenv shims and the like need it).
  (node_env; exec setsid "$RT_RABBITMQ_BIN/rabbitmq-server") \
    >>"$dir/log/console.log" 2>&1 </dev/null &
  pid=$!
  echo "$pid" > "$dir/run/wrapper.pid"

  out=$(wait_amqp "$t0" "$pid")
  if [ -n "${RETOUCH_TEST_RABBITMQ_NODE_REGISTRY:-}" ]; then
    printf '%s %s\n' "$dir" "$port" >> "$RETOUCH_TEST_RABBITMQ_NODE_REGISTRY"
  fi
  log "started $node: $out on 127.0.0.1:$port in $(rt_since "$t0") s (dist $dist_port, epmd $epmd_port, dir $dir)"
}

do_status() {
  local out
  if ! running; then echo "stopped: $node ($dir)"; return 3; fi
  if out=$(rt_amqp_probe 127.0.0.1 "$port" guest guest / 5 2>&1); then
    echo "running: $node, $out on 127.0.0.1:$port (beam pid $(beam_pid))"
    return 0
  fi
  echo "running but AMQP not answering: $node ($out)"
  return 1
}

case $cmd in
  start) do_start ;;
  stop) do_stop ;;
  restart) do_stop; do_start ;;
  status) do_status ;;
  ctl) node_env; exec "$RT_RABBITMQ_BIN/rabbitmqctl" -n "$node" "$@" ;;
  *) usage ;;
esac
