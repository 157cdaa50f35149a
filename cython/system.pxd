# POSIX socket and time declarations the nogil paths need.
from libc.stdint cimport uint8_t, uint16_t, uint32_t, uint64_t
from libc.string cimport memset

cdef extern from "<sys/uio.h>" nogil:
    pass

cdef extern from "<sys/socket.h>" nogil:
    ctypedef unsigned int socklen_t
    ctypedef unsigned short sa_family_t
    struct sockaddr:
        sa_family_t sa_family
    struct sockaddr_storage:
        sa_family_t ss_family
    struct linger:
        int l_onoff
        int l_linger
    int AF_INET, AF_INET6, SOCK_STREAM, SOCK_CLOEXEC, SOCK_NONBLOCK
    int SOL_SOCKET, SO_LINGER, SO_ERROR, SO_PEERNAME, SO_KEEPALIVE
    int SHUT_WR, SHUT_RDWR
    int MSG_NOSIGNAL, MSG_WAITALL, MSG_PEEK, MSG_TRUNC, MSG_DONTWAIT
    int SO_PEEK_OFF, SO_RCVBUF, SO_RCVLOWAT
    struct iovec:
        void *iov_base
        size_t iov_len
    struct msghdr:
        void *msg_name
        socklen_t msg_namelen
        iovec *msg_iov
        size_t msg_iovlen
        void *msg_control
        size_t msg_controllen
        int msg_flags
    int socket(int domain, int type, int protocol)
    int accept4(int fd, sockaddr *addr, socklen_t *len, int flags)
    int connect(int fd, const sockaddr *addr, socklen_t len)
    int getpeername(int fd, sockaddr *addr, socklen_t *len)
    int shutdown(int fd, int how)
    ssize_t recv(int fd, void *buf, size_t n, int flags)
    ssize_t send(int fd, const void *buf, size_t n, int flags)
    ssize_t sendmsg(int fd, const msghdr *msg, int flags)
    ssize_t recvmsg(int fd, msghdr *msg, int flags)
    int setsockopt(int fd, int level, int optname, const void *optval, socklen_t optlen)
    int getsockopt(int fd, int level, int optname, void *optval, socklen_t *optlen)
    int getsockname(int fd, sockaddr *addr, socklen_t *len)

cdef extern from "<netinet/in.h>" nogil:
    int IPPROTO_TCP
    struct in_addr:
        uint32_t s_addr
    struct sockaddr_in:
        sa_family_t sin_family
        uint16_t sin_port
        in_addr sin_addr
    struct in6_addr:
        unsigned char s6_addr[16]
    struct sockaddr_in6:
        sa_family_t sin6_family
        uint16_t sin6_port
        uint32_t sin6_flowinfo
        in6_addr sin6_addr
        uint32_t sin6_scope_id
    uint16_t htons(uint16_t)
    uint16_t ntohs(uint16_t)

cdef extern from "<netinet/tcp.h>" nogil:
    int TCP_NODELAY, TCP_KEEPIDLE, TCP_KEEPINTVL, TCP_KEEPCNT

cdef extern from "<arpa/inet.h>" nogil:
    int inet_pton(int af, const char *src, void *dst)
    const char *inet_ntop(int af, const void *src, char *dst, socklen_t size)
    int INET6_ADDRSTRLEN

cdef extern from "<time.h>" nogil:
    struct timespec:
        long tv_sec
        long tv_nsec
    int CLOCK_MONOTONIC, CLOCK_REALTIME
    int clock_gettime(int clk, timespec *tp)

cdef extern from "<unistd.h>" nogil:
    int close(int fd)
    int pipe2(int *fds, int flags)

