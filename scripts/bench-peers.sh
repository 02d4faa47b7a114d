#!/usr/bin/env bash
# Benchmark splice-relay against its peers under identical conditions, on loopback only.
#
#   scripts/bench-peers.sh [--quick] [--peers LIST] [--cases LIST] [--out FILE] [--relay BIN] [--no-install]
#                          [--haproxy-splice forced|auto] [--relay-args "--no-splice ..."]
#
# Peers: splice-relay, docker-proxy (docker mode flags, fd 3), haproxy-splice (option
# splice-request + splice-response; --haproxy-splice auto for option splice-auto, which
# HAProxy 2.6 did not act on here), haproxy (nosplice), socat, direct (no relay), and
# udp-floor (UDP case only: benches/floor/udp_floor.c, built with cc, the least work a
# user-space UDP relay can do per datagram: blocking recvmmsg, GSO sendmmsg, one flow).
# Every relay listens on [::1]:P and forwards to 127.0.0.1:Q (IPv6 client -> IPv4
# backend). The relay is pinned to CPU 1 (taskset), load generators and backends to
# CPU 0. Relay CPU is the cpuacct.usage of a cgroup v1 group holding only the relay's
# process tree (utime+stime from /proc when no cgroup can be made).
#
# Cases (--cases 1,...,9 or iperf,wrk,idle,udp,ports,dockeridle,fair,threads,transparent):
#   1 iperf    iperf3 TCP bulk, 1 and 8 streams, both directions: Gbit/s, relay CPU s/GB
#              (and for cases 1, 2 and 4, "system CPU": both cores' busy time per unit, which
#              shows work a relay pushes onto the load's core; direct is the baseline)
#   2 wrk      wrk -> relay -> nginx (small static file), 50 connections,
#              Connection: close (conn/s, p50/p99, relay CPU ms per 1000 conn) and keep-alive (req/s)
#   3 idle     9,000 idle connections held through the relay: RSS/PSS and fds per connection
#   4 udp      one-way UDP (examples/udpgen.rs, sendmmsg) 64/1400 B, 1/100 flows:
#              offered/delivered pps, loss, relay CPU s per million delivered
#   5 ports    1,000 forwarded ports: one splice-relay (port range) vs 1,000 docker-proxy
#              processes (and one HAProxy): start-up time, total RSS/PSS
#   6 dockeridle  idle docker-mode processes (what dockerd starts, one per port and
#              family), 1 alone and 10 side by side: PSS per process
#   7 fair     fairness (examples/fairness.rs): a 100-byte echo every 10 ms through the
#              relay, on a kept connection and on a new one, beside 1, 2 and 8 two-way bulk
#              flows through the same relay: probe p50/p99 ms, bulk Gbit/s, relay CPU s/GB;
#              and the same echo straight to the backend (what the load alone costs)
#   8 threads  cases 1 and 2 with the relay allowed both cores (not pinned; the load stays
#              on CPU 0): splice-relay --threads 1 and 2, HAProxy splice nbthread 2
#   9 transparent  (not in the default list; root, ip and nft) splice-relay alone, without
#              and with --transparent, in network namespaces of its own: client -> relay ->
#              backend (the backend's default route is the relay; return path by
#              scripts/transparent-routing.sh): iperf3 -P1 relay CPU s/GB, and wrk
#              Connection: close to nginx, relay CPU ms per 1000 connections
# Each measurement is repeated 3 times (median shown); --quick: once, shorter runs,
# under 5 minutes. Raw results (TSV: case, peer, metric, value) go to a file whose
# path is printed; the summary is one markdown table with ratios vs each peer.
#
# Installs what it needs from Debian (iperf3 haproxy socat nginx wrk; docker-proxy
# is extracted from the docker.io package into /tmp if not installed). Needs root
# for apt-get and for the cgroup; runs without either if the tools are present.
# Every process it starts is stopped by pid on exit.
set -euo pipefail

cd "$(dirname "$0")/.."
ROOT=$(pwd)
HELPER="$ROOT/scripts/bench_peers_helper.py"
TARGET_DIR="${CARGO_TARGET_DIR:-$ROOT/target}"

QUICK=0
PEERS="splice-relay,docker-proxy,haproxy-splice,haproxy,socat,direct,udp-floor"
CASES="iperf,wrk,idle,udp,ports,dockeridle,fair,threads"
OUT=""
RELAY_BIN="${SPLICE_RELAY_BIN:-}"
RELAY_ARGS="" # extra splice-relay options, e.g. "--no-splice"
INSTALL=1
HAPROXY_SPLICE=forced # or auto: "option splice-auto" instead of splice-request + splice-response
while [ $# -gt 0 ]; do
  case "$1" in
    --quick) QUICK=1 ;;
    --peers) PEERS="$2"; shift ;;
    --cases) CASES="$2"; shift ;;
    --out) OUT="$2"; shift ;;
    --relay) RELAY_BIN="$2"; shift ;;
    --relay-args) RELAY_ARGS="$2"; shift ;;
    --no-install) INSTALL=0 ;;
    --haproxy-splice) HAPROXY_SPLICE="$2"; shift ;;
    -h|--help) sed -n '2,48p' "$0"; exit 0 ;;
    *) echo "unknown argument: $1 (see --help)" >&2; exit 2 ;;
  esac
  shift
done
CASES=$(echo "$CASES" | sed 's/\b1\b/iperf/; s/\b2\b/wrk/; s/\b3\b/idle/; s/\b4\b/udp/; s/\b5\b/ports/; s/\b6\b/dockeridle/; s/\b7\b/fair/; s/\b8\b/threads/; s/\b9\b/transparent/')
has() { [[ ",$1," == *",$2,"* ]]; }

if [ "$QUICK" = 1 ]; then
  REPEAT=1 IPERF_SECS=5 WRK_SECS=2 UDP_SECS=1.5 IDLE_CONNS=9000 MANY_PORTS=1000 FAIR_PROBES=200
else
  REPEAT=3 IPERF_SECS=10 WRK_SECS=10 UDP_SECS=3 IDLE_CONNS=9000 MANY_PORTS=1000 FAIR_PROBES=500
fi
REPEAT=${BENCH_REPEAT:-$REPEAT}
IDLE_CONNS=${BENCH_IDLE_CONNS:-$IDLE_CONNS}
MANY_PORTS=${BENCH_MANY_PORTS:-$MANY_PORTS}

