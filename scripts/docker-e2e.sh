#!/usr/bin/env bash
# End to end with a real dockerd whose userland-proxy-path is splice-relay.
# The bridge is 198.18.0.0/24 with no NAT and no iptables, so every
# published-port byte goes through the relay; clients use 127.0.0.1/::1, and
# (part f) a network namespace of the script's own, 198.19.0.2, behind a veth.
# Every proxy runs with SPLICE_RELAY_OPTS=--transparent: loopback clients are
# not spoofed (parts a-e), the namespace's client is (part f), its replies
# brought back by scripts/transparent-routing.sh up docker0.
#   scripts/docker-e2e.sh [RELAY_BINARY]   (default: cargo build --release)
set -euo pipefail
cd "$(dirname "$0")/.."

E2E=/tmp/relay-e2e
export DOCKER_HOST=unix://$E2E/docker.sock
pass=0 fail=0
ok() { echo "PASS: $*"; pass=$((pass + 1)); }
bad() { echo "FAIL: $*"; fail=$((fail + 1)); }

# --- install (no default daemon is started: policy-rc.d says no) ---------------
if ! command -v dockerd >/dev/null || ! command -v busybox >/dev/null || ! command -v curl >/dev/null \
  || ! command -v nft >/dev/null || ! command -v ip >/dev/null; then
  made_policy=0
  if [ ! -e /usr/sbin/policy-rc.d ]; then
    printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d && chmod +x /usr/sbin/policy-rc.d && made_policy=1
  fi
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends docker.io busybox-static curl gcc libc6-dev nftables iproute2 >/dev/null
  [ "$made_policy" = 1 ] && rm -f /usr/sbin/policy-rc.d
fi

relay=${1:-}
if [ -z "$relay" ]; then
  cargo build --release -q
  relay=target/release/splice-relay
fi
mkdir -p "$E2E"
cp "$relay" "$E2E/splice-relay"
RELAY=$E2E/splice-relay

holder_pid=
CLIENT_NS=relay-e2e-client
cleanup() {
  set +e
  ip netns del "$CLIENT_NS" 2>/dev/null
  ip link del e2e-host 2>/dev/null
  scripts/transparent-routing.sh down docker0 2>/dev/null
  if docker version >/dev/null 2>&1; then
    ids=$(docker ps -aq)
    [ -n "$ids" ] && docker rm -f $ids >/dev/null 2>&1
  fi
  [ -n "$holder_pid" ] && kill "$holder_pid" 2>/dev/null
  if [ -f "$E2E/dockerd.pid" ]; then
    pid=$(cat "$E2E/dockerd.pid")
    kill "$pid" 2>/dev/null
    for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.2; done
    kill -9 "$pid" 2>/dev/null
  fi
  ip link del docker0 2>/dev/null
  grep " $E2E/" /proc/mounts | awk '{print $2}' | sort -r | xargs -r -n1 umount -l 2>/dev/null
}
trap cleanup EXIT
cleanup

# --- dockerd -----------------------------------------------------------------
cat > "$E2E/daemon.json" <<EOF
{
  "data-root": "$E2E/data", "exec-root": "$E2E/exec", "pidfile": "$E2E/dockerd.pid",
  "hosts": ["$DOCKER_HOST"], "storage-driver": "overlay2",
  "bip": "198.18.0.1/24", "ipv6": true, "fixed-cidr-v6": "fd00:d0c::/64",
  "iptables": false, "ip6tables": false, "ip-masq": false, "ip-forward": false,
  "dns": ["127.0.0.1"], "userland-proxy": true, "userland-proxy-path": "$RELAY"
}
EOF
# Close the shell's stray fds so no proxy inherits them.
(
  for fd in /proc/self/fd/*; do n=${fd##*/}; [ "$n" -gt 2 ] && eval "exec $n>&-" 2>/dev/null; done
  setsid env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin HOME=/root SPLICE_RELAY_LOG="$E2E/relay.log" \
    SPLICE_RELAY_OPTS=--transparent \
    dockerd --config-file "$E2E/daemon.json" </dev/null >>"$E2E/dockerd.log" 2>&1 &
)
for _ in $(seq 100); do docker version >/dev/null 2>&1 && break; sleep 0.2; done
docker version >/dev/null 2>&1 || { echo "dockerd did not start"; tail -20 "$E2E/dockerd.log"; exit 1; }

