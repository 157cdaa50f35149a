/* pingpong: latency of small messages at a fixed rate, the load generator of bench/latency.py.
 *
 *   pingpong PORT CONNS RATE SECONDS SIZE [WARMUP_S]
 *       CONNS connections to 127.0.0.1:PORT, whose far end echoes (`storm echo
 *       PORT` of bench/storm.c, directly or through a proxy). RATE SIZE-byte
 *       messages a second in all, OPEN LOOP: message i (i = 0, 1, ...) is due at
 *       t0 + i / RATE on connection i % CONNS, whatever happened to the ones
 *       before it. A connection carries one message at a time; when its previous
 *       echo is still out at a message's due time, that message goes as soon as
 *       the echo is back. Latency runs from the message's DUE time, not from the
 *       moment it could be sent, to the moment its whole echo is read: a stall
 *       delays the messages queued behind it and their latency says so (no
 *       coordinated omission).
 *       RATE 0 is CLOSED LOOP instead: each connection sends its next message as
 *       soon as the echo of the previous one is back, as fast as the path allows
 *       (the concurrency is CONNS); latency runs from the send, and
 *       `achieved_rate` is the echoes completed per second of the measured SECONDS.
 *       The run lasts WARMUP_S (default 1, may be fractional) + SECONDS; messages
 *       due in the warm-up are sent and checked but not recorded. Then the
 *       messages still out get up to DRAIN_S to come back.
 *       Every payload is its sequence number (connection << 40 | message) as 8
 *       little-endian bytes, then a pseudo-random stream seeded by it; each echo
 *       is compared with what was sent, byte for byte.
 *       Prints one JSON line: the target rate and the achieved one (the
 *       messages due in the measured SECONDS that were sent before those ended,
 *       over SECONDS: a path slower than the schedule leaves a backlog and falls
 *       short, and catching up on the warm-up cannot lift it above the target),
 *       the messages recorded, errors (failed connects, echoes that differ, EOFs
 *       or resets, bytes nobody asked for, echoes still missing after the drain),
 *       the latency percentiles p50 p90 p99 p99.9 and max in microseconds, the
 *       generator's own scheduling lag, and its CPU time from getrusage (whole
 *       run, and over the measured SECONDS).
 *       Exit status: 0 no errors, 1 errors (the JSON line still printed, the
 *       errors counted in it), 2 cannot start (usage, out of sockets or memory).
 *
 * Latencies go into a log-linear histogram (the HdrHistogram idea, written
 * here): in nanoseconds, exact below 256 ns, then 128 buckets per power of two, so
 * a bucket is at most 1/128 (0.8%) of its value wide, up to 2^40 ns (18 min);
 * ~35 KB, no sample stored. A percentile is the highest value of its bucket (an
 * upper bound within 0.8%); max is exact.
 *
 * Why the generator is not the bottleneck: one thread, non-blocking sockets,
 * level-triggered epoll, nothing allocated after start-up. Per message it makes
 * one send() and one read() of SIZE bytes; a timerfd armed at the next due time
 * (absolute CLOCK_MONOTONIC, no timer slack, no busy spinning) wakes it, and one
 * wake-up sends every message that has come due. Its own code is about 1% of its
 * CPU (perf); the rest is the kernel's: a loopback send() delivers the segment
 * and wakes the receiver in the sender's context, and every sleep and wake-up is
 * a context switch. It measures its own fitness and prints it:
 * `sched_lag_*_us` is how late it sent the messages whose connection was free at
 * the due time (its own lateness, nothing else's), `cpu_percent` its CPU over
 * the measured seconds. latency.py runs it against the echo server directly (the
 * `direct` path) and reports both: a direct run that reaches the target rate with
 * the generator well below one core and a small lag shows that a proxy's figures
 * are the proxy's; one near a core says the rate is the machine's limit.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/timerfd.h>
#include <time.h>
#include <unistd.h>

#define DRAIN_S 3           /* how long the last echoes may take after the run */
#define CONNECT_S 10        /* how long the connections may take to open */

/* ---------------------------------------------------------------- histogram */

#define SUB_BITS 7
#define SUB (1 << SUB_BITS)             /* buckets per power of two */
#define TOP_EXP 40                      /* values clamp below 2^TOP_EXP ns */
#define NBUCKETS (2 * SUB + (TOP_EXP - SUB_BITS - 1) * SUB)

