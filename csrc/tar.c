/* tar.c - streaming tar writer (PAX format, byte-compatible with Python's
 * tarfile `add(root, arcname='')` in modes 'w', 'w|gz' and 'w|bz2').
 *
 * The archive is produced incrementally: a stack of sorted directory
 * listings, one open file at a time and a small staging buffer; zlib / libbz2
 * compress in the same pass.  Rules mirrored from tarfile (CPython 3.11):
 *  - every member gets a PAX 'x' header, since tarfile stores st_mtime (a
 *    float) as a PAX "mtime" record using Python's repr of the float;
 *  - path/linkpath/uname/gname go to PAX records when non-ASCII or too long;
 *    uid/gid/size when they overflow the octal fields;
 *  - "hdrcharset=BINARY" when a PAX string is not valid UTF-8;
 *  - directories get a trailing '/', the root is named "/";
 *  - entries sorted like Python's sorted() on surrogate-escaped str names;
 *  - hard links (st_nlink > 1) after the first become LNKTYPE members;
 *  - sockets are skipped; 2 zero blocks then padding to 10240 bytes.
 * Races: an entry that vanishes before lstat() is skipped, a directory that
 * vanishes before it is listed is stored empty, a regular file that
 * vanishes or shrinks is padded with zeros to the size in its header
 * (like GNU tar), a file that grows is cut at that size. */
#define _GNU_SOURCE
#include "iocore.h"

#include <bzlib.h>
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <grp.h>
#include <math.h>
#include <pwd.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/sysmacros.h>
#include <sys/types.h>
#include <time.h>
#include <unistd.h>
#include <zlib.h>

#define BLOCK 512
#define RECORD (20 * BLOCK)
#define RAW_CAP (64 * 1024)
#define NAMECACHE 8

enum { ST_ENTRY, ST_DATA, ST_TRAILER, ST_FINISH, ST_DONE, ST_ERROR };

typedef struct {
    char **names;
    size_t count, idx;
    size_t path_len, arc_len;
} dirframe;

typedef struct {
    uint32_t id;
    int valid;
    char name[256];
} namecache;

typedef struct {
    dev_t dev;
    ino_t ino;
    char *arc; /* NULL: empty slot */
} linkslot;

typedef struct {
    char *p;
    size_t len, cap;
} strbuf;

struct iocore_tar {
    int compress;
    int state;
    int err;
    strbuf path, arc, errpath;
    dirframe *stack;
    size_t depth, stack_cap;
    /* staging buffer of uncompressed tar bytes */
    uint8_t *raw;
    size_t raw_len, raw_pos, raw_cap;
    /* compressed-side bytes not yet handed out (gzip header / trailer) */
    uint8_t side[32];
    size_t side_len, side_pos;
    /* current regular file */
    int fd;
    int zero_fill; /* file vanished or shrank: emit zeros */
    uint64_t data_left;
    size_t pad_after;
    uint64_t total; /* raw tar bytes produced */
    /* compression */
    z_stream z;
    bz_stream bz;
    int comp_ready;
    uLong crc;
    uint64_t isize;
    /* lookups */
    namecache users[NAMECACHE], groups[NAMECACHE];
    size_t users_next, groups_next;
    linkslot *links;
    size_t links_cap, links_used;
};

/* ------------------------------------------------------------------ */
/* small helpers                                                       */

static int sb_reserve(strbuf *b, size_t need)
{
    if (need + 1 <= b->cap)
        return 0;
    size_t cap = b->cap ? b->cap : 256;
    while (cap < need + 1)
        cap *= 2;
    char *p = realloc(b->p, cap);
    if (p == NULL)
        return -ENOMEM;
    b->p = p;
    b->cap = cap;
    return 0;
}

static int sb_set(strbuf *b, const char *s, size_t n)
{
    if (sb_reserve(b, n) < 0)
        return -ENOMEM;
    memcpy(b->p, s, n);
    b->len = n;
    b->p[n] = '\0';
    return 0;
}

static int sb_append(strbuf *b, const char *s, size_t n)
{
    if (sb_reserve(b, b->len + n) < 0)
        return -ENOMEM;
    memcpy(b->p + b->len, s, n);
    b->len += n;
    b->p[b->len] = '\0';
    return 0;
}

static void sb_truncate(strbuf *b, size_t n)
{
    b->len = n;
    if (b->p)
        b->p[n] = '\0';
}

/* Length of the valid UTF-8 sequence at s (Python's strict decoder rules),
 * 0 if the first byte does not start one.  *cp receives the code point. */
