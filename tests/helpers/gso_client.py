"""A client and a backend that send UDP GSO bursts (UDP_SEGMENT) through the relay.

    gso_client.py FAMILY RELAY_PORT BACKEND_PORT PROXY

FAMILY is 4 or 6 (the client side; the backend is 127.0.0.1, bound with
SO_REUSEADDR: the test holds BACKEND_PORT for it until then). PROXY is 1 if
the relay puts a PROXY v2 header on each datagram. Prints "ok" and exits 0
when every datagram arrived alone, in order, with its exact bytes, both ways.
"""
import socket
import struct
import sys

UDP_SEGMENT = 103
family, relay_port, backend_port, proxy = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4] == "1"
af, host = (socket.AF_INET6, "::1") if family == "6" else (socket.AF_INET, "127.0.0.1")
relay = (host, relay_port)

backend = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
backend.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
backend.bind(("127.0.0.1", backend_port))
backend.settimeout(15)
client = socket.socket(af, socket.SOCK_DGRAM)
client.settimeout(15)


def datagrams(seed, count, size, tail):
    out = [bytes([seed, i]) + bytes((i * 7 + j + seed) % 251 for j in range(size - 2)) for i in range(count)]
    return out + [bytes([seed, count]) + b"t" * (tail - 2)]


def strip(d):
    if proxy and len(d) >= 16 and d[:12] == b"\r\n\r\n\x00\r\nQUIT\n":
        return d[16 + struct.unpack("!H", d[14:16])[0]:]
    return d


def expect(sock, want, what):
    for i, w in enumerate(want):
        got = strip(sock.recvfrom(65536)[0])
        if got != w:
            sys.exit(f"{what}: datagram {i} of {len(want)}: got {len(got)} bytes {got[:4]!r}, want {len(w)} bytes {w[:4]!r}")


client.sendto(b"hello", relay)
first, flow = backend.recvfrom(65536)
if strip(first) != b"hello":
    sys.exit(f"first datagram: {first!r}")
up = datagrams(1, 20, 1000, 300)
client.sendmsg([b"".join(up)], [(socket.SOL_UDP, UDP_SEGMENT, struct.pack("H", 1000))], 0, relay)
down = datagrams(2, 15, 700, 10)
backend.sendmsg([b"".join(down)], [(socket.SOL_UDP, UDP_SEGMENT, struct.pack("H", 700))], 0, flow)
expect(backend, up, "client -> backend")
expect(client, down, "backend -> client")
print("ok")