struct hist {
	uint64_t count[NBUCKETS];
	uint64_t n, max;
};

static int bucket_of(uint64_t v)
{
	int e, shift;

	if (v < 2 * SUB)
		return (int)v;                  /* exact */
	if (v >= (1ULL << TOP_EXP))
		v = (1ULL << TOP_EXP) - 1;
	e = 63 - __builtin_clzll(v);            /* 2^e <= v < 2^(e+1), e > SUB_BITS */
	shift = e - SUB_BITS;                   /* v >> shift is in [SUB, 2 SUB) */
	return 2 * SUB + (e - SUB_BITS - 1) * SUB + (int)((v >> shift) - SUB);
}

static uint64_t bucket_top(int b)           /* the highest value bucket b holds */
{
	int e, shift;
	uint64_t m;

	if (b < 2 * SUB)
		return (uint64_t)b;
	b -= 2 * SUB;
	e = b / SUB + SUB_BITS + 1;
	m = (uint64_t)(b % SUB + SUB);
	shift = e - SUB_BITS;
	return (m << shift) + (1ULL << shift) - 1;
}

static void hist_add(struct hist *h, int64_t v)
{
	uint64_t u = v < 0 ? 0 : (uint64_t)v;

	h->count[bucket_of(u)]++;
	h->n++;
	if (u > h->max)
		h->max = u;
}

static double hist_pct_us(const struct hist *h, double p)  /* p in [0, 1] */
{
	uint64_t rank, seen = 0;
	int b;

	if (!h->n)
		return 0;
	rank = (uint64_t)(p * (double)h->n);     /* ceil(p n), at least 1 */
	if ((double)rank < p * (double)h->n || rank < 1)
		rank++;
	for (b = 0; b < NBUCKETS; b++) {
		seen += h->count[b];
		if (seen >= rank) {
			uint64_t v = bucket_top(b);
			return (v < h->max ? v : h->max) / 1000.0;
		}
	}
	return h->max / 1000.0;
}

/* ---------------------------------------------------------------- the run */

enum { DEAD, IDLE, BUSY };

struct conn {
	int fd, state, want_out;
	uint64_t next_j;            /* the next message of this connection */
	int64_t due;                /* the due time of the message out now */
	uint32_t wpos, got;
	unsigned char *sbuf, *rbuf;
};

static struct conn *conns;
static int nconns, size, ep;
static uint64_t rate, total;    /* messages due before the end of the run */
static int closed_loop;         /* RATE 0: each echo releases the next message */
static int64_t t0, t_warm, t_end;
static struct hist lat, lag;
static uint64_t sent_all, sent_window, echoed, recorded, busy;
static uint64_t connect_errors, mismatches, eofs, lost, unsent;

static int64_t now_ns(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (int64_t)ts.tv_sec * 1000000000 + ts.tv_nsec;
}

static int64_t due_of(uint64_t i)           /* message i's due time */
{
	return t0 + (int64_t)((unsigned __int128)i * 1000000000u / rate);
}

static uint64_t splitmix(uint64_t *x)
{
	uint64_t z = (*x += 0x9E3779B97F4A7C15ULL);
	z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ULL;
	z = (z ^ (z >> 27)) * 0x94D049BB133111EBULL;
	return z ^ (z >> 31);
}

static void fill(unsigned char *b, uint64_t seq)
{
	uint64_t x = seq, r = 0;
	int i;

	for (i = 0; i < size; i++) {
		if (i < 8) {
			b[i] = (unsigned char)(seq >> (8 * i));
			continue;
		}
		if (i % 8 == 0)
			r = splitmix(&x);
		b[i] = (unsigned char)(r >> (8 * (i % 8)));
	}
}

static void set_out(struct conn *c, int k, int on)
{
	struct epoll_event ev = { .events = EPOLLIN | (on ? EPOLLOUT : 0), .data.u32 = k };

	if (c->want_out != on && epoll_ctl(ep, EPOLL_CTL_MOD, c->fd, &ev) == 0)
		c->want_out = on;
}

static void kill_conn(struct conn *c)       /* the error is counted by the caller */
{
	close(c->fd);                       /* also leaves the epoll set */
	if (c->state == BUSY)
		busy--;
	c->state = DEAD;
}