static size_t utf8_seq(const unsigned char *s, size_t n, uint32_t *cp)
{
    unsigned char c = s[0];
    size_t len;
    unsigned char lo = 0x80, hi = 0xBF;
    if (c < 0x80) {
        *cp = c;
        return 1;
    }
    if (c >= 0xC2 && c <= 0xDF)
        len = 2;
    else if (c >= 0xE0 && c <= 0xEF) {
        len = 3;
        if (c == 0xE0)
            lo = 0xA0;
        else if (c == 0xED)
            hi = 0x9F;
    } else if (c >= 0xF0 && c <= 0xF4) {
        len = 4;
        if (c == 0xF0)
            lo = 0x90;
        else if (c == 0xF4)
            hi = 0x8F;
    } else
        return 0;
    if (n < len || s[1] < lo || s[1] > hi)
        return 0;
    for (size_t i = 2; i < len; i++)
        if (s[i] < 0x80 || s[i] > 0xBF)
            return 0;
    if (len == 2)
        *cp = ((uint32_t)(c & 0x1F) << 6) | (s[1] & 0x3F);
    else if (len == 3)
        *cp = ((uint32_t)(c & 0x0F) << 12) | ((uint32_t)(s[1] & 0x3F) << 6) | (s[2] & 0x3F);
    else
        *cp = ((uint32_t)(c & 0x07) << 18) | ((uint32_t)(s[1] & 0x3F) << 12) |
              ((uint32_t)(s[2] & 0x3F) << 6) | (s[3] & 0x3F);
    return len;
}

/* Next code point as Python sees it with surrogateescape decoding. */
static size_t next_cp(const unsigned char *s, size_t n, uint32_t *cp)
{
    size_t l = utf8_seq(s, n, cp);
    if (l == 0) {
        *cp = 0xDC00u + s[0];
        l = 1;
    }
    return l;
}

static int valid_utf8(const char *s, size_t n)
{
    const unsigned char *u = (const unsigned char *)s;
    size_t i = 0;
    uint32_t cp;
    while (i < n) {
        size_t l = utf8_seq(u + i, n - i, &cp);
        if (l == 0)
            return 0;
        i += l;
    }
    return 1;
}

static int is_ascii(const char *s, size_t n)
{
    for (size_t i = 0; i < n; i++)
        if ((unsigned char)s[i] >= 0x80)
            return 0;
    return 1;
}

static int cmp_pynames(const void *a, const void *b)
{
    const unsigned char *x = *(const unsigned char *const *)a;
    const unsigned char *y = *(const unsigned char *const *)b;
    size_t nx = strlen((const char *)x), ny = strlen((const char *)y);
    size_t i = 0, j = 0;
    while (i < nx && j < ny) {
        uint32_t cx, cy;
        i += next_cp(x + i, nx - i, &cx);
        j += next_cp(y + j, ny - j, &cy);
        if (cx != cy)
            return cx < cy ? -1 : 1;
    }
    if (i < nx)
        return 1;
    if (j < ny)
        return -1;
    return 0;
}

/* tarfile's stn(s, length, "ascii", "replace"): one '?' per non-ASCII code
 * point, truncated to `length`, NUL padded. */
static void put_str(uint8_t *field, size_t length, const char *s, size_t n)
{
    const unsigned char *u = (const unsigned char *)s;
    size_t i = 0, o = 0;
    memset(field, 0, length);
    while (i < n && o < length) {
        uint32_t cp;
        size_t l = next_cp(u + i, n - i, &cp);
        field[o++] = cp < 0x80 ? (uint8_t)cp : (uint8_t)'?';
        i += l;
    }
}

/* tarfile's itn() for values known to fit: "%0*o" + NUL. */
static void put_oct(uint8_t *field, size_t digits, uint64_t v)
{
    char tmp[32];
    snprintf(tmp, sizeof tmp, "%0*llo", (int)(digits - 1), (unsigned long long)v);
    memcpy(field, tmp, digits - 1);
    field[digits - 1] = 0;
}

/* Python's repr(float) (shortest round-trip digits, 'r' format rules). */
static void py_float_repr(double v, char *out, size_t outsz)
{
    char tmp[64], digits[32];
    int exp10 = 0, nd = 0, neg = 0;
    size_t o = 0;
    if (v == 0.0) {
        snprintf(out, outsz, "%s", signbit(v) ? "-0.0" : "0.0");
        return;
    }
    for (int prec = 1; prec <= 17; prec++) {
        snprintf(tmp, sizeof tmp, "%.*e", prec - 1, v);
        if (strtod(tmp, NULL) == v)
            break;
    }
    /* tmp: [-]d[.ddd]e[+-]XX */
    {
        const char *p = tmp;
        if (*p == '-') {
            neg = 1;
            p++;
        }
        while (*p && *p != 'e') {
            if (*p != '.')
                digits[nd++] = *p;
            p++;
        }
        exp10 = atoi(p + 1);
    }
    while (nd > 1 && digits[nd - 1] == '0')
        nd--;
    digits[nd] = '\0';
    if (neg)
        out[o++] = '-';
    int decpt = exp10 + 1;
    if (decpt > -4 && decpt <= 16) {
        if (decpt <= 0) {
            out[o++] = '0';
            out[o++] = '.';
            for (int i = 0; i < -decpt; i++)
                out[o++] = '0';
            for (int i = 0; i < nd; i++)
                out[o++] = digits[i];
        } else {
            for (int i = 0; i < decpt; i++)
                out[o++] = i < nd ? digits[i] : '0';
            out[o++] = '.';
            if (nd > decpt)
                for (int i = decpt; i < nd; i++)
                    out[o++] = digits[i];
            else
                out[o++] = '0';
        }
        out[o] = '\0';
    } else {
        out[o++] = digits[0];
        if (nd > 1) {
            out[o++] = '.';
            for (int i = 1; i < nd; i++)
                out[o++] = digits[i];
        }
        snprintf(out + o, outsz - o, "e%c%02d", exp10 < 0 ? '-' : '+', abs(exp10));
    }
}

