#!/usr/bin/env bash
# Soak test of splice-relay on loopback.
#
#   scripts/soak.sh DURATION        e.g. scripts/soak.sh 2m   (90s, 2m, 1h; a bare number is seconds)
#
# Builds the release binary (cargo build --release) unless SOAK_BIN names one.
# Starts python3 backends (TCP echo, UDP echo) and the relay with a TCP and a
# UDP forward and --metrics, all on 127.0.0.1, then runs one python3 driver
# for DURATION: a warm-up (10%, 5-30 s), a pause to take the relay's fd count
# and RSS, then the mixed load: bulk TCP echo transfers (SHA-256 checked),
# short connections, half-closes, resets (linger 0 and unread data), UDP echo
# exchanges over fresh flows, metrics scrapes, and one TCP backend restart
# midway (SIGKILL, 1 s down, started again; operations overlapping the gap may
# fail: counted as expected). At the end it waits for the relay to be idle and
# checks:
#   - every transfer that completed came back byte for byte (hash), no
#     operation failed outside the restart gap, no UDP datagram lost or crossed;
#   - the relay's sockets and other fds equal the post-warm-up values exactly,
#     no pipe is lent, and every pipe fd is a spare of the pipe pool (from the
#     SIGUSR1 stats line); RSS at most 2 MiB above the post-warm-up value;
#   - the relay counted exactly the connections the driver made;
#   - no WARN/ERROR in the relay log except backend-unreachable during the gap;
#   - the relay is still alive and relays.
# Prints a summary and "soak: PASS" (exit 0) or "soak: FAIL" (exit 1).
# Every process it starts is stopped by pid on exit. SOAK_KEEP=1 keeps the
# temporary directory (logs) even on success; SOAK_RUST_LOG sets the relay's
# RUST_LOG (default info).
set -uo pipefail

usage() { echo "usage: scripts/soak.sh DURATION   (e.g. 2m, 90s, 1h)" >&2; exit 2; }
[ $# -eq 1 ] || usage
case "$1" in
  *h) SECS=$(( ${1%h} * 3600 )) ;;
  *m) SECS=$(( ${1%m} * 60 )) ;;
  *s) SECS=${1%s} ;;
  *) SECS=$1 ;;
esac
if ! [[ "$SECS" =~ ^[0-9]+$ ]] || [ "$SECS" -lt 20 ]; then
  echo "soak: DURATION must be at least 20s" >&2
  usage
fi

ROOT=$(cd "$(dirname "$0")/.." && pwd)
command -v python3 >/dev/null || { echo "soak: python3 not found"; echo "soak: FAIL"; exit 1; }
if [ -n "${SOAK_BIN:-}" ]; then
  BIN=$SOAK_BIN
else
  echo "soak: cargo build --release"
  (cd "$ROOT" && cargo build --release) || { echo "soak: build failed"; echo "soak: FAIL"; exit 1; }
  BIN="${CARGO_TARGET_DIR:-$ROOT/target}/release/splice-relay"
fi
[ -x "$BIN" ] || { echo "soak: $BIN is not executable"; echo "soak: FAIL"; exit 1; }

TMP=$(mktemp -d "${TMPDIR:-/tmp}/soak.XXXXXX")
RELAY_PID="" TCPB_PID="" UDPB_PID="" DRIVER_PID=""
RESULT=1
# shellcheck disable=SC2317 # (called from the trap)
cleanup() {
  for pid in $DRIVER_PID $TCPB_PID $UDPB_PID $RELAY_PID; do
    kill -9 "$pid" 2>/dev/null
  done
  for pid in $DRIVER_PID $TCPB_PID $UDPB_PID $RELAY_PID; do
    wait "$pid" 2>/dev/null
  done
  if [ "$RESULT" -eq 0 ] && [ "${SOAK_KEEP:-0}" != 1 ]; then
    rm -rf "$TMP"
  else
    echo "soak: logs kept in $TMP"
  fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM

cat >"$TMP/backend.py" <<'PY'
# backend.py tcp|udp PORT: an echo server on 127.0.0.1:PORT; prints "ready".
import socket, sys, threading
mode, port = sys.argv[1], int(sys.argv[2])
if mode == "tcp":
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("127.0.0.1", port))
    s.listen(512)
    print("ready", flush=True)
    def echo(c):
        c.settimeout(120)
        try:
            while True:
                d = c.recv(262144)
                if not d:
                    break
                c.sendall(d)
            c.shutdown(socket.SHUT_WR)
        except OSError:
            pass
        finally:
            c.close()
    while True:
        c, _ = s.accept()
        threading.Thread(target=echo, args=(c,), daemon=True).start()
