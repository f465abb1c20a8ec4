/* The benchmark's load generator and destinations: one epoll process each,
 * so the client side costs far less CPU than any proxy it measures.
 *
 *   loadgen serve ECHO_PORT BULK_PORT
 *       the destinations: ECHO_PORT echoes; on BULK_PORT a 9-byte header
 *       ('U' or 'D' and a big-endian 64-bit count) asks to sink that many
 *       bytes and answer the 8-byte count received ('U'), or to send them ('D').
 *   loadgen rtt PROXY|- DEST INFLIGHT COUNT SECONDS PAYLOAD USER
 *       SOCKS4 CONNECT round trips from 127.0.0.1-8 (to a loopback proxy):
 *       connect, request, 8-byte reply, PAYLOAD
 *       bytes echoed, close; INFLIGHT at once, COUNT in all or SECONDS.
 *       PROXY "-" connects straight to DEST (the limit; "grant" = connected).
 *   loadgen bulk PROXY|- DEST up|down BYTES
 *       one connection moving BYTES through the proxy to/from BULK_PORT.
 *   loadgen idle PROXY DEST COUNT
 *       COUNT relayed connections, each echoing 16 bytes once (checked); then
 *       prints "ready" and holds them until stdin closes or a line arrives.
 *   loadgen ident IDENTD INFLIGHT COUNT SECONDS LPORT RPORT
 *       RFC 1413 queries "RPORT, LPORT" against IDENTD, INFLIGHT at once.
 * Addresses are IPv4 HOST:PORT.  Results are one JSON object on stdout.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

static double now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec * 1e-9;
}

static void die(const char *what) {
    perror(what);
    exit(2);
}

static struct sockaddr_in parse_addr(const char *text) {
    struct sockaddr_in sa;
    char host[64];
    const char *colon = strrchr(text, ':');
    if (!colon || (size_t)(colon - text) >= sizeof host) {
        fprintf(stderr, "bad address %s\n", text);
        exit(2);
    }
    memcpy(host, text, colon - text);
    host[colon - text] = 0;
    memset(&sa, 0, sizeof sa);
    sa.sin_family = AF_INET;
    sa.sin_port = htons(atoi(colon + 1));
    if (inet_pton(AF_INET, host, &sa.sin_addr) != 1) {
        fprintf(stderr, "bad host %s\n", host);
        exit(2);
    }
    return sa;
}

static void raise_nofile(void) {
    struct rlimit rl;
    if (getrlimit(RLIMIT_NOFILE, &rl) == 0) {
        rl.rlim_cur = rl.rlim_max;
        setrlimit(RLIMIT_NOFILE, &rl);
    }
}

static int cmp_double(const void *a, const void *b) {
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

static double percentile(double *sorted, long n, double p) {
    if (n == 0) return 0;
    long i = (long)(p * (n - 1) + 0.5);
    return sorted[i];
}

/* ---- serve ----------------------------------------------------------- */

enum { S_ECHO, S_HEAD, S_SINK, S_SOURCE, S_LISTEN_ECHO, S_LISTEN_BULK };

struct sconn {
    int fd, kind;
    uint64_t want, done;
    unsigned char head[9];
    int headlen;
    char pend[4096];
    int pendlen, pendoff;
};

static char bigbuf[1 << 18];

static void sclose(int ep, struct sconn *c) {
    epoll_ctl(ep, EPOLL_CTL_DEL, c->fd, NULL);
    close(c->fd);
    free(c);
}

static int listen_on(int port) {
    int fd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK, 0), one = 1;
    struct sockaddr_in sa;
    memset(&sa, 0, sizeof sa);
    sa.sin_family = AF_INET;
    sa.sin_port = htons(port);
    sa.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    if (bind(fd, (struct sockaddr *)&sa, sizeof sa) < 0) die("bind");
    if (listen(fd, 4096) < 0) die("listen");
    return fd;
}

static void source_more(int ep, struct sconn *c) {
    while (c->done < c->want) {
        uint64_t left = c->want - c->done;
        ssize_t n = send(c->fd, bigbuf, left < sizeof bigbuf ? left : sizeof bigbuf, MSG_NOSIGNAL);
        if (n < 0) {
            if (errno == EAGAIN) return;
            sclose(ep, c);
            return;
        }
        c->done += n;
    }
    sclose(ep, c);
}