/* ------------------------------------------------------------------ */
/* staging buffer                                                      */

static int raw_reserve(iocore_tar *t, size_t extra)
{
    if (t->raw_len + extra <= t->raw_cap)
        return 0;
    size_t cap = t->raw_cap;
    while (cap < t->raw_len + extra)
        cap *= 2;
    uint8_t *p = realloc(t->raw, cap);
    if (p == NULL)
        return -ENOMEM;
    t->raw = p;
    t->raw_cap = cap;
    return 0;
}

static int raw_zeros(iocore_tar *t, size_t n)
{
    if (raw_reserve(t, n) < 0)
        return -ENOMEM;
    memset(t->raw + t->raw_len, 0, n);
    t->raw_len += n;
    t->total += n;
    return 0;
}

/* ------------------------------------------------------------------ */
/* headers                                                             */

static void finish_block(uint8_t *b)
{
    unsigned sum = 0;
    char tmp[8];
    memcpy(b + 148, "        ", 8);
    for (int i = 0; i < BLOCK; i++)
        sum += b[i];
    snprintf(tmp, sizeof tmp, "%06o", sum & 0777777u);
    memcpy(b + 148, tmp, 6);
    b[154] = 0;
    b[155] = ' ';
}

typedef struct {
    const char *name;
    size_t name_len;
    const char *link;
    size_t link_len;
    const char *uname, *gname;
    uint32_t mode, uid, gid;
    uint64_t size;
    double mtime;
    char type;
    int has_dev;
    unsigned int devmajor, devminor;
} entryinfo;

static size_t ndigits(size_t v)
{
    size_t d = 1;
    while (v >= 10) {
        v /= 10;
        d++;
    }
    return d;
}

/* Append one "%d key=value\n" record (length includes itself). */
static int pax_record(strbuf *rec, const char *key, const char *val, size_t vlen)
{
    size_t l = strlen(key) + vlen + 3, p = 0, n;
    char num[32];
    for (;;) {
        n = l + ndigits(p);
        if (n == p)
            break;
        p = n;
    }
    snprintf(num, sizeof num, "%zu ", p);
    if (sb_append(rec, num, strlen(num)) < 0 || sb_append(rec, key, strlen(key)) < 0 ||
        sb_append(rec, "=", 1) < 0 || sb_append(rec, val, vlen) < 0 ||
        sb_append(rec, "\n", 1) < 0)
        return -ENOMEM;
    return 0;
}

static void base_header(uint8_t *b, const char *name, size_t name_len, uint32_t mode,
                        uint64_t uid, uint64_t gid, uint64_t size, uint64_t mtime, char type,
                        const char *link, size_t link_len, const char *uname, const char *gname)
{
    memset(b, 0, BLOCK);
    put_str(b, 100, name, name_len);
    put_oct(b + 100, 8, mode);
    put_oct(b + 108, 8, uid);
    put_oct(b + 116, 8, gid);
    put_oct(b + 124, 12, size);
    put_oct(b + 136, 12, mtime);
    b[156] = (uint8_t)type;
    put_str(b + 157, 100, link, link_len);
    memcpy(b + 257, "ustar\0" "00", 8);
    put_str(b + 265, 32, uname, strlen(uname));
    put_str(b + 297, 32, gname, strlen(gname));
}