# _GNU_SOURCE (Python.h defines it) exposes the pipe and splice constants.
cdef extern from "<fcntl.h>" nogil:
    int F_GETFL, F_SETFL, F_SETPIPE_SZ, F_GETPIPE_SZ, O_NONBLOCK, O_CLOEXEC
    unsigned SPLICE_F_NONBLOCK, SPLICE_F_MOVE
    int fcntl(int fd, int cmd, ...)
    ssize_t splice(int fd_in, void *off_in, int fd_out, void *off_out, size_t len, unsigned flags)

cdef extern from "<sys/ioctl.h>" nogil:
    int FIONREAD
    int ioctl(int fd, unsigned long request, ...)

cdef extern from "<poll.h>" nogil:
    unsigned POLLIN, POLLOUT, POLLERR, POLLHUP, POLLRDHUP, POLLNVAL
    struct pollfd:
        int fd
        short events
        short revents
    int poll(pollfd *fds, unsigned long nfds, int timeout)

cdef extern from "<sys/epoll.h>" nogil:
    unsigned EPOLLIN, EPOLLOUT, EPOLLERR, EPOLLHUP, EPOLLRDHUP, EPOLLET
    int EPOLL_CTL_ADD, EPOLL_CTL_DEL, EPOLL_CLOEXEC
    union epoll_data:
        int fd
        uint64_t u64
    struct epoll_event:
        uint32_t events
        epoll_data data
    int epoll_create1(int flags)
    int epoll_ctl(int epfd, int op, int fd, epoll_event *ev)
    int epoll_wait(int epfd, epoll_event *evs, int maxevents, int timeout)

cdef extern from "<errno.h>" nogil:
    int errno
    int EINTR, EAGAIN, ETIME, ENOBUFS, ECANCELED, ECONNREFUSED, ECONNRESET, EPIPE
    int EMFILE, ENFILE, ENOMEM, ETIMEDOUT, EINVAL, ENOTCONN, ENOENT, EALREADY
    int EHOSTUNREACH, ENETUNREACH, EPERM, ENOSYS, EOPNOTSUPP, EBUSY, EIO
    int EINPROGRESS, EISCONN, ECONNABORTED, EEXIST, EPROTO, EMSGSIZE

cdef extern from "<stdio.h>" nogil:
    int snprintf(char *buf, size_t size, const char *fmt, ...)

cdef extern from "<string.h>" nogil:
    size_t strlen(const char *s)
    int strcmp(const char *a, const char *b)
    int memcmp(const void *a, const void *b, size_t n)

cdef extern from "<stdint.h>" nogil:
    const long long INT64_MAX

cdef extern from "<stdlib.h>" nogil:
    void *malloc(size_t size)
    int posix_memalign(void **memptr, size_t alignment, size_t size)
    void free(void *p)
    void *calloc(size_t n, size_t size)
    void *realloc(void *p, size_t size)

cdef extern from "<sys/mman.h>" nogil:
    void *mmap(void *addr, size_t length, int prot, int flags, int fd, long offset)
    int munmap(void *addr, size_t length)
    void *MAP_FAILED
    int PROT_READ, PROT_WRITE, MAP_PRIVATE, MAP_ANONYMOUS, MAP_NORESERVE


# n bytes of zeroed address space, reserved, not committed (MAP_NORESERVE):
# a page costs memory once first written, so a table sized for a capacity
# (--max-conns, --max-buffers) costs memory for what is used. NULL if refused.
cdef inline void *reserve_zeroed(size_t n) noexcept nogil:
    cdef void *p = mmap(NULL, n, PROT_READ | PROT_WRITE,
                        MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0)
    return NULL if p == MAP_FAILED else p


# Grow the array *p of `old` elements of `size` bytes to `new`, the new ones
# zeroed. -1 (and *p as it was) when out of memory.
cdef inline int grow_zeroed(void **p, size_t size, size_t old, size_t new) noexcept nogil:
    cdef void *q = realloc(p[0], new * size)
    if q == NULL:
        return -1
    memset(<char *>q + old * size, 0, (new - old) * size)
    p[0] = q
    return 0