static int serve(int echo_port, int bulk_port) {
    int ep = epoll_create1(0);
    struct epoll_event ev, evs[256];
    struct sconn *le = calloc(1, sizeof *le), *lb = calloc(1, sizeof *lb);
    le->fd = listen_on(echo_port);
    le->kind = S_LISTEN_ECHO;
    lb->fd = listen_on(bulk_port);
    lb->kind = S_LISTEN_BULK;
    ev.events = EPOLLIN;
    ev.data.ptr = le;
    epoll_ctl(ep, EPOLL_CTL_ADD, le->fd, &ev);
    ev.data.ptr = lb;
    epoll_ctl(ep, EPOLL_CTL_ADD, lb->fd, &ev);
    printf("ready\n");
    fflush(stdout);
    for (;;) {
        int n = epoll_wait(ep, evs, 256, -1);
        for (int i = 0; i < n; i++) {
            struct sconn *c = evs[i].data.ptr;
            if (c->kind == S_LISTEN_ECHO || c->kind == S_LISTEN_BULK) {
                for (;;) {
                    int fd = accept4(c->fd, NULL, NULL, SOCK_NONBLOCK);
                    if (fd < 0) break;
                    struct sconn *d = calloc(1, sizeof *d);
                    d->fd = fd;
                    d->kind = c->kind == S_LISTEN_ECHO ? S_ECHO : S_HEAD;
                    ev.events = EPOLLIN;
                    ev.data.ptr = d;
                    epoll_ctl(ep, EPOLL_CTL_ADD, fd, &ev);
                }
                continue;
            }
            if (c->kind == S_SOURCE) {
                source_more(ep, c);
                continue;
            }
            if (c->kind == S_ECHO && c->pendlen > c->pendoff) {
                ssize_t w = send(c->fd, c->pend + c->pendoff, c->pendlen - c->pendoff, MSG_NOSIGNAL);
                if (w < 0 && errno != EAGAIN) { sclose(ep, c); continue; }
                if (w > 0) c->pendoff += w;
                if (c->pendoff == c->pendlen) {
                    c->pendoff = c->pendlen = 0;
                    ev.events = EPOLLIN;
                    ev.data.ptr = c;
                    epoll_ctl(ep, EPOLL_CTL_MOD, c->fd, &ev);
                }
                continue;
            }
            if (c->kind == S_ECHO) {
                ssize_t r = recv(c->fd, c->pend, sizeof c->pend, 0);
                if (r <= 0) {
                    if (r < 0 && errno == EAGAIN) continue;
                    sclose(ep, c);
                    continue;
                }
                ssize_t w = send(c->fd, c->pend, r, MSG_NOSIGNAL);
                if (w < 0 && errno != EAGAIN) { sclose(ep, c); continue; }
                if (w < 0) w = 0;
                if (w < r) {
                    c->pendoff = w;
                    c->pendlen = r;
                    ev.events = EPOLLOUT;
                    ev.data.ptr = c;
                    epoll_ctl(ep, EPOLL_CTL_MOD, c->fd, &ev);
                }
                continue;
            }
            if (c->kind == S_HEAD) {
                ssize_t r = recv(c->fd, c->head + c->headlen, 9 - c->headlen, 0);
                if (r <= 0) {
                    if (r < 0 && errno == EAGAIN) continue;
                    sclose(ep, c);
                    continue;
                }
                c->headlen += r;
                if (c->headlen < 9) continue;
                uint64_t count = 0;
                for (int k = 1; k < 9; k++) count = (count << 8) | c->head[k];
                c->want = count;
                if (c->head[0] == 'D') {
                    c->kind = S_SOURCE;
                    ev.events = EPOLLOUT;
                    ev.data.ptr = c;
                    epoll_ctl(ep, EPOLL_CTL_MOD, c->fd, &ev);
                    source_more(ep, c);
                } else {
                    c->kind = S_SINK;
                }
                continue;
            }
            if (c->kind == S_SINK) {
                for (;;) {
                    ssize_t r = recv(c->fd, bigbuf, sizeof bigbuf, 0);
                    if (r < 0 && errno == EAGAIN) break;
                    if (r > 0) c->done += r;
                    if (r <= 0 || c->done >= c->want) {
                        if (c->done >= c->want) {
                            unsigned char out[8];
                            for (int k = 0; k < 8; k++) out[k] = c->done >> (56 - 8 * k);
                            send(c->fd, out, 8, MSG_NOSIGNAL);
                        }
                        sclose(ep, c);
                        break;
                    }
                }
            }
        }
    }
    return 0;
}

/* ---- SOCKS4 helpers ---------------------------------------------------- */