static int append_header(iocore_tar *t, const entryinfo *e)
{
    strbuf rec = {0};
    int binary = 0, rc = 0;
    uint64_t h_uid = e->uid, h_gid = e->gid, h_size = e->size, h_mtime;
    char num[64];
    size_t ulen = strlen(e->uname), glen = strlen(e->gname);
    int pax_path = !is_ascii(e->name, e->name_len) || e->name_len > 100;
    int pax_link = !is_ascii(e->link, e->link_len) || e->link_len > 100;
    int pax_uname = !is_ascii(e->uname, ulen) || ulen > 32;
    int pax_gname = !is_ascii(e->gname, glen) || glen > 32;
    double r = nearbyint(e->mtime);

    if ((pax_path && !valid_utf8(e->name, e->name_len)) ||
        (pax_link && !valid_utf8(e->link, e->link_len)) ||
        (pax_uname && !valid_utf8(e->uname, ulen)) || (pax_gname && !valid_utf8(e->gname, glen)))
        binary = 1;
    if (binary)
        rc |= sb_append(&rec, "21 hdrcharset=BINARY\n", 21);
    if (pax_path)
        rc |= pax_record(&rec, "path", e->name, e->name_len);
    if (pax_link)
        rc |= pax_record(&rec, "linkpath", e->link, e->link_len);
    if (pax_uname)
        rc |= pax_record(&rec, "uname", e->uname, ulen);
    if (pax_gname)
        rc |= pax_record(&rec, "gname", e->gname, glen);
    if (h_uid >= 2097152u) {
        snprintf(num, sizeof num, "%llu", (unsigned long long)h_uid);
        rc |= pax_record(&rec, "uid", num, strlen(num));
        h_uid = 0;
    }
    if (h_gid >= 2097152u) {
        snprintf(num, sizeof num, "%llu", (unsigned long long)h_gid);
        rc |= pax_record(&rec, "gid", num, strlen(num));
        h_gid = 0;
    }
    if (h_size >= 8589934592ull) {
        snprintf(num, sizeof num, "%llu", (unsigned long long)h_size);
        rc |= pax_record(&rec, "size", num, strlen(num));
        h_size = 0;
    }
    /* mtime is a float for tarfile: always a PAX record, rounded in ustar */
    py_float_repr(e->mtime, num, sizeof num);
    rc |= pax_record(&rec, "mtime", num, strlen(num));
    h_mtime = (r >= 0.0 && r < 8589934592.0) ? (uint64_t)r : 0;
    if (rc < 0) {
        free(rec.p);
        return -ENOMEM;
    }

    size_t rec_blocks = (rec.len + BLOCK - 1) / BLOCK;
    size_t need = (2 + rec_blocks) * BLOCK;
    if (raw_reserve(t, need) < 0) {
        free(rec.p);
        return -ENOMEM;
    }
    uint8_t *b = t->raw + t->raw_len;
    memset(b, 0, need);
    base_header(b, "././@PaxHeader", 14, 0, 0, 0, rec.len, 0, 'x', "", 0, "", "");
    finish_block(b);
    memcpy(b + BLOCK, rec.p, rec.len);
    free(rec.p);
    b += (1 + rec_blocks) * BLOCK;
    base_header(b, e->name, e->name_len, e->mode & 07777, h_uid, h_gid, h_size, h_mtime,
                e->type, e->link, e->link_len, e->uname, e->gname);
    if (e->has_dev) {
        put_oct(b + 329, 8, e->devmajor);
        put_oct(b + 337, 8, e->devminor);
    }
    finish_block(b);
    t->raw_len += need;
    t->total += need;
    return 0;
}

/* ------------------------------------------------------------------ */
/* user / group names and hard links                                   */

static const char *lookup_name(namecache *cache, size_t *next, uint32_t id, int group)
{
    for (size_t i = 0; i < NAMECACHE; i++)
        if (cache[i].valid && cache[i].id == id)
            return cache[i].name;
    namecache *slot = &cache[*next];
    *next = (*next + 1) % NAMECACHE;
    slot->valid = 1;
    slot->id = id;
    slot->name[0] = '\0';
    size_t bufsize = 16384;
    for (int attempt = 0; attempt < 6; attempt++) {
        char *buf = malloc(bufsize);
        int rc;
        const char *found = NULL;
        if (buf == NULL)
            break;
        if (group) {
            struct group gr, *res = NULL;
            rc = getgrgid_r((gid_t)id, &gr, buf, bufsize, &res);
            if (rc == 0 && res)
                found = res->gr_name;
        } else {
            struct passwd pw, *res = NULL;
            rc = getpwuid_r((uid_t)id, &pw, buf, bufsize, &res);
            if (rc == 0 && res)
                found = res->pw_name;
        }
        if (found && strlen(found) < sizeof slot->name)
            strcpy(slot->name, found);
        free(buf);
        if (rc != ERANGE)
            break;
        bufsize *= 4;
    }
    return slot->name;
}

static size_t link_hash(dev_t dev, ino_t ino, size_t cap)
{
    uint64_t h = (uint64_t)ino * 0x9E3779B97F4A7C15ull ^ (uint64_t)dev * 0xC2B2AE3D27D4EB4Full;
    return (size_t)(h ^ (h >> 29)) & (cap - 1);
}