log() { echo "[bench-peers $(date +%T)] $*" >&2; }

# ---------------------------------------------------------------- tools
DOCKER_PROXY=""
find_docker_proxy() {
  local p
  for p in /usr/sbin/docker-proxy /usr/libexec/docker/docker-proxy /usr/bin/docker-proxy; do
    [ -x "$p" ] && { DOCKER_PROXY=$p; return 0; }
  done
  p=$(find /tmp/bench-peers-docker -type f -name docker-proxy 2>/dev/null | head -n1 || true)
  [ -n "$p" ] && [ -x "$p" ] && { DOCKER_PROXY=$p; return 0; }
  return 1
}
install_tools() {
  local missing=() t
  for t in iperf3 haproxy socat nginx wrk python3 taskset; do
    command -v "$t" >/dev/null 2>&1 || missing+=("$t")
  done
  if [ ${#missing[@]} -gt 0 ]; then
    [ "$INSTALL" = 1 ] || { log "missing: ${missing[*]} (and --no-install)"; exit 1; }
    log "installing: iperf3 haproxy socat nginx wrk"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends iperf3 haproxy socat nginx wrk python3 util-linux iproute2 >/dev/null
  fi
  if ! find_docker_proxy && [ "$INSTALL" = 1 ]; then
    log "extracting docker-proxy from the docker.io package into /tmp/bench-peers-docker"
    rm -rf /tmp/bench-peers-docker && mkdir -p /tmp/bench-peers-docker
    (cd /tmp/bench-peers-docker && apt-get download docker.io >/dev/null 2>&1 && dpkg -x docker.io_*.deb root) ||
      log "could not get docker.io"
    find_docker_proxy || true
  fi
}

# ---------------------------------------------------------------- build
UDPGEN=""
UDP_FLOOR=""
build() {
  if [ -z "$RELAY_BIN" ]; then
    log "cargo build --release (splice-relay, examples/udpgen, examples/fairness)"
    if cargo build --release --bin splice-relay --example udpgen --example fairness >"$TMPD/build.log" 2>&1; then
      :
    else
      log "cargo build failed (see $TMPD/build.log); using whatever target/release holds"
    fi
    RELAY_BIN="$TARGET_DIR/release/splice-relay"
  fi
  UDPGEN="$TARGET_DIR/release/examples/udpgen"
  FAIRNESS="$TARGET_DIR/release/examples/fairness"
  if [ ! -x "$FAIRNESS" ] || [ "$ROOT/examples/fairness.rs" -nt "$FAIRNESS" ]; then
    cargo build --release --example fairness >>"$TMPD/build.log" 2>&1 || true
  fi
  [ -x "$FAIRNESS" ] || { log "no examples/fairness: dropping the fair case"; CASES=$(echo ",$CASES," | sed 's/,fair,/,/; s/^,//; s/,$//'); }
  if [ ! -x "$UDPGEN" ] || [ "$ROOT/examples/udpgen.rs" -nt "$UDPGEN" ]; then
    # The crate may not build; udpgen needs only std and libc: build it alone.
    local libc_rlib
    libc_rlib=$(ls -t "$TARGET_DIR"/release/deps/liblibc-*.rlib 2>/dev/null | head -n1 || true)
    if [ -n "$libc_rlib" ] && rustc --edition 2024 -O -o "$TMPD/udpgen" "$ROOT/examples/udpgen.rs" \
      --extern libc="$libc_rlib" -L "$TARGET_DIR/release/deps" 2>>"$TMPD/build.log"; then
      UDPGEN="$TMPD/udpgen"
    fi
  fi
  [ -x "$RELAY_BIN" ] || { log "no relay binary at $RELAY_BIN: dropping splice-relay"; PEERS=$(echo ",$PEERS," | sed 's/,splice-relay,/,/; s/^,//; s/,$//'); }
  if has "$PEERS" udp-floor && command -v cc >/dev/null 2>&1 \
    && cc -O2 -o "$TMPD/udp_floor" "$ROOT/benches/floor/udp_floor.c" 2>>"$TMPD/build.log"; then
    UDP_FLOOR="$TMPD/udp_floor"
  fi
  [ -x "$UDPGEN" ] || { log "no udpgen: dropping the udp case"; CASES=$(echo ",$CASES," | sed 's/,udp,/,/; s/^,//; s/,$//'); }
}

# ---------------------------------------------------------------- processes
TMPD=$(mktemp -d /tmp/bench-peers.XXXXXX)
chmod 755 "$TMPD"
RAW=${OUT:-$TMPD/results.tsv}
PIDS=()         # every long-lived process we started
CGROOT=""
NCPU=$(nproc)
if [ "$NCPU" -ge 2 ]; then LOAD_CPU=0 RELAY_CPU=1; else LOAD_CPU=0 RELAY_CPU=0; fi
TS_LOAD=(taskset -c "$LOAD_CPU")
TS_RELAY=(taskset -c "$RELAY_CPU")

descendants() { # pid -> pid and all descendants, children first
  local p=$1 c
  for c in $(cat /proc/"$p"/task/*/children 2>/dev/null); do descendants "$c"; done
  echo "$p"
}
kill_pids() { # kill the given pids and their descendants: TERM, wait up to 3 s, KILL
  local all=() p
  for p in "$@"; do
    if [ -n "$p" ] && kill -0 "$p" 2>/dev/null; then mapfile -t -O "${#all[@]}" all < <(descendants "$p"); fi
  done
  [ ${#all[@]} -gt 0 ] || return 0
  kill -TERM "${all[@]}" 2>/dev/null || true
  for _ in $(seq 30); do
    local alive=0
    for p in "${all[@]}"; do kill -0 "$p" 2>/dev/null && { alive=1; break; }; done
    [ $alive = 0 ] && break
    sleep 0.1
  done
  kill -KILL "${all[@]}" 2>/dev/null || true
  for p in "$@"; do wait "$p" 2>/dev/null || true; done
}
cleanup() {
  set +e
  trap - EXIT INT TERM
  kill_pids "${PIDS[@]}"
  ns_delete
  if [ -n "${MANY_PIDFILE:-}" ] && [ -f "$MANY_PIDFILE" ]; then mapfile -t mp <"$MANY_PIDFILE"; kill_pids "${mp[@]}"; fi
  if [ -n "$CGROOT" ] && [ -d "$CGROOT" ]; then
    for d in "$CGROOT"/*/; do [ -d "$d" ] && rmdir "$d" 2>/dev/null; done
    rmdir "$CGROOT" 2>/dev/null
  fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM

ulimit -n "$(ulimit -Hn)" 2>/dev/null || true
if mkdir -p /sys/fs/cgroup/cpuacct/bench-peers-$$ 2>/dev/null; then
  CGROOT=/sys/fs/cgroup/cpuacct/bench-peers-$$
fi

PORT=16000
next_port() { PORT=$((PORT + 1)); }

CASE_PREFIX=""  # case 8 runs cases 1 and 2 again under this prefix
record() { printf '%s\t%s\t%s\t%s\n' "$CASE_PREFIX$1" "$2" "$3" "$4" >>"$RAW"; }

# HAProxy refuses to start when 2 * maxconn + 2 * maxpipes + listeners exceeds the
# fd limit, and the hard limit may be below 40,000 (it is 20,000 on our machines):
# use maxconn 20000, or as much as fits (with splice: 95% of that, the rest as pipes).
haproxy_limits() { # listeners splice(0|1) -> "maxconn M" [+ "maxpipes P"] lines
  local lim; lim=$(ulimit -Hn)
  [ "$lim" = unlimited ] && lim=1048576
  local room=$((lim - 20 - $1)) m
  if [ "$2" = 1 ]; then m=$((room * 95 / 200)); else m=$((room / 2)); fi
  [ "$m" -gt 20000 ] && m=20000
  echo "  maxconn $m"
  if [ "$2" = 1 ]; then echo "  maxpipes $(((room - 2 * m) / 2))"; fi
}

# start_peer PEER PROTO LPORT TPORT: start PEER relaying PROTO [::1]:LPORT -> 127.0.0.1:TPORT,
# pinned to RELAY_CPU, in its own cgroup. Sets PEER_PID (empty for direct) and CG.
PEER_PID="" CG="" CGN=0
start_peer() {
  local peer=$1 proto=$2 l=$3 t=$4 cmd=()
  PEER_PID="" CG=""
  case "$peer" in
    direct) return 0 ;;
    splice-relay)
      local extra=()
      read -r -a extra <<<"$RELAY_ARGS"
      cmd=("$RELAY_BIN" -q "${extra[@]}" "$proto:[::1]:$l=127.0.0.1:$t") ;;
    udp-floor) cmd=("$UDP_FLOOR" "[::1]:$l" "127.0.0.1:$t" gso) ;;
    docker-proxy) cmd=("$DOCKER_PROXY" -proto "$proto" -host-ip ::1 -host-port "$l" -container-ip 127.0.0.1 -container-port "$t") ;;
    haproxy|haproxy-splice)
      local cfg="$TMPD/haproxy-$l.cfg"
      {
        echo "global"
        echo "  nbthread ${HAPROXY_THREADS:-1}"
        if [ "$peer" = haproxy ]; then haproxy_limits 1 0; echo "  nosplice"; else haproxy_limits 1 1; fi
        echo "defaults"
        echo "  mode tcp"
        echo "  timeout connect 5s"
        echo "  timeout client 1h"
        echo "  timeout server 1h"
        if [ "$peer" = haproxy-splice ]; then
          # HAProxy 2.6's splice-auto heuristics never spliced in our runs (strace: recvfrom/sendto
          # only, same CPU as nosplice), so the default forces splicing both ways.
          if [ "$HAPROXY_SPLICE" = auto ]; then echo "  option splice-auto"
          else echo "  option splice-request"; echo "  option splice-response"; fi
        fi
        echo "frontend fe"
        echo "  bind [::1]:$l"
        echo "  default_backend be"
        echo "backend be"
        echo "  server s1 127.0.0.1:$t"
      } >"$cfg"
      cmd=(haproxy -db -f "$cfg") ;;
    socat)
      if [ "$proto" = tcp ]; then
        # backlog=4096: with socat's default of 5, SYNs are dropped (1 s retransmits) as soon as
        # clients connect faster than it forks
        cmd=(socat "TCP6-LISTEN:$l,bind=[::1],fork,reuseaddr,backlog=4096" "TCP4:127.0.0.1:$t")
      else
        # one child per datagram; -T 1 ends each child after 1 s idle so they cannot pile up
        cmd=(socat -T 1 "UDP6-RECVFROM:$l,bind=[::1],fork" "UDP4:127.0.0.1:$t")
      fi ;;
    *) log "unknown peer $peer"; return 1 ;;
  esac
  CGN=$((CGN + 1))
  local wrap=()
  if [ -n "$CGROOT" ]; then
    CG="$CGROOT/$CGN-$peer"
    mkdir -p "$CG"
    wrap=(sh -c 'echo $$ > "$0/cgroup.procs" && exec "$@"' "$CG")
  fi
  if [ "$peer" = docker-proxy ]; then # docker-proxy reports "0\n" on fd 3 when ready
    "${TS_RELAY[@]}" "${wrap[@]}" "${cmd[@]}" </dev/null >>"$TMPD/peer-$peer.log" 2>&1 3>/dev/null &
  else
    "${TS_RELAY[@]}" "${wrap[@]}" "${cmd[@]}" </dev/null >>"$TMPD/peer-$peer.log" 2>&1 3>&- &
  fi
  PEER_PID=$!
  PIDS+=("$PEER_PID")
  if ! python3 "$HELPER" waitlisten "$proto" "$l" 10 >/dev/null 2>>"$TMPD/peer-$peer.log"; then
    log "$peer did not listen on $proto [::1]:$l (see $TMPD/peer-$peer.log)"
    stop_peer
    return 1
  fi
}
stop_peer() {
  [ -n "$PEER_PID" ] && kill_pids "$PEER_PID"
  [ -n "$CG" ] && rmdir "$CG" 2>/dev/null || true
  PEER_PID="" CG=""
}
peer_alive() { [ -z "$PEER_PID" ] || kill -0 "$PEER_PID" 2>/dev/null; }
# Relay CPU seconds so far (all processes of the relay, exited children included).
relay_cpu() {
  if [ -z "$PEER_PID" ]; then echo 0
  elif [ -n "$CG" ]; then awk '{printf "%.4f\n", $1 / 1e9}' "$CG/cpuacct.usage"
  else python3 "$HELPER" cputree "$PEER_PID"; fi
}
# The user-space part of it, in seconds (cgroup only: cpuacct.stat's USER_HZ ticks).
relay_user() {
  if [ -n "$PEER_PID" ] && [ -n "$CG" ]; then awk '$1 == "user" {printf "%.2f\n", $2 / 100}' "$CG/cpuacct.stat"
  else echo 0; fi
}
# Busy CPU seconds of the whole machine so far (both cores: relay, load, backends, kernel
# threads; steal time excluded), from /proc/stat's USER_HZ ticks.
system_cpu() { awk '$1 == "cpu" {printf "%.2f\n", ($2 + $3 + $4 + $7 + $8) / 100}' /proc/stat; }
# "N %": the user-space share of a CPU interval (c0 c1 u0 u1).
user_share() { awk -v c="$(fsub "$2" "$1")" -v u="$(fsub "$4" "$3")" 'BEGIN { printf "%.0f %%", (c > 0 ? 100 * u / c : 0) }'; }
fsub() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.4f", a - b }'; }
fcalc() { awk "BEGIN { printf \"%.4f\", $1 }"; }
# client address for a peer: the relay's [::1]:L, or the backend itself for direct
client_host() { [ "$1" = direct ] && echo 127.0.0.1 || echo ::1; }
client_port() { [ "$1" = direct ] && echo "$3" || echo "$2"; }
peer_ok_for() { # peer proto
  case "$1" in
    docker-proxy) [ -n "$DOCKER_PROXY" ] ;;
    haproxy|haproxy-splice) [ "$2" = tcp ] ;;
    udp-floor) [ "$2" = udp ] && [ -n "$UDP_FLOOR" ] ;;
    *) return 0 ;;
  esac
}