static int socks4_request(unsigned char *out, struct sockaddr_in dest, const char *user) {
    int n = 0;
    out[n++] = 4;
    out[n++] = 1;
    memcpy(out + n, &dest.sin_port, 2);
    n += 2;
    memcpy(out + n, &dest.sin_addr, 4);
    n += 4;
    size_t ulen = strlen(user);
    memcpy(out + n, user, ulen);
    n += ulen;
    out[n++] = 0;
    return n;
}

/* Round trips come from 127.0.0.1 to 127.0.0.8 in turn: a proxy with workers
 * that sends each client host to one worker sees eight hosts, not one. */
#define SOURCES 8
static int spread = 1;

static void bind_source(int fd, long n, const struct sockaddr_in *target) {
    if (!spread || (ntohl(target->sin_addr.s_addr) >> 24) != 127) return;
    struct sockaddr_in src;
    int one = 1;
    memset(&src, 0, sizeof src);
    src.sin_family = AF_INET;
    src.sin_addr.s_addr = htonl(0x7f000001 + n % SOURCES);
    setsockopt(fd, IPPROTO_IP, IP_BIND_ADDRESS_NO_PORT, &one, sizeof one);
    bind(fd, (struct sockaddr *)&src, sizeof src);
}

/* ---- rtt ---------------------------------------------------------------- */

enum { R_IDLE, R_CONNECTING, R_REPLY, R_ECHO };

struct rconn {
    int fd, state, got;
    double started, granted;
    unsigned char buf[512];
};

static int rtt(const char *proxy, const char *dest_text, int inflight, long count, double seconds,
               int payload, const char *user) {
    int direct = strcmp(proxy, "-") == 0;
    struct sockaddr_in dest = parse_addr(dest_text);
    struct sockaddr_in target = direct ? dest : parse_addr(proxy);
    unsigned char req[300], pay[512];
    int reqlen = socks4_request(req, dest, user);
    if (payload > (int)sizeof pay) payload = sizeof pay;
    for (int i = 0; i < payload; i++) pay[i] = 'a' + i % 26;
    double *lat = malloc(sizeof(double) * (count + inflight));
    long started = 0, done = 0, errors = 0, refused = 0;
    int ep = epoll_create1(0);
    struct rconn *conns = calloc(inflight, sizeof *conns);
    struct epoll_event ev, evs[256];
    double t0 = now(), deadline = t0 + seconds;
    int active = 0;

#define START(c)                                                                          \
    do {                                                                                  \
        (c)->fd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK, 0);                        \
        bind_source((c)->fd, started, &target);                                           \
        (c)->started = now();                                                             \
        (c)->got = 0;                                                                     \
        started++;                                                                        \
        active++;                                                                         \
        int _r = connect((c)->fd, (struct sockaddr *)&target, sizeof target);             \
        if (_r < 0 && errno != EINPROGRESS) die("connect");                               \
        (c)->state = R_CONNECTING;                                                        \
        ev.events = EPOLLOUT;                                                             \
        ev.data.ptr = (c);                                                                \
        epoll_ctl(ep, EPOLL_CTL_ADD, (c)->fd, &ev);                                       \
    } while (0)

    for (int i = 0; i < inflight && started < count; i++) START(&conns[i]);
    while (active > 0) {
        int n = epoll_wait(ep, evs, 256, 1000);
        if (n == 0 && now() > deadline + 10) break;  /* a stalled proxy */
        for (int i = 0; i < n; i++) {
            struct rconn *c = evs[i].data.ptr;
            int finished = 0, failed = 0;
            if (c->state == R_CONNECTING) {
                int err = 0;
                socklen_t len = sizeof err;
                getsockopt(c->fd, SOL_SOCKET, SO_ERROR, &err, &len);
                if (err) {
                    failed = 1;
                } else {
                    ev.events = EPOLLIN;
                    ev.data.ptr = c;
                    epoll_ctl(ep, EPOLL_CTL_MOD, c->fd, &ev);
                    if (direct) {
                        c->granted = now() - c->started;
                        if (payload) {
                            send(c->fd, pay, payload, MSG_NOSIGNAL);
                            c->state = R_ECHO;
                        } else {
                            finished = 1;
                        }
                    } else {
                        if (send(c->fd, req, reqlen, MSG_NOSIGNAL) != reqlen) failed = 1;
                        c->state = R_REPLY;
                    }
                }
            } else {
                ssize_t r = recv(c->fd, c->buf + c->got, sizeof c->buf - c->got, 0);
                if (r < 0 && errno == EAGAIN) continue;
                if (r <= 0) {
                    failed = 1;
                } else {
                    c->got += r;
                    if (c->state == R_REPLY && c->got >= 8) {
                        if (c->buf[1] != 90) {
                            failed = 1;
                            refused++;
                        } else {
                            c->granted = now() - c->started;
                            if (payload) {
                                c->got -= 8;
                                memmove(c->buf, c->buf + 8, c->got);
                                send(c->fd, pay, payload, MSG_NOSIGNAL);
                                c->state = R_ECHO;
                            } else {
                                finished = 1;
                            }
                        }
                    }
                    if (c->state == R_ECHO && c->got >= payload) {
                        if (memcmp(c->buf, pay, payload) != 0) failed = 1;
                        else finished = 1;
                    }
                }
            }
            if (finished || failed) {
                if (finished) lat[done++] = c->granted;
                else errors++;
                close(c->fd);
                active--;
                if (started < count && now() < deadline) START(c);
            }
        }
    }
    double elapsed = now() - t0;
    qsort(lat, done, sizeof(double), cmp_double);
    printf("{\"done\": %ld, \"errors\": %ld, \"refused\": %ld, \"unfinished\": %d, "
           "\"seconds\": %.6f, \"rate\": %.1f, \"p50_us\": %.1f, \"p99_us\": %.1f, "
           "\"max_us\": %.1f}\n",
           done, errors, refused, active, elapsed, done / elapsed,
           percentile(lat, done, 0.5) * 1e6, percentile(lat, done, 0.99) * 1e6,
           done ? lat[done - 1] * 1e6 : 0.0);
    return errors || active ? 1 : 0;
}

