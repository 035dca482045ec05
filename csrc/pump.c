/* pump.c - output pump: child output bytes -> TEXT frames of whole lines.
 *
 * Semantics (see pump.h): per chunk (one read or one feed), exactly what
 *
 *     text = decoder.decode(chunk)            # utf-8, errors='replace'
 *     lines = splitter.append(text) if text else ''   # pyworker.lines.LineSplitter
 *     if lines: write(frame(TEXT, lines.encode(), channel))
 *
 * produces, in one pass over the bytes into the output buffer.
 *
 * Output buffer layout: out[0..8) frame header, out[8..line) complete lines
 * (the payload), out[line..w) the unfinished tail (LineSplitter._partial).
 * The tail's last characters out[held..w) may be "held" (states >= ST_CR): a
 * lone \r at the end, or a prefix of ESC[u / ESC[<d>;<d>H|f / ESC[2J, which a
 * later character turns into a newline or into literal text.  `col` counts
 * the literal characters of the tail (out[line..held)); the splitter's cut of
 * long lines is applied lazily: a newline is inserted before a literal
 * character when col == piece (max_line_length - 1), which is what
 * LineSplitter produces for its complete lines, and at the end of each chunk
 * the held characters count towards the tail length as in LineSplitter.
 *
 * Between calls the tail sits at out[8..w); a frame is sent as out[0..line)
 * with one write (continued after EINTR and partial writes; EAGAIN on a
 * non-blocking out_fd waits in poll), then the tail is moved back to out+8.
 */
#define _GNU_SOURCE
#include "iocore.h"
#include "pump.h"

#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#if defined(__SSE2__)
#include <emmintrin.h>
#endif

#define HDR 8
#define SLACK 256 /* room for the 64-byte block stores and small additions */
#define MAX_LINE_LENGTH_LIMIT (1 << 24)

enum {
    ST_NORMAL,
    ST_BS,   /* inside a run of \b (its newline already written); chunk-local */
    ST_CR,   /* held: \r */
    ST_ESC,  /* held: ESC */
    ST_BR,   /* held: ESC [ */
    ST_D1,   /* held: ESC [ digits (not exactly "2") */
    ST_D1_2, /* held: ESC [ 2 */
    ST_SEMI, /* held: ESC [ digits ; */
    ST_D2    /* held: ESC [ digits ; digits */
};

struct iocore_pump {
    uint8_t *out;
    size_t cap;
    size_t w;     /* end of the written bytes */
    size_t line;  /* end of the complete lines (start of the tail) */
    size_t held;  /* start of the held characters (states >= ST_CR) */
    size_t col;   /* literal characters in out[line..held) (<= piece) */
    size_t piece; /* max_line_length - 1 */
    int state;
    int cr_local; /* the held \r was decoded in the current chunk */
    int out_fd, kind, channel;
    int ndec;     /* bytes kept by the decoder */
    uint8_t dec[4];
    int64_t newlines;
    uint8_t *in;
    size_t in_cap;
    int tty_fd, is_tty, tty_nonblock;
    int simd; /* plain_run flavour: 1 = AVX2 */
};

static const uint8_t FFFD[3] = {0xEF, 0xBF, 0xBD};

/* ---- UTF-8 decoding, CPython's rules (Objects/stringlib/codecs.h) ---------- */

static inline int is_cont(uint8_t b)
{
    return (b & 0xC0) == 0x80;
}

/* The character starting at s (s[0] >= 0x80): returns the bytes it takes
 * (*bad = 1: one U+FFFD for them), or 0 if s..e is an incomplete sequence that
 * the incremental decoder keeps for the next chunk.  With `final` set,
 * incomplete sequences still return 0 (the caller replaces them as a whole),
 * but ED A0..BF at the very end is two errors rather than kept. */
static inline int utf8_char(const uint8_t *s, const uint8_t *e, int final, int *bad)
{
    uint8_t b0 = s[0];
    ptrdiff_t avail = e - s;

    *bad = 1;
    if (b0 < 0xC2)
        return 1;
    if (b0 < 0xE0) {
        if (avail < 2)
            return 0;
        if (!is_cont(s[1]))
            return 1;
        *bad = 0;
        return 2;
    }
    if (b0 < 0xF0) {
        if (avail >= 2) {
            uint8_t b1 = s[1];
            if (!is_cont(b1) || (b1 < 0xA0 ? b0 == 0xE0 : b0 == 0xED)) {
                /* a truncated surrogate is kept while more may come */
                if (!final && avail == 2 && b0 == 0xED && is_cont(b1))
                    return 0;
                return 1;
            }
        }
        if (avail < 3)
            return 0;
        if (!is_cont(s[2]))
            return 2;
        *bad = 0;
        return 3;
    }
    if (b0 < 0xF5) {
        if (avail >= 2) {
            uint8_t b1 = s[1];
            if (!is_cont(b1) || (b1 < 0x90 ? b0 == 0xF0 : b0 == 0xF4))
                return 1;
            if (avail >= 3 && !is_cont(s[2]))
                return 2;
        }
        if (avail < 4)
            return 0;
        if (!is_cont(s[3]))
            return 3;
        *bad = 0;
        return 4;
    }
    return 1;
}

