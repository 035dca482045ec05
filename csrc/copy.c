/* copy.c - chunked copy helpers: file -> framed pipe records, pipe -> file,
 * file -> file.  Uses splice / copy_file_range / sendfile where compiled in
 * and enabled (feature flags), read/write otherwise.  Every syscall result
 * is checked; EINTR is retried, partial writes are continued, EAGAIN on a
 * non-blocking descriptor waits with poll().  Errors are returned as -errno. */
#define _GNU_SOURCE
#include "iocore.h"

#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/types.h>
#include <unistd.h>

#ifdef __linux__
#include <sys/sendfile.h>
#define IOCORE_HAVE_SPLICE 1
#define IOCORE_HAVE_SENDFILE 1
#if defined(__GLIBC__) && (__GLIBC__ > 2 || (__GLIBC__ == 2 && __GLIBC_MINOR__ >= 27))
#define IOCORE_HAVE_COPY_FILE_RANGE 1
#endif
#endif

#define FRAME_HDR 8
#define RW_BUF (256 * 1024)
#define SPLICE_CHUNK (1024 * 1024)

static int compiled_features(void)
{
    int f = 0;
#ifdef IOCORE_HAVE_SPLICE
    f |= IOCORE_FEAT_SPLICE;
#endif
#ifdef IOCORE_HAVE_COPY_FILE_RANGE
    f |= IOCORE_FEAT_COPY_FILE_RANGE;
#endif
#ifdef IOCORE_HAVE_SENDFILE
    f |= IOCORE_FEAT_SENDFILE;
#endif
    return f;
}

static atomic_int enabled_features = -1;

int iocore_features(void)
{
    int f = atomic_load(&enabled_features);
    return f < 0 ? compiled_features() : f;
}

int iocore_set_features(int mask)
{
    int f = mask & compiled_features();
    atomic_store(&enabled_features, f);
    return f;
}

/* Wait until fd is ready for `events` (used when a descriptor is O_NONBLOCK). */
static int wait_fd(int fd, short events)
{
    struct pollfd p;
    p.fd = fd;
    p.events = events;
    p.revents = 0;
    for (;;) {
        int r = poll(&p, 1, -1);
        if (r >= 0)
            return 0;
        if (errno != EINTR)
            return -errno;
    }
}

static int write_all(int fd, const void *buf, size_t len)
{
    const char *p = buf;
    while (len > 0) {
        ssize_t w = write(fd, p, len);
        if (w < 0) {
            if (errno == EINTR)
                continue;
            if (errno == EAGAIN || errno == EWOULDBLOCK) {
                int r = wait_fd(fd, POLLOUT);
                if (r < 0)
                    return r;
                continue;
            }
            return -errno;
        }
        p += w;
        len -= (size_t)w;
    }
    return 0;
}

/* One read(), retried on EINTR/EAGAIN; returns bytes (0 = EOF) or -errno. */
static ssize_t read_some(int fd, void *buf, size_t len)
{
    for (;;) {
        ssize_t r = read(fd, buf, len);
        if (r >= 0)
            return r;
        if (errno == EINTR)
            continue;
        if (errno == EAGAIN || errno == EWOULDBLOCK) {
            int w = wait_fd(fd, POLLIN);
            if (w < 0)
                return w;
            continue;
        }
        return -errno;
    }
}

static void put_frame_header(uint8_t *h, uint32_t len, int kind, int channel)
{
    h[0] = (uint8_t)(len & 0xff);
    h[1] = (uint8_t)((len >> 8) & 0xff);
    h[2] = (uint8_t)((len >> 16) & 0xff);
    h[3] = (uint8_t)((len >> 24) & 0xff);
    h[4] = (uint8_t)kind;
    h[5] = (uint8_t)channel;
    h[6] = 0;
    h[7] = 0;
}

/* read/write path: read the payload right behind the header space, then one
 * write() of header + payload per frame. */