# --- image: busybox httpd + a static UDP echo ---------------------------------
root=$E2E/rootfs
rm -rf "$root" && mkdir -p "$root/bin" "$root/www/cgi-bin"
cp "$(command -v busybox)" "$root/bin/busybox"
for a in sh hostname cat echo httpd; do ln -sf busybox "$root/bin/$a"; done
echo "hello from the container" > "$root/www/index.html"
printf '#!/bin/sh\necho "Content-Type: text/plain"\necho\necho "REMOTE_ADDR=$REMOTE_ADDR"\n' > "$root/www/cgi-bin/ip"
chmod +x "$root/www/cgi-bin/ip"
cat > "$E2E/udpecho.c" <<'EOF'
#include <netinet/in.h>
#include <sys/socket.h>
/* Dual-stack: dockerd's :: proxy targets the container's IPv6 address. */
int main(void) {
  int s = socket(AF_INET6, SOCK_DGRAM, 0), off = 0;
  setsockopt(s, IPPROTO_IPV6, IPV6_V6ONLY, &off, sizeof off);
  struct sockaddr_in6 a = {.sin6_family = AF_INET6, .sin6_port = htons(5353)};
  bind(s, (struct sockaddr *)&a, sizeof a);
  char buf[65536];
  for (;;) {
    struct sockaddr_in6 from; socklen_t fl = sizeof from;
    ssize_t n = recvfrom(s, buf, sizeof buf, 0, (struct sockaddr *)&from, &fl);
    if (n >= 0) sendto(s, buf, n, 0, (struct sockaddr *)&from, fl);
  }
}
EOF
gcc -static -O2 -o "$root/bin/udpecho" "$E2E/udpecho.c"
printf '#!/bin/sh\n/bin/udpecho &\nexec /bin/busybox httpd -f -p 80 -h /www\n' > "$root/bin/start"
chmod +x "$root/bin/start"
tar -C "$root" -c . | docker import -c 'CMD ["/bin/start"]' - relay-webapp >/dev/null

udp_echo() { # host port payload -> prints the reply
  python3 - "$@" <<'EOF'
import socket, sys
host, port, msg = sys.argv[1], int(sys.argv[2]), sys.argv[3].encode()
fam = socket.AF_INET6 if ":" in host else socket.AF_INET
s = socket.socket(fam, socket.SOCK_DGRAM); s.settimeout(1)
for _ in range(5):
    s.sendto(msg, (host, port))
    try:
        print(s.recv(65536).decode()); break
    except socket.timeout:
        pass
EOF
}

# --- a. TCP and UDP through the relay, both families ---------------------------
docker run -d --pull=never --name e2e-web -p 8080:80 -p 5353:5353/udp relay-webapp >/dev/null
sleep 1
for url in http://127.0.0.1:8080/ "http://[::1]:8080/"; do
  body=$(curl -sS --max-time 5 "$url" || true)
  [ "$body" = "hello from the container" ] && ok "GET $url" || bad "GET $url -> '$body'"
done
for host in 127.0.0.1 ::1; do
  reply=$(udp_echo "$host" 5353 "ping-$host")
  [ "$reply" = "ping-$host" ] && ok "UDP echo via $host" || bad "UDP echo via $host -> '$reply'"
done

# --- b. the proxies dockerd started are the relay, with docker-proxy's argv ----
dpid=$(cat "$E2E/dockerd.pid")
kids=$(pgrep -P "$dpid" || true)
nrelay=0
for k in $kids; do
  if [ "$(readlink "/proc/$k/exe")" = "$RELAY" ]; then
    nrelay=$((nrelay + 1))
    tr '\0' ' ' < "/proc/$k/cmdline" | grep -q -- "-proto" || bad "argv of $k lacks -proto"
  fi