/* ---- output primitives ------------------------------------------------------ */

static inline int held_state(int state)
{
    return state >= ST_CR;
}

static inline void put_nl(iocore_pump *p)
{
    p->out[p->w++] = '\n';
    p->line = p->w;
    p->col = 0;
}

/* A literal character (its UTF-8 bytes), cutting the line if it is full. */
static inline void put_char(iocore_pump *p, const uint8_t *b, size_t n)
{
    if (p->col == p->piece)
        put_nl(p);
    memcpy(p->out + p->w, b, n);
    p->w += n;
    p->col++;
}

static inline void hold(iocore_pump *p, uint8_t c, int state)
{
    p->held = p->w;
    p->out[p->w++] = c;
    p->state = state;
}

/* The held characters out[held..w) (ASCII) become literal text: newlines are
 * inserted where the line reaches `piece` characters (in place, moving the
 * pieces right, last one first).  The state becomes ST_NORMAL. */
static void release_held(iocore_pump *p)
{
    size_t hs = p->held, n = p->w - hs, piece = p->piece, col = p->col;

    p->state = ST_NORMAL;
    if (col + n <= piece) {
        p->col = col + n;
        return;
    }
    /* breaks before held characters i0, i0 + piece, ... (< n) */
    size_t i0 = piece - col;
    size_t k = (n - i0 - 1) / piece + 1;
    uint8_t *h = p->out + hs;
    for (size_t j = k; j >= 1; j--) {
        size_t start = i0 + (j - 1) * piece;
        size_t end = j == k ? n : start + piece;
        memmove(h + start + j, h + start, end - start);
        h[start + j - 1] = '\n';
    }
    size_t last = i0 + (k - 1) * piece; /* held index of the last break */
    p->w += k;
    p->line = hs + last + k;
    p->col = n - last;
}

/* Drop the held characters (they matched): one newline instead. */
static inline void held_to_newline(iocore_pump *p)
{
    p->w = p->held;
    p->state = ST_NORMAL;
    put_nl(p);
}

/* ---- the NEWLINE_RE state machine --------------------------------------------- */

static void step_ascii(iocore_pump *p, uint8_t c)
{
    for (;;) {
        switch (p->state) {
        case ST_BS:
            if (c == 0x08)
                return;
            p->state = ST_NORMAL;
            /* fall through */
        case ST_NORMAL:
            switch (c) {
            case '\n':
                p->newlines++;
                put_nl(p);
                return;
            case '\r':
                p->newlines++;
                p->cr_local = 1;
                hold(p, c, ST_CR);
                return;
            case 0x1B:
                hold(p, c, ST_ESC);
                return;
            case 0x08:
                put_nl(p);
                p->state = ST_BS;
                return;
            default:
                put_char(p, &c, 1);
                return;
            }
        case ST_CR:
            held_to_newline(p); /* \r\n, or \r(?=.) */
            if (c == '\n') {
                if (!p->cr_local)
                    p->newlines++; /* the \r was counted with the previous chunk */
                return;
            }
            continue;
        case ST_ESC:
            if (c == '[') {
                p->out[p->w++] = c;
                p->state = ST_BR;
                return;
            }
            break;
        case ST_BR:
            if (c == 'u') {
                held_to_newline(p);
                return;
            }
            if (c >= '0' && c <= '9') {
                p->out[p->w++] = c;
                p->state = c == '2' ? ST_D1_2 : ST_D1;
                return;
            }
            break;
        case ST_D1_2:
            if (c == 'J') {
                held_to_newline(p);
                return;
            }
            /* fall through */
        case ST_D1:
            if (c >= '0' && c <= '9') {
                p->out[p->w++] = c;
                p->state = ST_D1;
                return;
            }
            if (c == ';') {
                p->out[p->w++] = c;
                p->state = ST_SEMI;
                return;
            }
            break;
        case ST_SEMI:
            if (c >= '0' && c <= '9') {
                p->out[p->w++] = c;
                p->state = ST_D2;
                return;
            }
            break;
        case ST_D2:
            if (c >= '0' && c <= '9') {
                p->out[p->w++] = c;
                return;
            }
            if (c == 'H' || c == 'f') {
                held_to_newline(p);
                return;
            }
            break;
        }
        /* no match: the held characters are text; look at c again */
        release_held(p);
    }
}

