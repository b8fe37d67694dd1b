/*
 * loadgen: a small closed-loop HTTP/1.1 keep-alive load generator for Kiln's benchmarks.
 *
 * C connections each send one request, read the whole answer, record that request's own
 * latency (send start -> last byte, CLOCK_MONOTONIC) and send the next one at once. There is
 * no coordinated-omission correction: a closed loop measures what each request took, and its
 * throughput is what the server sustains at that concurrency (see bench/README.md).
 *
 * One thread, epoll, non-blocking sockets: on a 2-core box the client must cost the server
 * as little CPU as possible.
 *
 * Usage:
 *   loadgen --url http://127.0.0.1:PORT/path --body-file F --concurrency C --duration D
 *           --warmup W [--content-type application/json] [--timeout S]
 *
 * Prints one JSON object: requests, seconds, rps, mean_ms, p50_ms, p90_ms, p99_ms, max_ms,
 * errors (non-2xx answers + socket errors + timeouts), non_2xx, socket_errors, timeouts,
 * reconnects, concurrency. Only requests that complete inside the measuring window count.
 * Exit status: 0 on a run (even one with errors), 2 on bad arguments.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <math.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

enum state { ST_IDLE, ST_CONNECTING, ST_SENDING, ST_READING, ST_BACKOFF };

struct conn {
    int fd;
    enum state st;
    size_t sent;          /* bytes of the request written so far */
    char *buf;            /* response bytes */
    size_t len, cap;
    double started;       /* send start of the request in flight */
    double retry_at;      /* for ST_BACKOFF */
    size_t head_len;      /* 0 until the header block is complete */
    long status;
    long content_length;  /* -1 when absent */
    int chunked;
    int close_after;
    size_t chunk_pos;     /* chunked: where the next chunk-size line starts */
};

static struct addrinfo *g_addr;
static char *g_request;
static size_t g_request_len;
static int g_epoll;
static double g_measure_start, g_measure_end, g_timeout = 30.0;

static double *g_lat;
static size_t g_nlat, g_caplat;
static long g_non2xx, g_sockerr, g_timeouts, g_reconnects;

static double now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec / 1e9;
}

static void die(const char *msg) {
    fprintf(stderr, "loadgen: %s\n", msg);
    exit(2);
}

static void record(double started, double ended) {
    if (ended < g_measure_start || ended > g_measure_end) return;
    if (g_nlat == g_caplat) {
        g_caplat = g_caplat ? g_caplat * 2 : 65536;
        g_lat = realloc(g_lat, g_caplat * sizeof(double));
        if (!g_lat) die("out of memory");
    }
    g_lat[g_nlat++] = (ended - started) * 1000.0;
}

static int in_window(double t) { return t >= g_measure_start && t <= g_measure_end; }

static void reset_response(struct conn *c) {
    c->len = 0;
    c->head_len = 0;
    c->status = 0;
    c->content_length = -1;
    c->chunked = 0;
    c->close_after = 0;
    c->chunk_pos = 0;
}

static void start_connect(struct conn *c);

static void drop(struct conn *c, int backoff) {
    if (c->fd >= 0) {
        epoll_ctl(g_epoll, EPOLL_CTL_DEL, c->fd, NULL);
        close(c->fd);
        c->fd = -1;
    }
    reset_response(c);
    if (backoff) {
        c->st = ST_BACKOFF;
        c->retry_at = now() + 0.01; /* a refused or failing server: do not spin */
    } else {
        start_connect(c);
    }
}

static void socket_error(struct conn *c, int backoff) {
    if (in_window(now())) g_sockerr++;
    drop(c, backoff);
}

static void send_request(struct conn *c) {
    c->st = ST_SENDING;
    c->sent = 0;
    c->started = now();
    reset_response(c);
    for (;;) {
        ssize_t n = send(c->fd, g_request + c->sent, g_request_len - c->sent, MSG_NOSIGNAL);
        if (n > 0) {
            c->sent += (size_t)n;
            if (c->sent == g_request_len) break;
        } else if (n < 0 && errno == EINTR) {
            continue;
        } else if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) {
            struct epoll_event ev = {.events = EPOLLOUT, .data.ptr = c};
            epoll_ctl(g_epoll, EPOLL_CTL_MOD, c->fd, &ev);
            return;
        } else {
            socket_error(c, 0);
            return;
        }
    }
    c->st = ST_READING;
    struct epoll_event ev = {.events = EPOLLIN, .data.ptr = c};
    epoll_ctl(g_epoll, EPOLL_CTL_MOD, c->fd, &ev);
}

