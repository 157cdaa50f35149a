# PROXY protocol (--proxy-protocol v1|v2): the upstream learns the client's
# address from a header sent before any client byte, as HAProxy's
# proxy-protocol specification defines it (docs/configuration.md gives
# the layout). The header goes out with one send(2) on the upstream socket
# the moment its connect completes, before the flow's first data SQE is
# prepared, so nothing can overtake it. A freshly connected socket's send
# buffer is empty and a header is at most 108 bytes, so the send takes it
# whole; anything else fails the connect attempt (a retry may follow).

cdef enum:
    PP_MAX = 108             # v1's longest line (TCP6, two full addresses) is 104

cdef const char *PP2_SIG = b"\r\n\r\n\x00\r\nQUIT\n"    # 12 bytes

# The header for a connection from `src` to `dst` (the address the client
# connected to); its length, at most PP_MAX. Families other than the two
# (or two different ones) give v1's UNKNOWN and v2's UNSPEC: the upstream
# then uses the connection's own addresses, as the specification says.
cdef int pp_header(int version, sockaddr_storage *src, sockaddr_storage *dst,
                   char *out) noexcept nogil:
    cdef char sh[64]
    cdef char dh[64]
    cdef sockaddr_in *s4 = <sockaddr_in *>src
    cdef sockaddr_in *d4 = <sockaddr_in *>dst
    cdef sockaddr_in6 *s6 = <sockaddr_in6 *>src
    cdef sockaddr_in6 *d6 = <sockaddr_in6 *>dst
    cdef int fam = src.ss_family if src.ss_family == dst.ss_family else 0
    if fam != AF_INET and fam != AF_INET6:
        fam = 0
    if version == 1:
        if fam == 0:
            return snprintf(out, PP_MAX, b"PROXY UNKNOWN\r\n")
        if fam == AF_INET:
            inet_ntop(AF_INET, &s4.sin_addr, sh, sizeof(sh))
            inet_ntop(AF_INET, &d4.sin_addr, dh, sizeof(dh))
            return snprintf(out, PP_MAX, b"PROXY TCP4 %s %s %u %u\r\n", sh, dh,
                            <unsigned>ntohs(s4.sin_port), <unsigned>ntohs(d4.sin_port))
        inet_ntop(AF_INET6, &s6.sin6_addr, sh, sizeof(sh))
        inet_ntop(AF_INET6, &d6.sin6_addr, dh, sizeof(dh))
        return snprintf(out, PP_MAX, b"PROXY TCP6 %s %s %u %u\r\n", sh, dh,
                        <unsigned>ntohs(s6.sin6_port), <unsigned>ntohs(d6.sin6_port))
    # v2: signature, version 2 + command PROXY, family + protocol, length
    # (network order), then both addresses and both ports (network order).
    memcpy(out, PP2_SIG, 12)
    out[12] = <char>0x21
    if fam == AF_INET:
        out[13] = <char>0x11         # TCP over IPv4
        out[14] = 0
        out[15] = 12
        memcpy(out + 16, &s4.sin_addr, 4)
        memcpy(out + 20, &d4.sin_addr, 4)
        memcpy(out + 24, &s4.sin_port, 2)
        memcpy(out + 26, &d4.sin_port, 2)
        return 28
    if fam == AF_INET6:
        out[13] = <char>0x21         # TCP over IPv6
        out[14] = 0
        out[15] = 36
        memcpy(out + 16, &s6.sin6_addr, 16)
        memcpy(out + 32, &d6.sin6_addr, 16)
        memcpy(out + 48, &s6.sin6_port, 2)
        memcpy(out + 50, &d6.sin6_port, 2)
        return 52
    out[13] = 0                      # UNSPEC, no addresses
    out[14] = 0
    out[15] = 0
    return 16

# Send the flow's header to its upstream: 0, or the errno that failed it.
cdef int pp_send(Engine e, Flow *f) noexcept nogil:
    cdef char hdr[PP_MAX]
    cdef sockaddr_storage dst
    cdef socklen_t dlen = sizeof(dst)
    cdef int n
    cdef ssize_t sent
    memset(&dst, 0, sizeof(dst))
    if f.pp_dst.sin6_family != 0:
        # --accept-proxy: the address the client's own header said it reached.
        memcpy(&dst, &f.pp_dst, sizeof(sockaddr_in6))
    elif getsockname(f.fd[0], <sockaddr *>&dst, &dlen) != 0:
        memset(&dst, 0, sizeof(dst))
    n = pp_header(e.proxy_proto, &f.peer, &dst, hdr)
    sent = send(f.fd[1], hdr, n, MSG_DONTWAIT | MSG_NOSIGNAL)
    if sent == n:
        return 0
    return errno if sent < 0 else EAGAIN