/* A non-ASCII character (or U+FFFD). */
static inline void step_other(iocore_pump *p, const uint8_t *b, size_t n)
{
    if (p->state == ST_BS)
        p->state = ST_NORMAL;
    else if (p->state == ST_CR)
        held_to_newline(p);
    else if (p->state != ST_NORMAL)
        release_held(p);
    put_char(p, b, n);
}

/* LineSplitter.append's end: the tail's unfinished long line is cut when the
 * held characters make it longer than `piece`. */
static void chunk_end(iocore_pump *p)
{
    if (p->state == ST_BS)
        p->state = ST_NORMAL;
    if (!held_state(p->state))
        return;
    size_t n = p->w - p->held, total = p->col + n;
    if (total <= p->piece)
        return;
    size_t cut = (total - 1) / p->piece * p->piece;
    if (cut > p->col) {
        /* the cut falls inside the held prefix: it is text now */
        release_held(p);
        return;
    }
    /* col == piece: the literal part is a full piece; keep the held part */
    uint8_t *h = p->out + p->held;
    memmove(h + 1, h, n);
    h[0] = '\n';
    p->w++;
    p->held++;
    p->line = p->held;
    p->col = 0;
}

/* ---- the fast path: runs of plain ASCII ------------------------------------- */

/* Set bits of x (SWAR: __builtin_popcountll is a libgcc call without -mpopcnt). */
static inline int popcount64(uint64_t x)
{
    x = x - ((x >> 1) & UINT64_C(0x5555555555555555));
    x = (x & UINT64_C(0x3333333333333333)) + ((x >> 2) & UINT64_C(0x3333333333333333));
    x = (x + (x >> 4)) & UINT64_C(0x0F0F0F0F0F0F0F0F);
    return (int)((x * UINT64_C(0x0101010101010101)) >> 56);
}

/* Per 64-byte block, bit i describes byte i.  sp: \b, \r, ESC or >= 0x80;
 * nl: \n.  Only for blocks with sp bits: hi: >= 0x80; cont: 80..BF; l2: C2..DF (a
 * 2-byte character); l3: E1..EC, EE, EF (a 3-byte character whose second byte
 * may be any continuation byte).  Other non-ASCII bytes (C0, C1, E0, ED,
 * F0..FF) are left to the scalar decoder. */
typedef struct {
    uint64_t sp, nl;
} block_masks;

typedef struct {
    uint64_t hi, cont, l2, l3;
} utf8_masks;

#if defined(__SSE2__)
#define M16(v) ((uint64_t)(uint32_t)_mm_movemask_epi8(v))

static inline void masks16(__m128i x, int shift, block_masks *m)
{
    /* OR-ing x itself in sets the top bit of bytes >= 0x80 */
    __m128i sp = _mm_or_si128(_mm_or_si128(_mm_cmpeq_epi8(x, _mm_set1_epi8(0x08)),
                                           _mm_cmpeq_epi8(x, _mm_set1_epi8(0x0D))),
                              _mm_or_si128(_mm_cmpeq_epi8(x, _mm_set1_epi8(0x1B)), x));
    m->sp |= M16(sp) << shift;
    m->nl |= M16(_mm_cmpeq_epi8(x, _mm_set1_epi8(0x0A))) << shift;
}

static inline void utf8_16(__m128i x, int shift, utf8_masks *u)
{
    /* signed bytes: 80..BF = -128..-65, C2..DF = -62..-33, E1..EF = -31..-17 */
    __m128i cont = _mm_cmpgt_epi8(_mm_set1_epi8(-64), x);
    u->hi |= M16(x) << shift;
    __m128i l2 = _mm_and_si128(_mm_cmpgt_epi8(x, _mm_set1_epi8(-63)),
                               _mm_cmpgt_epi8(_mm_set1_epi8(-32), x));
    __m128i l3 = _mm_andnot_si128(_mm_cmpeq_epi8(x, _mm_set1_epi8(-19)),
                                  _mm_and_si128(_mm_cmpgt_epi8(x, _mm_set1_epi8(-32)),
                                                _mm_cmpgt_epi8(_mm_set1_epi8(-16), x)));
    u->cont |= M16(cont) << shift;
    u->l2 |= M16(l2) << shift;
    u->l3 |= M16(l3) << shift;
}

#define LOAD16(s, i) _mm_loadu_si128((const __m128i *)(const void *)((s) + 16 * (i)))

#define STORE16(d, i, v) _mm_storeu_si128((__m128i *)(void *)((d) + 16 * (i)), v)

