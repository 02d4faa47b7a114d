#!/usr/bin/env python3
"""Helpers for scripts/bench-peers.sh (python3 standard library only).

Subcommands:
  memtree PID...              RSS/PSS/fds summed over the processes and all their descendants
  cputree PID                 utime+stime (+ reaped children) of a process tree, in seconds
  waitlisten PROTO PORTS SECS wait until every port in PORTS (N or A-B) has a listener; print seconds
  holdconns ...               open N idle TCP connections through a relay to our own backend and hold them
  startmany ...               start one process per port (docker-proxy style, fd-3 handshake), time it
  iperf FILE                  parse iperf3 -J output: "gbps bytes"
  wrk FILE                    parse wrk --latency output: "rps requests p50_ms p99_ms errors"
  udpgen FILE                 parse udpgen output: key=value pairs on one line
  summarize RAW               median per (case, peer, metric) -> one markdown table with ratios

Every loop is bounded in time. Addresses are loopback only.
"""
import json
import os
import re
import signal
import socket
import statistics
import subprocess
import sys
import time


def proc_children_map():
    kids = {}
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/stat") as f:
                st = f.read()
        except OSError:
            continue
        ppid = int(st.rsplit(")", 1)[1].split()[1])
        kids.setdefault(ppid, []).append(int(d))
    return kids


def tree(roots):
    kids = proc_children_map()
    seen, stack = set(), list(roots)
    while stack:
        p = stack.pop()
        if p in seen:
            continue
        seen.add(p)
        stack.extend(kids.get(p, []))
    return sorted(seen)


def memtree(pids):
    procs = rss = pss = fds = 0
    for p in tree(pids):
        try:
            with open(f"/proc/{p}/smaps_rollup") as f:
                txt = f.read()
            n = len(os.listdir(f"/proc/{p}/fd"))
        except OSError:
            continue
        m = re.search(r"^Rss:\s+(\d+)", txt, re.M)
        rss += int(m.group(1)) if m else 0
        m = re.search(r"^Pss:\s+(\d+)", txt, re.M)
        pss += int(m.group(1)) if m else 0
        fds += n
        procs += 1
    print(f"procs={procs} rss_kb={rss} pss_kb={pss} fds={fds}")


def cputree(pid):
    hz = os.sysconf("SC_CLK_TCK")
    total = 0
    for p in tree([pid]):
        try:
            with open(f"/proc/{p}/stat") as f:
                fl = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        # utime stime cutime cstime are fields 14-17 (index 11-14 after comm)
        total += sum(int(x) for x in fl[11:15])
    print(f"{total / hz:.3f}")


def parse_ports(s):
    if "-" in s:
        a, b = s.split("-")
        return set(range(int(a), int(b) + 1))
    return {int(s)}


def listening(proto):
    """Ports with a listening (tcp) or bound (udp) socket, IPv4 and IPv6."""
    out = set()
    for fam in ("", "6"):
        try:
            with open(f"/proc/net/{proto}{fam}") as f:
                next(f)
                for line in f:
                    parts = line.split()
                    port = int(parts[1].rsplit(":", 1)[1], 16)
                    if proto == "udp" or parts[3] == "0A":
                        out.add(port)
        except OSError:
            pass
    return out


def waitlisten(proto, ports, secs):
    want = parse_ports(ports)
    t0 = time.monotonic()
    while time.monotonic() - t0 < float(secs):
        if want <= listening(proto):
            print(f"{time.monotonic() - t0:.3f}")
            return 0
        time.sleep(0.005)
    print(f"timeout: {len(want - listening(proto))} of {len(want)} ports not listening", file=sys.stderr)
    return 1