static const char *link_find(iocore_tar *t, dev_t dev, ino_t ino)
{
    if (t->links_cap == 0)
        return NULL;
    for (size_t i = link_hash(dev, ino, t->links_cap);; i = (i + 1) & (t->links_cap - 1)) {
        linkslot *s = &t->links[i];
        if (s->arc == NULL)
            return NULL;
        if (s->dev == dev && s->ino == ino)
            return s->arc;
    }
}

static int link_add(iocore_tar *t, dev_t dev, ino_t ino, const char *arc)
{
    if ((t->links_used + 1) * 2 > t->links_cap) {
        size_t cap = t->links_cap ? t->links_cap * 2 : 64;
        linkslot *n = calloc(cap, sizeof *n);
        if (n == NULL)
            return -ENOMEM;
        for (size_t i = 0; i < t->links_cap; i++) {
            linkslot *s = &t->links[i];
            if (s->arc == NULL)
                continue;
            size_t j = link_hash(s->dev, s->ino, cap);
            while (n[j].arc)
                j = (j + 1) & (cap - 1);
            n[j] = *s;
        }
        free(t->links);
        t->links = n;
        t->links_cap = cap;
    }
    size_t i = link_hash(dev, ino, t->links_cap);
    while (t->links[i].arc) {
        if (t->links[i].dev == dev && t->links[i].ino == ino) {
            char *c = strdup(arc);
            if (c == NULL)
                return -ENOMEM;
            free(t->links[i].arc);
            t->links[i].arc = c;
            return 0;
        }
        i = (i + 1) & (t->links_cap - 1);
    }
    t->links[i].arc = strdup(arc);
    if (t->links[i].arc == NULL)
        return -ENOMEM;
    t->links[i].dev = dev;
    t->links[i].ino = ino;
    t->links_used++;
    return 0;
}

/* ------------------------------------------------------------------ */
/* traversal                                                           */

static void free_frame(dirframe *f)
{
    for (size_t i = 0; i < f->count; i++)
        free(f->names[i]);
    free(f->names);
    f->names = NULL;
    f->count = f->idx = 0;
}

/* List t->path (sorted) and push it; ENOENT/ENOTDIR (vanished) give an
 * empty listing unless is_root. */
static int push_dir(iocore_tar *t, int is_root)
{
    dirframe f = {0};
    size_t cap = 0;
    DIR *d = opendir(t->path.p);
    if (d == NULL) {
        if (!is_root && (errno == ENOENT || errno == ENOTDIR))
            goto push;
        return -errno;
    }
    for (;;) {
        struct dirent *de;
        errno = 0;
        de = readdir(d);
        if (de == NULL) {
            if (errno != 0) {
                int rc = -errno;
                closedir(d);
                free_frame(&f);
                return rc;
            }
            break;
        }
        if (strcmp(de->d_name, ".") == 0 || strcmp(de->d_name, "..") == 0)
            continue;
        if (f.count == cap) {
            size_t ncap = cap ? cap * 2 : 16;
            char **n = realloc(f.names, ncap * sizeof *n);
            if (n == NULL) {
                closedir(d);
                free_frame(&f);
                return -ENOMEM;
            }
            f.names = n;
            cap = ncap;
        }
        f.names[f.count] = strdup(de->d_name);
        if (f.names[f.count] == NULL) {
            closedir(d);
            free_frame(&f);
            return -ENOMEM;
        }
        f.count++;
    }
    closedir(d);
    if (f.count > 1)
        qsort(f.names, f.count, sizeof *f.names, cmp_pynames);
push:
    if (t->depth == t->stack_cap) {
        size_t ncap = t->stack_cap ? t->stack_cap * 2 : 16;
        dirframe *n = realloc(t->stack, ncap * sizeof *n);
        if (n == NULL) {
            free_frame(&f);
            return -ENOMEM;
        }
        t->stack = n;
        t->stack_cap = ncap;
    }
    f.path_len = t->path.len;
    f.arc_len = t->arc.len;
    t->stack[t->depth++] = f;
    return 0;
}

static int read_link(const char *path, strbuf *out, size_t hint)
{
    size_t size = hint + 1 > 256 ? hint + 1 : 256;
    for (;;) {
        if (sb_reserve(out, size) < 0)
            return -ENOMEM;
        ssize_t n = readlink(path, out->p, size);
        if (n < 0)
            return -errno;
        if ((size_t)n < size) {
            sb_truncate(out, (size_t)n);
            return 0;
        }
        size *= 2;
    }
}