/* The masks of s[0..64), which is also copied to d. */
static inline void masks64(const uint8_t *s, uint8_t *d, block_masks *m)
{
    __m128i a = LOAD16(s, 0), b = LOAD16(s, 1), c = LOAD16(s, 2), e = LOAD16(s, 3);
    m->sp = m->nl = 0;
    masks16(a, 0, m);
    masks16(b, 16, m);
    masks16(c, 32, m);
    masks16(e, 48, m);
    STORE16(d, 0, a);
    STORE16(d, 1, b);
    STORE16(d, 2, c);
    STORE16(d, 3, e);
}

static inline void utf8_64(const uint8_t *s, utf8_masks *u)
{
    u->cont = u->l2 = u->l3 = u->hi = 0;
    utf8_16(LOAD16(s, 0), 0, u);
    utf8_16(LOAD16(s, 1), 16, u);
    utf8_16(LOAD16(s, 2), 32, u);
    utf8_16(LOAD16(s, 3), 48, u);
}
#else
static inline void masks64(const uint8_t *s, uint8_t *d, block_masks *m)
{
    memcpy(d, s, 64);
    m->sp = m->nl = 0;
    for (int i = 0; i < 64; i++) {
        uint8_t b = s[i];
        uint64_t bit = UINT64_C(1) << i;
        if (b == 0x08 || b == 0x0D || b == 0x1B || b >= 0x80)
            m->sp |= bit;
        if (b == 0x0A)
            m->nl |= bit;
    }
}

static inline void utf8_64(const uint8_t *s, utf8_masks *u)
{
    u->cont = u->l2 = u->l3 = u->hi = 0;
    for (int i = 0; i < 64; i++) {
        uint8_t b = s[i];
        uint64_t bit = UINT64_C(1) << i;
        if (b >= 0x80)
            u->hi |= bit;
        if (b >= 0x80 && b <= 0xBF)
            u->cont |= bit;
        if (b >= 0xC2 && b <= 0xDF)
            u->l2 |= bit;
        if (b >= 0xE1 && b <= 0xEF && b != 0xED)
            u->l3 |= bit;
    }
}
#endif

static inline uint64_t low_bits(size_t n)
{
    return n >= 64 ? ~UINT64_C(0) : (UINT64_C(1) << n) - 1;
}

/* plain_run(p, s, e): copy text at s that needs no decision (ASCII other than
 * \b, \r, ESC, \n included, and 2- and 3-byte characters that are valid
 * whatever follows) to the output, 64 bytes at a time, plus \r\n pairs; stop
 * before anything else.  Only called in ST_NORMAL / ST_BS, at a character
 * boundary.  Returns the bytes consumed.  The body is instantiated per
 * instruction set (MASKS, UTF8, POPCOUNT). */