static void start_connect(struct conn *c) {
    c->fd = socket(g_addr->ai_family, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    if (c->fd < 0) die("socket() failed");
    int one = 1;
    setsockopt(c->fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    g_reconnects++;
    reset_response(c);
    int rc = connect(c->fd, g_addr->ai_addr, g_addr->ai_addrlen);
    struct epoll_event ev = {.events = EPOLLOUT, .data.ptr = c};
    if (epoll_ctl(g_epoll, EPOLL_CTL_ADD, c->fd, &ev) < 0) die("epoll_ctl failed");
    if (rc == 0) {
        send_request(c);
    } else if (errno == EINPROGRESS) {
        c->st = ST_CONNECTING;
        c->started = now(); /* for the timeout */
    } else {
        socket_error(c, 1);
    }
}

/* Case-insensitive search for a header's value inside the header block. */
static const char *header_value(const char *head, size_t head_len, const char *name) {
    size_t nlen = strlen(name);
    const char *p = memchr(head, '\n', head_len); /* skip the status line */
    const char *end = head + head_len;
    while (p && p + 1 < end) {
        p++;
        if ((size_t)(end - p) > nlen && strncasecmp(p, name, nlen) == 0 && p[nlen] == ':') {
            const char *v = p + nlen + 1;
            while (v < end && (*v == ' ' || *v == '\t')) v++;
            return v;
        }
        p = memchr(p, '\n', (size_t)(end - p));
    }
    return NULL;
}

/* 1: the response is complete, 0: need more bytes, -1: malformed or unsupported. */
static int parse(struct conn *c) {
    if (!c->head_len) {
        char *end = memmem(c->buf, c->len, "\r\n\r\n", 4);
        if (!end) return c->len > 65536 ? -1 : 0;
        c->head_len = (size_t)(end - c->buf) + 4;
        if (c->len < 12 || strncmp(c->buf, "HTTP/1.", 7) != 0) return -1;
        c->status = strtol(c->buf + 9, NULL, 10);
        const char *v = header_value(c->buf, c->head_len, "content-length");
        if (v) c->content_length = strtol(v, NULL, 10);
        v = header_value(c->buf, c->head_len, "transfer-encoding");
        if (v && strncasecmp(v, "chunked", 7) == 0) c->chunked = 1;
        v = header_value(c->buf, c->head_len, "connection");
        if (v && strncasecmp(v, "close", 5) == 0) c->close_after = 1;
        if (strncmp(c->buf, "HTTP/1.0", 8) == 0 && !(v && strncasecmp(v, "keep-alive", 10) == 0))
            c->close_after = 1;
        c->chunk_pos = c->head_len;
        if (!c->chunked && c->content_length < 0) {
            if (c->status == 204 || c->status == 304 || (c->status >= 100 && c->status < 200))
                c->content_length = 0;
            else
                return -1; /* a body delimited by closing the connection: not supported */
        }
    }
    if (!c->chunked) return c->len >= c->head_len + (size_t)c->content_length ? 1 : 0;
    for (;;) { /* chunked: walk the size lines; trailers are not expected */
        if (c->chunk_pos >= c->len) return 0;
        char *eol = memmem(c->buf + c->chunk_pos, c->len - c->chunk_pos, "\r\n", 2);
        if (!eol) return 0;
        long size = strtol(c->buf + c->chunk_pos, NULL, 16);
        if (size < 0) return -1;
        size_t data = (size_t)(eol - c->buf) + 2;
        if (size == 0) {
            /* the last chunk: "0\r\n" then optional trailers, then "\r\n" */
            if (c->len < data + 2) return 0;
            if (memcmp(c->buf + data, "\r\n", 2) == 0) return 1;
            return memmem(c->buf + data, c->len - data, "\r\n\r\n", 4) ? 1 : 0;
        }
        if (c->len < data + (size_t)size + 2) return 0;
        c->chunk_pos = data + (size_t)size + 2;
    }
}

static void on_readable(struct conn *c) {
    for (;;) {
        if (c->cap - c->len < 4096) {
            c->cap = c->cap ? c->cap * 2 : 16384;
            c->buf = realloc(c->buf, c->cap);
            if (!c->buf) die("out of memory");
        }
        ssize_t n = recv(c->fd, c->buf + c->len, c->cap - c->len - 1, 0);
        if (n > 0) {
            c->len += (size_t)n;
            continue;
        }
        if (n < 0 && errno == EINTR) continue;
        if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) break;
        socket_error(c, 0); /* EOF or reset before the answer was complete */
        return;
    }
    int done = parse(c);
    if (done == 0) return;
    if (done < 0) {
        socket_error(c, 0);
        return;
    }
    double ended = now();
    record(c->started, ended);
    if ((c->status < 200 || c->status > 299) && in_window(ended)) g_non2xx++;
    if (c->close_after)
        drop(c, 0);
    else
        send_request(c);
}

static void on_event(struct conn *c, uint32_t events) {
    if (c->st == ST_CONNECTING) {
        int err = 0;
        socklen_t len = sizeof err;
        getsockopt(c->fd, SOL_SOCKET, SO_ERROR, &err, &len);
        if (err || (events & (EPOLLERR | EPOLLHUP))) {
            socket_error(c, 1);
            return;
        }
        send_request(c);
        return;
    }
    if (c->st == ST_SENDING) {
        if (events & EPOLLERR) {
            socket_error(c, 0);
            return;
        }
        /* resume the partial write */
        for (;;) {
            ssize_t n = send(c->fd, g_request + c->sent, g_request_len - c->sent, MSG_NOSIGNAL);
            if (n > 0) {
                c->sent += (size_t)n;
                if (c->sent == g_request_len) break;
            } else if (n < 0 && errno == EINTR) {
                continue;
            } else if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) {
                return;
            } else {
                socket_error(c, 0);
                return;
            }
        }
        c->st = ST_READING;
        struct epoll_event ev = {.events = EPOLLIN, .data.ptr = c};
        epoll_ctl(g_epoll, EPOLL_CTL_MOD, c->fd, &ev);
        return;
    }
    if (c->st == ST_READING) on_readable(c);
}

