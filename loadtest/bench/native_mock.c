/* A replaying upstream for the benchmark: answers each request with bytes captured from
 * the Python mock (loadtest/bench/native_mock.py), each part at its captured time from
 * the request's arrival. One thread, epoll, a timerfd and a min-heap of due streams, so
 * that it costs the shared 2-core machine little next to the gateway it measures.
 *
 * Usage: native_mock PORT PLANFILE. PLANFILE (little-endian u32s):
 *   nplans, then per plan: nmarkers, per marker (len, bytes); nparts, per part
 *   (due_us, len, bytes). A request gets the first plan whose markers all occur in its
 *   head and body; parts are already framed (status line, headers, chunked framing).
 * Requests are taken one at a time per connection (no pipelining), with a
 * Content-Length body. Prints "listening" once the port is open. */
#define _GNU_SOURCE
#include <errno.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <sys/timerfd.h>
#include <time.h>
#include <unistd.h>

typedef struct { uint32_t len; char *data; } Bytes;
typedef struct { uint32_t due_us; Bytes bytes; } Part;
typedef struct { uint32_t nmarkers; Bytes *markers; uint32_t nparts; Part *parts; } Plan;

typedef struct Conn {
    int fd;
    char *in; size_t in_len, in_cap;
    char *out; size_t out_len, out_cap;
    const Plan *plan; uint32_t next_part; uint64_t start_ns;
    long heap_at; /* index in the heap, -1 when not waiting */
    int want_out;
} Conn;

static Plan *plans; static uint32_t nplans;
static Conn **heap; static size_t heap_len, heap_cap;
static int epfd, tfd, lfd;
static const char not_found[] =
    "HTTP/1.1 404 Not Found\r\ncontent-type: application/json\r\ncontent-length: 62\r\n\r\n"
    "{\"error\":{\"message\":\"no plan\",\"type\":\"invalid_request_error\"}}";

static void die(const char *what) { perror(what); exit(1); }

static void *grow(void *p, size_t *cap, size_t need, size_t item) {
    if (need <= *cap) return p;
    size_t cap2 = *cap ? *cap : 16;
    while (cap2 < need) cap2 *= 2;
    p = realloc(p, cap2 * item);
    if (!p) die("realloc");
    *cap = cap2;
    return p;
}

static uint64_t now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

static uint64_t due_ns(const Conn *c) {
    return c->start_ns + (uint64_t)c->plan->parts[c->next_part].due_us * 1000u;
}

/* ---- the heap of streams waiting for their next part ---- */
static void heap_set(size_t i, Conn *c) { heap[i] = c; c->heap_at = (long)i; }

static void heap_up(size_t i) {
    Conn *c = heap[i];
    while (i > 0 && due_ns(heap[(i - 1) / 2]) > due_ns(c)) {
        heap_set(i, heap[(i - 1) / 2]);
        i = (i - 1) / 2;
    }
    heap_set(i, c);
}

static void heap_down(size_t i) {
    Conn *c = heap[i];
    for (;;) {
        size_t k = 2 * i + 1;
        if (k >= heap_len) break;
        if (k + 1 < heap_len && due_ns(heap[k + 1]) < due_ns(heap[k])) k++;
        if (due_ns(heap[k]) >= due_ns(c)) break;
        heap_set(i, heap[k]);
        i = k;
    }
    heap_set(i, c);
}

static void heap_push(Conn *c) {
    heap = grow(heap, &heap_cap, heap_len + 1, sizeof *heap);
    heap_set(heap_len++, c);
    heap_up(heap_len - 1);
}

static void heap_remove(Conn *c) {
    size_t i = (size_t)c->heap_at;
    c->heap_at = -1;
    Conn *last = heap[--heap_len];
    if (last == c) return;
    heap_set(i, last);
    heap_up(i);
    heap_down((size_t)last->heap_at);
}

static void arm_timer(void) {
    struct itimerspec spec = {0};
    if (heap_len) {
        uint64_t due = due_ns(heap[0]);
        spec.it_value.tv_sec = (time_t)(due / 1000000000u);
        spec.it_value.tv_nsec = (long)(due % 1000000000u);
        if (!spec.it_value.tv_sec && !spec.it_value.tv_nsec) spec.it_value.tv_nsec = 1;
    }
    if (timerfd_settime(tfd, TFD_TIMER_ABSTIME, &spec, NULL) < 0) die("timerfd_settime");
}