#define PLAIN_RUN_BODY(MASKS, UTF8, POPCOUNT)                                             \
    {                                                                                     \
        uint8_t *out = p->out;                                                            \
        size_t w = p->w, col = p->col, line = p->line, piece = p->piece;                  \
        int64_t nls = 0;                                                                  \
        const uint8_t *start = s;                                                         \
                                                                                          \
        while (e - s >= 64) {                                                             \
            size_t avail = (size_t)(e - s), n = 64;                                       \
            block_masks m;                                                                \
            uint64_t bad, cont = 0, nl;                                                   \
            size_t k;                                                                     \
            /* copied as a whole (the buffer has room for 64 more bytes), checked after */ \
            MASKS(s, out + w, &m);                                                        \
            bad = m.sp;                                                                   \
            k = bad ? (size_t)__builtin_ctzll(bad) : 64;                                  \
            if (k < 64 && s[k] >= 0x80) {                                                 \
                /* non-ASCII before any \b \r ESC: which characters can go as they are */ \
                utf8_masks u;                                                             \
                UTF8(s, &u);                                                              \
                uint64_t lead = u.l2 | u.l3;                                              \
                /* \b \r ESC, other bytes >= 0x80, continuations where none / one is due */ \
                bad = (m.sp & ~u.hi) | (u.hi & ~(u.cont | lead))                          \
                      | (u.cont ^ (lead << 1 | u.l3 << 2));                               \
                k = bad ? (size_t)__builtin_ctzll(bad) : 64;                              \
                if (k < n)                                                                \
                    n = k;                                                                \
                /* no character may straddle the end */                                   \
                if (n && (lead >> (n - 1) & 1))                                           \
                    n--;                                                                  \
                else if (n >= 2 && (u.l3 >> (n - 2) & 1))                                 \
                    n -= 2;                                                               \
                cont = u.cont & low_bits(n);                                              \
            } else if (k < n) {                                                           \
                n = k;                                                                    \
            }                                                                             \
            if (n == 0)                                                                   \
                break;                                                                    \
            nl = m.nl & low_bits(n);                                                      \
            size_t first = nl ? (size_t)__builtin_ctzll(nl) : n;                          \
            size_t first_chars = first - (cont ? (size_t)POPCOUNT(cont & low_bits(first)) : 0); \
            /* with piece >= 64 only the first line of the block can need a cut */       \
            if (piece >= 64 && col + first_chars <= piece) {                              \
                if (nl) {                                                                 \
                    size_t last = 63 - (size_t)__builtin_clzll(nl);                       \
                    col = n - last - 1;                                                   \
                    if (cont && last < 63)                                                \
                        col -= (size_t)POPCOUNT(cont >> (last + 1));                      \
                    line = w + last + 1;                                                  \
                    nls += POPCOUNT(nl);                                                  \
                } else {                                                                  \
                    col += first_chars;                                                   \
                }                                                                         \
                w += n;                                                                   \
            } else {                                                                      \
                /* a line reaches `piece` characters in this block: cut it */             \
                for (size_t i = 0; i < n; i++) {                                          \
                    uint8_t b = s[i];                                                     \
                    if (b == '\n') {                                                      \
                        out[w++] = '\n';                                                  \
                        line = w;                                                         \
                        col = 0;                                                          \
                        nls++;                                                            \
                    } else if ((b & 0xC0) == 0x80) {                                      \
                        out[w++] = b;                                                     \
                    } else {                                                              \
                        if (col == piece) {                                               \
                            out[w++] = '\n';                                              \
                            line = w;                                                     \
                            col = 0;                                                      \
                        }                                                                 \
                        out[w++] = b;                                                     \
                        col++;                                                            \
                    }                                                                     \
                }                                                                         \
            }                                                                             \
            s += n;                                                                       \
            /* \r\n (PTY output): one newline, one count; stay in the fast loop */        \
            if (n < avail && s[0] == '\r' && n + 1 < avail && s[1] == '\n') {             \
                out[w++] = '\n';                                                          \
                line = w;                                                                 \
                col = 0;                                                                  \
                nls++;                                                                    \
                s += 2;                                                                   \
                continue;                                                                 \
            }                                                                             \
            /* go on unless stopped by a byte to decide on */                            \
            if (k < 64)                                                                   \
                goto done;                                                                \
        }                                                                                 \
        /* the last bytes, one by one: plain ASCII only */                                \
        for (; s < e; s++) {                                                              \
            uint8_t b = *s;                                                               \
            if (b == '\n') {                                                              \
                out[w++] = '\n';                                                          \
                line = w;                                                                 \
                col = 0;                                                                  \
                nls++;                                                                    \
            } else {                                                                      \
                if (b >= 0x80 || b == 0x08 || b == 0x0D || b == 0x1B)                    \
                    break;                                                                \
                if (col == piece) {                                                       \
                    out[w++] = '\n';                                                      \
                    line = w;                                                             \
                    col = 0;                                                              \
                }                                                                         \
                out[w++] = b;                                                             \
                col++;                                                                    \
            }                                                                             \
        }                                                                                 \
    done:                                                                                 \
        if (s != start) {                                                                 \
            p->w = w;                                                                     \
            p->col = col;                                                                 \
            p->line = line;                                                               \
            p->newlines += nls;                                                           \
            p->state = ST_NORMAL;                                                         \
        }                                                                                 \
        return (size_t)(s - start);                                                       \
    }

static size_t plain_run_base(iocore_pump *p, const uint8_t *s, const uint8_t *e)
    PLAIN_RUN_BODY(masks64, utf8_64, popcount64)

#if defined(__x86_64__) && defined(__GNUC__)
#define PUMP_HAVE_AVX2 1
#include <immintrin.h>

#define M32(v) ((uint64_t)(uint32_t)_mm256_movemask_epi8(v))
#define LOAD32(s, i) _mm256_loadu_si256((const __m256i *)(const void *)((s) + 32 * (i)))

__attribute__((target("avx2"))) static inline void masks32_avx2(__m256i x, int shift,
                                                                block_masks *m)
{
    __m256i sp = _mm256_or_si256(_mm256_or_si256(_mm256_cmpeq_epi8(x, _mm256_set1_epi8(0x08)),
                                                 _mm256_cmpeq_epi8(x, _mm256_set1_epi8(0x0D))),
                                 _mm256_or_si256(_mm256_cmpeq_epi8(x, _mm256_set1_epi8(0x1B)), x));
    m->sp |= M32(sp) << shift;
    m->nl |= M32(_mm256_cmpeq_epi8(x, _mm256_set1_epi8(0x0A))) << shift;
}