static void write_some(struct conn *c, int k)
{
	while (c->wpos < (uint32_t)size) {
		ssize_t w = send(c->fd, c->sbuf + c->wpos, size - c->wpos, MSG_NOSIGNAL);
		if (w > 0) {
			c->wpos += w;
			continue;
		}
		if (w < 0 && (errno == EAGAIN || errno == EINTR)) {
			set_out(c, k, 1);
			return;
		}
		eofs++;                     /* EPIPE, ECONNRESET: the far end went */
		kill_conn(c);
		return;
	}
	set_out(c, k, 0);
}

/* Send connection k's next message if it is due (its due time has passed). */
static void send_due(struct conn *c, int k, int64_t now)
{
	uint64_t i = c->next_j * nconns + k;

	if (closed_loop) {
		if (c->state != IDLE || now >= t_end)
			return;
		c->due = now;
	} else {
		if (c->state != IDLE || i >= total || due_of(i) > now)
			return;
		c->due = due_of(i);
	}
	fill(c->sbuf, (uint64_t)k << 40 | c->next_j);
	c->next_j++;
	c->wpos = c->got = 0;
	c->state = BUSY;
	busy++;
	sent_all++;
	if (c->due >= t_warm && now < t_end)
		sent_window++;          /* due in the measured seconds, sent inside them */
	write_some(c, k);
}

static void readable(struct conn *c, int k)
{
	unsigned char junk[4096];
	ssize_t r;

	if (c->state == BUSY && c->got < (uint32_t)size)
		r = read(c->fd, c->rbuf + c->got, size - c->got);
	else
		r = read(c->fd, junk, sizeof(junk));
	if (r < 0 && (errno == EAGAIN || errno == EINTR))
		return;
	if (r <= 0) {                       /* EOF or reset before we closed */
		eofs++;
		kill_conn(c);
		return;
	}
	if (c->state != BUSY) {             /* bytes with no message out */
		mismatches++;
		return;
	}
	c->got += r;
	if (c->got < (uint32_t)size)
		return;
	int64_t now = now_ns();
	if (c->wpos < (uint32_t)size || memcmp(c->rbuf, c->sbuf, size)) {
		mismatches++;
		if (c->wpos < (uint32_t)size) {     /* an "echo" of what was never sent */
			kill_conn(c);
			return;
		}
	} else {
		echoed++;
		if (c->due >= t_warm) {
			hist_add(&lat, now - c->due);
			recorded++;
		}
	}
	c->state = IDLE;
	busy--;
	send_due(c, k, now);                /* late already: it goes now */
}

static int connect_all(int port)
{
	struct sockaddr_in a = { .sin_family = AF_INET, .sin_port = htons(port) };
	struct epoll_event ev, evs[256];
	int one = 1, k, n, i, pending = 0;
	int64_t deadline = now_ns() + (int64_t)CONNECT_S * 1000000000;

	a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
	for (k = 0; k < nconns; k++) {
		struct conn *c = &conns[k];
		c->fd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK, 0);
		if (c->fd < 0) {
			perror("pingpong: socket");
			return -1;
		}
		setsockopt(c->fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
		c->state = BUSY;            /* = connecting, while in this function */
		if (connect(c->fd, (struct sockaddr *)&a, sizeof(a)) && errno != EINPROGRESS) {
			connect_errors++;
			close(c->fd);
			c->state = DEAD;
			continue;
		}
		ev.events = EPOLLOUT;
		ev.data.u32 = k;
		epoll_ctl(ep, EPOLL_CTL_ADD, c->fd, &ev);
		pending++;
	}
	while (pending > 0) {
		int64_t left = deadline - now_ns();
		if (left <= 0)
			break;
		n = epoll_wait(ep, evs, 256, (int)(left / 1000000) + 1);
		for (i = 0; i < n; i++) {
			struct conn *c = &conns[evs[i].data.u32];
			int err = 0;
			socklen_t el = sizeof(err);
			if (c->state != BUSY)
				continue;
			pending--;
			getsockopt(c->fd, SOL_SOCKET, SO_ERROR, &err, &el);
			if (err) {
				connect_errors++;
				close(c->fd);
				c->state = DEAD;
				continue;
			}
			c->state = IDLE;
			ev.events = EPOLLIN;
			ev.data.u32 = evs[i].data.u32;
			epoll_ctl(ep, EPOLL_CTL_MOD, c->fd, &ev);
		}
	}
	for (k = 0; k < nconns; k++) {
		if (conns[k].state == BUSY) {       /* still connecting */
			connect_errors++;
			close(conns[k].fd);
			conns[k].state = DEAD;
		}
	}
	return 0;
}