def proxy_header(int version, src, dst):
    """The PROXY protocol header uring-proxy sends for a connection from
    `src` to `dst` ((host, port) pairs, numeric), as bytes: for tests and
    for anyone checking what their upstream will receive."""
    cdef sockaddr_storage s, d
    cdef char out[PP_MAX]
    if version not in (1, 2):
        raise ValueError("version must be 1 or 2")
    _fill_addr(&s, src)
    _fill_addr(&d, dst)
    return out[:pp_header(version, &s, &d, out)]


cdef _fill_addr(sockaddr_storage *ss, addr):
    host, port = addr
    hb = host.encode()
    memset(ss, 0, sizeof(sockaddr_storage))
    if ":" in host:
        (<sockaddr_in6 *>ss).sin6_family = AF_INET6
        (<sockaddr_in6 *>ss).sin6_port = htons(port)
        ok = inet_pton(AF_INET6, hb, &(<sockaddr_in6 *>ss).sin6_addr)
    else:
        (<sockaddr_in *>ss).sin_family = AF_INET
        (<sockaddr_in *>ss).sin_port = htons(port)
        ok = inet_pton(AF_INET, hb, &(<sockaddr_in *>ss).sin_addr)
    if ok != 1:
        raise ValueError(f"not a numeric address: {host!r}")


# --- receiving a header (--accept-proxy) --------------------------------------------
#
# A client behind another proxy sends the header first; the flow waits for it
# in F_HEADER before anything else happens (no upstream is chosen, no byte
# forwarded). The header is read with MSG_PEEK into the stack, parsed, and
# only a complete one is taken out of the socket, by exactly its length: the
# client's first bytes after it stay where they are for the data path.
#
# Waiting for more of a header must not spin: a socket that holds part of it
# is readable, so a poll would fire at once again. SO_RCVLOWAT is set to the
# bytes still needed (the kernel's poll says readable only from that many on,
# or on EOF or error), so each poll completion brings new bytes or an end. A
# completion with fewer bytes than asked for is therefore an end: the header
# was truncated. The flow's wheel entry bounds the wait (--proxy-header-timeout).

cdef enum:
    PP_IN_MAX = 528          # the longest header accepted: v2 with 512 bytes of TLVs
    PP_V1_MAX = 107          # v1: the specification's longest line, CRLF included

cdef inline bint pp_digits(const char *p, int n, uint32_t *out) noexcept nogil:
    # A port: 1-5 decimal digits, no leading zero, at most 65535.
    cdef int i
    cdef uint32_t v = 0
    if n < 1 or n > 5 or (n > 1 and p[0] == c'0'):
        return False
    for i in range(n):
        if p[i] < c'0' or p[i] > c'9':
            return False
        v = v * 10 + <uint32_t>(p[i] - c'0')
    out[0] = v
    return v <= 65535