__attribute__((target("avx2"))) static inline void utf8_32_avx2(__m256i x, int shift,
                                                                utf8_masks *u)
{
    __m256i cont = _mm256_cmpgt_epi8(_mm256_set1_epi8(-64), x);
    u->hi |= M32(x) << shift;
    __m256i l2 = _mm256_and_si256(_mm256_cmpgt_epi8(x, _mm256_set1_epi8(-63)),
                                  _mm256_cmpgt_epi8(_mm256_set1_epi8(-32), x));
    __m256i l3 = _mm256_andnot_si256(_mm256_cmpeq_epi8(x, _mm256_set1_epi8(-19)),
                                     _mm256_and_si256(_mm256_cmpgt_epi8(x, _mm256_set1_epi8(-32)),
                                                      _mm256_cmpgt_epi8(_mm256_set1_epi8(-16), x)));
    u->cont |= M32(cont) << shift;
    u->l2 |= M32(l2) << shift;
    u->l3 |= M32(l3) << shift;
}

__attribute__((target("avx2"))) static inline void masks64_avx2(const uint8_t *s, uint8_t *d,
                                                                block_masks *m)
{
    __m256i a = LOAD32(s, 0), b = LOAD32(s, 1);
    m->sp = m->nl = 0;
    masks32_avx2(a, 0, m);
    masks32_avx2(b, 32, m);
    _mm256_storeu_si256((__m256i *)(void *)d, a);
    _mm256_storeu_si256((__m256i *)(void *)(d + 32), b);
}

__attribute__((target("avx2"))) static inline void utf8_64_avx2(const uint8_t *s,
                                                                utf8_masks *u)
{
    u->cont = u->l2 = u->l3 = u->hi = 0;
    utf8_32_avx2(LOAD32(s, 0), 0, u);
    utf8_32_avx2(LOAD32(s, 1), 32, u);
}

__attribute__((target("avx2,popcnt,bmi,lzcnt"))) static size_t
plain_run_avx2(iocore_pump *p, const uint8_t *s, const uint8_t *e)
    PLAIN_RUN_BODY(masks64_avx2, utf8_64_avx2, __builtin_popcountll)
#endif

/* SIMD level in use for new pumps: 0 = SSE2 (or portable C), 1 = AVX2. */
static _Atomic int simd_level = -1;

static int detect_simd(void)
{
#ifdef PUMP_HAVE_AVX2
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("popcnt")
           && __builtin_cpu_supports("bmi") ? 1 : 0;
#else
    return 0;
#endif
}

int iocore_pump_simd(int level)
{
    int best = detect_simd();
    if (level < 0) {
        int cur = atomic_load(&simd_level);
        if (cur >= 0)
            return cur;
        level = best;
    }
    if (level > best)
        level = best;
    atomic_store(&simd_level, level);
    return level;
}

static inline size_t plain_run(iocore_pump *p, const uint8_t *s, const uint8_t *e)
{
#ifdef PUMP_HAVE_AVX2
    if (p->simd)
        return plain_run_avx2(p, s, e);
#endif
    return plain_run_base(p, s, e);
}

/* Non-ASCII characters that plain_run leaves (4-byte, E0/ED leads, invalid
 * bytes are not taken here either), in ST_NORMAL / ST_BS: copy valid UTF-8
 * characters one by one; stop at ASCII, an invalid or incomplete sequence,
 * or a character that needs a cut.  Returns the bytes consumed. */
static size_t text_run(iocore_pump *p, const uint8_t *s, const uint8_t *e)
{
    uint8_t *out = p->out;
    size_t w = p->w, col = p->col, piece = p->piece;
    const uint8_t *start = s;
    int bad, c;

    while (s < e && *s >= 0x80 && col < piece) {
        c = utf8_char(s, e, 0, &bad);
        if (c == 0 || bad)
            break;
        out[w] = s[0];
        out[w + 1] = s[1];
        if (c > 2)
            out[w + 2] = s[2];
        if (c > 3)
            out[w + 3] = s[3];
        w += (size_t)c;
        s += c;
        col++;
    }
    if (s != start) {
        p->w = w;
        p->col = col;
        p->state = ST_NORMAL;
    }
    return (size_t)(s - start);
}

/* ---- one chunk ---------------------------------------------------------------- */

