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
    if getsockname(f.fd[0], <sockaddr *>&dst, &dlen) != 0:
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