cdef int pp_parse_v1(const uint8_t *b, int n, int *want, sockaddr_storage *src,
                     sockaddr_storage *dst) noexcept nogil:
    cdef const char *pre = b"PROXY "
    cdef char line[PP_V1_MAX + 1]
    cdef char *tok[6]
    cdef int ntok = 0, i, end = -1, fam
    cdef uint32_t sp, dp
    for i in range(min(n, 6)):
        if b[i] != <uint8_t>pre[i]:
            return -EPROTO
    for i in range(min(n, PP_V1_MAX)):
        if b[i] == c'\r':
            if i + 1 < n and b[i + 1] != c'\n':
                return -EPROTO
            if i + 1 < n:
                end = i
            break
        if b[i] < 0x20 or b[i] > 0x7e:
            return -EPROTO
    if end < 0:
        if n >= PP_V1_MAX:
            return -EMSGSIZE
        want[0] = n + 1
        return 0
    memcpy(line, b, end)
    line[end] = 0
    if end >= 13 and memcmp(line + 6, b"UNKNOWN", 7) == 0:
        return end + 2               # addresses not given: the connection's own hold
    # PROXY TCPx SRC DST SPORT DPORT, single spaces
    tok[0] = line
    for i in range(end):
        if line[i] == c' ':
            line[i] = 0
            if ntok == 5 or line[i + 1] == 0 or line[i + 1] == c' ':
                return -EPROTO
            ntok += 1
            tok[ntok] = line + i + 1
    if ntok != 5:
        return -EPROTO
    if strcmp(tok[1], b"TCP4") == 0:
        fam = AF_INET
    elif strcmp(tok[1], b"TCP6") == 0:
        fam = AF_INET6
    else:
        return -EPROTO
    if not pp_digits(tok[4], <int>strlen(tok[4]), &sp) or not pp_digits(tok[5], <int>strlen(tok[5]), &dp):
        return -EPROTO
    memset(src, 0, sizeof(sockaddr_storage))
    memset(dst, 0, sizeof(sockaddr_storage))
    if fam == AF_INET:
        (<sockaddr_in *>src).sin_family = AF_INET
        (<sockaddr_in *>dst).sin_family = AF_INET
        (<sockaddr_in *>src).sin_port = htons(<uint16_t>sp)
        (<sockaddr_in *>dst).sin_port = htons(<uint16_t>dp)
        if inet_pton(AF_INET, tok[2], &(<sockaddr_in *>src).sin_addr) != 1 \
                or inet_pton(AF_INET, tok[3], &(<sockaddr_in *>dst).sin_addr) != 1:
            return -EPROTO
    else:
        (<sockaddr_in6 *>src).sin6_family = AF_INET6
        (<sockaddr_in6 *>dst).sin6_family = AF_INET6
        (<sockaddr_in6 *>src).sin6_port = htons(<uint16_t>sp)
        (<sockaddr_in6 *>dst).sin6_port = htons(<uint16_t>dp)
        if inet_pton(AF_INET6, tok[2], &(<sockaddr_in6 *>src).sin6_addr) != 1 \
                or inet_pton(AF_INET6, tok[3], &(<sockaddr_in6 *>dst).sin6_addr) != 1:
            return -EPROTO
    return end + 2

cdef int pp_parse_v2(const uint8_t *b, int n, int *want, sockaddr_storage *src,
                     sockaddr_storage *dst) noexcept nogil:
    cdef int i, length, total
    for i in range(min(n, 12)):
        if b[i] != <uint8_t>PP2_SIG[i]:
            return -EPROTO
    if n < 16:
        want[0] = 16
        return 0
    if (b[12] >> 4) != 2 or (b[12] & 0xF) > 1:      # version 2; LOCAL or PROXY
        return -EPROTO
    length = (<int>b[14] << 8) | b[15]
    total = 16 + length
    if total > PP_IN_MAX:
        return -EMSGSIZE
    if (b[13] == 0x11 and length < 12) or (b[13] == 0x21 and length < 36):
        return -EPROTO
    if n < total:
        want[0] = total
        return 0
    if (b[12] & 0xF) == 1 and b[13] == 0x11:        # PROXY, TCP over IPv4
        memset(src, 0, sizeof(sockaddr_storage))
        memset(dst, 0, sizeof(sockaddr_storage))
        (<sockaddr_in *>src).sin_family = AF_INET
        (<sockaddr_in *>dst).sin_family = AF_INET
        memcpy(&(<sockaddr_in *>src).sin_addr, b + 16, 4)
        memcpy(&(<sockaddr_in *>dst).sin_addr, b + 20, 4)
        memcpy(&(<sockaddr_in *>src).sin_port, b + 24, 2)
        memcpy(&(<sockaddr_in *>dst).sin_port, b + 26, 2)
    elif (b[12] & 0xF) == 1 and b[13] == 0x21:      # PROXY, TCP over IPv6
        memset(src, 0, sizeof(sockaddr_storage))
        memset(dst, 0, sizeof(sockaddr_storage))
        (<sockaddr_in6 *>src).sin6_family = AF_INET6
        (<sockaddr_in6 *>dst).sin6_family = AF_INET6
        memcpy(&(<sockaddr_in6 *>src).sin6_addr, b + 16, 16)
        memcpy(&(<sockaddr_in6 *>dst).sin6_addr, b + 32, 16)
        memcpy(&(<sockaddr_in6 *>src).sin6_port, b + 48, 2)
        memcpy(&(<sockaddr_in6 *>dst).sin6_port, b + 50, 2)
    # LOCAL, UNSPEC, UDP or unix: no TCP addresses; the connection's own hold.
    return total