static void process(iocore_pump *p, const uint8_t *s, size_t len)
{
    const uint8_t *e = s + len;
    int bad, c;

    p->cr_local = 0;
    /* bytes kept by the decoder come first, as in BufferedIncrementalDecoder */
    while (p->ndec && s < e) {
        uint8_t tmp[8];
        size_t nd = (size_t)p->ndec, k = (size_t)(e - s) < 4 ? (size_t)(e - s) : 4;
        memcpy(tmp, p->dec, nd);
        memcpy(tmp + nd, s, k);
        c = utf8_char(tmp, tmp + nd + k, 0, &bad);
        if (c == 0) { /* still incomplete: everything given is kept (k == len) */
            memcpy(p->dec + nd, s, k);
            p->ndec += (int)k;
            s = e;
            break;
        }
        if (bad)
            step_other(p, FFFD, 3);
        else
            step_other(p, tmp, (size_t)c);
        if ((size_t)c >= nd) {
            s += (size_t)c - nd;
            p->ndec = 0;
        } else {
            memmove(p->dec, p->dec + c, nd - (size_t)c);
            p->ndec -= c;
        }
    }
    while (s < e) {
        if (p->state <= ST_BS) {
            s += plain_run(p, s, e);
            if (s >= e)
                break;
            if (*s >= 0x80) {
                size_t k = text_run(p, s, e);
                if (k) {
                    s += k;
                    continue;
                }
            }
        }
        if (*s < 0x80) {
            step_ascii(p, *s++);
            continue;
        }
        c = utf8_char(s, e, 0, &bad);
        if (c == 0) {
            p->ndec = (int)(e - s);
            memcpy(p->dec, s, (size_t)p->ndec);
            break;
        }
        if (bad)
            step_other(p, FFFD, 3);
        else
            step_other(p, s, (size_t)c);
        s += c;
    }
    chunk_end(p);
}

/* decoder.decode(b'', final=True) as a chunk of its own. */
static void final_decode(iocore_pump *p)
{
    int i = 0, bad, c;

    if (!p->ndec)
        return;
    p->cr_local = 0;
    while (i < p->ndec) {
        c = utf8_char(p->dec + i, p->dec + p->ndec, 1, &bad);
        if (c == 0) { /* "unexpected end of data": one U+FFFD for the rest */
            step_other(p, FFFD, 3);
            break;
        }
        if (bad)
            step_other(p, FFFD, 3);
        else
            step_other(p, p->dec + i, (size_t)c);
        i += c;
    }
    p->ndec = 0;
    chunk_end(p);
}

/* ---- buffers and I/O ------------------------------------------------------------- */

/* Room to process `len` more input bytes: each may become U+FFFD plus a line
 * cut; held tail characters may gain cuts too. */
static int reserve(iocore_pump *p, size_t len)
{
    size_t need = p->w + (p->w - HDR) + 4 * len + SLACK;
    if (need <= p->cap)
        return 0;
    size_t cap = p->cap * 2 > need ? p->cap * 2 : need;
    uint8_t *out = realloc(p->out, cap);
    if (!out)
        return -ENOMEM;
    p->out = out;
    p->cap = cap;
    return 0;
}

static int write_all(int fd, const uint8_t *b, size_t n)
{
    while (n) {
        ssize_t r = write(fd, b, n);
        if (r < 0) {
            if (errno == EINTR)
                continue;
            if (errno == EAGAIN || errno == EWOULDBLOCK) {
                struct pollfd pfd = {.fd = fd, .events = POLLOUT, .revents = 0};
                if (poll(&pfd, 1, -1) < 0 && errno != EINTR)
                    return -errno;
                continue;
            }
            return -errno;
        }
        b += r;
        n -= (size_t)r;
    }
    return 0;
}

/* Send out[0..line) if it holds lines, then move the tail back to out+8.  The
 * tail moves even if the write fails (the frame is dropped, not resent). */
static int send_frame(iocore_pump *p)
{
    size_t n = p->line - HDR;
    int r = 0;

    if (!n)
        return 0;
    uint8_t *h = p->out;
    h[0] = (uint8_t)n;
    h[1] = (uint8_t)(n >> 8);
    h[2] = (uint8_t)(n >> 16);
    h[3] = (uint8_t)(n >> 24);
    h[4] = (uint8_t)p->kind;
    h[5] = (uint8_t)p->channel;
    h[6] = 0;
    h[7] = 0;
    r = write_all(p->out_fd, p->out, p->line);
    size_t tail = p->w - p->line;
    memmove(p->out + HDR, p->out + p->line, tail);
    if (held_state(p->state))
        p->held -= n;
    p->w = HDR + tail;
    p->line = HDR;
    return r;
}

int iocore_pump_new(int out_fd, int kind, int channel, int64_t max_line_length,
                    iocore_pump **out)
{
    *out = NULL;
    if (kind < 0 || kind > 255 || channel < 0 || channel > 255 || max_line_length < 2
        || max_line_length > MAX_LINE_LENGTH_LIMIT)
        return IOCORE_EARG;
    iocore_pump *p = calloc(1, sizeof *p);
    if (!p)
        return -ENOMEM;
    p->cap = 64 * 1024;
    p->out = malloc(p->cap);
    if (!p->out) {
        free(p);
        return -ENOMEM;
    }
    p->w = p->line = p->held = HDR;
    p->piece = (size_t)max_line_length - 1;
    p->state = ST_NORMAL;
    p->out_fd = out_fd;
    p->kind = kind;
    p->channel = channel;
    p->tty_fd = -1;
    p->simd = iocore_pump_simd(-1);
    *out = p;
    return 0;
}