done
[ "$nrelay" -ge 4 ] && ok "$nrelay proxy processes are splice-relay" || bad "only $nrelay relay children of dockerd"

# --- c. a port range -----------------------------------------------------------
docker run -d --pull=never --name e2e-range -p 9000-9004:9000-9004 relay-webapp \
  /bin/busybox httpd -f -p 9002 -h /www >/dev/null
sleep 1
body=$(curl -sS --max-time 5 http://127.0.0.1:9002/ || true)
[ "$body" = "hello from the container" ] && ok "port range: GET :9002" || bad "port range: '$body'"

# --- d. docker rm -f stops every proxy ----------------------------------------
docker rm -f e2e-web e2e-range >/dev/null
left=1
for _ in $(seq 50); do
  left=0
  for k in $(pgrep -P "$dpid" || true); do [ "$(readlink "/proc/$k/exe")" = "$RELAY" ] && left=$((left + 1)); done
  [ "$left" = 0 ] && break
  sleep 0.2
done
[ "$left" = 0 ] && ok "docker rm -f leaves no relay process" || bad "$left relay processes left after rm -f"

# --- e. a taken port: the relay's error reaches docker run --------------------
python3 -c 'import socket,time; s=socket.socket(); s.setsockopt(socket.SOL_SOCKET,socket.SO_REUSEADDR,1); s.bind(("0.0.0.0",8081)); s.listen(); time.sleep(120)' &
holder_pid=$!
sleep 0.5
out=$(docker run -d --pull=never --name e2e-busy -p 8081:80 relay-webapp 2>&1 || true)
if echo "$out" | grep -qi "8081" && echo "$out" | grep -qi "in use"; then
  ok "port in use reported: $(echo "$out" | grep -i "in use" | head -1)"
else
  bad "port in use not reported: $out"
fi

# --- f. --transparent: the container sees a client namespace's own address ----
ip netns add "$CLIENT_NS"
ip link add e2e-client netns "$CLIENT_NS" type veth peer name e2e-host
ip -n "$CLIENT_NS" link set lo up
ip -n "$CLIENT_NS" addr add 198.19.0.2/24 dev e2e-client
ip -n "$CLIENT_NS" link set e2e-client up
ip -n "$CLIENT_NS" route add default via 198.19.0.1
ip addr add 198.19.0.1/24 dev e2e-host
ip link set e2e-host up
# The container answers 198.19.0.2 through its default route, docker0: hand
# those replies to the relay's socket.
scripts/transparent-routing.sh up docker0
docker run -d --pull=never --name e2e-ip -p 8082:80 relay-webapp >/dev/null
sleep 1
# busybox httpd listens dual-stack: an IPv4 peer may show as [::ffff:a.b.c.d].
body=$(ip netns exec "$CLIENT_NS" curl -sS --max-time 5 http://198.19.0.1:8082/cgi-bin/ip || true)
[[ "$body" =~ ^REMOTE_ADDR=(\[::ffff:)?198\.19\.0\.2\]?$ ]] && ok "transparent: the container sees the client's $body" \
  || bad "transparent: the container saw '$body', not the client's 198.19.0.2"
body=$(curl -sS --max-time 5 http://127.0.0.1:8082/cgi-bin/ip || true)
[[ "$body" =~ ^REMOTE_ADDR=(\[::ffff:)?198\.18\.0\.1\]?$ ]] && ok "transparent: a loopback client arrives from the bridge's $body" \
  || bad "transparent: loopback client seen as '$body', not from the bridge's 198.18.0.1"
docker rm -f e2e-ip >/dev/null
scripts/transparent-routing.sh down docker0
if ip rule show | grep "lookup 2711" >/dev/null || nft list tables | grep splice_relay_transparent >/dev/null; then
  bad "transparent-routing.sh down left a rule"
else
  ok "transparent-routing.sh down removed its rules"
fi

echo "docker-e2e: $pass passed, $fail failed"
[ "$fail" = 0 ]