# > 0: a complete header of that length (src/dst filled, or family 0 when it
# carries none); 0: incomplete, *want bytes needed; < 0: -EPROTO (malformed)
# or -EMSGSIZE (longer than accepted).
cdef int pp_parse(const uint8_t *b, int n, int *want, sockaddr_storage *src,
                  sockaddr_storage *dst) noexcept nogil:
    src.ss_family = 0
    dst.ss_family = 0
    if n <= 0:
        want[0] = 1
        return 0
    if b[0] == c'P':
        return pp_parse_v1(b, n, want, src, dst)
    if b[0] == c'\r':
        return pp_parse_v2(b, n, want, src, dst)
    return -EPROTO

cdef void hdr_arm(Engine e, uint32_t slot, Flow *f) noexcept nogil:
    cdef io_uring_sqe *s = e.flow_sqe(slot, f, OP_HDRPOLL, 0)
    io_uring_prep_poll_add(s, f.fd[0], POLLIN | POLLRDHUP)

cdef void on_hdr_poll(Engine e, uint32_t slot, Flow *f, int res) noexcept nogil:
    cdef uint8_t buf[PP_IN_MAX]
    cdef sockaddr_storage src, dst
    cdef int want = 0, r, one = 1
    cdef ssize_t n
    if f.state != F_HEADER or res == -ECANCELED:
        return
    if res < 0:
        side_failed(e, f, 0, res)
        return
    n = recv(f.fd[0], buf, PP_IN_MAX, MSG_PEEK | MSG_DONTWAIT)
    if n < 0:
        if errno == EAGAIN or errno == EINTR:
            hdr_arm(e, slot, f)
        else:
            side_failed(e, f, 0, -errno)
        return
    r = pp_parse(buf, <int>n, &want, &src, &dst)
    if r == 0 and n < f.hdr_want:
        r = -ECONNABORTED           # woke with less than asked for: the client ended
    if r < 0:
        e.st.bad_headers += 1
        flow_fail(e, f, C_BAD_HEADER, -r, 0)
        return
    if r == 0:
        f.hdr_want = <uint16_t>want
        setsockopt(f.fd[0], SOL_SOCKET, SO_RCVLOWAT, &want, sizeof(int))
        hdr_arm(e, slot, f)
        return
    # Complete: take exactly the header out; what follows is the client's.
    if recv(f.fd[0], buf, r, MSG_DONTWAIT) != r:
        flow_fail(e, f, C_BAD_HEADER, EIO, 0)
        return
    if f.hdr_want > 1:
        setsockopt(f.fd[0], SOL_SOCKET, SO_RCVLOWAT, &one, sizeof(int))
    if src.ss_family == AF_INET or src.ss_family == AF_INET6:
        memcpy(&f.peer, &src, sizeof(sockaddr_storage))
        memcpy(&f.pp_dst, &dst, sizeof(sockaddr_in6))
    e.st.headers_accepted += 1
    e.tw.remove(slot)
    f.state = F_CONNECTING
    flow_begin(e, slot, f)


def parse_proxy_header(bytes data):
    """What --accept-proxy makes of `data`, the first bytes of a connection:
    ("ok", length, src, dst) with (host, port) pairs or None when the header
    carries no address; ("more", bytes needed, None, None); or ("error",
    errno name, None, None). For tests and for checking a sender."""
    cdef sockaddr_storage s, d
    cdef int want = 0
    cdef int r = pp_parse(<const uint8_t *>data, <int>len(data), &want, &s, &d)
    if r < 0:
        return ("error", "EPROTO" if r == -EPROTO else "EMSGSIZE", None, None)
    if r == 0:
        return ("more", want, None, None)
    if s.ss_family == 0:
        return ("ok", r, None, None)
    return ("ok", r, _addr_pair(&s), _addr_pair(&d))


cdef _addr_pair(sockaddr_storage *ss):
    cdef char host[64]
    if ss.ss_family == AF_INET:
        inet_ntop(AF_INET, &(<sockaddr_in *>ss).sin_addr, host, sizeof(host))
        return (host.decode(), ntohs((<sockaddr_in *>ss).sin_port))
    inet_ntop(AF_INET6, &(<sockaddr_in6 *>ss).sin6_addr, host, sizeof(host))
    return (host.decode(), ntohs((<sockaddr_in6 *>ss).sin6_port))
