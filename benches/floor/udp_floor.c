/*
 * udp_floor: the least work a user-space UDP relay can do per datagram, as a
 * yardstick for splice-relay's CPU per packet (not a relay to use: one flow,
 * one direction, no flow table, no replies, no error handling beyond exit).
 *
 * Blocking recvmmsg (MSG_WAITFORONE, batches of 64) on LISTEN, then one
 * sendmmsg of the whole batch on a socket connected to TARGET. No epoll, no
 * timers. With "gso" as the third argument, a batch of equal-size datagrams
 * goes out as UDP_SEGMENT messages of up to 64 KB each instead, as
 * splice-relay sends them.
 *
 *   cc -O2 -o /tmp/udp_floor benches/floor/udp_floor.c
 *   taskset -c 1 /tmp/udp_floor '[::1]:17000' 127.0.0.1:17001 [gso]
 *
 * Loopback only, like every benchmark here.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <netinet/in.h>
#include <netinet/udp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#ifndef UDP_SEGMENT
#define UDP_SEGMENT 103
#endif

#define BATCH 64
#define SIZE 2048

static int parse(const char *s, struct sockaddr_storage *ss, socklen_t *len) {
    char host[64];
    const char *colon = strrchr(s, ':');
    if (!colon || colon - s >= (long)sizeof(host)) return -1;
    memcpy(host, s, colon - s);
    host[colon - s] = 0;
    int port = atoi(colon + 1);
    memset(ss, 0, sizeof(*ss));
    if (host[0] == '[') {
        struct sockaddr_in6 *a = (struct sockaddr_in6 *)ss;
        host[strlen(host) - 1] = 0;
        a->sin6_family = AF_INET6;
        a->sin6_port = htons(port);
        *len = sizeof(*a);
        return inet_pton(AF_INET6, host + 1, &a->sin6_addr) == 1 ? 0 : -1;
    }
    struct sockaddr_in *a = (struct sockaddr_in *)ss;
    a->sin_family = AF_INET;
    a->sin_port = htons(port);
    *len = sizeof(*a);
    return inet_pton(AF_INET, host, &a->sin_addr) == 1 ? 0 : -1;
}

int main(int argc, char **argv) {
    struct sockaddr_storage l, t;
    socklen_t ll, tl;
    if (argc < 3 || parse(argv[1], &l, &ll) || parse(argv[2], &t, &tl)) {
        fprintf(stderr, "usage: udp_floor LISTEN TARGET [gso]\n");
        return 2;
    }
    int gso = argc > 3 && strcmp(argv[3], "gso") == 0;
    int in = socket(l.ss_family, SOCK_DGRAM, 0), out = socket(t.ss_family, SOCK_DGRAM, 0);
    int rcvbuf = 4 << 20;
    setsockopt(in, SOL_SOCKET, SO_RCVBUFFORCE, &rcvbuf, sizeof(rcvbuf));
    if (in < 0 || out < 0 || bind(in, (struct sockaddr *)&l, ll) || connect(out, (struct sockaddr *)&t, tl)) {
        perror("udp_floor");
        return 1;
    }
    static char bufs[BATCH][SIZE];
    struct iovec iov[BATCH];
    struct mmsghdr rx[BATCH], tx[BATCH];
    for (;;) {
        memset(rx, 0, sizeof(rx));
        for (int i = 0; i < BATCH; i++) {
            iov[i].iov_base = bufs[i];
            iov[i].iov_len = SIZE;
            rx[i].msg_hdr.msg_iov = &iov[i];
            rx[i].msg_hdr.msg_iovlen = 1;
        }
        int n = recvmmsg(in, rx, BATCH, MSG_WAITFORONE, NULL);
        if (n <= 0) continue;
        memset(tx, 0, sizeof(tx));
        int same = 1;
        for (int i = 0; i < n; i++) {
            iov[i].iov_len = rx[i].msg_len;
            same &= rx[i].msg_len == rx[0].msg_len;
        }
        int m = 0;
        if (gso && same && n > 1) {
            /* runs of up to 64 KB as GSO super-datagrams: one message each */
            int per = 65000 / rx[0].msg_len;
            static char ctrls[BATCH][CMSG_SPACE(sizeof(unsigned short))] __attribute__((aligned(8)));
            for (int i = 0; i < n; i += per, m++) {
                tx[m].msg_hdr.msg_iov = &iov[i];
                tx[m].msg_hdr.msg_iovlen = n - i < per ? n - i : per;
                tx[m].msg_hdr.msg_control = ctrls[m];
                tx[m].msg_hdr.msg_controllen = sizeof(ctrls[m]);
                struct cmsghdr *c = CMSG_FIRSTHDR(&tx[m].msg_hdr);
                c->cmsg_level = SOL_UDP;
                c->cmsg_type = UDP_SEGMENT;
                c->cmsg_len = CMSG_LEN(sizeof(unsigned short));
                unsigned short seg = rx[0].msg_len;
                memcpy(CMSG_DATA(c), &seg, sizeof(seg));
            }
        } else {
            for (; m < n; m++) {
                tx[m].msg_hdr.msg_iov = &iov[m];
                tx[m].msg_hdr.msg_iovlen = 1;
            }
        }
        for (int sent = 0; sent < m;) {
            int k = sendmmsg(out, tx + sent, m - sent, 0);
            sent += k > 0 ? k : 1; /* skip a refused message, as a relay would */
        }
    }
}