/* ---- connections ---- */
static void close_conn(Conn *c) {
    if (c->heap_at >= 0) heap_remove(c);
    close(c->fd);
    free(c->in);
    free(c->out);
    free(c);
}

static void watch(Conn *c, int want_out) {
    if (c->want_out == want_out) return;
    struct epoll_event ev = {.events = EPOLLIN | (want_out ? EPOLLOUT : 0), .data.ptr = c};
    if (epoll_ctl(epfd, EPOLL_CTL_MOD, c->fd, &ev) < 0) die("epoll_ctl");
    c->want_out = want_out;
}

/* Write what is buffered, then ``data``; keep what the kernel does not take. 0 on error. */
static int send_bytes(Conn *c, const char *data, size_t len) {
    if (!c->out_len) {
        ssize_t n = write(c->fd, data, len);
        if (n < 0) {
            if (errno != EAGAIN) return 0;
            n = 0;
        }
        data += n;
        len -= (size_t)n;
    }
    if (len) {
        c->out = grow(c->out, &c->out_cap, c->out_len + len, 1);
        memcpy(c->out + c->out_len, data, len);
        c->out_len += len;
        watch(c, 1);
    }
    return 1;
}

static int flush_out(Conn *c) {
    while (c->out_len) {
        ssize_t n = write(c->fd, c->out, c->out_len);
        if (n < 0) return errno == EAGAIN;
        memmove(c->out, c->out + n, c->out_len - (size_t)n);
        c->out_len -= (size_t)n;
    }
    watch(c, 0);
    return 1;
}

static int try_request(Conn *c);

/* Send every part that is due; then wait for the next, or take the next request. */
static int advance(Conn *c, uint64_t now) {
    const Plan *p = c->plan;
    while (c->next_part < p->nparts && due_ns(c) <= now) {
        const Bytes *b = &p->parts[c->next_part++].bytes;
        if (!send_bytes(c, b->data, b->len)) return 0;
    }
    if (c->next_part < p->nparts) {
        heap_push(c);
        return 1;
    }
    c->plan = NULL;
    return try_request(c);
}

static size_t content_length(const char *head, size_t len) {
    static const char name[] = "\r\ncontent-length:";
    size_t n = sizeof name - 1;
    for (size_t i = 0; i + n <= len; i++) {
        if (strncasecmp(head + i, name, n) == 0) return strtoul(head + i + n, NULL, 10);
    }
    return 0;
}

static const Plan *match(const char *req, size_t len) {
    for (uint32_t i = 0; i < nplans; i++) {
        uint32_t k = 0;
        while (k < plans[i].nmarkers && memmem(req, len, plans[i].markers[k].data,
                                               plans[i].markers[k].len)) k++;
        if (k == plans[i].nmarkers) return &plans[i];
    }
    return NULL;
}

/* Start answering the request at the front of the input, if it has arrived whole. */
static int try_request(Conn *c) {
    if (c->plan) return 1;
    char *end = memmem(c->in, c->in_len, "\r\n\r\n", 4);
    if (!end) return 1;
    size_t head = (size_t)(end - c->in) + 4;
    size_t whole = head + content_length(c->in, head);
    if (c->in_len < whole) return 1;
    const Plan *plan = match(c->in, whole);
    memmove(c->in, c->in + whole, c->in_len - whole);
    c->in_len -= whole;
    if (!plan) {
        if (!send_bytes(c, not_found, sizeof not_found - 1)) return 0;
        return try_request(c);
    }
    c->plan = plan;
    c->next_part = 0;
    c->start_ns = now_ns();
    return advance(c, c->start_ns);
}

static int on_readable(Conn *c) {
    for (;;) {
        c->in = grow(c->in, &c->in_cap, c->in_len + 65536, 1);
        ssize_t n = read(c->fd, c->in + c->in_len, c->in_cap - c->in_len);
        if (n == 0) return 0;
        if (n < 0) return errno == EAGAIN ? try_request(c) : 0;
        c->in_len += (size_t)n;
    }
}