def holdconns(args):
    """holdconns CONNECT_HOST CONNECT_PORT BACKEND_PORT N OPEN_SECS HOLD_SECS STATUSFILE

    Listens on 127.0.0.1:BACKEND_PORT (the backend), opens N connections to
    CONNECT_HOST:CONNECT_PORT (the relay) within OPEN_SECS, waits until the
    backend has accepted as many, writes "opened=.. accepted=.. secs=.." to
    STATUSFILE, and holds everything until SIGTERM or HOLD_SECS."""
    host, cport, bport, n, open_secs, hold_secs, status = args
    cport, bport, n, open_secs, hold_secs = int(cport), int(bport), int(n), float(open_secs), float(hold_secs)
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    stop = []
    signal.signal(signal.SIGTERM, lambda *_: stop.append(1))
    srv = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.bind(("127.0.0.1", bport))
    srv.listen(4096)
    srv.setblocking(False)
    fam = socket.AF_INET6 if ":" in host else socket.AF_INET
    clients, accepted, err = [], [], ""

    def drain():
        while True:
            try:
                c, _ = srv.accept()
                accepted.append(c)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as e:  # EMFILE and such: stop accepting
                return e

    t0 = time.monotonic()
    while len(clients) < n and time.monotonic() - t0 < open_secs and not stop:
        s = socket.socket(fam, socket.SOCK_STREAM)
        s.settimeout(5)
        try:
            s.connect((host, cport))
        except OSError as e:
            err = f"connect #{len(clients) + 1}: {e}"
            s.close()
            break
        clients.append(s)
        if len(clients) % 64 == 0:
            e = drain()
            if e:
                err = f"backend accept: {e}"
                break
    last, last_t = -1, time.monotonic()
    while len(accepted) < len(clients) and time.monotonic() - t0 < open_secs + 10 and not stop:
        if drain():
            break
        if len(accepted) != last:
            last, last_t = len(accepted), time.monotonic()
        elif time.monotonic() - last_t > 3:
            break  # no progress for 3 s: the relay is stuck or gone
        time.sleep(0.005)
    # A relay that died or gave up shows as closed client sockets: count live ones.
    time.sleep(0.5)
    drain()
    live = 0
    for s in clients:
        try:
            s.setblocking(False)
            if s.recv(1, socket.MSG_PEEK) == b"":
                continue  # EOF: the relay closed it
        except BlockingIOError:
            pass
        except OSError:
            continue
        live += 1
    secs = time.monotonic() - t0
    with open(status + ".tmp", "w") as f:
        f.write(f"opened={len(clients)} accepted={len(accepted)} live={live} secs={secs:.2f} err={err!r}\n")
    os.rename(status + ".tmp", status)
    t1 = time.monotonic()
    while not stop and time.monotonic() - t1 < hold_secs:
        time.sleep(0.05)
    return 0


def startmany(args):
    """startmany PIDFILE LISTEN_PORTS OFFSET TIMEOUT -- CMD... ({L} and {T} are replaced per port)

    One process per port with a pipe on fd 3 (docker-proxy's handshake: "0\\n"
    when ready). Prints "startup_s=.. ready=.. procs=..". Leaves the processes
    running; their pids are in PIDFILE (one per line) for the caller to kill."""
    i = args.index("--")
    pidfile, ports, offset, timeout = args[:i]
    cmd = args[i + 1:]
    lo, hi = [int(x) for x in ports.split("-")]
    offset, timeout = int(offset), float(timeout)
    t0 = time.monotonic()
    procs, pipes = [], []
    with open(pidfile, "w") as pf:
        for port in range(lo, hi + 1):
            if time.monotonic() - t0 > timeout:
                break
            r, w = os.pipe()
            argv = [a.replace("{L}", str(port)).replace("{T}", str(port + offset)) for a in cmd]

            def child_fd3(w=w):
                os.dup2(w, 3)  # inheritable; every other fd of ours is O_CLOEXEC

            p = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                 stderr=subprocess.DEVNULL, preexec_fn=child_fd3, close_fds=False)
            os.close(w)
            procs.append(p)
            pipes.append(r)
            pf.write(f"{p.pid}\n")
            pf.flush()
    ready = 0
    for r in pipes:
        os.set_blocking(r, False)
    pending = dict(enumerate(pipes))
    while pending and time.monotonic() - t0 < timeout:
        for k, r in list(pending.items()):
            try:
                b = os.read(r, 64)
            except BlockingIOError:
                continue
            if b.startswith(b"0"):
                ready += 1
            pending.pop(k)
            os.close(r)
        time.sleep(0.002)
    secs = time.monotonic() - t0
    print(f"startup_s={secs:.3f} ready={ready} procs={len(procs)}")
    return 0


def parse_iperf(path):
    with open(path) as f:
        j = json.load(f)
    end = j.get("end", {})
    s = end.get("sum_received") or end.get("sum") or {}
    print(f"{s.get('bits_per_second', 0) / 1e9:.3f} {int(s.get('bytes', 0))}")


def to_ms(v):
    m = re.match(r"([\d.]+)(us|ms|s|m)$", v)
    if not m:
        return float("nan")
    x, u = float(m.group(1)), m.group(2)
    return x * {"us": 0.001, "ms": 1, "s": 1000, "m": 60000}[u]


def parse_wrk(path):
    txt = open(path).read()
    rps = re.search(r"Requests/sec:\s+([\d.]+)", txt)
    req = re.search(r"(\d+) requests in", txt)
    p50 = re.search(r"^\s+50%\s+(\S+)", txt, re.M)
    p99 = re.search(r"^\s+99%\s+(\S+)", txt, re.M)
    errs = 0
    m = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", txt)
    if m:
        errs += sum(int(x) for x in m.groups())
    m = re.search(r"Non-2xx or 3xx responses: (\d+)", txt)
    if m:
        errs += int(m.group(1))
    print(
        f"{float(rps.group(1)) if rps else 0:.1f} {int(req.group(1)) if req else 0} "
        f"{to_ms(p50.group(1)) if p50 else float('nan'):.3f} {to_ms(p99.group(1)) if p99 else float('nan'):.3f} {errs}"
    )


