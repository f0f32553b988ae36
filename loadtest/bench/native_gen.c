/* The native load generator: the Python one's closed loop (loadtest/bench/loadgen.py) in
 * C, so that measuring costs the shared 2-core machine little next to the gateway.
 *
 * Usage: native_gen HOST PORT CONCURRENCY WARMUP_S DURATION_S TIMEOUT_S RAMP_S HONOUR
 *        REQUEST_FILE
 * Each of CONCURRENCY keep-alive connections sends the request (the file's bytes), reads
 * the response to its end (Content-Length or chunked framing, skipped unread) and sends
 * again; connection i starts RAMP_S * u_i after the others are connected (u_i fixed per
 * i). A 429/503 with retry-after is waited out (at most 10 s) and counted as shed when
 * HONOUR is 1, else counted as an error. Time to first byte is taken, as the Python
 * generator takes it, when the first body byte arrives.
 *
 * Output (stdout), for loadtest/bench/native_gen.py: "window start" and "window end"
 * when the measured window opens and closes (the caller samples the servers' CPU
 * then), then "R <ttfb_us> <latency_us>" per response completed in the window,
 * "E <count> <what>" per kind of error, and one summary line
 * "S <errors> <shed> <cpu_s> <window_s> <unfinished> <oldest_s> <older_than_window>". */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
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

enum { WAITING, SENDING, READING };

typedef struct {
    int fd, fresh, state;
    char *buf;
    size_t len, cap, sent;
    uint64_t sent_at, ttfb_at, wake_at;
    int got_head, status, chunked, close_after;
    long clen;         /* body bytes still to come (Content-Length), -1 when chunked */
    size_t pos, skip;  /* chunked framing: parse position, data bytes left to skip */
    double retry_after;
} Conn;

static struct sockaddr_in addr;
static char *request;
static size_t request_len;
static int epfd, honour;
static Conn *conns;
static long nconns;
static uint64_t window_start, window_end, timeout_ns;
static long errors, shed;
static uint64_t *ttfbs, *lats;
static size_t nres, capres;
static char err_what[8][96];
static long err_count[8];

static uint64_t now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

static void die(const char *what) { perror(what); exit(1); }

static int in_window(uint64_t t) { return t >= window_start && t < window_end; }

static void error(const char *what, uint64_t t) {
    if (!in_window(t)) return;
    errors++;
    for (int i = 0; i < 8; i++) {
        if (!err_count[i]) snprintf(err_what[i], sizeof err_what[i], "%s", what);
        if (strcmp(err_what[i], what) == 0) {
            err_count[i]++;
            return;
        }
    }
}

static double cpu_self(void) {
    struct rusage u;
    getrusage(RUSAGE_SELF, &u);
    return u.ru_utime.tv_sec + u.ru_utime.tv_usec / 1e6 + u.ru_stime.tv_sec +
           u.ru_stime.tv_usec / 1e6;
}

static void watch(Conn *c, uint32_t events, int op) {
    struct epoll_event ev = {.events = events, .data.ptr = c};
    if (epoll_ctl(epfd, op, c->fd, &ev) < 0) die("epoll_ctl");
}

static int set_nonblocking(int fd) {
    int flags = fcntl(fd, F_GETFL);
    return flags < 0 ? -1 : fcntl(fd, F_SETFL, flags | O_NONBLOCK);
}

static int connect_conn(Conn *c) {
    int fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (fd < 0) return 0;
    if (connect(fd, (struct sockaddr *)&addr, sizeof addr) < 0) {
        close(fd);
        return 0;
    }
    int one = 1;
    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    if (set_nonblocking(fd) < 0) die("fcntl");
    c->fd = fd;
    c->fresh = 1;
    watch(c, EPOLLIN, EPOLL_CTL_ADD);
    return 1;
}

static void drop(Conn *c) {
    if (c->fd >= 0) close(c->fd);  /* closing removes it from the epoll set */
    c->fd = -1;
}

static void send_request(Conn *c, uint64_t now);

/* Start the next request now, or wait ``delay_ns`` first. */
static void next(Conn *c, uint64_t now, uint64_t delay_ns) {
    c->len = 0;
    if (delay_ns) {
        c->state = WAITING;
        c->wake_at = now + delay_ns;
        return;
    }
    send_request(c, now);
}

static void send_request(Conn *c, uint64_t now) {
    while (c->fd < 0) {
        if (connect_conn(c)) break;
        error("connect failed", now);
        c->state = WAITING;
        c->wake_at = now + 50000000u;
        return;
    }
    c->state = SENDING;
    c->sent = 0;
    c->sent_at = now_ns();
    c->ttfb_at = 0;
    c->got_head = 0;
    c->len = 0;
    ssize_t n = write(c->fd, request, request_len);
    if (n == (ssize_t)request_len) {
        c->state = READING;
        return;
    }
    if (n < 0 && errno != EAGAIN) {
        error("write failed", now);
        drop(c);
        next(c, now, 50000000u);
        return;
    }
    c->sent = n < 0 ? 0 : (size_t)n;
    watch(c, EPOLLIN | EPOLLOUT, EPOLL_CTL_MOD);
}

