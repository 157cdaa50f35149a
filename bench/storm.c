/* storm: latency of short connections, the load generator of bench/storm.py.
 *
 *   storm echo PORT
 *       An echo server on 127.0.0.1:PORT, one thread, level-triggered epoll:
 *       echoes what it reads and closes at the client's EOF.
 *   storm client PORT TOTAL CONC SIZE
 *       TOTAL connections to 127.0.0.1:PORT, CONC of them at once. Each one:
 *       connect, send SIZE bytes, shut down writing, read the SIZE bytes back
 *       and the EOF, close. Its latency runs from the connect() call to the
 *       EOF. Prints one JSON line: count, errors, seconds, conn/s and the
 *       latency percentiles in microseconds (every sample kept, sorted: no
 *       histogram buckets to round them).
 *
 * C, not Python, so the client is not what limits the rate or the tail: one
 * thread, non-blocking sockets, no allocation per connection. storm.py checks
 * it by pointing it at the echo server directly, with no proxy between.
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
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

static int64_t now_us(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (int64_t)ts.tv_sec * 1000000 + ts.tv_nsec / 1000;
}

static struct sockaddr_in addr_of(int port)
{
	struct sockaddr_in a = { .sin_family = AF_INET, .sin_port = htons(port) };
	a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
	return a;
}

static int echo(int port)
{
	struct sockaddr_in a = addr_of(port);
	struct epoll_event ev, evs[256];
	char buf[65536];
	int one = 1, ep, ls, n, i;

	ls = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK, 0);
	setsockopt(ls, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
	if (bind(ls, (struct sockaddr *)&a, sizeof(a)) || listen(ls, 4096)) {
		perror("storm echo: listen");
		return 1;
	}
	ep = epoll_create1(0);
	ev.events = EPOLLIN;
	ev.data.fd = ls;
	epoll_ctl(ep, EPOLL_CTL_ADD, ls, &ev);
	for (;;) {
		n = epoll_wait(ep, evs, 256, -1);
		for (i = 0; i < n; i++) {
			int fd = evs[i].data.fd;
			if (fd == ls) {
				int c;
				while ((c = accept4(ls, NULL, NULL, SOCK_NONBLOCK)) >= 0) {
					setsockopt(c, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
					ev.events = EPOLLIN;
					ev.data.fd = c;
					epoll_ctl(ep, EPOLL_CTL_ADD, c, &ev);
				}
				continue;
			}
			ssize_t r = read(fd, buf, sizeof(buf));
			if (r > 0) {
				if (write(fd, buf, r) != r)       /* a few bytes always fit */
					close(fd);
			} else if (r == 0 || errno != EAGAIN) {
				close(fd);
			}
		}
	}
}

struct conn {
	int fd;
	int64_t t0;
	uint32_t got;
};

static int cmp_u32(const void *a, const void *b)
{
	uint32_t x = *(const uint32_t *)a, y = *(const uint32_t *)b;
	return x < y ? -1 : x > y;
}

static int client(int port, long total, int conc, int size)
{
	struct sockaddr_in a = addr_of(port);
	struct conn *c = calloc(conc, sizeof(*c));
	uint32_t *lat = calloc(total, sizeof(uint32_t));
	char *payload = malloc(size), buf[65536];
	struct epoll_event ev, evs[256];
	long started = 0, done = 0, errors = 0, i;
	int ep = epoll_create1(0), one = 1, n, k;
	int64_t t_start = now_us(), elapsed;

	memset(payload, 'x', size);
	/* Slot k of c[] is free when c[k].fd < 0. */
	for (k = 0; k < conc; k++)
		c[k].fd = -1;
	for (;;) {
		for (k = 0; k < conc && started < total; k++) {
			if (c[k].fd >= 0)
				continue;
			c[k].fd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK, 0);
			setsockopt(c[k].fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
			c[k].t0 = now_us();
			c[k].got = 0;
			started++;
			if (connect(c[k].fd, (struct sockaddr *)&a, sizeof(a)) && errno != EINPROGRESS) {
				errors++;
				close(c[k].fd);
				c[k].fd = -1;
				continue;
			}
			ev.events = EPOLLOUT;
			ev.data.u32 = k;
			epoll_ctl(ep, EPOLL_CTL_ADD, c[k].fd, &ev);
		}
		if (done + errors >= total)
			break;
		n = epoll_wait(ep, evs, 256, 10000);
		if (n == 0) {
			fprintf(stderr, "storm client: nothing happened for 10 s\n");
			return 1;
		}
		for (i = 0; i < n; i++) {
			struct conn *x = &c[evs[i].data.u32];
			int err = 0;
			socklen_t el = sizeof(err);
			if (evs[i].events & EPOLLOUT) {
				getsockopt(x->fd, SOL_SOCKET, SO_ERROR, &err, &el);
				if (err || send(x->fd, payload, size, MSG_NOSIGNAL) != size) {
					errors++;
					close(x->fd);
					x->fd = -1;
					continue;
				}
				shutdown(x->fd, SHUT_WR);
				ev.events = EPOLLIN;
				ev.data.u32 = evs[i].data.u32;
				epoll_ctl(ep, EPOLL_CTL_MOD, x->fd, &ev);
				continue;
			}
			ssize_t r = read(x->fd, buf, sizeof(buf));
			if (r > 0) {
				x->got += r;
				continue;
			}
			if (r < 0 && errno == EAGAIN)
				continue;
			if (r == 0 && x->got == (uint32_t)size)
				lat[done++] = (uint32_t)(now_us() - x->t0);
			else
				errors++;
			close(x->fd);
			x->fd = -1;
		}
	}
	elapsed = now_us() - t_start;
	qsort(lat, done, sizeof(uint32_t), cmp_u32);
#define PCT(p) (done ? lat[(long)((done - 1) * (p))] : 0)
	printf("{\"connections\": %ld, \"errors\": %ld, \"seconds\": %.3f, \"conn_per_s\": %.0f, "
	       "\"p50_us\": %u, \"p90_us\": %u, \"p99_us\": %u, \"p999_us\": %u, \"max_us\": %u}\n",
	       done, errors, elapsed / 1e6, done / (elapsed / 1e6),
	       PCT(0.5), PCT(0.9), PCT(0.99), PCT(0.999), PCT(1.0));
	return errors ? 1 : 0;
}

int main(int argc, char **argv)
{
	if (argc == 3 && !strcmp(argv[1], "echo"))
		return echo(atoi(argv[2]));
	if (argc == 6 && !strcmp(argv[1], "client"))
		return client(atoi(argv[2]), atol(argv[3]), atoi(argv[4]), atoi(argv[5]));
	fprintf(stderr, "usage: storm echo PORT | storm client PORT TOTAL CONC SIZE\n");
	return 2;
}
