/* pump.h - output pump of the pyworker I/O core (pump.c).
 *
 * Like iocore.h, this file is both the C header and cffi cdef source: plain
 * declarations only (preprocessor lines are dropped for the cdef).
 *
 * A pump turns the bytes of one output stream of a command (stdout, stderr or
 * a PTY master) into TEXT frames for the executor pipe, exactly as the Python
 * path does: an incremental UTF-8 decoder with errors='replace' (CPython's
 * rules, including what it keeps back at the end of a chunk), then
 * pyworker.lines.LineSplitter.append on each chunk's text (NEWLINE_RE
 * normalisation over the unfinished tail + the new text, whole lines only,
 * lines of max_line_length characters or more cut into max_line_length - 1
 * character pieces), then one frame <IBBH (length, kind, channel, 0) + UTF-8
 * per chunk that completes at least one line.  Decoding, normalising and
 * splitting are one pass into the buffer that becomes the frame; the frame is
 * written with one write() (continued after partial writes and EINTR, and
 * after poll() if out_fd is non-blocking, so a slow reader blocks the pump).
 *
 * Return values: >= 0 on success, -errno for system errors, IOCORE_EARG
 * (iocore.h) for bad arguments, IOCORE_PUMP_EAGAIN when a read would block.
 * A pump is not thread-safe; distinct pumps may run in parallel.
 */
#ifndef PYWORKER_PUMP_H
#define PYWORKER_PUMP_H

#include <stdint.h>

enum {
    IOCORE_PUMP_EAGAIN = -10101,        /* read_from: no data now (EAGAIN) */
    IOCORE_PUMP_MAX_READ = 2097152,     /* largest max_bytes / feed slice */

    /* flags for iocore_pump_read / iocore_pump_feed */
    IOCORE_PUMP_DEFER = 1,   /* keep the frame until iocore_pump_send (or the next call) */
    IOCORE_PUMP_DISCARD = 2  /* read_from only: read and drop the bytes */
};

typedef struct iocore_pump iocore_pump;

/* New pump writing frames of `kind` on `channel` to out_fd; max_line_length
 * >= 2.  Returns 0 and *out, or a negative code. */
int iocore_pump_new(int out_fd, int kind, int channel, int64_t max_line_length,
                    iocore_pump **out);
void iocore_pump_free(iocore_pump *pump);

/* One read(2) of up to max_bytes from fd (a PTY master: further non-blocking
 * reads until EAGAIN, EIO or max_bytes), processed and sent as at most one
 * frame.  Returns the bytes read, 0 at EOF (EIO from a PTY is EOF),
 * IOCORE_PUMP_EAGAIN if nothing can be read now, or -errno.  A frame kept by
 * IOCORE_PUMP_DEFER earlier is sent first. */
int64_t iocore_pump_read(iocore_pump *pump, int fd, int64_t max_bytes, int flags);
/* Process len bytes given directly (as if read); len <= IOCORE_PUMP_MAX_READ. */
int iocore_pump_feed(iocore_pump *pump, const uint8_t *data, int64_t len, int flags);
/* End of input: the decoder's kept bytes become U+FFFD (one frame if that
 * completes lines).  Later reads start a new stream for the decoder. */
int iocore_pump_eof(iocore_pump *pump);
/* iocore_pump_eof, then the unfinished tail as a last line, as one frame. */
int iocore_pump_flush(iocore_pump *pump);
/* Send the frame kept by IOCORE_PUMP_DEFER (nothing if none). */
int iocore_pump_send(iocore_pump *pump);
/* \r\n, \r and \n (pyworker.lines.LINE_COUNT_RE) in the text decoded by the
 * last read/feed call. */
int64_t iocore_pump_newlines(const iocore_pump *pump);
/* Payload bytes of the frame kept by IOCORE_PUMP_DEFER (0 if none). */
int64_t iocore_pump_pending(const iocore_pump *pump);
/* Characters of the unfinished tail (always < max_line_length). */
int64_t iocore_pump_tail_chars(const iocore_pump *pump);
/* SIMD flavour of the plain-text scan for pumps created from now on:
 * level < 0 queries (the best one the CPU has, unless set), 0 = SSE2 /
 * portable C, 1 = AVX2; returns the level in effect (capped by the CPU). */
int iocore_pump_simd(int level);

#endif