static void on_writable(Conn *c) {
    ssize_t n = write(c->fd, request + c->sent, request_len - c->sent);
    if (n > 0) c->sent += (size_t)n;
    if (c->sent == request_len) {
        c->state = READING;
        watch(c, EPOLLIN, EPOLL_CTL_MOD);
    }
}

static double header_number(const char *head, const char *name) {
    const char *at = strcasestr(head, name);
    return at ? strtod(at + strlen(name), NULL) : -1;
}

static int parse_head(Conn *c) {
    char *end = memmem(c->buf, c->len, "\r\n\r\n", 4);
    if (!end) return 0;
    size_t head_len = (size_t)(end - c->buf);
    char saved = c->buf[head_len];
    c->buf[head_len] = 0;
    c->status = atoi(c->buf + 9);
    c->chunked = strcasestr(c->buf, "\r\ntransfer-encoding: chunked") != NULL;
    c->close_after = strcasestr(c->buf, "\r\nconnection: close") != NULL;
    double length = header_number(c->buf, "\r\ncontent-length:");
    c->retry_after = -1;
    if (c->status == 429 || c->status == 503) {
        double ms = header_number(c->buf, "\r\nretry-after-ms:");
        c->retry_after = ms >= 0 ? ms / 1000 : header_number(c->buf, "\r\nretry-after:");
    }
    c->buf[head_len] = saved;
    c->got_head = 1;
    c->pos = head_len + 4;
    c->skip = 0;
    c->clen = c->chunked ? -1 : (long)length;
    return 1;
}

/* Whether the body has ended; consumes what it parsed. -1 on a framing error. */
static int body_done(Conn *c) {
    if (!c->chunked) {
        if (c->clen < 0) return -1;
        size_t have = c->len - c->pos;
        if ((long)have > c->clen) return -1;
        c->clen -= (long)have;
        c->len = c->pos = 0;
        return c->clen == 0;
    }
    for (;;) {
        if (c->skip) {
            size_t take = c->len - c->pos < c->skip ? c->len - c->pos : c->skip;
            c->pos += take;
            c->skip -= take;
            if (c->skip) break;
        }
        char *eol = memmem(c->buf + c->pos, c->len - c->pos, "\r\n", 2);
        if (!eol) break;
        long size = strtol(c->buf + c->pos, NULL, 16);
        if (size < 0) return -1;
        size_t after = (size_t)(eol - c->buf) + 2;
        if (size == 0) {
            if (c->len - after >= 2) return 1;
            break;
        }
        c->pos = after;
        c->skip = (size_t)size + 2;
    }
    memmove(c->buf, c->buf + c->pos, c->len - c->pos);
    c->len -= c->pos;
    c->pos = 0;
    return 0;
}

static void finished(Conn *c, uint64_t now) {
    c->fresh = 0;
    uint64_t delay = 0;
    if (c->retry_after >= 0 && honour) {
        if (in_window(now)) shed++;
        double wait = c->retry_after < 10 ? c->retry_after : 10;
        delay = (uint64_t)(wait * 1e9);
    } else if (c->status != 200) {
        char what[32];
        snprintf(what, sizeof what, "status %d", c->status);
        error(what, now);
    } else if (in_window(now)) {
        if (nres == capres) {
            capres = capres ? capres * 2 : 65536;
            ttfbs = realloc(ttfbs, capres * sizeof *ttfbs);
            lats = realloc(lats, capres * sizeof *lats);
            if (!ttfbs || !lats) die("realloc");
        }
        ttfbs[nres] = c->ttfb_at ? c->ttfb_at - c->sent_at : now - c->sent_at;
        lats[nres++] = now - c->sent_at;
    }
    if (c->close_after) drop(c);
    next(c, now, delay);
}

static void on_readable(Conn *c) {
    if (c->cap - c->len < 65536) {
        c->cap = c->cap ? c->cap * 2 : 131072;
        c->buf = realloc(c->buf, c->cap);
        if (!c->buf) die("realloc");
    }
    ssize_t n = read(c->fd, c->buf + c->len, c->cap - c->len);
    uint64_t now = now_ns();
    if (n < 0 && errno == EAGAIN) return;
    if (n <= 0) {
        int nothing = c->state == READING && !c->got_head && c->len == 0;
        drop(c);
        if (c->state != READING) return;  /* an idle connection closed: reopened on use */
        if (nothing && !c->fresh) {  /* a kept-alive connection the server had closed */
            send_request(c, now);
            return;
        }
        error(nothing ? "closed before response" : "eof in response", now);
        next(c, now, 0);
        return;
    }
    if (c->state != READING) return;  /* bytes nobody asked for: ignored */
    c->len += (size_t)n;
    if (!c->got_head && !parse_head(c)) return;
    if (!c->ttfb_at && c->len > c->pos) c->ttfb_at = now;  /* the first body bytes */
    int done = body_done(c);
    if (done < 0) {
        error("bad framing", now);
        drop(c);
        next(c, now, 0);
    } else if (done) {
        finished(c, now);
    }
}