static void on_accept(void) {
    for (;;) {
        int fd = accept4(lfd, NULL, NULL, SOCK_NONBLOCK | SOCK_CLOEXEC);
        if (fd < 0) return;
        int one = 1;
        setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
        Conn *c = calloc(1, sizeof *c);
        if (!c) die("calloc");
        c->fd = fd;
        c->heap_at = -1;
        struct epoll_event ev = {.events = EPOLLIN, .data.ptr = c};
        if (epoll_ctl(epfd, EPOLL_CTL_ADD, fd, &ev) < 0) die("epoll_ctl add");
    }
}

/* ---- the plan file ---- */
static uint32_t u32(FILE *f) {
    unsigned char b[4];
    if (fread(b, 1, 4, f) != 4) die("plan file truncated");
    return b[0] | b[1] << 8 | b[2] << 16 | (uint32_t)b[3] << 24;
}

static Bytes bytes(FILE *f) {
    Bytes b = {.len = u32(f)};
    b.data = malloc(b.len ? b.len : 1);
    if (!b.data || fread(b.data, 1, b.len, f) != b.len) die("plan file truncated");
    return b;
}

static void load(const char *path) {
    FILE *f = fopen(path, "rb");
    if (!f) die(path);
    nplans = u32(f);
    plans = calloc(nplans, sizeof *plans);
    for (uint32_t i = 0; i < nplans; i++) {
        Plan *p = &plans[i];
        p->nmarkers = u32(f);
        p->markers = calloc(p->nmarkers + 1, sizeof *p->markers);
        for (uint32_t k = 0; k < p->nmarkers; k++) p->markers[k] = bytes(f);
        p->nparts = u32(f);
        p->parts = calloc(p->nparts + 1, sizeof *p->parts);
        for (uint32_t k = 0; k < p->nparts; k++) {
            p->parts[k].due_us = u32(f);
            p->parts[k].bytes = bytes(f);
        }
        if (!p->nparts) die("a plan without parts");
    }
    fclose(f);
}

int main(int argc, char **argv) {
    if (argc != 3) {
        fprintf(stderr, "usage: %s PORT PLANFILE\n", argv[0]);
        return 2;
    }
    signal(SIGPIPE, SIG_IGN);
    load(argv[2]);
    lfd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    int one = 1;
    setsockopt(lfd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    struct sockaddr_in addr = {.sin_family = AF_INET, .sin_port = htons((uint16_t)atoi(argv[1])),
                               .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
    if (bind(lfd, (struct sockaddr *)&addr, sizeof addr) < 0) die("bind");
    if (listen(lfd, 4096) < 0) die("listen");
    epfd = epoll_create1(EPOLL_CLOEXEC);
    tfd = timerfd_create(CLOCK_MONOTONIC, TFD_NONBLOCK | TFD_CLOEXEC);
    if (epfd < 0 || tfd < 0) die("epoll/timerfd");
    struct epoll_event ev = {.events = EPOLLIN, .data.ptr = &lfd};
    epoll_ctl(epfd, EPOLL_CTL_ADD, lfd, &ev);
    ev.data.ptr = &tfd;
    epoll_ctl(epfd, EPOLL_CTL_ADD, tfd, &ev);
    printf("listening\n");
    fflush(stdout);
    struct epoll_event events[256];
    for (;;) {
        int n = epoll_wait(epfd, events, 256, -1);
        if (n < 0 && errno != EINTR) die("epoll_wait");
        for (int i = 0; i < n; i++) {
            void *ptr = events[i].data.ptr;
            if (ptr == &lfd) {
                on_accept();
            } else if (ptr == &tfd) {
                uint64_t expirations;
                if (read(tfd, &expirations, sizeof expirations) < 0 && errno != EAGAIN)
                    die("read timerfd");
            } else {
                Conn *c = ptr;
                int ok = 1;
                if (events[i].events & EPOLLOUT) ok = flush_out(c);
                if (ok && events[i].events & (EPOLLIN | EPOLLHUP | EPOLLERR))
                    ok = on_readable(c);
                if (!ok) close_conn(c);
            }
        }
        uint64_t now = now_ns();
        while (heap_len && due_ns(heap[0]) <= now) {
            Conn *c = heap[0];
            heap_remove(c);
            if (!advance(c, now)) close_conn(c);
        }
        arm_timer();
    }
}