static int64_t frames_rw(int src_fd, int out_fd, int kind, int channel, int64_t count,
                         int64_t frame_max)
{
    int64_t want_buf = frame_max < count ? frame_max : count;
    uint8_t *buf = malloc((size_t)want_buf + FRAME_HDR);
    int64_t sent = 0;
    if (buf == NULL)
        return -ENOMEM;
    while (sent < count) {
        int64_t want = count - sent < frame_max ? count - sent : frame_max;
        int64_t got = 0;
        int eof = 0;
        while (got < want) {
            ssize_t r = read_some(src_fd, buf + FRAME_HDR + got, (size_t)(want - got));
            if (r < 0) {
                free(buf);
                return r;
            }
            if (r == 0) {
                eof = 1;
                break;
            }
            got += r;
        }
        if (got > 0) {
            int w;
            put_frame_header(buf, (uint32_t)got, kind, channel);
            w = write_all(out_fd, buf, (size_t)got + FRAME_HDR);
            if (w < 0) {
                free(buf);
                return w;
            }
            sent += got;
        }
        if (eof)
            break;
    }
    free(buf);
    return sent;
}

#ifdef IOCORE_HAVE_SPLICE
/* splice one direction, retrying EINTR and waiting on EAGAIN. */
static ssize_t splice_some(int in, int out, size_t len)
{
    for (;;) {
        ssize_t r = splice(in, NULL, out, NULL, len, SPLICE_F_MOVE);
        if (r >= 0)
            return r;
        if (errno == EINTR)
            continue;
        if (errno == EAGAIN) {
            /* either side may be non-blocking: wait for both to be ready */
            int w = wait_fd(in, POLLIN);
            if (w == 0)
                w = wait_fd(out, POLLOUT);
            if (w < 0)
                return w;
            continue;
        }
        return -errno;
    }
}

/* Zero-copy path: splice the payload from the file into a private pipe
 * first (so its exact length is known), then write the header and splice
 * the private pipe into out_fd.  The private pipe is sized for a whole frame
 * plus two pages (page-cache splices fill one pipe slot per page touched);
 * should it still fill up, the rest of the frame is read() into a buffer,
 * so frames never depend on the path taken.  Returns -EINVAL before
 * consuming anything if src_fd cannot be spliced or the pipe cannot be made
 * big enough, so the caller can fall back to read/write. */