/* ---- bulk ---------------------------------------------------------------- */

static int read_full(int fd, unsigned char *buf, int len) {
    int got = 0;
    while (got < len) {
        ssize_t r = recv(fd, buf + got, len - got, 0);
        if (r <= 0) return -1;
        got += r;
    }
    return 0;
}

static int open_relayed(const char *proxy, struct sockaddr_in dest, int blocking) {
    int direct = strcmp(proxy, "-") == 0;
    struct sockaddr_in target = direct ? dest : parse_addr(proxy);
    int fd = socket(AF_INET, SOCK_STREAM, 0);
    if (connect(fd, (struct sockaddr *)&target, sizeof target) < 0) die("connect");
    if (!direct) {
        unsigned char req[64], rep[8];
        int n = socks4_request(req, dest, "bench");
        if (send(fd, req, n, 0) != n || read_full(fd, rep, 8) < 0 || rep[1] != 90) {
            fprintf(stderr, "SOCKS4 request refused\n");
            exit(1);
        }
    }
    if (!blocking) fcntl(fd, F_SETFL, O_NONBLOCK);
    return fd;
}

static int bulk(const char *proxy, const char *dest_text, const char *dir, uint64_t bytes) {
    struct sockaddr_in dest = parse_addr(dest_text);
    int fd = open_relayed(proxy, dest, 1);
    unsigned char head[9];
    head[0] = strcmp(dir, "up") == 0 ? 'U' : 'D';
    for (int k = 0; k < 8; k++) head[1 + k] = bytes >> (56 - 8 * k);
    double t0 = now();
    if (send(fd, head, 9, 0) != 9) die("send");
    uint64_t moved = 0;
    if (head[0] == 'U') {
        while (moved < bytes) {
            uint64_t left = bytes - moved;
            ssize_t n = send(fd, bigbuf, left < sizeof bigbuf ? left : sizeof bigbuf, 0);
            if (n <= 0) die("send");
            moved += n;
        }
        unsigned char out[8];
        if (read_full(fd, out, 8) < 0) die("no count from the sink");
        moved = 0;
        for (int k = 0; k < 8; k++) moved = (moved << 8) | out[k];
    } else {
        for (;;) {
            ssize_t n = recv(fd, bigbuf, sizeof bigbuf, 0);
            if (n <= 0) break;
            moved += n;
        }
    }
    double elapsed = now() - t0;
    close(fd);
    printf("{\"bytes\": %llu, \"expected\": %llu, \"seconds\": %.6f, \"mib_s\": %.1f}\n",
           (unsigned long long)moved, (unsigned long long)bytes, elapsed,
           moved / elapsed / 1048576.0);
    return moved == bytes ? 0 : 1;
}

/* ---- idle ---------------------------------------------------------------- */