def parse_udpgen(path):
    kv = dict(x.split("=", 1) for x in open(path).read().split() if "=" in x)
    print(" ".join(kv.get(k, "0") for k in ("offered_pps", "delivered_pps", "loss_pct", "delivered_pkts")))


# Metric name suffix -> True if higher is better (shown with an arrow).
def parse_fair(out, cpu, system):
    """examples/fairness output plus the relay's and the machine's CPU seconds -> metric lines."""
    m = dict(x.split("=") for x in out.split())
    gb = int(m["bulk_total"]) / 1e9
    print(f"probe p50 ms\t{m['rtt_p50']}")
    print(f"probe p99 ms\t{m['rtt_p99']}")
    print(f"new conn p50 ms\t{m['new_p50']}")
    print(f"new conn p99 ms\t{m['new_p99']}")
    print(f"direct p99 ms\t{m['direct_p99']}")
    print(f"bulk Gbit/s\t{8 * gb / float(m['total_secs']):.2f}")
    if gb > 0:
        print(f"relay CPU s/GB\t{float(cpu) / gb:.3f}")
        print(f"system CPU s/GB\t{float(system) / gb:.3f}")


def higher_better(metric):
    return any(k in metric for k in ("Gbit/s", "conn/s", "req/s", "pps", "established"))


PEER_ORDER = ["splice-relay", "splice-relay --transparent", "docker-proxy", "haproxy-splice", "haproxy", "socat", "direct", "udp-floor"]


def fmt(v):
    if isinstance(v, str):
        return v
    if v != v:
        return "-"
    a = abs(v)
    if a >= 1000:
        return f"{v:,.0f}"
    if a >= 100:
        return f"{v:.0f}"
    if a >= 10:
        return f"{v:.1f}"
    return f"{v:.2f}" if a >= 0.1 or a == 0 else f"{v:.3f}"


def ratio(r):
    if r >= 10:
        return f"{r:.0f}x"
    if r >= 0.1:
        return f"{r:.2f}x"
    return f"{r:.2g}x"


def summarize(raw):
    vals, order, status = {}, [], {}
    for line in open(raw):
        if line.startswith("#") or not line.strip():
            continue
        parts = line.rstrip("\n").split("\t")
        if len(parts) < 4:
            continue
        case, peer, metric, value = parts[:4]
        key = (case, metric)
        if key not in order:
            order.append(key)
        try:
            v = float(value)
            vals.setdefault((case, metric, peer), []).append(v)
        except ValueError:
            status[(case, metric, peer)] = value  # "exits", "fails", "n/a"
    peers = [p for p in PEER_ORDER if any(k[2] == p for k in list(vals) + list(status))]
    others = [p for p in peers if p != "splice-relay"]
    have_sr = "splice-relay" in peers
    hdr = ["case", "metric"] + peers + ([f"sr / {p}" for p in others] if have_sr else [])
    print("| " + " | ".join(hdr) + " |")
    print("|" + "---|" * len(hdr))
    for case, metric in order:
        row = [case, metric + (" ↑" if higher_better(metric) else " ↓")]
        med = {}
        for p in peers:
            if (case, metric, p) in vals:
                med[p] = statistics.median(vals[(case, metric, p)])
                row.append(fmt(med[p]))
            else:
                row.append(status.get((case, metric, p), ""))
        if have_sr:
            for p in others:
                a, b = med.get("splice-relay"), med.get(p)
                row.append(ratio(a / b) if a is not None and b not in (None, 0) else "")
        print("| " + " | ".join(row) + " |")
    print()
    print("↑ higher is better, ↓ lower is better; sr / X = splice-relay's median divided by X's (same run).")


def main():
    if len(sys.argv) < 2:
        print(__doc__, file=sys.stderr)
        return 2
    cmd, a = sys.argv[1], sys.argv[2:]
    if cmd == "memtree":
        memtree([int(x) for x in a])
    elif cmd == "cputree":
        cputree(int(a[0]))
    elif cmd == "waitlisten":
        return waitlisten(a[0], a[1], a[2])
    elif cmd == "holdconns":
        return holdconns(a)
    elif cmd == "startmany":
        return startmany(a)
    elif cmd == "fair":
        parse_fair(a[0], a[1], a[2])
    elif cmd == "iperf":
        parse_iperf(a[0])
    elif cmd == "wrk":
        parse_wrk(a[0])
    elif cmd == "udpgen":
        parse_udpgen(a[0])
    elif cmd == "summarize":
        summarize(a[0])
    else:
        print(__doc__, file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