static int64_t frames_splice(int src_fd, int out_fd, int kind, int channel, int64_t count,
                             int64_t frame_max)
{
    int p[2];
    int64_t sent = 0;
    int64_t cap, need;
    long page = sysconf(_SC_PAGESIZE);
    uint8_t *tail = NULL;
    int rc = 0;
    if (page <= 0)
        page = 4096;
    need = (frame_max < count ? frame_max : count) + 2 * page;
    if (need > SPLICE_CHUNK)
        return -EINVAL;
    if (pipe2(p, O_CLOEXEC) < 0)
        return -errno;
    cap = fcntl(p[1], F_GETPIPE_SZ);
    if (cap >= 0 && cap < need) {
        int r = fcntl(p[1], F_SETPIPE_SZ, (int)need);
        if (r > 0)
            cap = r;
    }
    if (cap < need) {
        rc = -EINVAL;
        goto out;
    }
    while (sent < count) {
        int64_t want = count - sent;
        int64_t got = 0, moved = 0, tail_len = 0;
        int eof = 0;
        uint8_t hdr[FRAME_HDR];
        if (want > frame_max)
            want = frame_max;
        while (got < want) {
            ssize_t r = splice(src_fd, NULL, p[1], NULL, (size_t)(want - got),
                               SPLICE_F_MOVE | SPLICE_F_NONBLOCK);
            if (r < 0 && errno == EINTR)
                continue;
            if (r < 0 && errno == EAGAIN && got == 0) {
                /* the private pipe is empty here: the source (a pipe) has no data yet */
                int w = wait_fd(src_fd, POLLIN);
                if (w < 0) {
                    rc = w;
                    goto out;
                }
                continue;
            }
            if (r < 0 && errno == EAGAIN) {
                /* private pipe full: read the rest of this frame */
                if (tail == NULL && (tail = malloc((size_t)frame_max)) == NULL) {
                    rc = -ENOMEM;
                    goto out;
                }
                while (got + tail_len < want) {
                    ssize_t n = read_some(src_fd, tail + tail_len, (size_t)(want - got - tail_len));
                    if (n < 0) {
                        rc = (int)n;
                        goto out;
                    }
                    if (n == 0) {
                        eof = 1;
                        break;
                    }
                    tail_len += n;
                }
                break;
            }
            if (r < 0) {
                rc = (sent == 0 && got == 0 && errno == EINVAL) ? -EINVAL : -errno;
                goto out;
            }
            if (r == 0) {
                eof = 1;
                break;
            }
            got += r;
        }
        if (got + tail_len > 0) {
            put_frame_header(hdr, (uint32_t)(got + tail_len), kind, channel);
            rc = write_all(out_fd, hdr, FRAME_HDR);
            if (rc < 0)
                goto out;
            while (moved < got) {
                ssize_t r = splice_some(p[0], out_fd, (size_t)(got - moved));
                if (r <= 0) {
                    rc = r < 0 ? (int)r : -EIO;
                    goto out;
                }
                moved += r;
            }
            if (tail_len > 0) {
                rc = write_all(out_fd, tail, (size_t)tail_len);
                if (rc < 0)
                    goto out;
            }
            sent += got + tail_len;
        }
        if (eof)
            break;
    }
out:
    free(tail);
    close(p[0]);
    close(p[1]);
    return rc < 0 ? rc : sent;
}
#endif

int64_t iocore_send_file_frames(int src_fd, int out_fd, int kind, int channel, int64_t count,
                                int64_t frame_max)
{
    if (kind < 0 || kind > 255 || channel < 0 || channel > 255 || count < 0 || frame_max < 1 ||
        frame_max > (int64_t)UINT32_MAX)
        return IOCORE_EARG;
    if (count == 0)
        return 0;
#ifdef IOCORE_HAVE_SPLICE
    if (iocore_features() & IOCORE_FEAT_SPLICE) {
        struct stat st;
        if (fstat(out_fd, &st) < 0)
            return -errno;
        if (S_ISFIFO(st.st_mode)) {
            int64_t r = frames_splice(src_fd, out_fd, kind, channel, count, frame_max);
            if (r != -EINVAL)
                return r;
        }
    }
#endif
    return frames_rw(src_fd, out_fd, kind, channel, count, frame_max);
}

static int64_t recv_rw(int in_fd, int dst_fd, int64_t count, int64_t done)
{
    size_t bufsize = count - done < RW_BUF ? (size_t)(count - done) : RW_BUF;
    uint8_t *buf = malloc(bufsize);
    if (buf == NULL)
        return -ENOMEM;
    while (done < count) {
        size_t want = count - done < (int64_t)bufsize ? (size_t)(count - done) : bufsize;
        ssize_t r = read_some(in_fd, buf, want);
        int w;
        if (r <= 0) {
            free(buf);
            return r < 0 ? r : IOCORE_EEOF;
        }
        w = write_all(dst_fd, buf, (size_t)r);
        if (w < 0) {
            free(buf);
            return w;
        }
        done += r;
    }
    free(buf);
    return done;
}

int64_t iocore_recv_to_file(int in_fd, int dst_fd, int64_t count)
{
    int64_t done = 0;
    if (count < 0)
        return IOCORE_EARG;
    if (count == 0)
        return 0;
#ifdef IOCORE_HAVE_SPLICE
    if (iocore_features() & IOCORE_FEAT_SPLICE) {
        while (done < count) {
            size_t want = count - done < SPLICE_CHUNK ? (size_t)(count - done) : SPLICE_CHUNK;
            ssize_t r = splice_some(in_fd, dst_fd, want);
            if (r == -EINVAL && done == 0)
                break; /* e.g. O_APPEND destination: fall back */
            if (r < 0)
                return r;
            if (r == 0)
                return IOCORE_EEOF;
            done += r;
        }
        if (done == count)
            return done;
    }
#endif
    return recv_rw(in_fd, dst_fd, count, done);
}