static int idle(const char *proxy, const char *dest_text, int count) {
    struct sockaddr_in dest = parse_addr(dest_text);
    int *fds = malloc(sizeof(int) * count), bad = 0;
    unsigned char msg[16] = "0123456789abcdef", back[16];
    for (int i = 0; i < count; i++) {
        fds[i] = open_relayed(proxy, dest, 1);
        if (send(fds[i], msg, 16, 0) != 16 || read_full(fds[i], back, 16) < 0 ||
            memcmp(msg, back, 16) != 0)
            bad++;
    }
    printf("{\"open\": %d, \"bad\": %d}\nready\n", count, bad);
    fflush(stdout);
    char line[16];
    if (read(0, line, sizeof line) < 0) {}
    for (int i = 0; i < count; i++) close(fds[i]);
    return bad ? 1 : 0;
}

/* ---- ident --------------------------------------------------------------- */

static int ident(const char *identd, int inflight, long count, double seconds, int lport,
                 int rport) {
    struct sockaddr_in target = parse_addr(identd);
    spread = 0;  /* oidentd answers for the querier's own connections only */
    char q[64];
    int qlen = snprintf(q, sizeof q, "%d, %d\r\n", rport, lport);
    long started = 0, done = 0, errors = 0, users = 0;
    int ep = epoll_create1(0), active = 0;
    struct rconn *conns = calloc(inflight, sizeof *conns);
    struct epoll_event ev, evs[256];
    double *lat = malloc(sizeof(double) * (count + inflight));
    double t0 = now(), deadline = t0 + seconds;
    for (int i = 0; i < inflight && started < count; i++) START(&conns[i]);
    while (active > 0) {
        int n = epoll_wait(ep, evs, 256, 1000);
        if (n == 0 && now() > deadline + 10) break;
        for (int i = 0; i < n; i++) {
            struct rconn *c = evs[i].data.ptr;
            int finished = 0, failed = 0;
            if (c->state == R_CONNECTING) {
                int err = 0;
                socklen_t len = sizeof err;
                getsockopt(c->fd, SOL_SOCKET, SO_ERROR, &err, &len);
                if (err || send(c->fd, q, qlen, MSG_NOSIGNAL) != qlen) {
                    failed = 1;
                } else {
                    c->state = R_REPLY;
                    ev.events = EPOLLIN;
                    ev.data.ptr = c;
                    epoll_ctl(ep, EPOLL_CTL_MOD, c->fd, &ev);
                }
            } else {
                ssize_t r = recv(c->fd, c->buf + c->got, sizeof c->buf - 1 - c->got, 0);
                if (r < 0 && errno == EAGAIN) continue;
                if (r > 0) c->got += r;
                c->buf[c->got] = 0;
                if (r <= 0 || memchr(c->buf, '\n', c->got)) {
                    if (strstr((char *)c->buf, "USERID")) users++;
                    if (c->got) {
                        c->granted = now() - c->started;
                        finished = 1;
                    } else {
                        failed = 1;
                    }
                }
            }
            if (finished || failed) {
                if (finished) lat[done++] = c->granted;
                else errors++;
                close(c->fd);
                active--;
                if (started < count && now() < deadline) START(c);
            }
        }
    }
    double elapsed = now() - t0;
    qsort(lat, done, sizeof(double), cmp_double);
    printf("{\"done\": %ld, \"errors\": %ld, \"userid_answers\": %ld, \"seconds\": %.6f, "
           "\"rate\": %.1f, \"p50_us\": %.1f, \"p99_us\": %.1f}\n",
           done, errors, users, elapsed, done / elapsed, percentile(lat, done, 0.5) * 1e6,
           percentile(lat, done, 0.99) * 1e6);
    return 0;
}

int main(int argc, char **argv) {
    signal(SIGPIPE, SIG_IGN);
    raise_nofile();
    memset(bigbuf, 'x', sizeof bigbuf);
    if (argc == 4 && strcmp(argv[1], "serve") == 0) return serve(atoi(argv[2]), atoi(argv[3]));
    if (argc == 9 && strcmp(argv[1], "rtt") == 0)
        return rtt(argv[2], argv[3], atoi(argv[4]), atol(argv[5]), atof(argv[6]), atoi(argv[7]),
                   argv[8]);
    if (argc == 6 && strcmp(argv[1], "bulk") == 0)
        return bulk(argv[2], argv[3], argv[4], strtoull(argv[5], NULL, 10));
    if (argc == 5 && strcmp(argv[1], "idle") == 0) return idle(argv[2], argv[3], atoi(argv[4]));
    if (argc == 8 && strcmp(argv[1], "ident") == 0)
        return ident(argv[2], atoi(argv[3]), atol(argv[4]), atof(argv[5]), atoi(argv[6]),
                     atoi(argv[7]));
    fprintf(stderr, "usage: see the comment at the top of loadgen.c\n");
    return 2;
}