/* Emit the entry at t->path / t->arc.  Returns 0, 1 if skipped, or <0. */
static int emit_entry(iocore_tar *t, int is_root)
{
    struct stat st;
    entryinfo e;
    strbuf link = {0};
    strbuf name = {0};
    int rc;

    if (lstat(t->path.p, &st) < 0) {
        if (!is_root && errno == ENOENT)
            return 1;
        return -errno;
    }
    memset(&e, 0, sizeof e);
    e.link = "";
    if (S_ISREG(st.st_mode)) {
        const char *prev = NULL;
        if (st.st_nlink > 1)
            prev = link_find(t, st.st_dev, st.st_ino);
        if (prev && strcmp(prev, t->arc.p) != 0) {
            e.type = '1';
            if (sb_set(&link, prev, strlen(prev)) < 0)
                return -ENOMEM;
            e.link = link.p;
            e.link_len = link.len;
        } else {
            e.type = '0';
            e.size = (uint64_t)st.st_size;
            if (st.st_nlink > 1 && st.st_ino != 0 &&
                link_add(t, st.st_dev, st.st_ino, t->arc.p) < 0)
                return -ENOMEM;
        }
    } else if (S_ISDIR(st.st_mode))
        e.type = '5';
    else if (S_ISFIFO(st.st_mode))
        e.type = '6';
    else if (S_ISLNK(st.st_mode)) {
        e.type = '2';
        rc = read_link(t->path.p, &link, (size_t)st.st_size);
        if (rc < 0) {
            free(link.p);
            return rc;
        }
        e.link = link.p;
        e.link_len = link.len;
    } else if (S_ISCHR(st.st_mode) || S_ISBLK(st.st_mode)) {
        e.type = S_ISCHR(st.st_mode) ? '3' : '4';
        e.has_dev = 1;
        e.devmajor = major(st.st_rdev);
        e.devminor = minor(st.st_rdev);
    } else
        return 1; /* socket etc.: tarfile skips it */

    if (e.type == '0' && e.size > 0) {
        /* O_NONBLOCK: swapped for a FIFO since lstat, the open must not wait for a writer */
        t->fd = open(t->path.p, O_RDONLY | O_NONBLOCK | O_CLOEXEC);
        t->zero_fill = 0;
        if (t->fd < 0) {
            if (errno != ENOENT) {
                free(link.p);
                return -errno;
            }
            t->zero_fill = 1; /* vanished since lstat: zeros */
        } else {
            struct stat fst;
            if (fstat(t->fd, &fst) < 0 || !S_ISREG(fst.st_mode)) {
                close(t->fd); /* not that file any more (a FIFO, a device): zeros */
                t->fd = -1;
                t->zero_fill = 1;
            }
        }
    }
    if (sb_set(&name, t->arc.p, t->arc.len) < 0 ||
        (e.type == '5' && (name.len == 0 || name.p[name.len - 1] != '/') &&
         sb_append(&name, "/", 1) < 0)) {
        free(link.p);
        free(name.p);
        return -ENOMEM;
    }
    e.name = name.p;
    e.name_len = name.len;
    e.mode = (uint32_t)st.st_mode;
    e.uid = (uint32_t)st.st_uid;
    e.gid = (uint32_t)st.st_gid;
    e.mtime = (double)st.st_mtim.tv_sec + (double)st.st_mtim.tv_nsec * 1e-9;
    e.uname = lookup_name(t->users, &t->users_next, (uint32_t)st.st_uid, 0);
    e.gname = lookup_name(t->groups, &t->groups_next, (uint32_t)st.st_gid, 1);
    rc = append_header(t, &e);
    free(link.p);
    free(name.p);
    if (rc < 0)
        return rc;
    if (e.type == '0' && e.size > 0) {
        t->data_left = e.size;
        t->pad_after = (size_t)((BLOCK - e.size % BLOCK) % BLOCK);
        t->state = ST_DATA;
    } else if (e.type == '5') {
        return push_dir(t, is_root);
    }
    return 0;
}

static int next_entry(iocore_tar *t)
{
    for (;;) {
        if (t->depth == 0) {
            t->state = ST_TRAILER;
            return 0;
        }
        dirframe *f = &t->stack[t->depth - 1];
        if (f->idx == f->count) {
            free_frame(f);
            t->depth--;
            continue;
        }
        const char *n = f->names[f->idx++];
        size_t nl = strlen(n);
        sb_truncate(&t->path, f->path_len);
        sb_truncate(&t->arc, f->arc_len);
        if ((t->path.len > 0 && t->path.p[t->path.len - 1] != '/' &&
             sb_append(&t->path, "/", 1) < 0) ||
            sb_append(&t->path, n, nl) < 0 ||
            (t->arc.len > 0 && sb_append(&t->arc, "/", 1) < 0) ||
            sb_append(&t->arc, n, nl) < 0)
            return -ENOMEM;
        int rc = emit_entry(t, 0);
        if (rc == 1)
            continue;
        return rc;
    }
}

static void close_file(iocore_tar *t)
{
    if (t->fd >= 0)
        close(t->fd);
    t->fd = -1;
}