static double cpu_of(const struct rusage *u)
{
	return u->ru_utime.tv_sec + u->ru_utime.tv_usec / 1e6
	       + u->ru_stime.tv_sec + u->ru_stime.tv_usec / 1e6;
}

int main(int argc, char **argv)
{
	struct epoll_event ev, evs[256];
	struct rusage ru_warm, ru_end, ru_all;
	int port, tfd, k, n, i, warm_taken = 0, end_taken = 0;
	double seconds, warmup = 1.0;
	int64_t armed = -1, deadline, now, w_t0 = 0, w_t1 = 0;
	uint64_t gi = 0;

	if (argc != 6 && argc != 7) {
		fprintf(stderr, "usage: pingpong PORT CONNS RATE SECONDS SIZE [WARMUP_S]\n");
		return 2;
	}
	port = atoi(argv[1]);
	nconns = atoi(argv[2]);
	rate = strtoull(argv[3], NULL, 10);
	seconds = atof(argv[4]);
	size = atoi(argv[5]);
	if (argc == 7)
		warmup = atof(argv[6]);
	if (port <= 0 || port > 65535 || nconns < 1 || nconns > (1 << 20)
	    || !(seconds > 0) || size < 1 || size > (1 << 24) || !(warmup >= 0)) {
		fprintf(stderr, "pingpong: bad arguments (PORT 1-65535, CONNS >= 1, RATE >= 0, "
			"SECONDS > 0, SIZE >= 1, WARMUP_S >= 0)\n");
		return 2;
	}
	conns = calloc(nconns, sizeof(*conns));
	unsigned char *bufs = malloc(2 * (size_t)nconns * size);
	ep = epoll_create1(0);
	tfd = timerfd_create(CLOCK_MONOTONIC, TFD_NONBLOCK);
	if (!conns || !bufs || ep < 0 || tfd < 0) {
		perror("pingpong: setup");
		return 2;
	}
	for (k = 0; k < nconns; k++) {
		conns[k].sbuf = bufs + 2 * (size_t)k * size;
		conns[k].rbuf = conns[k].sbuf + size;
	}
	if (connect_all(port))
		return 2;
	ev.events = EPOLLIN;
	ev.data.u32 = (uint32_t)nconns;     /* the timer */
	epoll_ctl(ep, EPOLL_CTL_ADD, tfd, &ev);

	t0 = now_ns();
	t_warm = t0 + (int64_t)(warmup * 1e9);
	t_end = t_warm + (int64_t)(seconds * 1e9);
	deadline = t_end + (int64_t)DRAIN_S * 1000000000;
	/* Messages due before t_end: the smallest i with due_of(i) >= t_end. */
	closed_loop = rate == 0;
	if (!closed_loop)
		total = (uint64_t)(((unsigned __int128)(t_end - t0) * rate + 999999999u) / 1000000000u);
	else
		for (k = 0; k < nconns; k++)
			if (conns[k].state == IDLE)
				send_due(&conns[k], k, t0);
	if (connect_errors == (uint64_t)nconns)
		total = 0;

	for (;;) {
		now = now_ns();
		if (!warm_taken && now >= t_warm) {
			getrusage(RUSAGE_SELF, &ru_warm);
			w_t0 = now;
			warm_taken = 1;
		}
		if (!end_taken && now >= t_end) {
			getrusage(RUSAGE_SELF, &ru_end);
			w_t1 = now;
			end_taken = 1;
		}
		if (now >= deadline)
			break;
		/* Every message now due: sent if its connection is free, else it goes
		 * when that connection's echo is back (readable()). */
		for (; gi < total && due_of(gi) <= now; gi++) {
			struct conn *c = &conns[gi % nconns];
			if (c->state == IDLE && c->next_j * nconns + gi % nconns == gi) {
				if (due_of(gi) >= t_warm)
					hist_add(&lag, now - due_of(gi));
				send_due(c, gi % nconns, now);
			}
		}
		if (gi >= total && busy == 0 && (!closed_loop || now >= t_end))
			break;
		int64_t next = gi < total ? due_of(gi) : deadline;
		if (!warm_taken && t_warm < next)
			next = t_warm;
		if (!end_taken && t_end < next)
			next = t_end;
		if (next != armed) {        /* re-arming also clears a fired timer */
			struct itimerspec its = { .it_value = { next / 1000000000, next % 1000000000 } };
			timerfd_settime(tfd, TFD_TIMER_ABSTIME, &its, NULL);
			armed = next;
		}
		n = epoll_wait(ep, evs, 256, -1);
		for (i = 0; i < n; i++) {
			uint32_t k2 = evs[i].data.u32;
			if (k2 == (uint32_t)nconns) {
				armed = -1;         /* fired: re-arm whatever comes next */
				continue;
			}
			struct conn *c = &conns[k2];
			if (c->state == DEAD)
				continue;
			if ((evs[i].events & EPOLLOUT) && c->state == BUSY)
				write_some(c, k2);
			if (c->state != DEAD && (evs[i].events & (EPOLLIN | EPOLLHUP | EPOLLERR)))
				readable(c, k2);
		}
	}
	now = now_ns();
	if (!warm_taken) {
		getrusage(RUSAGE_SELF, &ru_warm);
		w_t0 = now;
	}
	if (!end_taken) {
		getrusage(RUSAGE_SELF, &ru_end);
		w_t1 = now;
	}
	getrusage(RUSAGE_SELF, &ru_all);
	for (k = 0; k < nconns; k++) {
		struct conn *c = &conns[k];
		uint64_t mine = total > (uint64_t)k ? (total - k + nconns - 1) / nconns : 0;
		if (c->state == BUSY)
			lost++;                 /* its echo never came back */
		if (mine > c->next_j)
			unsent += mine - c->next_j;
		if (c->state != DEAD)
			close(c->fd);
	}
	uint64_t errors = connect_errors + mismatches + eofs + lost;
	double wall = w_t1 > w_t0 ? (w_t1 - w_t0) / 1e9 : 0;
	printf("{\"target_rate\": %llu, \"achieved_rate\": %.1f, \"conns\": %d, \"size\": %d, "
	       "\"seconds\": %g, \"warmup_s\": %g, \"messages\": %llu, \"sent\": %llu, "
	       "\"echoed\": %llu, \"unsent\": %llu, \"errors\": %llu, \"connect_errors\": %llu, "
	       "\"mismatches\": %llu, \"eofs\": %llu, \"lost\": %llu, "
	       "\"p50_us\": %.1f, \"p90_us\": %.1f, \"p99_us\": %.1f, \"p999_us\": %.1f, "
	       "\"max_us\": %.1f, \"sched_lag_p99_us\": %.1f, \"sched_lag_max_us\": %.1f, "
	       "\"cpu_s\": %.3f, \"window_cpu_s\": %.3f, \"cpu_percent\": %.1f, \"wall_s\": %.3f}\n",
	       (unsigned long long)rate, (closed_loop ? recorded : sent_window) / seconds, nconns,
	       size, seconds, warmup,
	       (unsigned long long)recorded, (unsigned long long)sent_all,
	       (unsigned long long)echoed, (unsigned long long)unsent, (unsigned long long)errors,
	       (unsigned long long)connect_errors, (unsigned long long)mismatches,
	       (unsigned long long)eofs, (unsigned long long)lost,
	       hist_pct_us(&lat, 0.5), hist_pct_us(&lat, 0.9), hist_pct_us(&lat, 0.99),
	       hist_pct_us(&lat, 0.999), lat.max / 1000.0, hist_pct_us(&lag, 0.99), lag.max / 1000.0,
	       cpu_of(&ru_all), cpu_of(&ru_end) - cpu_of(&ru_warm),
	       wall > 0 ? 100.0 * (cpu_of(&ru_end) - cpu_of(&ru_warm)) / wall : 0.0,
	       (now - t0) / 1e9);
	return errors ? 1 : 0;
}