# ---------------------------------------------------------------- case 1: iperf3
case_iperf() {
  local peer p dir l t srv
  next_port; t=$PORT
  "${TS_LOAD[@]}" iperf3 -s -B 127.0.0.1 -p "$t" --idle-timeout 60 >"$TMPD/iperf3-server.log" 2>&1 &
  srv=$!; PIDS+=("$srv")
  python3 "$HELPER" waitlisten tcp "$t" 10 >/dev/null
  for peer in ${PEERS//,/ }; do
    peer_ok_for "$peer" tcp || continue
    next_port; l=$PORT
    start_peer "$peer" tcp "$l" "$t" || { record "iperf3" "$peer" "Gbit/s" "fails"; continue; }
    for p in 1 8; do
      for dir in "" "-R"; do
        local name="iperf3 -P$p${dir:+ $dir}"
        for _ in $(seq "$REPEAT"); do
          if ! peer_ok_for "$peer" tcp || ! peer_alive; then record "$name" "$peer" "Gbit/s" "exits"; break; fi
          kill -0 "$srv" 2>/dev/null || { log "iperf3 server died"; return 1; }
          local c0 c1 u0 u1 m0 m1 out="$TMPD/iperf.json"
          c0=$(relay_cpu) u0=$(relay_user) m0=$(system_cpu)
          timeout $((IPERF_SECS + 30)) "${TS_LOAD[@]}" iperf3 -c "$(client_host "$peer")" -p "$(client_port "$peer" "$l" "$t")" \
            -t "$IPERF_SECS" -P "$p" $dir -J --connect-timeout 5000 >"$out" 2>>"$TMPD/iperf-client.log" || true
          c1=$(relay_cpu) u1=$(relay_user) m1=$(system_cpu)
          read -r gbps bytes < <(python3 "$HELPER" iperf "$out" 2>/dev/null || echo "0 0")
          if [ "${bytes:-0}" = 0 ]; then
            record "$name" "$peer" "Gbit/s" "fails"
            log "$name $peer: failed"
            continue
          fi
          record "$name" "$peer" "Gbit/s" "$gbps"
          if [ "$peer" != direct ]; then record "$name" "$peer" "relay CPU s/GB" "$(fcalc "($c1 - $c0) / ($bytes / 1e9)")"; fi
          record "$name" "$peer" "system CPU s/GB" "$(fcalc "($m1 - $m0) / ($bytes / 1e9)")"
          log "$name $peer: $gbps Gbit/s, relay CPU $(fsub "$c1" "$c0") s ($(user_share "$c0" "$c1" "$u0" "$u1") in user space)"
        done
      done
    done
    stop_peer
  done
  kill_pids "$srv"
}

# ---------------------------------------------------------------- case 2: wrk -> nginx
NGINX_PID=""
start_nginx() { # port [address [command prefix, e.g. ip netns exec NS]]
  local addr=${2:-127.0.0.1} prefix=("${@:3}")
  mkdir -p "$TMPD/www" "$TMPD/nginx-tmp"
  head -c 100 /dev/zero | tr '\0' 'x' >"$TMPD/www/small.html"
  chmod -R a+rX "$TMPD/www"
  cat >"$TMPD/nginx.conf" <<EOF
worker_processes 1;
daemon off;
master_process on;
pid $TMPD/nginx.pid;
error_log $TMPD/nginx-error.log warn;
worker_rlimit_nofile 20000;
events { worker_connections 10000; }
http {
  access_log off;
  sendfile on;
  keepalive_requests 10000000;
  client_body_temp_path $TMPD/nginx-tmp/body;
  proxy_temp_path $TMPD/nginx-tmp/proxy;
  fastcgi_temp_path $TMPD/nginx-tmp/fastcgi;
  uwsgi_temp_path $TMPD/nginx-tmp/uwsgi;
  scgi_temp_path $TMPD/nginx-tmp/scgi;
  server {
    listen $addr:$1;
    root $TMPD/www;
  }
}
EOF
  "${prefix[@]}" "${TS_LOAD[@]}" nginx -c "$TMPD/nginx.conf" -p "$TMPD" >>"$TMPD/nginx.log" 2>&1 &
  NGINX_PID=$!; PIDS+=("$NGINX_PID")
  "${prefix[@]}" python3 "$HELPER" waitlisten tcp "$1" 10 >/dev/null
}
case_wrk() {
  local peer l t
  next_port; t=$PORT
  start_nginx "$t" || { log "nginx did not start (see $TMPD/nginx-error.log)"; return 1; }
  for peer in ${PEERS//,/ }; do
    peer_ok_for "$peer" tcp || continue
    next_port; l=$PORT
    start_peer "$peer" tcp "$l" "$t" || { record "wrk close" "$peer" "conn/s" "fails"; continue; }
    local host url
    host=$(client_host "$peer"); [ "$host" = ::1 ] && host="[::1]"
    url="http://$host:$(client_port "$peer" "$l" "$t")/small.html"
    for mode in close keepalive; do
      for _ in $(seq "$REPEAT"); do
        local name hdr=() c0 c1 u0 u1 m0 m1 out="$TMPD/wrk.txt"
        if [ $mode = close ]; then name="wrk Connection: close"; hdr=(-H 'Connection: close'); else name="wrk keep-alive"; fi
        if ! peer_alive; then record "$name" "$peer" "req/s" "exits"; break; fi
        c0=$(relay_cpu) u0=$(relay_user) m0=$(system_cpu)
        timeout $((WRK_SECS + 30)) "${TS_LOAD[@]}" wrk -t1 -c50 -d"${WRK_SECS}s" --timeout 5s --latency "${hdr[@]}" "$url" \
          >"$out" 2>&1 || true
        c1=$(relay_cpu) u1=$(relay_user) m1=$(system_cpu)
        read -r rps reqs p50 p99 errs < <(python3 "$HELPER" wrk "$out")
        if [ "${reqs:-0}" = 0 ]; then record "$name" "$peer" "req/s" "fails"; log "$name $peer: failed"; continue; fi
        if [ $mode = close ]; then
          record "$name" "$peer" "conn/s" "$rps"
          record "$name" "$peer" "p50 ms" "$p50"
          record "$name" "$peer" "p99 ms" "$p99"
          if [ "$peer" != direct ]; then record "$name" "$peer" "relay CPU ms/1000 conn" "$(fcalc "($c1 - $c0) * 1000 / ($reqs / 1000)")"; fi
          record "$name" "$peer" "system CPU ms/1000 conn" "$(fcalc "($m1 - $m0) * 1000 / ($reqs / 1000)")"
        else
          record "$name" "$peer" "req/s" "$rps"
          record "$name" "$peer" "p99 ms" "$p99"
          if [ "$peer" != direct ]; then record "$name" "$peer" "relay CPU ms/1000 req" "$(fcalc "($c1 - $c0) * 1000 / ($reqs / 1000)")"; fi
          record "$name" "$peer" "system CPU ms/1000 req" "$(fcalc "($m1 - $m0) * 1000 / ($reqs / 1000)")"
        fi
        record "$name" "$peer" "errors" "$errs"
        log "$name $peer: $rps/s p50 ${p50}ms p99 ${p99}ms errors $errs relay CPU $(fsub "$c1" "$c0") s ($(user_share "$c0" "$c1" "$u0" "$u1") in user space)"
      done
    done
    stop_peer
  done
  kill_pids "$NGINX_PID"
}

# ---------------------------------------------------------------- case 3: idle connections
case_idle() {
  local peer l t name="$IDLE_CONNS idle conns"
  for peer in ${PEERS//,/ }; do
    [ "$peer" = direct ] && continue
    peer_ok_for "$peer" tcp || continue
    for _ in $(seq "$REPEAT"); do
      next_port; l=$PORT; next_port; t=$PORT
      start_peer "$peer" tcp "$l" "$t" || { record "$name" "$peer" "established" "fails"; continue; }
      sleep 0.2
      local m0 m1 st="$TMPD/hold-status" hold
      m0=$(python3 "$HELPER" memtree "$PEER_PID")
      rm -f "$st"
      "${TS_LOAD[@]}" python3 "$HELPER" holdconns ::1 "$l" "$t" "$IDLE_CONNS" 60 120 "$st" 2>>"$TMPD/hold.log" &
      hold=$!; PIDS+=("$hold")
      for _ in $(seq 900); do if [ -f "$st" ] || ! kill -0 "$hold" 2>/dev/null; then break; fi; sleep 0.1; done
      sleep 1 # let the relay settle (socat children finish forking)
      m1=$(python3 "$HELPER" memtree "$PEER_PID")
      local status; status=$(cat "$st" 2>/dev/null || echo "opened=0 accepted=0 live=0")
      local live; live=$(sed -n 's/.*live=\([0-9]*\).*/\1/p' <<<"$status")
      log "$name $peer: $status | before: $m0 | after: $m1"
      if ! peer_alive; then
        record "$name" "$peer" "established" "exits at $(sed -n 's/.*accepted=\([0-9]*\).*/\1/p' <<<"$status")"
        for k in "RSS bytes/conn" "PSS bytes/conn" "fds/conn"; do record "$name" "$peer" "$k" "exits"; done
      elif [ "${live:-0}" -lt "$IDLE_CONNS" ]; then
        record "$name" "$peer" "established" "${live:-0}"
        for k in "RSS bytes/conn" "PSS bytes/conn" "fds/conn"; do record "$name" "$peer" "$k" "fails at ${live:-0}"; done
      else
        record "$name" "$peer" "established" "$live"
        python3 - "$m0" "$m1" "$live" <<'EOF' | while IFS=$'\t' read -r k v; do record "$name" "$peer" "$k" "$v"; done
import sys
a = dict(x.split("=") for x in sys.argv[1].split()); b = dict(x.split("=") for x in sys.argv[2].split()); n = int(sys.argv[3])
print(f"RSS bytes/conn\t{(int(b['rss_kb']) - int(a['rss_kb'])) * 1024 / n:.0f}")
print(f"PSS bytes/conn\t{(int(b['pss_kb']) - int(a['pss_kb'])) * 1024 / n:.0f}")
print(f"fds/conn\t{(int(b['fds']) - int(a['fds'])) / n:.2f}")
print(f"relay PSS MiB total\t{int(b['pss_kb']) / 1024:.1f}")
print(f"relay processes\t{b['procs']}")
EOF
      fi
      kill_pids "$hold"
      stop_peer
    done
  done
}

# ---------------------------------------------------------------- case 4: UDP
case_udp() {
  local peer size flows l t
  for size in 64 1400; do
    for flows in 1 100; do
      local name="UDP ${size} B, $flows flows"
      [ "$flows" = 1 ] && name="UDP ${size} B, 1 flow"
      for peer in ${PEERS//,/ }; do
        peer_ok_for "$peer" udp || continue
        for _ in $(seq "$REPEAT"); do
          next_port; l=$PORT; next_port; t=$PORT
          start_peer "$peer" udp "$l" "$t" || { record "$name" "$peer" "delivered pps" "fails"; continue; }
          local c0 c1 u0 u1 m0 m1 out="$TMPD/udpgen.txt" target
          if [ "$peer" = direct ]; then target="127.0.0.1:$t"; else target="[::1]:$l"; fi
          c0=$(relay_cpu) u0=$(relay_user) m0=$(system_cpu)
          timeout 60 "$UDPGEN" --target "$target" --sink "127.0.0.1:$t" --size "$size" --flows "$flows" \
            --secs "$UDP_SECS" --sender-cpu "$LOAD_CPU" --sink-cpu "$LOAD_CPU" >"$out" 2>>"$TMPD/udpgen.log" || true
          c1=$(relay_cpu) u1=$(relay_user) m1=$(system_cpu)
          read -r offered delivered loss pkts < <(python3 "$HELPER" udpgen "$out")
          if ! peer_alive; then record "$name" "$peer" "delivered pps" "exits"; stop_peer; continue; fi
          record "$name" "$peer" "offered pps" "$offered"
          record "$name" "$peer" "delivered pps" "$delivered"
          record "$name" "$peer" "loss %" "$loss"
          if [ "$peer" != direct ] && [ "${pkts:-0}" -gt 0 ]; then
            record "$name" "$peer" "relay CPU s/M pkts" "$(fcalc "($c1 - $c0) / ($pkts / 1e6)")"
          fi
          if [ "${pkts:-0}" -gt 0 ]; then record "$name" "$peer" "system CPU s/M pkts" "$(fcalc "($m1 - $m0) / ($pkts / 1e6)")"; fi
          log "$name $peer: offered $offered pps, delivered $delivered pps, loss $loss %, relay CPU $(fsub "$c1" "$c0") s ($(user_share "$c0" "$c1" "$u0" "$u1") in user space)"
          stop_peer
        done
      done
    done
  done
}

# ---------------------------------------------------------------- case 5: many ports
MANY_PIDFILE=""
case_ports() {
  local n=$MANY_PORTS lo=24000 off=2000 peer mp name="$MANY_PORTS ports"
  local hi=$((lo + n - 1))
  for peer in splice-relay docker-proxy haproxy; do
    has "$PEERS" "$peer" || has "$PEERS" "$peer-splice" || continue
    for _ in $(seq "$REPEAT"); do
      MANY_PIDFILE="$TMPD/many.pids"
      : >"$MANY_PIDFILE"
      local t0 t1 secs="" st=""
      t0=$(date +%s.%N)
      case $peer in
        splice-relay)
          "${TS_RELAY[@]}" "$RELAY_BIN" -q "tcp:[::1]:$lo-$hi=127.0.0.1:$((lo + off))-$((hi + off))" \
            </dev/null >>"$TMPD/peer-many.log" 2>&1 &
          echo $! >"$MANY_PIDFILE" ;;
        haproxy)
          printf 'global\n  nbthread 1\n%s\ndefaults\n  mode tcp\n  timeout connect 5s\n  timeout client 1h\n  timeout server 1h\nfrontend fe\n  bind [::1]:%s-%s\n  default_backend be\nbackend be\n  server s1 127.0.0.1:+%s\n' \
            "$(haproxy_limits "$n" 0)" "$lo" "$hi" "$off" >"$TMPD/haproxy-many.cfg"
          "${TS_RELAY[@]}" haproxy -db -f "$TMPD/haproxy-many.cfg" </dev/null >>"$TMPD/peer-many.log" 2>&1 &
          echo $! >"$MANY_PIDFILE" ;;
        docker-proxy)
          [ -n "$DOCKER_PROXY" ] || continue
          st=$(python3 "$HELPER" startmany "$MANY_PIDFILE" "$lo-$hi" "$off" 120 -- "${TS_RELAY[@]}" "$DOCKER_PROXY" \
            -proto tcp -host-ip ::1 -host-port '{L}' -container-ip 127.0.0.1 -container-port '{T}') ;;
      esac
      if python3 "$HELPER" waitlisten tcp "$lo-$hi" 120 >/dev/null 2>>"$TMPD/peer-many.log"; then
        t1=$(date +%s.%N)
        secs=$(fsub "$t1" "$t0")
        sleep 1
        local m mp; mapfile -t mp <"$MANY_PIDFILE"; m=$(python3 "$HELPER" memtree "${mp[@]}")
        log "$name $peer: up in $secs s ($st) $m"
        record "$name" "$peer" "start-up s" "$secs"
        python3 - "$m" <<'EOF' | while IFS=$'\t' read -r k v; do record "$name" "$peer" "$k" "$v"; done
import sys
m = dict(x.split("=") for x in sys.argv[1].split())
print(f"processes\t{m['procs']}")
print(f"RSS MiB total\t{int(m['rss_kb']) / 1024:.1f}")
print(f"PSS MiB total\t{int(m['pss_kb']) / 1024:.1f}")
print(f"fds total\t{m['fds']}")
EOF
      else
        record "$name" "$peer" "start-up s" "fails"
        log "$name $peer: not all $n ports listening within 120 s"
      fi
      mapfile -t mp <"$MANY_PIDFILE"; kill_pids "${mp[@]}"
      sleep 0.5
    done
  done
  MANY_PIDFILE=""
}

case_dockeridle() {
  local lo=26000 off=1000 peer n bin name
  for peer in splice-relay docker-proxy; do
    has "$PEERS" "$peer" || continue
    bin=$RELAY_BIN
    if [ "$peer" = docker-proxy ]; then
      [ -n "$DOCKER_PROXY" ] || continue
      bin=$DOCKER_PROXY
    fi
    for n in 1 10; do
      name="docker mode, $n idle"
      for _ in $(seq "$REPEAT"); do
        # Started from this shell, which outlives them: splice-relay sets
        # PR_SET_PDEATHSIG (as dockerd does for docker-proxy), so a parent that
        # exits at once would take it along.
        local i m mp=() st=ready
        for i in $(seq 0 $((n - 1))); do
          : >"$TMPD/fd3.$i"
          "${TS_RELAY[@]}" "$bin" -proto tcp -host-ip ::1 -host-port $((lo + i)) -container-ip 127.0.0.1 \
            -container-port $((lo + off + i)) 3>"$TMPD/fd3.$i" </dev/null >/dev/null 2>>"$TMPD/dockeridle.log" &
          mp+=("$!"); PIDS+=("$!")
        done
        for i in $(seq 0 $((n - 1))); do
          local t=0
          while [ "$(head -c1 "$TMPD/fd3.$i" 2>/dev/null)" != 0 ] && [ $t -lt 100 ]; do sleep 0.1; t=$((t + 1)); done
          [ $t -lt 100 ] || st="not ready: $(cat "$TMPD/fd3.$i")"
        done
        sleep 1
        m=$(python3 "$HELPER" memtree "${mp[@]}")
        log "$name $peer: ($st) $m"
        python3 - "$m" "$n" <<'EOF' | while IFS=$'\t' read -r k v; do record "$name" "$peer" "$k" "$v"; done
import sys
m = dict(x.split("=") for x in sys.argv[1].split())
n = int(sys.argv[2])
if int(m["procs"]) == n:
    print(f"PSS KB/process\t{int(m['pss_kb']) / n:.0f}")
    print(f"RSS KB/process\t{int(m['rss_kb']) / n:.0f}")
else:
    print(f"PSS KB/process\tfails ({m['procs']} of {n} running)")
EOF
        kill_pids "${mp[@]}"
        sleep 0.5
      done
    done
  done
}

# ---------------------------------------------------------------- case 7: fairness
case_fair() {
  local peer n l t out c0 c1 s0 s1
  for peer in splice-relay haproxy-splice haproxy docker-proxy; do
    has "$PEERS" "$peer" && peer_ok_for "$peer" tcp || continue
    for n in 1 2 8; do
      for _ in $(seq "$REPEAT"); do
        next_port; l=$PORT; next_port; t=$PORT
        start_peer "$peer" tcp "$l" "$t" || continue
        c0=$(relay_cpu); s0=$(system_cpu)
        out=$(timeout 300 "${TS_LOAD[@]}" "$FAIRNESS" --relay "[::1]:$l" --backend "127.0.0.1:$t" --bulk "$n" \
          --probes "$FAIR_PROBES" 2>>"$TMPD/fair.log") || out=""
        c1=$(relay_cpu); s1=$(system_cpu)
        stop_peer
        log "fair $n bulk $peer: $out relay_cpu=$(fsub "$c1" "$c0")"
        [ -n "$out" ] || { record "fair, $n bulk" "$peer" "probe p99 ms" fails; continue; }
        python3 "$HELPER" fair "$out" "$(fsub "$c1" "$c0")" "$(fsub "$s1" "$s0")" |
          while IFS=$'\t' read -r k v; do record "fair, $n bulk" "$peer" "$k" "$v"; done
      done
    done
  done
}

# ---------------------------------------------------------------- case 8: threads
case_threads() {
  local saved_ts=("${TS_RELAY[@]}") saved_args=$RELAY_ARGS saved_peers=$PEERS n
  TS_RELAY=()
  for n in 1 2; do
    CASE_PREFIX="$n thr: " RELAY_ARGS="$saved_args --threads $n" HAPROXY_THREADS=$n PEERS=""
    has "$saved_peers" splice-relay && PEERS=splice-relay
    if [ "$n" = 2 ] && has "$saved_peers" haproxy-splice; then PEERS="${PEERS:+$PEERS,}haproxy-splice"; fi
    [ -n "$PEERS" ] || continue
    case_wrk
    case_iperf
  done
  TS_RELAY=("${saved_ts[@]}") RELAY_ARGS=$saved_args PEERS=$saved_peers CASE_PREFIX="" HAPROXY_THREADS=1
}

# ---------------------------------------------------------------- case 9: transparent
# Three namespaces named after this script's pid, deleted on exit (ns_delete, from
# cleanup): client 10.231.1.2 -- 10.231.1.1 relay 10.231.2.1 -- 10.231.2.2 backend.
NS_C="" NS_R="" NS_B=""
ns_delete() {
  local ns
  for ns in $NS_C $NS_R $NS_B; do ip netns del "$ns" 2>/dev/null; done
  NS_C="" NS_R="" NS_B=""
}
ns_create() {
  local tag="bp$$"
  NS_C="${tag}c" NS_R="${tag}r" NS_B="${tag}b"
  local ns
  for ns in $NS_C $NS_R $NS_B; do ip netns add "$ns" && ip -n "$ns" link set lo up || return 1; done
  ip link add "${tag}c" netns "$NS_C" type veth peer name "${tag}rc" netns "$NS_R" &&
    ip link add "${tag}b" netns "$NS_B" type veth peer name "${tag}rb" netns "$NS_R" &&
    ip -n "$NS_C" addr add 10.231.1.2/24 dev "${tag}c" && ip -n "$NS_C" link set "${tag}c" up &&
    ip -n "$NS_R" addr add 10.231.1.1/24 dev "${tag}rc" && ip -n "$NS_R" link set "${tag}rc" up &&
    ip -n "$NS_R" addr add 10.231.2.1/24 dev "${tag}rb" && ip -n "$NS_R" link set "${tag}rb" up &&
    ip -n "$NS_B" addr add 10.231.2.2/24 dev "${tag}b" && ip -n "$NS_B" link set "${tag}b" up &&
    ip -n "$NS_C" route add default via 10.231.1.1 && ip -n "$NS_B" route add default via 10.231.2.1 &&
    ip netns exec "$NS_R" "$ROOT/scripts/transparent-routing.sh" up "${tag}rb"
}
# start_ns_relay LPORT TPORT [OPTION...]: splice-relay in the relay namespace, pinned to
# RELAY_CPU, in its own cgroup, relaying 10.231.1.1:LPORT -> 10.231.2.2:TPORT.
start_ns_relay() {
  local l=$1 t=$2 wrap=()
  shift 2
  PEER_PID="" CG=""
  CGN=$((CGN + 1))
  if [ -n "$CGROOT" ]; then
    CG="$CGROOT/$CGN-transparent"
    mkdir -p "$CG"
    wrap=(sh -c 'echo $$ > "$0/cgroup.procs" && exec "$@"' "$CG")
  fi
  "${wrap[@]}" ip netns exec "$NS_R" "${TS_RELAY[@]}" "$RELAY_BIN" -q "$@" "10.231.1.1:$l=10.231.2.2:$t" \
    </dev/null >>"$TMPD/peer-transparent.log" 2>&1 3>&- &
  PEER_PID=$!
  PIDS+=("$PEER_PID")
  ip netns exec "$NS_R" python3 "$HELPER" waitlisten tcp "$l" 10 >/dev/null 2>>"$TMPD/peer-transparent.log" ||
    { log "splice-relay did not listen in $NS_R (see $TMPD/peer-transparent.log)"; stop_peer; return 1; }
}
case_transparent() {
  if [ "$(id -u)" != 0 ] || ! command -v ip >/dev/null || ! command -v nft >/dev/null; then
    log "transparent: needs root, ip (iproute2) and nft (nftables); not run"
    record "transparent" splice-relay "relay CPU s/GB" "not run (root, ip, nft)"
    return 0
  fi
  ns_create || { log "transparent: cannot set up the namespaces"; ns_delete; return 1; }
  local ti tw srv mode
  next_port; ti=$PORT
  next_port; tw=$PORT
  ip netns exec "$NS_B" "${TS_LOAD[@]}" iperf3 -s -B 10.231.2.2 -p "$ti" --idle-timeout 120 >"$TMPD/iperf3-ns.log" 2>&1 &
  srv=$!; PIDS+=("$srv")
  ip netns exec "$NS_B" python3 "$HELPER" waitlisten tcp "$ti" 10 >/dev/null
  start_nginx "$tw" 10.231.2.2 ip netns exec "$NS_B" || { log "nginx did not start in $NS_B"; return 1; }
  for mode in off on; do
    local peer="splice-relay" li lw args=()
    [ $mode = on ] && { peer="splice-relay --transparent"; args=(--transparent); }
    next_port; li=$PORT
    start_ns_relay "$li" "$ti" "${args[@]}" || { record "transparent iperf3 -P1" "$peer" "Gbit/s" "fails"; continue; }
    for _ in $(seq "$REPEAT"); do
      local c0 c1 out="$TMPD/iperf-ns.json" name="transparent iperf3 -P1"
      c0=$(relay_cpu)
      timeout $((IPERF_SECS + 30)) ip netns exec "$NS_C" "${TS_LOAD[@]}" iperf3 -c 10.231.1.1 -p "$li" \
        -t "$IPERF_SECS" -P 1 -J --connect-timeout 5000 >"$out" 2>>"$TMPD/iperf-client.log" || true
      c1=$(relay_cpu)
      read -r gbps bytes < <(python3 "$HELPER" iperf "$out" 2>/dev/null || echo "0 0")
      if [ "${bytes:-0}" = 0 ]; then record "$name" "$peer" "Gbit/s" "fails"; log "$name $peer: failed"; continue; fi
      record "$name" "$peer" "Gbit/s" "$gbps"
      record "$name" "$peer" "relay CPU s/GB" "$(fcalc "($c1 - $c0) / ($bytes / 1e9)")"
      log "$name $peer: $gbps Gbit/s, relay CPU $(fsub "$c1" "$c0") s"
    done
    stop_peer
    next_port; lw=$PORT
    start_ns_relay "$lw" "$tw" "${args[@]}" || { record "transparent wrk close" "$peer" "conn/s" "fails"; continue; }
    for _ in $(seq "$REPEAT"); do
      local c0 c1 out="$TMPD/wrk-ns.txt" name="transparent wrk Connection: close"
      c0=$(relay_cpu)
      timeout $((WRK_SECS + 30)) ip netns exec "$NS_C" "${TS_LOAD[@]}" wrk -t1 -c50 -d"${WRK_SECS}s" --timeout 5s \
        --latency -H 'Connection: close' "http://10.231.1.1:$lw/small.html" >"$out" 2>&1 || true
      c1=$(relay_cpu)
      read -r rps reqs p50 p99 errs < <(python3 "$HELPER" wrk "$out")
      if [ "${reqs:-0}" = 0 ]; then record "$name" "$peer" "conn/s" "fails"; log "$name $peer: failed"; continue; fi
      record "$name" "$peer" "conn/s" "$rps"
      record "$name" "$peer" "relay CPU ms/1000 conn" "$(fcalc "($c1 - $c0) * 1000 / ($reqs / 1000)")"
      record "$name" "$peer" "errors" "$errs"
      log "$name $peer: $rps/s p99 ${p99}ms errors $errs relay CPU $(fsub "$c1" "$c0") s"
    done
    stop_peer
  done
  kill_pids "$srv" "$NGINX_PID"
  ns_delete
}

# ---------------------------------------------------------------- main
START=$(date +%s)
install_tools
build
log "relay: $RELAY_BIN"
log "docker-proxy: ${DOCKER_PROXY:-none}"
log "peers: $PEERS; cases: $CASES; repeat $REPEAT; relay on CPU $RELAY_CPU, load on CPU $LOAD_CPU; cgroup: ${CGROOT:-none}"
{
  echo "# bench-peers $(date -u +%FT%TZ) quick=$QUICK repeat=$REPEAT kernel=$(uname -r) cpus=$NCPU"
  echo "# relay=$RELAY_BIN docker-proxy=${DOCKER_PROXY:-none} $(haproxy -v 2>/dev/null | head -n1) $(socat -V 2>/dev/null | sed -n 2p)"
} >>"$RAW"
has "$CASES" iperf && case_iperf
has "$CASES" wrk && case_wrk
has "$CASES" idle && case_idle
has "$CASES" udp && case_udp
has "$CASES" ports && case_ports
has "$CASES" dockeridle && case_dockeridle
has "$CASES" fair && case_fair
has "$CASES" threads && case_threads
has "$CASES" transparent && case_transparent
log "done in $(($(date +%s) - START)) s"
echo
echo "## splice-relay vs peers ($([ $QUICK = 1 ] && echo "quick, 1 run each" || echo "median of $REPEAT"); relay on CPU $RELAY_CPU, load on CPU $LOAD_CPU)"
echo
python3 "$HELPER" summarize "$RAW"
echo
echo "raw results: $RAW (logs in $TMPD)"
