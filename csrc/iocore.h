/* iocore.h - public C interface of the pyworker I/O core.
 *
 * This file is both the C header and the cffi cdef source: the build script
 * (pyworker/iocore/_build.py) feeds it to ffibuilder.cdef() after dropping
 * every preprocessor line, so keep it to plain declarations (no macros,
 * no inline code).  Every function returns a value >= 0 on success and a
 * negative number on failure: -errno for system errors, or one of the
 * IOCORE_E* codes below.  The binding layer (pyworker/iocore/_c.py) turns
 * these into Python exceptions.  All functions are reentrant (no global
 * state except the feature mask); a single iocore_tar must not be used by
 * two threads at once.
 */
#ifndef PYWORKER_IOCORE_H
#define PYWORKER_IOCORE_H

#include <stddef.h>
#include <stdint.h>

enum {
    /* library-specific error codes (errno values are all < 4096) */
    IOCORE_EEOF = -10001,      /* pipe reached end of file early */
    IOCORE_ESAMEFILE = -10002, /* copy_file source and destination are the same */
    IOCORE_EZLIB = -10003,     /* zlib reported an error */
    IOCORE_EBZ2 = -10004,      /* libbz2 reported an error */
    IOCORE_EARG = -10005,      /* invalid argument */

    /* compression kinds for iocore_tar_open */
    IOCORE_COMPRESS_NONE = 0,
    IOCORE_COMPRESS_GZ = 1,
    IOCORE_COMPRESS_BZ2 = 2,

    /* feature flags (iocore_features / iocore_set_features) */
    IOCORE_FEAT_SPLICE = 1,
    IOCORE_FEAT_COPY_FILE_RANGE = 2,
    IOCORE_FEAT_SENDFILE = 4
};

/* Features compiled in and currently enabled (bit mask of IOCORE_FEAT_*). */
int iocore_features(void);
/* Restrict the enabled features to mask & compiled-in ones (for tests);
 * returns the resulting mask. */
int iocore_set_features(int mask);

/* ---- chunked copy helpers (copy.c) ---- */

/* Read up to `count` bytes from src_fd (current offset) and write them to
 * out_fd as frames: 8-byte header <IBBH (length, kind, channel, 0) followed
 * by at most frame_max payload bytes.  Returns the payload bytes sent. */
int64_t iocore_send_file_frames(int src_fd, int out_fd, int kind, int channel,
                                int64_t count, int64_t frame_max);
/* Move exactly `count` bytes from in_fd (a pipe) to dst_fd (a file). */
int64_t iocore_recv_to_file(int in_fd, int dst_fd, int64_t count);
/* Copy the file src_path to dst_path (created/truncated), preserving mode.
 * On failure *which is set to 1 if src_path failed, 2 if dst_path did. */
int iocore_copy_file(const char *src_path, const char *dst_path, int *which);

/* ---- streaming tar writer (tar.c) ---- */

typedef struct iocore_tar iocore_tar;

/* Start archiving the tree at `root`.  compress is IOCORE_COMPRESS_*,
 * level the compression level, gzip_mtime the gzip header time (-1: now).
 * On failure returns a negative code and, if *out is not NULL, a stream
 * holding the error details (iocore_tar_errpath) that must still be freed. */
int iocore_tar_open(const char *root, int compress, int level, int64_t gzip_mtime,
                    iocore_tar **out);
/* Produce up to max bytes of the archive into buf; fills buf completely
 * except at the end.  Returns the byte count, 0 at the end, <0 on error. */
int64_t iocore_tar_read(iocore_tar *tar, uint8_t *buf, int64_t max);
/* Path involved in the last error (empty string if none). */
const char *iocore_tar_errpath(iocore_tar *tar);
void iocore_tar_free(iocore_tar *tar);

#endif