int main(int argc, char **argv) {
    if (argc != 10) {
        fprintf(stderr, "usage: %s HOST PORT CONCURRENCY WARMUP_S DURATION_S TIMEOUT_S RAMP_S"
                        " HONOUR REQUEST_FILE\n", argv[0]);
        return 2;
    }
    signal(SIGPIPE, SIG_IGN);
    addr.sin_family = AF_INET;
    addr.sin_port = htons((uint16_t)atoi(argv[2]));
    if (inet_pton(AF_INET, argv[1], &addr.sin_addr) != 1) die("host");
    nconns = atol(argv[3]);
    double warmup = atof(argv[4]), duration = atof(argv[5]), ramp = atof(argv[7]);
    timeout_ns = (uint64_t)(atof(argv[6]) * 1e9);
    honour = atoi(argv[8]);
    FILE *f = fopen(argv[9], "rb");
    if (!f) die(argv[9]);
    fseek(f, 0, SEEK_END);
    request_len = (size_t)ftell(f);
    rewind(f);
    request = malloc(request_len);
    if (fread(request, 1, request_len, f) != request_len) die("request file");
    fclose(f);
    struct rlimit lim;
    getrlimit(RLIMIT_NOFILE, &lim);
    lim.rlim_cur = lim.rlim_max;
    setrlimit(RLIMIT_NOFILE, &lim);
    epfd = epoll_create1(EPOLL_CLOEXEC);
    conns = calloc((size_t)nconns, sizeof *conns);
    window_start = window_end = UINT64_MAX;
    uint64_t t0 = now_ns();
    for (long i = 0; i < nconns; i++) {
        Conn *c = &conns[i];
        c->fd = -1;
        if (!connect_conn(c)) error("connect failed", t0);
        /* A fixed draw per connection (a 64-bit LCG step of its index), as the Python
         * generator seeds one per index. */
        uint64_t x = (uint64_t)i * 6364136223846793005u + 1442695040888963407u;
        double u = (double)(x >> 11) / 9007199254740992.0;
        c->state = WAITING;
        c->wake_at = (uint64_t)(ramp * u * 1e9);  /* relative until ``go`` below */
    }
    uint64_t go = now_ns();
    for (long i = 0; i < nconns; i++) conns[i].wake_at += go;
    window_start = go + (uint64_t)(warmup * 1e9);
    window_end = window_start + (uint64_t)(duration * 1e9);
    int started = 0;
    double cpu0 = 0, cpu1 = 0;
    uint64_t next_scan = 0;
    struct epoll_event events[512];
    for (;;) {
        uint64_t now = now_ns();
        if (!started && now >= window_start) {
            started = 1;
            cpu0 = cpu_self();
            printf("window start\n");
            fflush(stdout);
        }
        if (now >= window_end) break;
        if (now >= next_scan) {  /* due waits and timeouts; at most every millisecond */
            next_scan = now + 1000000u;
            for (long i = 0; i < nconns; i++) {
                Conn *c = &conns[i];
                if (c->state == WAITING && c->wake_at <= now) {
                    send_request(c, now);
                } else if (c->state != WAITING && now - c->sent_at > timeout_ns) {
                    error("timeout", now);
                    drop(c);
                    next(c, now, 0);
                }
            }
        }
        int n = epoll_wait(epfd, events, 512, 1);
        if (n < 0 && errno != EINTR) die("epoll_wait");
        for (int i = 0; i < n; i++) {
            Conn *c = events[i].data.ptr;
            if (c->fd < 0) continue;
            if ((events[i].events & EPOLLOUT) && c->state == SENDING) on_writable(c);
            if (events[i].events & (EPOLLIN | EPOLLHUP | EPOLLERR)) on_readable(c);
        }
    }
    cpu1 = cpu_self();
    uint64_t end = now_ns();
    printf("window end\n");
    long unfinished = 0, older = 0;
    uint64_t oldest = 0;
    double window_s = (end - window_start) / 1e9;
    for (long i = 0; i < nconns; i++) {
        if (conns[i].state == WAITING || conns[i].fd < 0) continue;
        uint64_t age = end - conns[i].sent_at;
        unfinished++;
        if (age > oldest) oldest = age;
        if (age / 1e9 > window_s) older++;
    }
    for (size_t i = 0; i < nres; i++)
        printf("R %llu %llu\n", (unsigned long long)(ttfbs[i] / 1000),
               (unsigned long long)(lats[i] / 1000));
    for (int i = 0; i < 8 && err_count[i]; i++) printf("E %ld %s\n", err_count[i], err_what[i]);
    printf("S %ld %ld %.6f %.6f %ld %.6f %ld\n", errors, shed, cpu1 - cpu0, window_s,
           unfinished, oldest / 1e9, older);
    return 0;
}