static int copy_rw(int src, int dst, int *which)
{
    uint8_t *buf = malloc(RW_BUF);
    if (buf == NULL)
        return -ENOMEM;
    for (;;) {
        ssize_t r = read_some(src, buf, RW_BUF);
        int w;
        if (r <= 0) {
            free(buf);
            *which = 1;
            return (int)r;
        }
        w = write_all(dst, buf, (size_t)r);
        if (w < 0) {
            free(buf);
            *which = 2;
            return w;
        }
    }
}

/* Kernel-side copy; returns 1 if done, 0 to fall back, <0 on error.
 * *which is set to 1/2 for errors attributable to the source/destination. */
static int copy_kernel(int src, int dst, const struct stat *st, int *which)
{
    int64_t copied = 0;
    (void)st;
#ifdef IOCORE_HAVE_COPY_FILE_RANGE
    if (iocore_features() & IOCORE_FEAT_COPY_FILE_RANGE) {
        for (;;) {
            ssize_t r = copy_file_range(src, NULL, dst, NULL, (size_t)1 << 30, 0);
            if (r < 0) {
                if (errno == EINTR)
                    continue;
                if (copied == 0 && (errno == EXDEV || errno == ENOSYS || errno == EINVAL ||
                                    errno == EOPNOTSUPP || errno == EPERM || errno == EBADF))
                    break; /* try sendfile */
                *which = 2;
                return -errno;
            }
            if (r == 0) {
                /* pseudo files report size 0 but have content: fall back */
                if (copied == 0 && st->st_size == 0)
                    return 0;
                return 1;
            }
            copied += r;
        }
    }
#endif
#ifdef IOCORE_HAVE_SENDFILE
    if (iocore_features() & IOCORE_FEAT_SENDFILE) {
        for (;;) {
            ssize_t r = sendfile(dst, src, NULL, (size_t)1 << 30);
            if (r < 0) {
                if (errno == EINTR)
                    continue;
                if (copied == 0 && (errno == EINVAL || errno == ENOSYS))
                    return 0;
                *which = 2;
                return -errno;
            }
            if (r == 0) {
                if (copied == 0 && st->st_size == 0)
                    return 0;
                return 1;
            }
            copied += r;
        }
    }
#endif
    return 0;
}

int iocore_copy_file(const char *src_path, const char *dst_path, int *which)
{
    struct stat st, dst_st;
    int src, dst, rc;
    *which = 1;
    src = open(src_path, O_RDONLY | O_CLOEXEC);
    if (src < 0)
        return -errno;
    if (fstat(src, &st) < 0) {
        rc = -errno;
        close(src);
        return rc;
    }
    if (S_ISDIR(st.st_mode)) {
        close(src);
        return -EISDIR;
    }
    if (stat(dst_path, &dst_st) == 0 && dst_st.st_dev == st.st_dev &&
        dst_st.st_ino == st.st_ino) {
        close(src);
        return IOCORE_ESAMEFILE;
    }
    *which = 2;
    dst = open(dst_path, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0666);
    if (dst < 0) {
        rc = -errno;
        close(src);
        return rc;
    }
    rc = copy_kernel(src, dst, &st, which);
    if (rc == 0)
        rc = copy_rw(src, dst, which);
    if (rc >= 0)
        *which = 2;
    if (rc >= 0 && fchmod(dst, st.st_mode & 07777) < 0)
        rc = -errno;
    if (close(dst) < 0 && rc >= 0)
        rc = -errno;
    close(src);
    return rc < 0 ? rc : 0;
}