static int cmp_double(const void *a, const void *b) {
    double x = *(const double *)a, y = *(const double *)b;
    return x < y ? -1 : x > y;
}

static double pct(double q) { /* nearest rank */
    if (!g_nlat) return 0.0;
    size_t rank = (size_t)ceil(q / 100.0 * (double)g_nlat);
    if (rank < 1) rank = 1;
    return g_lat[rank - 1];
}

static char *read_file(const char *path, size_t *len) {
    FILE *f = fopen(path, "rb");
    if (!f) die("cannot open --body-file");
    size_t cap = 4096, n = 0;
    char *data = malloc(cap);
    size_t got;
    while ((got = fread(data + n, 1, cap - n, f)) > 0) {
        n += got;
        if (n == cap) data = realloc(data, cap *= 2);
    }
    fclose(f);
    *len = n;
    return data;
}

static void usage(void) {
    fprintf(stderr,
            "usage: loadgen --url http://HOST:PORT/PATH --body-file F --concurrency C "
            "--duration D --warmup W [--content-type T] [--timeout S]\n");
    exit(2);
}

int main(int argc, char **argv) {
    const char *url = NULL, *body_file = NULL, *ctype = "application/json";
    int concurrency = 1;
    double duration = 5, warmup = 1;
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i];
        if (i + 1 >= argc) usage();
        const char *v = argv[++i];
        if (!strcmp(a, "--url")) url = v;
        else if (!strcmp(a, "--body-file")) body_file = v;
        else if (!strcmp(a, "--concurrency")) concurrency = atoi(v);
        else if (!strcmp(a, "--duration")) duration = atof(v);
        else if (!strcmp(a, "--warmup")) warmup = atof(v);
        else if (!strcmp(a, "--content-type")) ctype = v;
        else if (!strcmp(a, "--timeout")) g_timeout = atof(v);
        else usage();
    }
    if (!url || !body_file || concurrency < 1 || duration <= 0 || warmup < 0) usage();
    if (strncmp(url, "http://", 7) != 0) die("only http:// URLs are supported");

    /* http://host[:port][/path] */
    char host[256], port[16] = "80";
    const char *hp = url + 7, *slash = strchr(hp, '/');
    const char *path = slash ? slash : "/";
    size_t hplen = slash ? (size_t)(slash - hp) : strlen(hp);
    if (hplen == 0 || hplen >= sizeof host) die("bad host in --url");
    memcpy(host, hp, hplen);
    host[hplen] = 0;
    char *colon = strrchr(host, ':');
    if (colon) {
        snprintf(port, sizeof port, "%s", colon + 1);
        *colon = 0;
    }
    struct addrinfo hints = {.ai_family = AF_UNSPEC, .ai_socktype = SOCK_STREAM};
    if (getaddrinfo(host, port, &hints, &g_addr) != 0) die("cannot resolve host");

    size_t body_len;
    char *body = read_file(body_file, &body_len);
    char head[1024];
    int hlen = snprintf(head, sizeof head,
                        "POST %s HTTP/1.1\r\nHost: %s:%s\r\nContent-Type: %s\r\n"
                        "Content-Length: %zu\r\n\r\n",
                        path, host, port, ctype, body_len);
    if (hlen < 0 || (size_t)hlen >= sizeof head) die("request line too long");
    g_request_len = (size_t)hlen + body_len;
    g_request = malloc(g_request_len);
    memcpy(g_request, head, (size_t)hlen);
    memcpy(g_request + hlen, body, body_len);

    signal(SIGPIPE, SIG_IGN);
    g_epoll = epoll_create1(EPOLL_CLOEXEC);
    if (g_epoll < 0) die("epoll_create1 failed");

    double t0 = now();
    g_measure_start = t0 + warmup;
    g_measure_end = g_measure_start + duration;

    struct conn *conns = calloc((size_t)concurrency, sizeof *conns);
    for (int i = 0; i < concurrency; i++) {
        conns[i].fd = -1;
        start_connect(&conns[i]);
    }
    g_reconnects = 0; /* count only connections made after the first */

    struct epoll_event events[256];
    double last_scan = t0;
    for (;;) {
        double t = now();
        if (t >= g_measure_end) break;
        int wait_ms = (int)((g_measure_end - t) * 1000.0) + 1;
        if (wait_ms > 10) wait_ms = 10; /* wake for timeouts and backoffs */
        int n = epoll_wait(g_epoll, events, 256, wait_ms);
        if (n < 0 && errno != EINTR) die("epoll_wait failed");
        for (int i = 0; i < n; i++) on_event(events[i].data.ptr, events[i].events);
        t = now();
        if (t - last_scan >= 0.005) {
            last_scan = t;
            for (int i = 0; i < concurrency; i++) {
                struct conn *c = &conns[i];
                if (c->st == ST_BACKOFF && t >= c->retry_at) {
                    start_connect(c);
                } else if ((c->st == ST_READING || c->st == ST_SENDING ||
                            c->st == ST_CONNECTING) &&
                           t - c->started > g_timeout) {
                    if (in_window(t)) g_timeouts++;
                    drop(c, 0);
                }
            }
        }
    }
    double seconds = duration;

    qsort(g_lat, g_nlat, sizeof(double), cmp_double);
    double sum = 0;
    for (size_t i = 0; i < g_nlat; i++) sum += g_lat[i];
    long errors = g_non2xx + g_sockerr + g_timeouts;
    printf("{\"requests\": %zu, \"seconds\": %.3f, \"rps\": %.1f, \"mean_ms\": %.4f, "
           "\"p50_ms\": %.4f, \"p90_ms\": %.4f, \"p99_ms\": %.4f, \"max_ms\": %.4f, "
           "\"errors\": %ld, \"non_2xx\": %ld, \"socket_errors\": %ld, \"timeouts\": %ld, "
           "\"reconnects\": %ld, \"concurrency\": %d}\n",
           g_nlat, seconds, (double)g_nlat / seconds, g_nlat ? sum / (double)g_nlat : 0.0,
           pct(50), pct(90), pct(99), g_nlat ? g_lat[g_nlat - 1] : 0.0, errors, g_non2xx,
           g_sockerr, g_timeouts, g_reconnects, concurrency);
    return 0;
}