/* Read file data into dst (n <= data_left); zeros after EOF/vanish. */
static int read_data(iocore_tar *t, uint8_t *dst, size_t n)
{
    size_t got = 0;
    while (got < n && !t->zero_fill) {
        ssize_t r = read(t->fd, dst + got, n - got);
        if (r < 0) {
            if (errno == EINTR)
                continue;
            return -errno;
        }
        if (r == 0) {
            t->zero_fill = 1; /* shrank: pad with zeros */
            break;
        }
        got += (size_t)r;
    }
    if (got < n)
        memset(dst + got, 0, n - got);
    t->data_left -= n;
    t->total += n;
    return 0;
}

static int end_data(iocore_tar *t)
{
    close_file(t);
    t->state = ST_ENTRY;
    return raw_zeros(t, t->pad_after);
}

/* Generate more raw tar bytes into the staging buffer (which is empty). */
static int fill_raw(iocore_tar *t)
{
    t->raw_len = t->raw_pos = 0;
    while (t->raw_len < RAW_CAP / 2) {
        int rc = 0;
        switch (t->state) {
        case ST_ENTRY:
            rc = next_entry(t);
            break;
        case ST_DATA: {
            size_t space = t->raw_cap - t->raw_len;
            size_t n = t->data_left < space ? (size_t)t->data_left : space;
            rc = read_data(t, t->raw + t->raw_len, n);
            if (rc < 0)
                break;
            t->raw_len += n;
            if (t->data_left == 0)
                rc = end_data(t);
            break;
        }
        case ST_TRAILER: {
            uint64_t after = t->total + 2 * BLOCK;
            size_t pad = (size_t)((RECORD - after % RECORD) % RECORD);
            rc = raw_zeros(t, 2 * BLOCK + pad);
            t->state = ST_FINISH;
            break;
        }
        default:
            return 0;
        }
        if (rc < 0)
            return rc;
    }
    return 0;
}

static void put_le32(uint8_t *p, uint32_t v)
{
    p[0] = (uint8_t)v;
    p[1] = (uint8_t)(v >> 8);
    p[2] = (uint8_t)(v >> 16);
    p[3] = (uint8_t)(v >> 24);
}

/* Compress staged raw bytes (or finish the stream) into out. */
static int compress_step(iocore_tar *t, uint8_t *out, size_t space, size_t *produced, int finish)
{
    size_t avail_in = t->raw_len - t->raw_pos;
    if (space > UINT32_MAX)
        space = UINT32_MAX;
    if (avail_in > UINT32_MAX)
        avail_in = UINT32_MAX;
    if (t->compress == IOCORE_COMPRESS_GZ) {
        t->z.next_in = t->raw + t->raw_pos;
        t->z.avail_in = (uInt)avail_in;
        t->z.next_out = out;
        t->z.avail_out = (uInt)space;
        int r = deflate(&t->z, finish ? Z_FINISH : Z_NO_FLUSH);
        size_t used = avail_in - t->z.avail_in;
        if (used) {
            t->crc = crc32(t->crc, t->raw + t->raw_pos, (uInt)used);
            t->isize += used;
        }
        t->raw_pos += used;
        *produced = space - t->z.avail_out;
        if (r == Z_STREAM_END) {
            put_le32(t->side, (uint32_t)t->crc);
            put_le32(t->side + 4, (uint32_t)(t->isize & 0xffffffffu));
            t->side_len = 8;
            t->side_pos = 0;
            return 1;
        }
        if (r != Z_OK && r != Z_BUF_ERROR)
            return IOCORE_EZLIB;
        return 0;
    } else {
        t->bz.next_in = (char *)(t->raw + t->raw_pos);
        t->bz.avail_in = (unsigned)avail_in;
        t->bz.next_out = (char *)out;
        t->bz.avail_out = (unsigned)space;
        int r = BZ2_bzCompress(&t->bz, finish ? BZ_FINISH : BZ_RUN);
        t->raw_pos += avail_in - t->bz.avail_in;
        *produced = space - t->bz.avail_out;
        if (r == BZ_STREAM_END)
            return 1;
        if (r != BZ_RUN_OK && r != BZ_FINISH_OK)
            return IOCORE_EBZ2;
        return 0;
    }
}

static int64_t fail(iocore_tar *t, int rc)
{
    t->state = ST_ERROR;
    t->err = rc;
    if (rc > -10000) /* an errno: keep the path */
        sb_set(&t->errpath, t->path.p ? t->path.p : "", t->path.len);
    return rc;
}