else:
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
    s.bind(("127.0.0.1", port))
    print("ready", flush=True)
    while True:
        d, a = s.recvfrom(65535)
        s.sendto(d, a)
PY

cat >"$TMP/ports.py" <<'PY'
# Prints N ports free for both TCP and UDP on 127.0.0.1 (held until all are chosen).
import socket, sys
held, ports = [], []
while len(ports) < int(sys.argv[1]):
    t = socket.socket(); t.bind(("127.0.0.1", 0))
    p = t.getsockname()[1]
    u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        u.bind(("127.0.0.1", p))
    except OSError:
        t.close(); u.close(); continue
    held += [t, u]; ports.append(p)
print(" ".join(map(str, ports)))
PY

cat >"$TMP/driver.py" <<'PY'
# The soak driver: warm-up, baseline, mixed load with one backend restart, checks.
import hashlib, os, random, re, signal, socket, struct, sys, threading, time

RELAY_PID, TCP_PORT, UDP_PORT, METRICS_PORT, LOG, DIR, SECS = (
    int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), sys.argv[5], sys.argv[6], int(sys.argv[7]))
TCP = ("127.0.0.1", TCP_PORT)
UDP = ("127.0.0.1", UDP_PORT)
WARMUP = min(30, max(5, SECS // 10))
MAIN = SECS - WARMUP
HARD_DEADLINE = time.time() + SECS + 300

def watchdog():
    while time.time() < HARD_DEADLINE:
        time.sleep(1)
    print("soak: driver watchdog fired (hung)", flush=True)
    os._exit(1)
threading.Thread(target=watchdog, daemon=True).start()

lock = threading.Lock()
C = {k: 0 for k in [
    "tcp_connects", "bulk_ok", "short_ok", "halfclose_ok", "resets", "bytes_up", "bytes_down",
    "udp_sent", "udp_received", "udp_flows", "metrics_scrapes"]}
OPS = []        # failed operations: (kind, t0, t1, error)
CORRUPT = []    # completed with wrong bytes: always unexpected

def add(k, n=1):
    with lock:
        C[k] += n

def failed(kind, t0, err):
    with lock:
        OPS.append((kind, t0, time.time(), err))

def tcp_connect():
    # Counted before the attempt: the relay accepts (and counts) every one,
    # even those it resets before connect() returns (backend down).
    add("tcp_connects")
    s = socket.create_connection(TCP, timeout=10)
    s.settimeout(30)
    return s

def recv_all(s, h=None):
    got = 0
    buf = bytearray()
    while True:
        d = s.recv(262144)
        if not d:
            return got, buf
        got += len(d)
        if h is not None:
            h.update(d)
        else:
            buf += d

def bulk(stop, rnd, wid):
    block = rnd.randbytes(16 << 20)
    for _ in range(100000):
        if stop.is_set():
            return
        n = rnd.randint(256 << 10, 16 << 20)
        off = rnd.randint(0, len(block) - n)
        data = memoryview(block)[off:off + n]
        want = hashlib.sha256(data).digest()
        t0 = time.time()
        try:
            s = tcp_connect()
            errs = []
            def send():
                try:
                    s.sendall(data)
                    s.shutdown(socket.SHUT_WR)
                except OSError as e:
                    errs.append(e)
            th = threading.Thread(target=send, daemon=True)
            th.start()
            h = hashlib.sha256()
            try:
                got, _ = recv_all(s, h)
            finally:
                th.join(60)
                s.close()
            if got == n and h.digest() != want:
                with lock:
                    CORRUPT.append(f"bulk {wid}: {n} bytes back, hash differs")
            elif got != n or errs:
                failed("bulk", t0, f"{got} of {n} bytes back; send: {errs}")
            else:
                add("bulk_ok"); add("bytes_up", n); add("bytes_down", n)
        except OSError as e:
            failed("bulk", t0, repr(e))
            time.sleep(0.05)

def echo_once(kind, wid, data, hold=0.0):
    """One connection: send `data`, shut the write side, stay half-closed for
    `hold` seconds, read the echo to EOF, and count the outcome as `kind`."""
    t0 = time.time()
    try:
        s = tcp_connect()
        try:
            s.sendall(data)
            s.shutdown(socket.SHUT_WR)
            if hold:
                time.sleep(hold)
            got, buf = recv_all(s)
        finally:
            s.close()
        if got == len(data) and bytes(buf) != data:
            with lock:
                CORRUPT.append(f"{kind} {wid}: bytes differ")
        elif got != len(data):
            failed(kind, t0, f"{got} of {len(data)} bytes back")
        else:
            add(f"{kind}_ok"); add("bytes_up", got); add("bytes_down", got)
    except OSError as e:
        failed(kind, t0, repr(e))
        time.sleep(0.05)

def short(stop, rnd, wid):
    for _ in range(1000000):
        if stop.is_set():
            return
        echo_once("short", wid, rnd.randbytes(rnd.randint(1, 2000)))
        time.sleep(0.02)

def halfclose(stop, rnd, wid):
    for _ in range(1000000):
        if stop.is_set():
            return
        # Half-closed for a while before the echo is read.
        echo_once("halfclose", wid, rnd.randbytes(64 << 10), rnd.uniform(0.05, 0.3))

def resetter(stop, rnd, wid):
    for i in range(1000000):
        if stop.is_set():
            return
        t0 = time.time()
        try:
            s = tcp_connect()
            s.sendall(rnd.randbytes(32 << 10))
            first = s.recv(4096)                  # the relay is relaying
            if not first:
                raise OSError("EOF before any echo")
            if i % 2 == 0:
                s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            else:
                time.sleep(0.05)                  # the rest of the echo arrives, unread
            s.close()                             # either way: a reset
            add("resets")
        except OSError as e:
            failed("reset", t0, repr(e))
        time.sleep(0.05)

def udp(stop, rnd, wid):
    s, flow, seq = None, 0, 0
    for _ in range(10000000):
        if stop.is_set():
            break
        if s is None or seq % 200 == 0:
            if s is not None:
                s.close()
            s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            s.bind(("127.0.0.1", 0))
            s.settimeout(1.0)
            flow += 1
            add("udp_flows")
        seq += 1
        msg = struct.pack("!III", wid, flow, seq) + rnd.randbytes(rnd.randint(0, 1400))
        t0 = time.time()
        answered = False
        for _try in range(3):
            s.sendto(msg, UDP)
            add("udp_sent")
            deadline = time.time() + 1.0
            while time.time() < deadline and not answered:
                try:
                    d, a = s.recvfrom(65535)
                except socket.timeout:
                    break
                if d == msg and a == UDP:
                    answered = True
                elif a != UDP:
                    # Not from the relay: a stray datagram of another program
                    # that reached this reused ephemeral port; not a crossing.
                    continue
                elif len(d) < 12 or struct.unpack("!III", d[:12])[:2] != (wid, flow):
                    with lock:
                        CORRUPT.append(f"udp {wid}: a datagram of another client: {d[:12].hex()} from {a}")
            if answered:
                break
        if answered:
            add("udp_received")
        else:
            failed("udp", t0, f"datagram {seq} of flow {flow}: no echo after 3 tries")
        time.sleep(0.002)
    if s is not None:
        s.close()

def http_metrics():
    s = socket.create_connection(("127.0.0.1", METRICS_PORT), timeout=5)
    try:
        s.sendall(b"GET /metrics HTTP/1.0\r\n\r\n")
        _, buf = recv_all(s)
    finally:
        s.close()
    return buf.decode()

def metric(page, name):
    total = 0
    for line in page.splitlines():
        if line.startswith(name + "{"):
            total += int(line.rsplit(" ", 1)[1])
    return total

def scraper(stop, rnd, wid):
    for _ in range(100000):
        if stop.wait(2.0):
            return
        t0 = time.time()
        try:
            page = http_metrics()
            if "splice_relay_tcp_connections_total" not in page:
                raise OSError("no counters in the page")
            add("metrics_scrapes")
        except OSError as e:
            failed("metrics", t0, repr(e))

WORKERS = [(bulk, 2), (short, 2), (halfclose, 1), (resetter, 1), (udp, 2), (scraper, 1)]

def run_load(seconds, seed, midway=None):
    stop = threading.Event()
    threads = []
    for fn, n in WORKERS:
        for i in range(n):
            rnd = random.Random(seed * 1000 + len(threads))
            t = threading.Thread(target=fn, args=(stop, rnd, len(threads)), daemon=True)
            t.start()
            threads.append(t)
    end = time.time() + seconds
    if midway is not None:
        time.sleep(max(0, seconds / 2))
        midway()
    while time.time() < end:
        time.sleep(min(1.0, max(0, end - time.time())))
    stop.set()
    for t in threads:
        t.join(90)
    hung = sum(t.is_alive() for t in threads)
    if hung:
        print(f"soak: {hung} load threads still running after the stop", flush=True)
    return hung

GAP = []
GAP_LOG = []    # the relay log's byte range written around the gap
def restart_backend():
    off0 = os.path.getsize(LOG)
    open(os.path.join(DIR, "restart.request"), "w").close()
    path = os.path.join(DIR, "gap")
    for _ in range(600):
        if os.path.exists(path):
            a, b = open(path).read().split()
            GAP.append((float(a), float(b)))
            time.sleep(1.5)
            GAP_LOG.append((off0, os.path.getsize(LOG)))
            return
        time.sleep(0.05)
    print("soak: the backend restart did not happen", flush=True)

def log_lines():
    with open(LOG, errors="replace") as f:
        return f.read().splitlines()

def pipe_stats():
    before = sum("stats pipes in_use" in l for l in log_lines())
    os.kill(RELAY_PID, signal.SIGUSR1)
    for _ in range(100):
        lines = [l for l in log_lines() if "stats pipes in_use" in l]
        if len(lines) > before:
            m = re.search(r"in_use (\d+) spare (\d+)", lines[-1])
            return int(m.group(1)), int(m.group(2))
        time.sleep(0.03)
    raise SystemExit("soak: no stats line after SIGUSR1")

def fds():
    f = {"total": 0, "sockets": 0, "pipes": 0}
    d = f"/proc/{RELAY_PID}/fd"
    for e in os.listdir(d):
        try:
            t = os.readlink(os.path.join(d, e))
        except OSError:
            continue
        f["total"] += 1
        if t.startswith("socket:"):
            f["sockets"] += 1
        elif t.startswith("pipe:"):
            f["pipes"] += 1
    f["other"] = f["total"] - f["sockets"] - f["pipes"]
    return f

def rss_kib():
    for l in open(f"/proc/{RELAY_PID}/status"):
        if l.startswith("VmRSS:"):
            return int(l.split()[1])
    return 0

def settle():
    """Waits for no TCP connection and no UDP flow in the relay, then 3 s more."""
    for _ in range(100):
        page = http_metrics()
        if metric(page, "splice_relay_tcp_connections_open") == 0 and metric(page, "splice_relay_udp_flows_open") == 0:
            break
        time.sleep(0.2)
    else:
        print("soak: the relay did not become idle", flush=True)
    time.sleep(3)
    in_use, spare = pipe_stats()
    return {"fds": fds(), "in_use": in_use, "spare": spare, "rss": rss_kib()}

# Warm-up, then the baseline.
t_start = time.time()
hung = run_load(WARMUP, 1)
start = settle()
warm_connects = C["tcp_connects"]
# The load, with the backend restart midway.
hung += run_load(MAIN, 2, restart_backend)
end = settle()

problems = []
if hung:
    problems.append(f"{hung} load threads hung")
if not GAP:
    problems.append("no backend restart")
gap = GAP[0] if GAP else (0.0, 0.0)
lo, hi = gap[0] - 0.5, gap[1] + 1.0
expected = [o for o in OPS if o[0] in ("bulk", "short", "halfclose", "reset") and o[2] >= lo and o[1] <= hi]
unexpected = [o for o in OPS if o not in expected]
if unexpected:
    problems.append(f"{len(unexpected)} unexpected failures")
if CORRUPT:
    problems.append(f"{len(CORRUPT)} corrupted transfers or crossed datagrams")
for k in ("bulk_ok", "short_ok", "halfclose_ok", "resets", "udp_received", "metrics_scrapes"):
    if C[k] == 0:
        problems.append(f"no successful {k}")

# fds: sockets and other fds exact; pipes = the relay's own (e.g. inherited) + 2 per pool spare.
fs, fe = start["fds"], end["fds"]
own_pipes = fs["pipes"] - 2 * start["spare"]
if fe["sockets"] != fs["sockets"] or fe["other"] != fs["other"]:
    problems.append(f"fds changed: {fs} -> {fe}")
if end["in_use"] != 0 or fe["pipes"] != own_pipes + 2 * end["spare"]:
    problems.append(f"pipes not accounted for: {fe['pipes']} pipe fds, {end['in_use']} lent, {end['spare']} spare")
if end["rss"] > start["rss"] + 2048:
    problems.append(f"RSS grew {start['rss']} -> {end['rss']} KiB")

# The relay counted exactly the connections made.
page = http_metrics()
relay_total = metric(page, "splice_relay_tcp_connections_total")
relay_failed = metric(page, "splice_relay_tcp_connect_failures_total")
made = C["tcp_connects"]
if relay_total != made:
    problems.append(f"relay counted {relay_total} connections, the driver made {made}")

# Log: WARN/ERROR only for the unreachable backend during the gap (lines
# written, by file offset, from the restart request to 1.5 s after the
# backend was back).
gap_log = GAP_LOG[0] if GAP_LOG else (0, 0)
warn_expected, warn_unexpected = 0, []
with open(LOG, "rb") as f:
    offset = 0
    for raw in f:
        line = raw.decode(errors="replace").rstrip("\n")
        at, offset = offset, offset + len(raw)
        if not re.match(r"\S+ (WARN|ERROR) ", line):
            continue
        if ("backend unreachable" in line or "cannot connect" in line) and gap_log[0] <= at < gap_log[1]:
            warn_expected += 1
        else:
            warn_unexpected.append(line)
if warn_unexpected:
    problems.append(f"{len(warn_unexpected)} unexpected WARN/ERROR log lines")

# Still alive and relaying.
try:
    os.kill(RELAY_PID, 0)
    s = tcp_connect()
    s.sendall(b"still there?")
    s.shutdown(socket.SHUT_WR)
    got, buf = recv_all(s)
    s.close()
    if bytes(buf) != b"still there?":
        problems.append("final echo differs")
except OSError as e:
    problems.append(f"relay not alive or not relaying: {e!r}")

elapsed = time.time() - t_start
print(f"soak: {elapsed:.0f} s ({WARMUP} s warm-up + {MAIN} s load), backend restart gap {gap[1] - gap[0]:.2f} s")
print(f"  tcp connections {made} (after warm-up {made - warm_connects}); relay counted {relay_total}, of which backend failures {relay_failed}")
print(f"  bulk transfers ok {C['bulk_ok']}, short {C['short_ok']}, half-close {C['halfclose_ok']}, resets {C['resets']}, metrics scrapes {C['metrics_scrapes']}")
print(f"  bytes echoed intact: {C['bytes_up']} up, {C['bytes_down']} down ({C['bytes_up'] / 2**20:.0f} MiB each way)")
print(f"  udp: {C['udp_flows']} flows, {C['udp_sent']} datagrams sent, {C['udp_received']} echoed")
print(f"  failures: expected (restart gap) {len(expected)}, unexpected {len(unexpected)}, corrupt {len(CORRUPT)}")
for o in unexpected[:10]:
    print(f"    unexpected: {o[0]} at +{o[1] - t_start:.1f}s..+{o[2] - t_start:.1f}s: {o[3]}")
for c in CORRUPT[:10]:
    print(f"    corrupt: {c}")
print(f"  relay fds start {fs['total']} (sockets {fs['sockets']}, pipes {fs['pipes']}, other {fs['other']}; pool spare {start['spare']})"
      f" end {fe['total']} (sockets {fe['sockets']}, pipes {fe['pipes']}, other {fe['other']}; pool spare {end['spare']}, lent {end['in_use']})")
print(f"  relay RSS start {start['rss']} KiB end {end['rss']} KiB ({end['rss'] - start['rss']:+d} KiB)")
print(f"  relay WARN/ERROR lines: {warn_expected} expected (gap), {len(warn_unexpected)} unexpected")
for l in warn_unexpected[:10]:
    print(f"    {l}")
for p in problems:
    print(f"  problem: {p}")
sys.exit(1 if problems else 0)
PY

read -r LT LU MP BT BU < <(python3 "$TMP/ports.py" 5)

# start_backend MODE PORT: starts an echo backend, waits for "ready"; sets BACKEND_PID.
start_backend() {
  local mode=$1 port=$2 out
  out="$TMP/$1-backend.$(date +%s%N).out"
  python3 "$TMP/backend.py" "$mode" "$port" >"$out" 2>&1 &
  BACKEND_PID=$!
  for _ in $(seq 100); do
    grep -q ready "$out" 2>/dev/null && return 0
    kill -0 "$BACKEND_PID" 2>/dev/null || break
    sleep 0.1
  done
  echo "soak: $mode backend on port $port did not start:"; cat "$out"
  return 1
}

start_backend tcp "$BT" || exit 1
TCPB_PID=$BACKEND_PID
start_backend udp "$BU" || exit 1
UDPB_PID=$BACKEND_PID

RUST_LOG=${SOAK_RUST_LOG:-info} "$BIN" --metrics "127.0.0.1:$MP" --udp-timeout 3s \
  "127.0.0.1:$LT=127.0.0.1:$BT" "udp:127.0.0.1:$LU=127.0.0.1:$BU" 2>"$TMP/relay.log" &
RELAY_PID=$!
for _ in $(seq 100); do
  [ "$(grep -c 'listening on' "$TMP/relay.log" 2>/dev/null)" -ge 2 ] && break
  sleep 0.1
done
if [ "$(grep -c 'listening on' "$TMP/relay.log" 2>/dev/null)" -lt 2 ]; then
  echo "soak: the relay did not start:"; cat "$TMP/relay.log"; echo "soak: FAIL"; exit 1
fi
echo "soak: relay pid $RELAY_PID: tcp 127.0.0.1:$LT -> :$BT, udp 127.0.0.1:$LU -> :$BU, metrics :$MP; load for ${SECS}s"

python3 "$TMP/driver.py" "$RELAY_PID" "$LT" "$LU" "$MP" "$TMP/relay.log" "$TMP" "$SECS" &
DRIVER_PID=$!

# Wait for the driver (bounded), restarting the TCP backend when it asks.
restarted=0
deadline=$(( $(date +%s) + SECS + 360 ))
while kill -0 "$DRIVER_PID" 2>/dev/null && [ "$(date +%s)" -lt "$deadline" ]; do
  if [ "$restarted" -eq 0 ] && [ -f "$TMP/restart.request" ]; then
    restarted=1
    gap_start=$(date +%s.%N)
    kill -9 "$TCPB_PID"; wait "$TCPB_PID" 2>/dev/null
    sleep 1
    if start_backend tcp "$BT"; then
      TCPB_PID=$BACKEND_PID
      gap_end=$(date +%s.%N)
      echo "$gap_start $gap_end" >"$TMP/gap.tmp" && mv "$TMP/gap.tmp" "$TMP/gap"
      echo "soak: TCP backend killed and restarted (pid $TCPB_PID)"
    fi
  fi
  sleep 0.1 & wait $! # (wait, unlike a foreground sleep, lets INT/TERM through at once)
done
if kill -0 "$DRIVER_PID" 2>/dev/null; then
  echo "soak: the driver did not finish in time"
  echo "soak: FAIL"; exit 1
fi
wait "$DRIVER_PID"; rc=$?
DRIVER_PID=""
if ! kill -0 "$RELAY_PID" 2>/dev/null; then
  echo "soak: the relay died"; rc=1
fi
if [ "$rc" -eq 0 ]; then
  RESULT=0
  echo "soak: PASS"
  exit 0
fi
echo "soak: FAIL"
exit 1