void iocore_pump_free(iocore_pump *p)
{
    if (!p)
        return;
    free(p->out);
    free(p->in);
    free(p);
}

/* A PTY hands out a few KiB per read: gather what is ready. */
static size_t read_more(iocore_pump *p, int fd, size_t got, size_t max)
{
    while (got < max) {
        if (!p->tty_nonblock) {
            struct pollfd pfd = {.fd = fd, .events = POLLIN, .revents = 0};
            int r = poll(&pfd, 1, 0);
            if (r < 0 && errno == EINTR)
                continue;
            if (r <= 0 || !(pfd.revents & POLLIN))
                break;
        }
        ssize_t r = read(fd, p->in + got, max - got);
        if (r < 0 && errno == EINTR)
            continue;
        if (r <= 0) /* EAGAIN: nothing more now; EIO/EOF: the next call sees it */
            break;
        got += (size_t)r;
    }
    return got;
}

int64_t iocore_pump_read(iocore_pump *p, int fd, int64_t max_bytes, int flags)
{
    int r;

    if (max_bytes <= 0 || max_bytes > IOCORE_PUMP_MAX_READ)
        return IOCORE_EARG;
    r = send_frame(p);
    if (r < 0)
        return r;
    size_t max = (size_t)max_bytes;
    if (p->in_cap < max) {
        uint8_t *in = realloc(p->in, max);
        if (!in)
            return -ENOMEM;
        p->in = in;
        p->in_cap = max;
    }
    if (!(flags & IOCORE_PUMP_DISCARD)) {
        r = reserve(p, max);
        if (r < 0)
            return r;
    }
    if (fd != p->tty_fd) {
        p->tty_fd = fd;
        p->is_tty = isatty(fd);
        if (p->is_tty) {
            int fl = fcntl(fd, F_GETFL);
            p->tty_nonblock = fl >= 0 && (fl & O_NONBLOCK);
        }
    }
    p->newlines = 0;
    ssize_t got;
    do
        got = read(fd, p->in, max);
    while (got < 0 && errno == EINTR);
    if (got < 0) {
        if (errno == EAGAIN || errno == EWOULDBLOCK)
            return IOCORE_PUMP_EAGAIN;
        if (errno == EIO && p->is_tty)
            return 0; /* the PTY's last writer closed it */
        return -errno;
    }
    if (got > 0 && p->is_tty)
        got = (ssize_t)read_more(p, fd, (size_t)got, max);
    if (got == 0 || (flags & IOCORE_PUMP_DISCARD))
        return got;
    process(p, p->in, (size_t)got);
    if (!(flags & IOCORE_PUMP_DEFER)) {
        r = send_frame(p);
        if (r < 0)
            return r;
    }
    return got;
}

int iocore_pump_feed(iocore_pump *p, const uint8_t *data, int64_t len, int flags)
{
    int r;

    if (len < 0 || len > IOCORE_PUMP_MAX_READ)
        return IOCORE_EARG;
    r = send_frame(p);
    if (r < 0)
        return r;
    r = reserve(p, (size_t)len);
    if (r < 0)
        return r;
    p->newlines = 0;
    if (len)
        process(p, data, (size_t)len);
    if (!(flags & IOCORE_PUMP_DEFER))
        return send_frame(p);
    return 0;
}

int iocore_pump_eof(iocore_pump *p)
{
    int r = send_frame(p);
    if (r < 0)
        return r;
    r = reserve(p, 8);
    if (r < 0)
        return r;
    final_decode(p);
    return send_frame(p);
}

int iocore_pump_flush(iocore_pump *p)
{
    int r = send_frame(p);
    if (r < 0)
        return r;
    r = reserve(p, 8);
    if (r < 0)
        return r;
    final_decode(p);
    if (p->w > p->line) { /* LineSplitter.flush: append('\n') */
        int64_t keep = p->newlines;
        p->cr_local = 0;
        step_ascii(p, '\n');
        chunk_end(p);
        p->newlines = keep;
    }
    return send_frame(p);
}

int iocore_pump_send(iocore_pump *p)
{
    return send_frame(p);
}

int64_t iocore_pump_newlines(const iocore_pump *p)
{
    return p->newlines;
}

int64_t iocore_pump_pending(const iocore_pump *p)
{
    return (int64_t)(p->line - HDR);
}

int64_t iocore_pump_tail_chars(const iocore_pump *p)
{
    return (int64_t)(p->col + (held_state(p->state) ? p->w - p->held : 0));
}