int64_t iocore_tar_read(iocore_tar *t, uint8_t *buf, int64_t max)
{
    int64_t out = 0;
    if (t == NULL || max < 0)
        return IOCORE_EARG;
    if (t->state == ST_ERROR)
        return t->err;
    while (out < max) {
        size_t space = (size_t)(max - out);
        if (t->side_pos < t->side_len) {
            size_t n = t->side_len - t->side_pos < space ? t->side_len - t->side_pos : space;
            memcpy(buf + out, t->side + t->side_pos, n);
            t->side_pos += n;
            out += (int64_t)n;
            continue;
        }
        if (t->state == ST_DONE)
            break;
        if (t->raw_pos < t->raw_len) {
            if (t->compress == IOCORE_COMPRESS_NONE) {
                size_t n = t->raw_len - t->raw_pos < space ? t->raw_len - t->raw_pos : space;
                memcpy(buf + out, t->raw + t->raw_pos, n);
                t->raw_pos += n;
                out += (int64_t)n;
            } else {
                size_t produced = 0;
                int rc = compress_step(t, buf + out, space, &produced, 0);
                if (rc < 0)
                    return fail(t, rc);
                out += (int64_t)produced;
            }
            continue;
        }
        if (t->state == ST_DATA && t->compress == IOCORE_COMPRESS_NONE && space >= BLOCK) {
            /* straight from the file into the caller's buffer */
            size_t n = t->data_left < space ? (size_t)t->data_left : space;
            int rc = read_data(t, buf + out, n);
            if (rc < 0)
                return fail(t, rc);
            out += (int64_t)n;
            if (t->data_left == 0) {
                t->raw_len = t->raw_pos = 0;
                rc = end_data(t);
                if (rc < 0)
                    return fail(t, rc);
            }
            continue;
        }
        if (t->state == ST_FINISH) {
            if (t->compress == IOCORE_COMPRESS_NONE) {
                t->state = ST_DONE;
                continue;
            }
            size_t produced = 0;
            int rc = compress_step(t, buf + out, space, &produced, 1);
            if (rc < 0)
                return fail(t, rc);
            out += (int64_t)produced;
            if (rc == 1)
                t->state = ST_DONE;
            continue;
        }
        int rc = fill_raw(t);
        if (rc < 0)
            return fail(t, rc);
    }
    return out;
}

int iocore_tar_open(const char *root, int compress, int level, int64_t gzip_mtime,
                    iocore_tar **out)
{
    iocore_tar *t;
    int rc;
    *out = NULL;
    if (compress == IOCORE_COMPRESS_GZ ? (level < -1 || level > 9)
        : compress == IOCORE_COMPRESS_BZ2 ? (level < 1 || level > 9)
        : compress != IOCORE_COMPRESS_NONE)
        return IOCORE_EARG;
    t = calloc(1, sizeof *t);
    if (t == NULL)
        return -ENOMEM;
    t->fd = -1;
    t->compress = compress;
    t->state = ST_ENTRY;
    t->raw_cap = RAW_CAP;
    t->raw = malloc(t->raw_cap);
    if (t->raw == NULL) {
        free(t);
        return -ENOMEM;
    }
    *out = t;
    if (sb_set(&t->path, root, strlen(root)) < 0 || sb_set(&t->arc, "", 0) < 0 ||
        sb_set(&t->errpath, "", 0) < 0)
        return (int)fail(t, -ENOMEM);
    if (compress == IOCORE_COMPRESS_GZ) {
        if (deflateInit2(&t->z, level, Z_DEFLATED, -MAX_WBITS, 8, Z_DEFAULT_STRATEGY) != Z_OK)
            return (int)fail(t, IOCORE_EZLIB);
        t->comp_ready = 1;
        t->crc = crc32(0L, Z_NULL, 0);
        uint32_t ts = gzip_mtime < 0 ? (uint32_t)time(NULL) : (uint32_t)gzip_mtime;
        memcpy(t->side, "\037\213\010\010", 4);
        put_le32(t->side + 4, ts);
        t->side[8] = 2;
        t->side[9] = 0xff;
        t->side[10] = 0; /* empty FNAME, as tarfile writes with a nameless fileobj */
        t->side_len = 11;
    } else if (compress == IOCORE_COMPRESS_BZ2) {
        if (BZ2_bzCompressInit(&t->bz, level, 0, 0) != BZ_OK)
            return (int)fail(t, IOCORE_EBZ2);
        t->comp_ready = 1;
    }
    rc = emit_entry(t, 1);
    if (rc < 0)
        return (int)fail(t, rc);
    return 0;
}

const char *iocore_tar_errpath(iocore_tar *t)
{
    return (t && t->errpath.p) ? t->errpath.p : "";
}

void iocore_tar_free(iocore_tar *t)
{
    if (t == NULL)
        return;
    close_file(t);
    while (t->depth > 0)
        free_frame(&t->stack[--t->depth]);
    free(t->stack);
    for (size_t i = 0; i < t->links_cap; i++)
        free(t->links[i].arc);
    free(t->links);
    if (t->comp_ready) {
        if (t->compress == IOCORE_COMPRESS_GZ)
            deflateEnd(&t->z);
        else
            BZ2_bzCompressEnd(&t->bz);
    }
    free(t->raw);
    free(t->path.p);
    free(t->arc.p);
    free(t->errpath.p);
    free(t);
}
