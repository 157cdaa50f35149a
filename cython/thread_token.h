/* A number per thread, never given to another thread of the process.
 *
 * PollSet needs to know whether the thread calling it is the one its ring
 * belongs to (SINGLE_ISSUER, and a registered ring fd, tie the ring to the
 * thread that set it up). pthread_self() and the kernel's thread id are
 * both reused: a thread that exits leaves its pthread_self() value to the
 * next one started, which would then use a dead thread's ring (EINVAL).
 * A thread-local number drawn from a process-wide counter is not reused.
 * Called with the GIL held, which serialises the counter. */
#ifndef URING_NET_THREAD_TOKEN_H
#define URING_NET_THREAD_TOKEN_H

static __thread unsigned long long un_thread_token_value;
static unsigned long long un_thread_tokens_given;

static inline unsigned long long un_thread_token(void)
{
    if (!un_thread_token_value)
        un_thread_token_value = ++un_thread_tokens_given;
    return un_thread_token_value;
}

#endif
