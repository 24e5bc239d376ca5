/* Compiled CPU kernels of the codecs' hot loops (called through ctypes: loaded by weightpack/coding/native.py,
 * wrapped by coding/entropy_native.py and each codec's native.py under coding/codecs/).
 *
 * The same algorithms as the numpy/constriction paths and the lock-step decoder (coding/lockstep.py), on
 * the same bytes (docs/FORMAT.md):
 *   wp_lanes           ANS lanes (coding/lanes.py's layout), one bucketed symbol table per context;
 *                      constriction's AnsCoder: 64-bit state, 32-bit words, 24-bit precision.
 *   wp_ungroup_*       symbols in coding order (grouped by a key, stable) back to element order.
 *   wp_walk            the trellis quantizer of each element from the parities of the levels before it.
 *   wp_split_contexts  the rest contexts of the trellis codec's lanes layout, and their counts.
 *   wp_split_multiples the multiples of the step from parity, rest and quantizer.
 *   wp_step_major      the step-major trellis layout (format 1.1) of one chunk, whole.
 *   wp_lanes_fast      ANS lanes of a fields chunk's heads, with a direct symbol table (2**15 slots) per
 *                      context: 32 lanes in four AVX-512 vectors where the CPU has them, else eight lanes
 *                      in registers.
 *   wp_fields_join     a fields chunk from its head symbols and packed tails, in one pass.
 * and the encoders, which write the bytes constriction and numpy write (tests/test_coding_native.py):
 *   wp_plan_scan, wp_class_hist   the planning passes of the fields plan (histograms, block statistics).
 *   wp_fields_split    a fields chunk's head symbols grouped by block class, and its packed tails.
 *   wp_lanes_encode    ANS lanes (constriction's AnsCoder, bit for bit), four lanes at a time.
 * and wp_crc32, zlib's crc32 with carry-less multiplication; wp_simd, the vector level in use.
 *
 * Reads and writes stay inside the sizes passed in: the wrappers check those against each other first and
 * the kernels re-check what they index with (class and trailing-zero keys, symbol ranges, counts); words
 * are read only between a lane's first and last word, and a symbol found in a table is below that table's
 * alphabet. Corrupt data decodes to some symbols and is reported by the end-of-lane check (all words read,
 * state back at 0) or by the caller's checksums. scripts/sanitize.sh runs the kernel tests under ASan and
 * UBSan. No Python API is used: ctypes releases the GIL around each call. */

#include <Python.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define BUCKETS 4096 /* per context: 2**15 slots, 8 a bucket */
#define LANE_STATES 8

static inline uint64_t ans_start(const uint32_t *words, int64_t lo, int64_t hi, int64_t *ptr) {
    int64_t size = hi - lo; /* 0 words: state 0 (only symbol 0 was coded); 1 word: a state below 2**32 */
    if (size >= 2) {
        *ptr = hi - 2;
        return ((uint64_t)words[hi - 1] << 32) | (uint64_t)words[hi - 2];
    }
    if (size == 1) {
        *ptr = hi - 1;
        return (uint64_t)words[hi - 1];
    }
    *ptr = hi;
    return 0;
}

/* One decoding step with the table of one context: bucket[i] is the symbol of slot 8i, cdf its A + 1
 * cumulative frequencies (15-bit, cdf[A] = 2**15). Returns the symbol, advances the state and reads a word
 * if due. A bucket holds 8 slots, so the tables of many contexts stay in cache (8 KB each). */
#define BUCKET_SHIFT 3
static inline uint32_t ans_step(uint64_t *state, const uint32_t *words, int64_t lo, int64_t *ptr,
                                const uint16_t *bucket, const uint32_t *cdf) {
    uint64_t x = *state;
    uint64_t q = x & 0xFFFFFF;
    uint64_t slot = q >> 9;
    uint32_t s = bucket[slot >> BUCKET_SHIFT];
    while (cdf[s + 1] <= slot)
        s++;
    x = (x >> 24) * ((uint64_t)(cdf[s + 1] - cdf[s]) << 9) + ((slot - (uint64_t)cdf[s]) << 9) + (q & 511);
    if (x < ((uint64_t)1 << 32) && *ptr > lo) {
        *ptr -= 1;
        x = (x << 32) | (uint64_t)words[*ptr];
    }
    *state = x;
    return s;
}

/* Lane j (of nl) holds per[j * C + c] symbols of context c, contexts in order, and writes them at
 * t * nl + j (tables as for ans_step, cdf rows of A1 entries). wcount[j] words each, back to back. Returns
 * -1, or the first lane that did not end cleanly.
 * Caller: sum(wcount) == nwords, lane j holds ceil((n - j) / nl) symbols in all (n: the output's length).
 * IL lanes are decoded together: each step's table lookups are independent, so their latencies overlap. */
#define IL 8
int64_t wp_lanes(const uint32_t *restrict words, int64_t nwords, const int64_t *restrict wcount, int64_t nl,
                 const int64_t *restrict per, int64_t C, const uint16_t *restrict bucket,
                 const uint32_t *restrict cdf, int64_t A1, int32_t *restrict out) {
    int64_t base = 0;
    (void)nwords;
    for (int64_t j0 = 0; j0 < nl; j0 += IL) {
        uint64_t st[IL];
        int64_t lo[IL], ptr[IL], pos[IL], left[IL], c[IL], rem[IL], steps = 0;
        for (int i = 0; i < IL; i++) {
            int64_t j = j0 + i;
            left[i] = 0;
            lo[i] = ptr[i] = pos[i] = 0;
            st[i] = 0;
            c[i] = -1;
            rem[i] = 0;
            if (j >= nl)
                continue;
            lo[i] = base;
            base += wcount[j];
            st[i] = ans_start(words, lo[i], base, &ptr[i]);
            pos[i] = j;
            for (int64_t k = 0; k < C; k++)
                left[i] += per[j * C + k];
            if (left[i] > steps)
                steps = left[i];
        }
        for (int64_t t = 0; t < steps; t++) {
            for (int i = 0; i < IL; i++) {
                if (t >= left[i])
                    continue;
                while (rem[i] == 0) {
                    c[i]++;
                    rem[i] = per[(j0 + i) * C + c[i]];
                }
                rem[i]--;
                int64_t ci = c[i];
                out[pos[i]] = (int32_t)ans_step(&st[i], words, lo[i], &ptr[i], bucket + ci * BUCKETS,
                                                cdf + ci * A1);
                pos[i] += nl;
            }
        }
        for (int i = 0; i < IL && j0 + i < nl; i++)
            if (ptr[i] != lo[i] || st[i] != 0)
                return j0 + i;
    }
    return -1;
}

/* out[i] = the next symbol of key keys[i] in grouped (the keys' runs in key order, counts[k] each, n in
 * all). Returns 0, or -1 where a key is out of range or has more elements than its count (nothing is read
 * or written out of bounds then). */
#define UNGROUP(NAME, T)                                                                                    \
    int64_t NAME(const int32_t *grouped, const uint8_t *keys, int64_t n, const int64_t *counts, int64_t K,  \
                 T *out) {                                                                                  \
        int64_t off[256], end[256], acc = 0;                                                                \
        if (K > 256)                                                                                        \
            return -1;                                                                                      \
        for (int64_t k = 0; k < K; k++) {                                                                   \
            off[k] = acc;                                                                                   \
            acc += counts[k];                                                                               \
            end[k] = acc;                                                                                   \
        }                                                                                                   \
        if (acc > n)                                                                                        \
            return -1;                                                                                      \
        for (int64_t i = 0; i < n; i++) {                                                                   \
            uint8_t k = keys[i];                                                                            \
            if (k >= K || off[k] >= end[k])                                                                 \
                return -1;                                                                                  \
            out[i] = (T)grouped[off[k]++];                                                                  \
        }                                                                                                   \
        return 0;                                                                                           \
    }
UNGROUP(wp_ungroup_u8, uint8_t)
UNGROUP(wp_ungroup_i32, int32_t)

/* The trellis machine (stages/tcq.py): states 0-3 quantizer 0, 4-7 quantizer 1; next state from the
 * parity p of the level: ((p ^ parity(popcount(s))) << 2) | (s >> 1). */
static inline int next_state(int s, int p) {
    return ((p ^ __builtin_parity((unsigned)s)) << 2) | (s >> 1);
}

void wp_walk(const uint8_t *p, int64_t n, int64_t lane, uint8_t *q) {
    uint8_t nxt[LANE_STATES][2];
    for (int s = 0; s < LANE_STATES; s++)
        for (int b = 0; b < 2; b++)
            nxt[s][b] = (uint8_t)next_state(s, b);
    for (int64_t a = 0; a < n; a += lane) {
        int64_t e = a + lane < n ? a + lane : n;
        int s = 0;
        for (int64_t i = a; i < e; i++) {
            q[i] = (uint8_t)(s >> 2);
            s = nxt[s][p[i] & 1];
        }
    }
}

/* ctx = (q * 2 + p) * R + rc; counts[ctx]++. Caller: q, p in {0, 1}, rc < R, counts has 4R zeros. */
void wp_split_contexts(const uint8_t *p, const uint8_t *q, const uint8_t *rc, int64_t n, int64_t R, uint8_t *ctx,
                       int64_t *counts) {
    for (int64_t i = 0; i < n; i++) {
        uint8_t c = (uint8_t)(((q[i] & 1) * 2 + (p[i] & 1)) * R + rc[i]);
        ctx[i] = c;
        counts[c]++;
    }
}

/* Level k = 2 (rest + rlo) + parity; the multiple is 2k on quantizer 0, 2k - sign(k) on quantizer 1. */
void wp_split_multiples(const uint8_t *p, const int32_t *rs, const uint8_t *q, int64_t n, int64_t rlo,
                        int16_t *out) {
    for (int64_t i = 0; i < n; i++) {
        int64_t k = 2 * ((int64_t)rs[i] + rlo) + (p[i] & 1);
        int64_t m = 2 * k - (int64_t)(q[i] & 1) * ((k > 0) - (k < 0));
        out[i] = (int16_t)m;
    }
}

/* The step-major trellis layout of one chunk of m elements (element a of the tensor first): lanes of `lane`
 * elements; at step j, every lane that has an element j gets a context (quantizer of its state, the sign
 * class of its previous level when prev, its row's class), the symbols of each context are decoded as one
 * group, contexts in order, lanes in order within a group, all from one ANS stream (tables as for
 * ans_step, cdf rows of A + 1). multiple[s * A + sym]
 * is the multiple a symbol decodes to in state s. scratch: 2 * L * lane + 24 * L + 16 * C bytes (L lanes,
 * C contexts; 8-byte aligned). Writes out[l * lane + j] (out holds L * lane int16). Returns 1 when the
 * stream ends cleanly, else 0. Caller: rcls[r] < R for r < nrows, nrows >= 1, C = 2 * (prev ? 3 : 1) * R
 * <= 256 tables of A <= 4096 symbols. The per-lane state is kept in small types (it is swept at every step)
 * and each step's multiples are written contiguously, then transposed into place. */
int64_t wp_step_major(const uint32_t *words, int64_t nwords, int64_t m, int64_t lane, int64_t a, int64_t row,
                      const uint8_t *rcls, int64_t nrows, int64_t R, int64_t prev, int64_t lo,
                      const uint16_t *bucket, const uint32_t *cdf, int64_t A,
                      const int16_t *multiple, int64_t *scratch, int16_t *out) {
    int64_t L = (m + lane - 1) / lane, C = 2 * (prev ? 3 : 1) * R, ptr;
    int64_t *counts = scratch, *off = scratch + C;
    int64_t *rw = off + C, *rp = rw + L; /* 64-bit: a crafted stream's rows may not fit 32 bits */
    uint16_t *got = (uint16_t *)(rp + L);
    uint8_t *st = (uint8_t *)(got + L), *pv = st + L, *ctx = pv + L;
    int16_t *byStep = (int16_t *)(((uintptr_t)(ctx + L) + 7) & ~(uintptr_t)7); /* [j * L + l] */
    uint64_t state = ans_start(words, 0, nwords, &ptr);
    if (C > 256 || row < 1)
        return 0;
    for (int64_t l = 0; l < L; l++) {
        st[l] = 0;
        pv[l] = 1; /* a lane starts as if after a zero */
        rw[l] = (a + l * lane) / row; /* the row of the lane's next element, and its place in it */
        rp[l] = (a + l * lane) % row;
    }
    int64_t steps = 0;
    for (int64_t j = 0; j < lane; j++) {
        int64_t active = (m - j + lane - 1) / lane;
        if (active <= 0)
            break;
        steps = j + 1;
        for (int64_t c = 0; c < C; c++)
            counts[c] = 0;
        for (int64_t l = 0; l < active; l++) {
            int64_t r = rw[l] < nrows ? rw[l] : nrows - 1;
            if (++rp[l] == row) {
                rp[l] = 0;
                rw[l]++;
            }
            int64_t c = (st[l] >> 2) * (prev ? 3 : 1) + (prev ? pv[l] : 0);
            c = c * R + rcls[r];
            ctx[l] = (uint8_t)c;
            counts[c]++;
        }
        /* the groups in context order, from the stream; the g-th symbol of context c is the g-th lane's
         * (in lane order) with context c */
        int64_t g = 0;
        for (int64_t c = 0; c < C; c++) {
            const uint16_t *bc = bucket + c * BUCKETS;
            const uint32_t *cc = cdf + c * (A + 1);
            off[c] = g;
            for (int64_t k = counts[c]; k > 0; k--)
                got[g++] = (uint16_t)ans_step(&state, words, 0, &ptr, bc, cc);
        }
        int16_t *row_out = byStep + j * L;
        for (int64_t l = 0; l < active; l++) {
            int64_t s = got[off[ctx[l]]++];
            int64_t k = s + lo;
            row_out[l] = multiple[st[l] * A + s];
            st[l] = (uint8_t)next_state((int)st[l], (int)(k & 1));
            pv[l] = k < 0 ? 0 : (k == 0 ? 1 : 2);
        }
    }
    /* transpose (steps x L, only the active part of each step is written) into out[l * lane + j] */
    for (int64_t l0 = 0; l0 < L; l0 += 64)
        for (int64_t j0 = 0; j0 < steps; j0 += 64)
            for (int64_t l = l0; l < l0 + 64 && l < L; l++)
                for (int64_t j = j0; j < j0 + 64 && j < steps; j++)
                    if (l * lane + j < m)
                        out[l * lane + j] = byStep[j * L + l];
    return ptr == 0 && state == 0;
}

/* Bytes of n values of `width` bits packed as fields.pack_bits packs them (byte planes, then 4-, 2-, 1-bit). */
static int64_t packed_size(int64_t n, int64_t width) {
    int64_t size = n * (width / 8), r = width % 8;
    for (int64_t w = 4; w >= 1; w >>= 1)
        if (r & w)
            size += (n * w + 7) / 8;
    return size;
}



/* -- lanes, fast: direct slot tables ------------------------------------------------------------------
 *
 * The same streams as wp_lanes, with the symbol of every one of the 2**15 slots of a context looked up
 * directly (dslot: C rows of 2**15 uint16) and its frequency and cumulative frequency packed in one word
 * (fc: C rows of A uint32, f | c << 16). Eight lanes are decoded together, their states in registers, the
 * refill without a branch: a step's latency (two table lookups and a multiply) is what bounds one lane,
 * so eight of them overlap. The symbols of the whole sequence run through the contexts in order (ccount
 * each); within a step where all eight lanes are in one context, the table is fixed. Symbols are written
 * as uint16. */
#define DSTEP(k, CTX)                                                                                        \
    do {                                                                                                     \
        const int64_t cc = (CTX);                                                                            \
        uint64_t q = x##k & 0xFFFFFF;                                                                        \
        uint32_t s = dslot[(cc << 15) + (q >> 9)], e = fc[cc * A + s];                                       \
        int64_t more = -(int64_t)(p##k > lo[k]); /* all ones while the lane has words left */                \
        uint64_t w = ws[(p##k - 1) & more];                                                                  \
        x##k = (x##k >> 24) * ((uint64_t)(e & 0xFFFF) << 9) + q - ((uint64_t)(e >> 16) << 9);                 \
        /* the refill as arithmetic: a branch here mispredicts often and stalls all the lanes */             \
        uint64_t r = -(uint64_t)(x##k < ((uint64_t)1 << 32)) & (uint64_t)more;                                \
        x##k = (x##k << (32 & r)) | (w & r);                                                                 \
        p##k += (int64_t)r; /* r is 0 or all ones (-1) */                                                    \
        out[base + k] = (uint16_t)s;                                                                         \
    } while (0)

/* the context of position i of the sequence: bounds[c] <= i < bounds[c + 1] */
static inline int64_t ctx_of(const int64_t *bounds, int64_t C, int64_t i) {
    int64_t c = 0;
    while (c + 1 < C && bounds[c + 1] <= i)
        c++;
    return c;
}

/* The SIMD kernels are compiled for x86-64 with AVX-512 (F, DQ, BW, VL) and chosen at run time, once
 * (wp_simd); elsewhere, and where the CPU lacks them, the portable loops run. Both give the same symbols. */
#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#define WP_AVX512 __attribute__((target("avx512f,avx512dq,avx512bw,avx512vl")))
static int simd_on = -1; /* -1: not asked yet; 0: portable loops; 1: AVX-512 */
static int simd_avx512(void) {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512dq") &&
           __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl");
}
#else
static int simd_on = 0;
static int simd_avx512(void) { return 0; }
#endif

/* want < 0: the level in use; 0: portable loops only; 1: the best the CPU has. Returns the level in use
 * (0 portable, 1 AVX-512). Tests run both on the same bytes. */
int64_t wp_simd(int64_t want) {
    if (want >= 0 || simd_on < 0)
        simd_on = want == 0 ? 0 : simd_avx512();
    return simd_on;
}

#ifdef WP_AVX512
/* One decoding step's end for eight lanes (the `on` ones): the state x advanced by its symbol's frequency f and
 * cumulative frequency cdf (both << 9) from its low 24 bits q, and where it fell below 2**32 (and the lane has
 * words left) the lane's next word taken in. */
static inline __attribute__((always_inline)) WP_AVX512 void
lane_advance(__m512i *x, __m512i *p, __m512i lo, __mmask8 on, __m512i q, __m512i f, __m512i cdf, const uint32_t *ws) {
    const __m512i one = _mm512_set1_epi64(1);
    __mmask8 more = _mm512_mask_cmpgt_epi64_mask(on, *p, lo);
    __m256i w = _mm512_mask_i64gather_epi32(_mm256_setzero_si256(), more, _mm512_sub_epi64(*p, one), ws, 4);
    __m512i nx = _mm512_sub_epi64(_mm512_add_epi64(_mm512_mullo_epi64(_mm512_srli_epi64(*x, 24), f), q), cdf);
    __mmask8 take = _mm512_mask_cmplt_epu64_mask(more, nx, _mm512_set1_epi64((int64_t)1 << 32));
    *x = _mm512_mask_mov_epi64(nx, take, _mm512_or_si512(_mm512_slli_epi64(nx, 32), _mm512_cvtepu32_epi64(w)));
    *p = _mm512_mask_sub_epi64(*p, take, *p, one);
}

/* M(g) for each vector g < G of a group, g a constant (the intrinsics that take a part of a vector need one). */
#define EACH_GROUP(M)                                                                                       \
    do {                                                                                                    \
        M(0);                                                                                               \
        if (G > 1)                                                                                          \
            M(1);                                                                                           \
        if (G > 2)                                                                                          \
            M(2);                                                                                           \
        if (G > 3)                                                                                          \
            M(3);                                                                                           \
    } while (0)

/* G groups of eight lanes (lanes j0 .. j0 + 8G - 1, all with at least `steps` symbols) decoded together for
 * their first `steps` steps, one lane per 64-bit element of a vector: the symbol found with a gather from
 * the slot table (as 32-bit words, the halfword picked by the slot's parity, so no read passes the table's
 * end), its frequency and cumulative frequency with a second gather, the state updated with a 64-bit
 * multiply, and the next word gathered ahead of need (masked to lanes with words left) and taken where the
 * state fell below 2**32. The G groups' chains overlap. States and word positions in and out through x, p. */
static inline __attribute__((always_inline)) WP_AVX512 void
lanes_avx512_g(const uint32_t *ws, int64_t j0, const int G, int64_t nl, int64_t steps, const int64_t *bounds,
               int64_t C, const uint16_t *dslot, const uint32_t *fc, int64_t A, uint16_t *out, uint64_t *x,
               int64_t *p, const int64_t *lo, int64_t active) {
    __m512i X[4], P[4], LO[4];
    __mmask8 on[4]; /* the group's lanes that exist (active of them): the others read nothing and write nothing */
    const __m512i m24 = _mm512_set1_epi64(0xFFFFFF), one = _mm512_set1_epi64(1);
    const __m256i m16 = _mm256_set1_epi32(0xFFFF);
    const __m512i m16w = _mm512_set1_epi64(0xFFFF);
    for (int g = 0; g < G; g++) {
        X[g] = _mm512_loadu_si512(x + 8 * g);
        P[g] = _mm512_loadu_si512(p + 8 * g);
        LO[g] = _mm512_loadu_si512(lo + 8 * g);
        int64_t k = active - 8 * g;
        on[g] = (__mmask8)(k >= 8 ? 0xFF : k > 0 ? (1u << k) - 1 : 0);
    }
    int64_t c = 0, cctx[32], creg = -1, half = 0;
    const int small = A <= 64; /* the symbol found by a binary search of the context's cdf, in registers */
    while (2 * half < A)
        half = half ? 2 * half : 1;
    half = A > 1 ? half : 0; /* the search's first step: the largest power of two below A */
    const __mmask32 on32 = (__mmask32)(active >= 32 ? 0xFFFFFFFFu : (1u << active) - 1);
    __m512i CDF0 = _mm512_setzero_si512(), CDF1 = CDF0, F0 = CDF0, F1 = CDF0;
    for (int64_t t = 0; t < steps; t++) {
        const int64_t base = t * nl + j0;
        while (bounds[c + 1] <= base)
            c++;
        const int uniform = base + active - 1 < bounds[c + 1];
        if (small && uniform) {
            if (c != creg) { /* the context's cumulative frequencies (0xFFFF past A: never at or below a slot) */
                uint16_t cd[64], fr[64];
                for (int64_t k = 0; k < 64; k++) {
                    uint32_t e = k < A ? fc[c * A + k] : 0;
                    cd[k] = k < A ? (uint16_t)(e >> 16) : 0xFFFF;
                    fr[k] = (uint16_t)(e & 0xFFFF);
                }
                CDF0 = _mm512_loadu_si512(cd), CDF1 = _mm512_loadu_si512(cd + 32);
                F0 = _mm512_loadu_si512(fr), F1 = _mm512_loadu_si512(fr + 32);
                creg = c;
            }
            __m512i Q[4], slot;
            for (int g = 0; g < G; g++)
                Q[g] = _mm512_and_si512(X[g], m24);
            slot = _mm512_castsi128_si512(_mm512_cvtepi64_epi16(_mm512_srli_epi64(Q[0], 9)));
            if (G > 1)
                slot = _mm512_inserti32x4(slot, _mm512_cvtepi64_epi16(_mm512_srli_epi64(Q[1], 9)), 1);
            if (G > 2)
                slot = _mm512_inserti32x4(slot, _mm512_cvtepi64_epi16(_mm512_srli_epi64(Q[2], 9)), 2);
            if (G > 3)
                slot = _mm512_inserti32x4(slot, _mm512_cvtepi64_epi16(_mm512_srli_epi64(Q[3], 9)), 3);
            __m512i sy = _mm512_setzero_si512();
            for (int64_t st = half; st; st >>= 1) { /* the last symbol whose cdf is at or below the slot */
                __m512i cand = _mm512_add_epi16(sy, _mm512_set1_epi16((short)st));
                __mmask32 ge = _mm512_cmpge_epu16_mask(slot, _mm512_permutex2var_epi16(CDF0, cand, CDF1));
                sy = _mm512_mask_mov_epi16(sy, ge, cand);
            }
            const __m512i cz = _mm512_permutex2var_epi16(CDF0, sy, CDF1), fz = _mm512_permutex2var_epi16(F0, sy, F1);
            _mm512_mask_storeu_epi16(out + base, on32, sy);
#define SMALL_STEP(g)                                                                                           \
            lane_advance(X + g, P + g, LO[g], on[g], Q[g],                                                      \
                         _mm512_slli_epi64(_mm512_cvtepu16_epi64(_mm512_extracti32x4_epi32(fz, g)), 9),        \
                         _mm512_slli_epi64(_mm512_cvtepu16_epi64(_mm512_extracti32x4_epi32(cz, g)), 9), ws)
            EACH_GROUP(SMALL_STEP);
#undef SMALL_STEP
            continue;
        }
        if (!uniform)
            for (int k = 0; k < 8 * G; k++)
                cctx[k] = k < active ? ctx_of(bounds, C, base + k) : 0;
        for (int g = 0; g < G; g++) {
            __m512i cv = uniform ? _mm512_set1_epi64(c) : _mm512_loadu_si512(cctx + 8 * g);
            __m512i q = _mm512_and_si512(X[g], m24);
            __m512i slot = _mm512_srli_epi64(q, 9);
            __m512i idx = _mm512_add_epi64(_mm512_slli_epi64(cv, 15), slot);
            __m256i pair = _mm512_i64gather_epi32(_mm512_srli_epi64(idx, 1), dslot, 4);
            __m256i par = _mm512_cvtepi64_epi32(_mm512_and_si512(idx, one));
            __m256i s = _mm256_and_si256(_mm256_srlv_epi32(pair, _mm256_slli_epi32(par, 4)), m16);
            __m256i fidx = _mm256_add_epi32(s, _mm512_cvtepi64_epi32(_mm512_mullo_epi64(cv, _mm512_set1_epi64(A))));
            __m512i e = _mm512_cvtepu32_epi64(_mm256_i32gather_epi32((const int *)fc, fidx, 4));
            __m512i f = _mm512_slli_epi64(_mm512_and_si512(e, m16w), 9);
            __m512i cdf = _mm512_slli_epi64(_mm512_srli_epi64(e, 16), 9);
            lane_advance(X + g, P + g, LO[g], on[g], q, f, cdf, ws);
            _mm_mask_storeu_epi16(out + base + 8 * g, on[g], _mm256_cvtepi32_epi16(s));
        }
    }
    for (int g = 0; g < G; g++) {
        _mm512_storeu_si512(x + 8 * g, X[g]);
        _mm512_storeu_si512(p + 8 * g, P[g]);
    }
}

static WP_AVX512 void lanes_avx512(const uint32_t *ws, int64_t j0, int G, int64_t nl, int64_t steps,
                                   const int64_t *bounds, int64_t C, const uint16_t *dslot, const uint32_t *fc,
                                   int64_t A, uint16_t *out, uint64_t *x, int64_t *p, const int64_t *lo,
                                   int64_t active) {
    switch (G) {
    case 4: lanes_avx512_g(ws, j0, 4, nl, steps, bounds, C, dslot, fc, A, out, x, p, lo, active); break;
    case 3: lanes_avx512_g(ws, j0, 3, nl, steps, bounds, C, dslot, fc, A, out, x, p, lo, active); break;
    case 2: lanes_avx512_g(ws, j0, 2, nl, steps, bounds, C, dslot, fc, A, out, x, p, lo, active); break;
    default: lanes_avx512_g(ws, j0, 1, nl, steps, bounds, C, dslot, fc, A, out, x, p, lo, active); break;
    }
}
#endif

/* The word counts of the lanes: int64 (wc64), or as a lanes part stores them (wc32: little-endian uint32). */
static inline int64_t lane_wcount(const int64_t *wc64, const uint8_t *wc32, int64_t j) {
    uint32_t v;
    if (wc64)
        return wc64[j];
    memcpy(&v, wc32 + 4 * j, 4);
    return v;
}

static int64_t lanes_fast(const uint32_t *restrict words, int64_t nwords, const int64_t *restrict wcount,
                          const uint8_t *restrict wcount32, int64_t nl, const int64_t *restrict ccount, int64_t C,
                          const uint16_t *restrict dslot, const uint32_t *restrict fc, int64_t A, int64_t n,
                          uint16_t *restrict out) {
    static const uint32_t zero = 0;
    const uint32_t *ws = nwords ? words : &zero; /* the refill reads ws[0] when it does not refill */
    int64_t bounds[257], acc = 0, wbase = 0;
    if (C < 1 || C > 256 || nl < 0 || (nl == 0) != (n == 0))
        return 0;
    for (int64_t c = 0; c < C; c++) {
        bounds[c] = acc;
        acc += ccount[c];
    }
    bounds[C] = acc;
    if (acc != n)
        return 0;
    const int simd = wp_simd(-1);
    for (int64_t j0 = 0; j0 < nl;) {
        /* a group: up to 32 lanes for the vector kernel (its last vector maybe part full), else 8 */
        int64_t G = simd ? ((nl - j0 + 7) / 8 < 4 ? (nl - j0 + 7) / 8 : 4) : 0, width = G ? 8 * G : 8;
        int64_t active = nl - j0 < width ? nl - j0 : width;
        int64_t lo[32], cnt[32], pp[32];
        uint64_t xx[32];
        for (int k = 0; k < width; k++) {
            int64_t j = j0 + k;
            lo[k] = pp[k] = wbase, xx[k] = 0, cnt[k] = 0;
            if (j < nl) {
                lo[k] = wbase;
                wbase += lane_wcount(wcount, wcount32, j);
                xx[k] = ans_start(ws, lo[k], wbase, &pp[k]);
                cnt[k] = (n - 1 - j) / nl + 1; /* non-increasing in k, by at most one in all */
            }
        }
        int64_t done = 0; /* steps every lane of the group has taken */
#ifdef WP_AVX512
        if (G) {
            done = cnt[active - 1];
            lanes_avx512(ws, j0, (int)G, nl, done, bounds, C, dslot, fc, A, out, xx, pp, lo, active);
        }
#endif
        if (!G && j0 + 8 <= nl && cnt[7] == cnt[0]) { /* eight full lanes, states in registers */
            uint64_t x0 = xx[0], x1 = xx[1], x2 = xx[2], x3 = xx[3], x4 = xx[4], x5 = xx[5], x6 = xx[6], x7 = xx[7];
            int64_t p0 = pp[0], p1 = pp[1], p2 = pp[2], p3 = pp[3], p4 = pp[4], p5 = pp[5], p6 = pp[6], p7 = pp[7];
            int64_t c = 0;
            for (int64_t t = 0; t < cnt[0]; t++) {
                const int64_t base = t * nl + j0;
                while (bounds[c + 1] <= base)
                    c++;
                if (base + 7 < bounds[c + 1]) {
                    DSTEP(0, c); DSTEP(1, c); DSTEP(2, c); DSTEP(3, c);
                    DSTEP(4, c); DSTEP(5, c); DSTEP(6, c); DSTEP(7, c);
                } else { /* a context boundary inside the step */
                    DSTEP(0, ctx_of(bounds, C, base)); DSTEP(1, ctx_of(bounds, C, base + 1));
                    DSTEP(2, ctx_of(bounds, C, base + 2)); DSTEP(3, ctx_of(bounds, C, base + 3));
                    DSTEP(4, ctx_of(bounds, C, base + 4)); DSTEP(5, ctx_of(bounds, C, base + 5));
                    DSTEP(6, ctx_of(bounds, C, base + 6)); DSTEP(7, ctx_of(bounds, C, base + 7));
                }
            }
            xx[0] = x0, xx[1] = x1, xx[2] = x2, xx[3] = x3, xx[4] = x4, xx[5] = x5, xx[6] = x6, xx[7] = x7;
            pp[0] = p0, pp[1] = p1, pp[2] = p2, pp[3] = p3, pp[4] = p4, pp[5] = p5, pp[6] = p6, pp[7] = p7;
            done = cnt[0];
        }
        /* what is left (the last lanes, lanes of unequal length, a group's last step): one lane at a time */
        for (int k = 0; k < width && j0 + k < nl; k++) {
            uint64_t x0 = xx[k];
            int64_t p0 = pp[k];
            const int64_t *lok = lo + k;
            for (int64_t t = done; t < cnt[k]; t++) {
                const int64_t base = t * nl + j0 + k, *lo = lok; /* DSTEP's lo[0] and out[base + 0] */
                DSTEP(0, ctx_of(bounds, C, base));
            }
            xx[k] = x0, pp[k] = p0;
        }
        for (int k = 0; k < width && j0 + k < nl; k++)
            if (pp[k] != lo[k] || xx[k] != 0)
                return j0 + k + 1;
        j0 += width;
    }
    return -1;
}

int64_t wp_lanes_fast(const uint32_t *restrict words, int64_t nwords, const int64_t *restrict wcount, int64_t nl,
                      const int64_t *restrict ccount, int64_t C, const uint16_t *restrict dslot,
                      const uint32_t *restrict fc, int64_t A, int64_t n, uint16_t *restrict out) {
    return lanes_fast(words, nwords, wcount, NULL, nl, ccount, C, dslot, fc, A, n, out);
}

/* A fields chunk rebuilt from its decoded head symbols and its packed tail (codecs/fields/: cpu.py, layout.py),
 * in one pass over its blocks: m elements of W bits in nb blocks of L (the last one maybe shorter);
 * element = sign | head | tail with T tail bits and S (0 or 1) sign bits. syms: the head symbols grouped
 * by class (classes in order, blocks in order within a class; ccount[c] elements each), alphabet[s] the
 * head value of symbol s. tail: for each trailing-zero count tz in order (blocks with btz == tz, in order),
 * the tails of width T - tz + S packed as bit planes (fields.pack_bits); each element's tail is read
 * straight from the planes at its place in its group. out: W/8 bytes per element. Returns 0, or -1 on any
 * inconsistency (nothing is read or written out of bounds then). */
#define JPIECE 2048 /* elements of a block joined at a time (their tails gathered in a stack buffer) */

/* The k values (j0 ... j0 + k - 1) of a plane of 4-, 2- or 1-bit values (fields.pack_bits: value j in bits
 * (j % per) * w of byte j / per, per = 8 / w) as bytes. Eight values at a time are spread from the bytes that
 * hold them with shifts and masks, reading no byte outside those of the k values. */
static inline uint64_t spread4(uint32_t v) { /* 8 nibbles -> 8 bytes */
    uint64_t t = v;
    t = (t | (t << 16)) & 0x0000FFFF0000FFFFull;
    t = (t | (t << 8)) & 0x00FF00FF00FF00FFull;
    return (t | (t << 4)) & 0x0F0F0F0F0F0F0F0Full;
}
static inline uint64_t spread2(uint32_t v) { /* 8 two-bit fields -> 8 bytes */
    uint64_t t = v;
    t = (t | (t << 24)) & 0x000000FF000000FFull;
    t = (t | (t << 12)) & 0x000F000F000F000Full;
    return (t | (t << 6)) & 0x0303030303030303ull;
}
static inline uint64_t spread1(uint32_t v) { /* 8 bits -> 8 bytes */
    uint64_t t = v;
    t = (t | (t << 28)) & 0x0000000F0000000Full;
    t = (t | (t << 14)) & 0x0003000300030003ull;
    return (t | (t << 7)) & 0x0101010101010101ull;
}
static void unpack_plane(const uint8_t *restrict p, int64_t w, int64_t j0, int64_t k, uint8_t *restrict dst) {
    const int64_t per = 8 / w, mask = (1 << w) - 1;
    int64_t i = 0;
    for (; i < k && (j0 + i) % per; i++) { /* up to the next byte boundary */
        int64_t j = j0 + i;
        dst[i] = (p[j / per] >> ((j % per) * w)) & mask;
    }
    for (; i + 8 <= k; i += 8) {
        const uint8_t *b = p + (j0 + i) / per; /* w bytes hold these 8 values */
        uint64_t v;
        if (w == 4)
            v = spread4((uint32_t)b[0] | (uint32_t)b[1] << 8 | (uint32_t)b[2] << 16 | (uint32_t)b[3] << 24);
        else if (w == 2)
            v = spread2((uint32_t)b[0] | (uint32_t)b[1] << 8);
        else
            v = spread1(b[0]);
        memcpy(dst + i, &v, 8);
    }
    for (; i < k; i++) {
        int64_t j = j0 + i;
        dst[i] = (p[j / per] >> ((j % per) * w)) & mask;
    }
}

#define JOIN(NAME, U, W)                                                                                    \
    static int64_t NAME(const uint16_t *restrict syms, int64_t m, const uint64_t *restrict alphabet,      \
                        int64_t A, const uint8_t *restrict bcls, const uint8_t *restrict btz, int64_t nb,   \
                        int64_t L, int64_t *restrict off, const int64_t *restrict end,                     \
                        const uint8_t *restrict tail, const int64_t *restrict tpos,                        \
                        const int64_t *restrict tcount, int64_t S, int64_t T, U *restrict out) {           \
        int64_t tdone[65] = {0};                                                                            \
        U head[4096];                                                                                       \
        U xs[JPIECE];                                                                                       \
        uint8_t sub[JPIECE];                                                                                \
        if (A > 4096)                                                                                       \
            return -1;                                                                                      \
        for (int64_t s = 0; s < A; s++)                                                                     \
            head[s] = (U)(alphabet[s] << T);                                                                \
        for (int64_t b = 0; b < nb; b++) {                                                                  \
            int64_t a = b * L, len = b == nb - 1 ? m - a : L, c = bcls[b], tz = btz[b];                     \
            if (off[c] + len > end[c])                                                                      \
                return -1;                                                                                  \
            const uint16_t *sc = syms + off[c];                                                             \
            U *o = out + a;                                                                                 \
            uint16_t smax = 0;                                                                              \
            for (int64_t i = 0; i < len; i++) /* (vectorized) */                                            \
                smax = sc[i] > smax ? sc[i] : smax;                                                         \
            if (len && smax >= A)                                                                           \
                return -1;                                                                                  \
            for (int64_t i = 0; i < len; i++)                                                               \
                o[i] = head[sc[i]];                                                                         \
            off[c] += len;                                                                                  \
            if (T + S == 0)                                                                                 \
                continue;                                                                                   \
            int64_t t = T - tz, width = t + S, n = tcount[tz], nbytes = width / 8, r = width % 8;           \
            U mask = t ? (U)((((uint64_t)1) << t) - 1) : 0;                                                 \
            const uint8_t *pb = tail + tpos[tz];                                                            \
            const uint8_t *p4 = pb + nbytes * n;                                                            \
            const uint8_t *p2 = p4 + ((r & 4) ? (n * 4 + 7) / 8 : 0);                                       \
            const uint8_t *p1 = p2 + ((r & 2) ? (n * 2 + 7) / 8 : 0);                                       \
            for (int64_t i0 = 0; i0 < len; i0 += JPIECE) {                                                  \
                int64_t k = len - i0 < JPIECE ? len - i0 : JPIECE, j0 = tdone[tz] + i0, shift = 0;          \
                for (int64_t i = 0; i < k; i++)                                                             \
                    xs[i] = 0;                                                                              \
                for (int64_t q = 0; q < nbytes; q++, shift += 8) {                                          \
                    const uint8_t *p = pb + q * n + j0;                                                     \
                    for (int64_t i = 0; i < k; i++)                                                         \
                        xs[i] |= (U)((U)p[i] << shift);                                                     \
                }                                                                                           \
                for (int64_t w = 4; w >= 1; w >>= 1) {                                                      \
                    if (!(r & w))                                                                           \
                        continue;                                                                           \
                    unpack_plane(w == 4 ? p4 : w == 2 ? p2 : p1, w, j0, k, sub);                            \
                    for (int64_t i = 0; i < k; i++)                                                         \
                        xs[i] |= (U)((U)sub[i] << shift);                                                   \
                    shift += w;                                                                             \
                }                                                                                           \
                U *oo = o + i0;                                                                             \
                if (S)                                                                                      \
                    for (int64_t i = 0; i < k; i++)                                                         \
                        oo[i] |= (U)(((U)(xs[i] & mask) << tz) | ((U)(xs[i] >> t) << (W - 1)));             \
                else                                                                                        \
                    for (int64_t i = 0; i < k; i++)                                                         \
                        oo[i] |= (U)((U)(xs[i] & mask) << tz);                                              \
            }                                                                                               \
            tdone[tz] += len;                                                                               \
        }                                                                                                   \
        return 0;                                                                                           \
    }
JOIN(join8, uint8_t, 8)
JOIN(join16, uint16_t, 16)
JOIN(join32, uint32_t, 32)
JOIN(join64, uint64_t, 64)

#ifdef WP_AVX512
/* Element j's tail bits read from the planes of its group, one at a time (a block's first elements, up to a
 * byte boundary of its sub-byte planes). */
static inline uint32_t tail_at(const uint8_t *pb, int64_t n, int64_t nbytes, int64_t r, const uint8_t *p4,
                               const uint8_t *p2, const uint8_t *p1, int64_t j) {
    uint32_t x = 0;
    int sh = 0;
    for (int64_t q = 0; q < nbytes; q++, sh += 8)
        x |= (uint32_t)pb[q * n + j] << sh;
    if (r & 4)
        x |= (uint32_t)((p4[j >> 1] >> ((j & 1) * 4)) & 15) << sh, sh += 4;
    if (r & 2)
        x |= (uint32_t)((p2[j >> 2] >> ((j & 3) * 2)) & 3) << sh, sh += 2;
    if (r & 1)
        x |= (uint32_t)((p1[j >> 3] >> (j & 7)) & 1) << sh;
    return x;
}

/* 32 values of a 4-, 2- or 1-bit plane (width w) from its nb bytes at p (at most 16, none read past them),
 * widened to 16-bit lanes: lane i takes byte idx[i] shifted right by shifts[i]. */
static inline WP_AVX512 __m512i widen_plane(const uint8_t *p, int64_t nb, __m512i idx, __m512i shifts, int w) {
    __m128i v = _mm_maskz_loadu_epi8((__mmask16)((1u << nb) - 1), p);
    __m512i x = _mm512_permutexvar_epi16(idx, _mm512_castsi256_si512(_mm256_cvtepu8_epi16(v)));
    return _mm512_and_si512(_mm512_srlv_epi16(x, shifts), _mm512_set1_epi16((short)((1 << w) - 1)));
}

/* join16 with AVX-512: 32 elements a step, reading and writing nothing outside their bytes (masked loads and
 * stores at a block's end). The head values come from two registers (A <= 64: one permute) or a gather; each
 * tail plane is widened to 16-bit lanes with a permute and a shift. The same output and checks as join16. */
static WP_AVX512 int64_t join16_avx512(const uint16_t *restrict syms, int64_t m, const uint64_t *restrict alphabet,
                                       int64_t A, const uint8_t *restrict bcls, const uint8_t *restrict btz,
                                       int64_t nb, int64_t L, int64_t *restrict off, const int64_t *restrict end,
                                       const uint8_t *restrict tail, const int64_t *restrict tpos,
                                       const int64_t *restrict tcount, int64_t S, int64_t T, uint16_t *restrict out) {
    int64_t tdone[65] = {0};
    uint32_t head[4096];
    uint16_t h16[64] = {0};
    if (A > 4096)
        return -1;
    for (int64_t s = 0; s < A; s++) {
        head[s] = (uint16_t)(alphabet[s] << T);
        if (s < 64)
            h16[s] = (uint16_t)head[s];
    }
    uint16_t io[32];
    for (int i = 0; i < 32; i++)
        io[i] = (uint16_t)i;
    const __m512i iota = _mm512_loadu_si512(io), H0 = _mm512_loadu_si512(h16), H1 = _mm512_loadu_si512(h16 + 32);
    const __m512i idx4 = _mm512_srli_epi16(iota, 1), sh4 = _mm512_slli_epi16(_mm512_and_si512(iota, _mm512_set1_epi16(1)), 2);
    const __m512i idx2 = _mm512_srli_epi16(iota, 2), sh2 = _mm512_slli_epi16(_mm512_and_si512(iota, _mm512_set1_epi16(3)), 1);
    const __m512i idx1 = _mm512_srli_epi16(iota, 3), sh1 = _mm512_and_si512(iota, _mm512_set1_epi16(7));
    const __m512i vA = _mm512_set1_epi16((short)(A < 65535 ? A : 65535));
    for (int64_t b = 0; b < nb; b++) {
        int64_t a = b * L, len = b == nb - 1 ? m - a : L, c = bcls[b], tz = btz[b];
        if (off[c] + len > end[c])
            return -1;
        const uint16_t *sc = syms + off[c];
        uint16_t *o = out + a;
        const int64_t t = T - tz, width = t + S, n = tcount[tz], nbytes = width / 8, r = width % 8, j0 = tdone[tz];
        const uint32_t mask = t ? (uint32_t)((1u << t) - 1) : 0;
        const uint8_t *pb = tail + tpos[tz];
        const uint8_t *p4 = pb + nbytes * n;
        const uint8_t *p2 = p4 + ((r & 4) ? (n * 4 + 7) / 8 : 0);
        const uint8_t *p1 = p2 + ((r & 2) ? (n * 2 + 7) / 8 : 0);
        int64_t i = 0;
        if (T + S)
            for (; i < len && (j0 + i) % 8; i++) {
                if (sc[i] >= A)
                    return -1;
                uint32_t x = tail_at(pb, n, nbytes, r, p4, p2, p1, j0 + i);
                o[i] = (uint16_t)(head[sc[i]] | ((x & mask) << tz) | (S ? (x >> t) << 15 : 0));
            }
        const __m128i ctz = _mm_cvtsi32_si128((int)tz), ct = _mm_cvtsi32_si128((int)t);
        const __m512i vmask = _mm512_set1_epi16((short)mask);
        for (; i < len; i += 32) {
            const int64_t k = len - i < 32 ? len - i : 32, j = j0 + i;
            const __mmask32 km = k == 32 ? 0xFFFFFFFFu : (__mmask32)((1u << k) - 1);
            __m512i s = _mm512_maskz_loadu_epi16(km, sc + i), h;
            if (_mm512_mask_cmpge_epu16_mask(km, s, vA))
                return -1;
            if (A <= 64)
                h = _mm512_permutex2var_epi16(H0, s, H1);
            else {
                __m512i lo = _mm512_i32gather_epi32(_mm512_cvtepu16_epi32(_mm512_castsi512_si256(s)), (const int *)head, 4);
                __m512i hi = _mm512_i32gather_epi32(_mm512_cvtepu16_epi32(_mm512_extracti64x4_epi64(s, 1)), (const int *)head, 4);
                h = _mm512_inserti64x4(_mm512_castsi256_si512(_mm512_cvtepi32_epi16(lo)), _mm512_cvtepi32_epi16(hi), 1);
            }
            if (T + S) {
                __m512i x = _mm512_setzero_si512();
                int sh = 0;
                for (int64_t q = 0; q < nbytes; q++, sh += 8)
                    x = _mm512_or_si512(x, _mm512_sll_epi16(_mm512_cvtepu8_epi16(_mm256_maskz_loadu_epi8(km, pb + q * n + j)),
                                                            _mm_cvtsi32_si128(sh)));
                if (r & 4) {
                    x = _mm512_or_si512(x, _mm512_sll_epi16(widen_plane(p4 + j / 2, (k + 1) / 2, idx4, sh4, 4),
                                                            _mm_cvtsi32_si128(sh)));
                    sh += 4;
                }
                if (r & 2) {
                    x = _mm512_or_si512(x, _mm512_sll_epi16(widen_plane(p2 + j / 4, (k + 3) / 4, idx2, sh2, 2),
                                                            _mm_cvtsi32_si128(sh)));
                    sh += 2;
                }
                if (r & 1)
                    x = _mm512_or_si512(x, _mm512_sll_epi16(widen_plane(p1 + j / 8, (k + 7) / 8, idx1, sh1, 1),
                                                            _mm_cvtsi32_si128(sh)));
                h = _mm512_or_si512(h, _mm512_sll_epi16(_mm512_and_si512(x, vmask), ctz));
                if (S)
                    h = _mm512_or_si512(h, _mm512_slli_epi16(_mm512_srl_epi16(x, ct), 15));
            }
            _mm512_mask_storeu_epi16(o + i, km, h);
        }
        off[c] += len;
        tdone[tz] += len;
    }
    return 0;
}
#endif

int64_t wp_fields_join(const uint16_t *syms, int64_t m, const uint64_t *alphabet, int64_t A, const uint8_t *bcls,
                       const uint8_t *btz, int64_t nb, int64_t L, int64_t C, const int64_t *ccount,
                       const uint8_t *tail, int64_t tail_len, int64_t W, int64_t S, int64_t T, void *out) {
    int64_t off[256], end[256], tpos[65], tcount[65], acc = 0;
    if (C < 1 || C > 256 || L < 1 || nb != (m + L - 1) / L || T < 0 || T > 63 || (S != 0 && S != 1) ||
        T + S >= W)
        return -1;
    for (int64_t c = 0; c < C; c++) {
        off[c] = acc;
        acc += ccount[c];
        end[c] = acc;
    }
    if (acc != m)
        return -1;
    for (int64_t tz = 0; tz <= T; tz++)
        tcount[tz] = 0;
    for (int64_t b = 0; b < nb; b++) {
        if (bcls[b] >= C || btz[b] > T)
            return -1;
        tcount[btz[b]] += b == nb - 1 ? m - b * L : L;
    }
    int64_t pos = 0;
    for (int64_t tz = 0; tz <= T; tz++) {
        tpos[tz] = pos;
        if (tcount[tz] && T + S)
            pos += packed_size(tcount[tz], T - tz + S);
    }
    if (pos != tail_len)
        return -1;
    switch (W) {
    case 8: return join8(syms, m, alphabet, A, bcls, btz, nb, L, off, end, tail, tpos, tcount, S, T, out);
    case 16:
#ifdef WP_AVX512
        if (wp_simd(-1))
            return join16_avx512(syms, m, alphabet, A, bcls, btz, nb, L, off, end, tail, tpos, tcount, S, T, out);
#endif
        return join16(syms, m, alphabet, A, bcls, btz, nb, L, off, end, tail, tpos, tcount, S, T, out);
    case 32: return join32(syms, m, alphabet, A, bcls, btz, nb, L, off, end, tail, tpos, tcount, S, T, out);
    case 64: return join64(syms, m, alphabet, A, bcls, btz, nb, L, off, end, tail, tpos, tcount, S, T, out);
    default: return -1;
    }
}

uint32_t wp_crc32(const uint8_t *p, int64_t n, uint32_t value);

/* A laned fields chunk in one call (the Python around it is the same for every chunk, and each call
 * through ctypes costs a round trip through the GIL): its head part (nl = ceil(m / lane) word counts, then
 * the lanes' words) decoded with the direct slot tables into syms (m uint16 of work space), joined with its
 * tail part into out (as wp_fields_join; ccount from the blocks' classes), and the crc32 of out from `seed`
 * (zlib's) put in *crc. Returns 0; -1: the head part is malformed (its length, or word counts that do not
 * add up to its words); -2: a lane did not end cleanly; -3: the blocks' side information or the tail
 * disagree with the chunk; -4: the arguments disagree. */
int64_t wp_fields_decode(const uint8_t *head, int64_t head_len, int64_t lane, const uint8_t *tail, int64_t tail_len,
                         int64_t m, const uint8_t *bcls, const uint8_t *btz, int64_t nb, int64_t L, int64_t C,
                         const uint16_t *dslot, const uint32_t *fc, int64_t A, const uint64_t *alphabet, int64_t W,
                         int64_t S, int64_t T, uint16_t *syms, void *out, uint32_t seed, uint32_t *crc) {
    int64_t ccount[256] = {0};
    if (lane < 1 || m < 1 || L < 1 || nb != (m + L - 1) / L || C < 1 || C > 256 || A < 1 || (W != 8 && W != 16 &&
        W != 32 && W != 64))
        return -4;
    const int64_t nl = (m + lane - 1) / lane;
    if (head_len < 4 * nl || head_len % 4)
        return -1;
    const int64_t nwords = (head_len - 4 * nl) / 4;
    int64_t total = 0;
    for (int64_t j = 0; j < nl; j++)
        total += lane_wcount(NULL, head, j);
    if (total != nwords)
        return -1;
    for (int64_t b = 0; b < nb; b++) {
        if (bcls[b] >= C)
            return -3;
        ccount[bcls[b]] += b == nb - 1 ? m - b * L : L;
    }
    if (lanes_fast((const uint32_t *)(head + 4 * nl), nwords, NULL, head, nl, ccount, C, dslot, fc, A, m, syms) >= 0)
        return -2;
    if (wp_fields_join(syms, m, alphabet, A, bcls, btz, nb, L, C, ccount, tail, tail_len, W, S, T, out))
        return -3;
    *crc = wp_crc32(out, m * (W / 8), seed);
    return 0;
}

/* -- encoding ----------------------------------------------------------------------------------------
 *
 * The encoders write exactly the bytes the Python/constriction encoders write (tests/test_coding_native.py checks
 * both ways): the planning histograms of coding/streams.make_plan, and fields chunks with their heads as
 * ANS lanes (entropy.lanes_encode) and their tails packed by trailing-zero group (fields.pack_bits). */

/* Element i of an array of W-bit unsigned values, widened. */
static inline uint64_t elem(const void *u, int64_t W, int64_t i) {
    switch (W) {
    case 8: return ((const uint8_t *)u)[i];
    case 16: return ((const uint16_t *)u)[i];
    case 32: return ((const uint32_t *)u)[i];
    default: return ((const uint64_t *)u)[i];
    }
}

/* Planning, first pass over n elements (blocks of L from block b0 on; n a multiple of L but for the last
 * piece): hist[head]++, bsum[b] += head, blow[b] |= tail bits, where head = (v >> T) & (2**H - 1).
 * Caller: hist has 2**H entries, bsum and blow ceil(n / L) from b0. */
/* (Counts go to four copies of the histogram in turn, added up at the end: weights repeat the same few head
 * values, and one copy would make every count wait for the one before it.) */
#define SCAN(NAME, U)                                                                                       \
    static void NAME(const U *restrict u, int64_t n, int64_t T, uint64_t hmask, uint64_t tmask, int64_t L,  \
                     int64_t *restrict hist, int64_t *restrict bsum, uint64_t *restrict blow,             \
                     uint32_t *restrict sub) {                                                               \
        const int64_t nh = (int64_t)hmask + 1;                                                              \
        for (int64_t a = 0, b = 0; a < n; a += L, b++) {                                                    \
            int64_t e = a + L < n ? a + L : n, s = 0, i = a;                                                \
            uint64_t low = 0;                                                                               \
            if (sub)                                                                                        \
                for (; i + 4 <= e; i += 4) {                                                                \
                    uint64_t v0 = u[i], v1 = u[i + 1], v2 = u[i + 2], v3 = u[i + 3];                        \
                    uint64_t h0 = (v0 >> T) & hmask, h1 = (v1 >> T) & hmask, h2 = (v2 >> T) & hmask,       \
                             h3 = (v3 >> T) & hmask;                                                         \
                    sub[h0]++, sub[nh + h1]++, sub[2 * nh + h2]++, sub[3 * nh + h3]++;                     \
                    s += (int64_t)(h0 + h1 + h2 + h3);                                                      \
                    low |= (v0 | v1 | v2 | v3) & tmask;                                                     \
                }                                                                                           \
            for (; i < e; i++) {                                                                            \
                uint64_t v = u[i], h = (v >> T) & hmask;                                                    \
                hist[h]++;                                                                                  \
                s += (int64_t)h;                                                                            \
                low |= v & tmask;                                                                           \
            }                                                                                               \
            bsum[b] = s;                                                                                    \
            blow[b] = low;                                                                                  \
        }                                                                                                   \
        if (sub)                                                                                            \
            for (int64_t h = 0; h < nh; h++)                                                                \
                hist[h] += (int64_t)sub[h] + sub[nh + h] + sub[2 * nh + h] + sub[3 * nh + h];             \
    }
SCAN(scan8, uint8_t)
SCAN(scan16, uint16_t)
SCAN(scan32, uint32_t)
SCAN(scan64, uint64_t)

int64_t wp_plan_scan(const void *u, int64_t n, int64_t W, int64_t H, int64_t T, int64_t L, int64_t *hist,
                     int64_t *bsum, uint64_t *blow) {
    if (L < 1 || H < 1 || H > 16 || T < 0 || T > 63 || n < 0)
        return -1;
    uint64_t hmask = ((uint64_t)1 << H) - 1, tmask = T ? (((uint64_t)1 << T) - 1) : 0;
    /* four 32-bit histograms hold any count of a call below 2**32 */
    uint32_t *sub = n < ((int64_t)1 << 32) ? calloc(4 << H, sizeof(uint32_t)) : NULL;
    int64_t r = 0;
    switch (W) {
    case 8: scan8(u, n, T, hmask, tmask, L, hist, bsum, blow, sub); break;
    case 16: scan16(u, n, T, hmask, tmask, L, hist, bsum, blow, sub); break;
    case 32: scan32(u, n, T, hmask, tmask, L, hist, bsum, blow, sub); break;
    case 64: scan64(u, n, T, hmask, tmask, L, hist, bsum, blow, sub); break;
    default: r = -1;
    }
    free(sub);
    return r;
}

/* Planning, second pass: fine[cls[b] * A + lut[head]]++ over n elements in blocks of L (cls from the
 * first of these blocks). Caller: lut has 2**H entries below A, cls entries below the classes of fine. */
int64_t wp_class_hist(const void *u, int64_t n, int64_t W, int64_t H, int64_t T, int64_t L, const uint8_t *cls,
                      const int32_t *lut, int64_t A, int64_t *fine) {
    if (L < 1 || H < 1 || H > 16 || T < 0 || T > 63 || n < 0)
        return -1;
    uint64_t hmask = ((uint64_t)1 << H) - 1;
    if (W == 16 && H <= 12 && n < ((int64_t)1 << 32)) {
        /* counted by head value in four copies per class (as in SCAN), mapped through lut at the end */
        int64_t C = 0, nh = (int64_t)1 << H;
        for (int64_t a = 0, b = 0; a < n; a += L, b++)
            C = cls[b] + 1 > C ? cls[b] + 1 : C;
        uint32_t *sub = calloc((size_t)(4 * C * nh), sizeof(uint32_t));
        if (sub) {
            const uint16_t *v = u;
            for (int64_t a = 0, b = 0; a < n; a += L, b++) {
                int64_t e = a + L < n ? a + L : n, i = a;
                uint32_t *h = sub + 4 * nh * (int64_t)cls[b];
                for (; i + 4 <= e; i += 4) {
                    h[(v[i] >> T) & hmask]++, h[nh + ((v[i + 1] >> T) & hmask)]++;
                    h[2 * nh + ((v[i + 2] >> T) & hmask)]++, h[3 * nh + ((v[i + 3] >> T) & hmask)]++;
                }
                for (; i < e; i++)
                    h[(v[i] >> T) & hmask]++;
            }
            for (int64_t c = 0; c < C; c++)
                for (int64_t k = 0; k < nh; k++) {
                    const uint32_t *h = sub + 4 * nh * c + k;
                    fine[c * A + lut[k]] += (int64_t)h[0] + h[nh] + h[2 * nh] + h[3 * nh];
                }
            free(sub);
            return 0;
        }
    }
    for (int64_t a = 0, b = 0; a < n; a += L, b++) {
        int64_t e = a + L < n ? a + L : n;
        int64_t *row = fine + (int64_t)cls[b] * A;
        for (int64_t i = a; i < e; i++)
            row[lut[(elem(u, W, i) >> T) & hmask]]++;
    }
    return 0;
}

/* constriction's AnsCoder, encoding: 64-bit state, 32-bit words, 24-bit precision, tables f << 9 of the
 * stored 15-bit tables. Symbols are encoded in reverse order; a word is pushed when the state would
 * overflow; at the end the state follows as its low word and, when not zero, its high word (nothing for
 * state 0). */
typedef struct {
    uint32_t f, c;  /* 15-bit frequency and cumulative frequency */
    uint64_t magic; /* y / f == mulhi(y << pre, magic) >> post for y < 2**55 (enc_tables in native.py) */
    uint32_t pre, post;
} EncSym;

static inline uint64_t ans_put(uint64_t x, uint32_t *buf, int64_t *nw, const EncSym *e) {
    uint64_t f = e->f;
    /* branch-free: whether a word is pushed is data-dependent (a branch would mispredict often); buf has
     * room for the speculative store */
    int64_t push = x >= (f << 49);
    buf[*nw] = (uint32_t)x;
    *nw += push;
    x >>= 32 * push;
    uint64_t y = x >> 9; /* < 2**55 */
    uint64_t q = (uint64_t)(((unsigned __int128)(y << e->pre) * e->magic) >> 64) >> e->post;
    return (q << 24) | ((((y - q * f) << 9) | (x & 511)) + ((uint64_t)e->c << 9));
}

static inline void ans_flush(uint64_t state, uint32_t *buf, int64_t *nw) {
    if (state) {
        buf[(*nw)++] = (uint32_t)state;
        if (state >> 32)
            buf[(*nw)++] = (uint32_t)(state >> 32);
    }
}

/* The lanes payload of n symbols (coding order; ctx[i] the context of symbol i): nl = ceil(n / lane)
 * lanes, symbol i in lane i % nl; nl word counts, then each lane's words. tab: C rows of A EncSym.
 * scratch: 33 * lane + 16 words (entropy_native.enc_scratch). Returns the payload's length in bytes, or -1 if
 * out would overflow (cap bytes) or a symbol or context is out of range. Four lanes are encoded together,
 * their states in registers (their dependency chains overlap); with AVX-512, 32 (lanes_encode_avx512). */
#ifdef WP_AVX512
/* wp_lanes_encode with AVX-512, for lanes j0 .. j0 + active - 1 (at most 32, in vectors of eight 64-bit
 * states). Each step encodes every lane's symbol: its f | c << 32 gathered from tab, the word pushed where
 * the state would overflow, and the division y / f done in doubles -- y < f 2**40 after the push, so the
 * quotient is off by at most one and is corrected exactly with integers. The pushed words (the lanes' low
 * words, compressed) go to one stream, with each step's push mask; then they are dealt to their lanes,
 * followed by the final states: the lanes' word counts at 4 * j0, their words from pos on. Returns the new
 * pos, or -1 past cap. stream: 32 words per step and 8 more; masks: one per step. The same words as the
 * portable loop (tests/test_coding_native.py). */
static WP_AVX512 int64_t lanes_encode_avx512(const uint16_t *restrict sym, const uint8_t *restrict ctx, int64_t n,
                                             int64_t nl, int64_t j0, int64_t active, const EncSym *restrict tab,
                                             int64_t A, uint32_t *restrict stream, uint32_t *restrict masks,
                                             uint8_t *restrict out, int64_t pos, int64_t cap) {
    const int G = (int)((active + 7) / 8);
    int64_t cnt[32] = {0};
    for (int k = 0; k < active; k++)
        cnt[k] = (n - 1 - (j0 + k)) / nl + 1; /* non-increasing in k, by at most one in all */
    __m512i X[4], NC[4];
    for (int g = 0; g < 4; g++)
        X[g] = NC[g] = _mm512_setzero_si512();
    const __m512i one = _mm512_set1_epi64(1), m511 = _mm512_set1_epi64(511), zero = _mm512_setzero_si512();
    const __m512i low32 = _mm512_set1_epi64(0xFFFFFFFF);
    const __m256i vA = _mm256_set1_epi32((int)A), three = _mm256_set1_epi32(3);
    __m512i F0 = zero, F1 = zero, C0 = zero, C1 = zero;
    int64_t ns = 0, steps = 0, creg = -1;
    for (int64_t t = cnt[0] - 1; t >= 0; t--, steps++) {
        int64_t act = active; /* the lanes with a symbol at step t */
        while (act > 0 && cnt[act - 1] <= t)
            act--;
        const __mmask32 am = (__mmask32)(act >= 32 ? 0xFFFFFFFFu : (1u << act) - 1);
        const int64_t base = t * nl + j0;
        uint32_t pm = 0;
        __m512i FG[4], CG[4]; /* the lanes' frequencies and cumulative frequencies */
        const int c0 = ctx[base];
        if (A <= 64 && _mm256_mask_cmpeq_epi8_mask(am, _mm256_maskz_loadu_epi8(am, ctx + base), _mm256_set1_epi8((char)c0)) == am) {
            /* one context at this step, an alphabet of up to 64: from its tables in registers, 32 lanes at once */
            if (c0 != creg) {
                uint16_t fr[64] = {0}, cu[64] = {0};
                for (int64_t k = 0; k < A; k++)
                    fr[k] = (uint16_t)tab[c0 * A + k].f, cu[k] = (uint16_t)tab[c0 * A + k].c;
                F0 = _mm512_loadu_si512(fr), F1 = _mm512_loadu_si512(fr + 32);
                C0 = _mm512_loadu_si512(cu), C1 = _mm512_loadu_si512(cu + 32);
                creg = c0;
            }
            const __m512i sv = _mm512_maskz_loadu_epi16(am, sym + base);
            const __m512i fz = _mm512_permutex2var_epi16(F0, sv, F1), cz = _mm512_permutex2var_epi16(C0, sv, C1);
#define FC_PART(g)                                                                                              \
            FG[g] = _mm512_cvtepu16_epi64(_mm512_extracti32x4_epi32(fz, g)),                                   \
            CG[g] = _mm512_cvtepu16_epi64(_mm512_extracti32x4_epi32(cz, g))
            EACH_GROUP(FC_PART);
#undef FC_PART
        } else
            for (int g = 0; g < G; g++) {
                const __mmask8 on = (__mmask8)(am >> (8 * g));
                __m256i s32 = _mm256_cvtepu16_epi32(_mm_maskz_loadu_epi16(on, sym + base + 8 * g));
                __m256i c32 = _mm256_cvtepu8_epi32(_mm_maskz_loadu_epi8(on, ctx + base + 8 * g));
                __m256i idx = _mm256_mullo_epi32(_mm256_add_epi32(_mm256_mullo_epi32(c32, vA), s32), three);
                __m512i e = _mm512_mask_i32gather_epi64(zero, on, idx, (const long long *)tab, 8);
                FG[g] = _mm512_and_si512(e, low32), CG[g] = _mm512_srli_epi64(e, 32);
            }
        for (int g = 0; g < G; g++) {
            const __mmask8 on = (__mmask8)(am >> (8 * g));
            __m512i f = _mm512_mask_mov_epi64(one, on, FG[g]), c = CG[g];
            __m512i x = X[g];
            __mmask8 push = _mm512_mask_cmpge_epu64_mask(on, x, _mm512_slli_epi64(f, 49));
            _mm256_storeu_si256((__m256i *)(stream + ns), _mm512_cvtepi64_epi32(_mm512_maskz_compress_epi64(push, x)));
            ns += __builtin_popcount(push);
            pm |= (uint32_t)push << (8 * g);
            NC[g] = _mm512_mask_add_epi64(NC[g], push, NC[g], one);
            x = _mm512_mask_srli_epi64(x, push, x, 32);
            __m512i y = _mm512_srli_epi64(x, 9);
            __m512i q = _mm512_cvttpd_epu64(_mm512_div_pd(_mm512_cvtepu64_pd(y), _mm512_cvtepu64_pd(f)));
            __m512i r = _mm512_sub_epi64(y, _mm512_mullo_epi64(q, f));
            __mmask8 lo = _mm512_cmplt_epi64_mask(r, zero);
            q = _mm512_mask_sub_epi64(q, lo, q, one);
            r = _mm512_mask_add_epi64(r, lo, r, f);
            __mmask8 hi = _mm512_cmpge_epi64_mask(r, f);
            q = _mm512_mask_add_epi64(q, hi, q, one);
            r = _mm512_mask_sub_epi64(r, hi, r, f);
            __m512i nx = _mm512_or_si512(_mm512_slli_epi64(q, 24), _mm512_or_si512(_mm512_slli_epi64(r, 9), _mm512_and_si512(x, m511)));
            X[g] = _mm512_mask_mov_epi64(X[g], on, _mm512_add_epi64(nx, _mm512_slli_epi64(c, 9)));
        }
        masks[steps] = pm;
    }
    uint64_t xs[32], pushed[32];
    int64_t ptr[32];
    for (int g = 0; g < G; g++) {
        _mm512_storeu_si512(xs + 8 * g, X[g]);
        _mm512_storeu_si512(pushed + 8 * g, NC[g]);
    }
    for (int k = 0; k < active; k++) {
        uint32_t count = (uint32_t)(pushed[k] + (xs[k] != 0) + (xs[k] >> 32 != 0));
        if (pos + 4 * (int64_t)count > cap)
            return -1;
        memcpy(out + 4 * (j0 + k), &count, 4);
        ptr[k] = pos;
        pos += 4 * (int64_t)count;
    }
    int64_t p = 0;
    for (int64_t i = 0; i < steps; i++)
        for (uint32_t m = masks[i]; m; m &= m - 1) {
            int k = __builtin_ctz(m);
            memcpy(out + ptr[k], stream + p++, 4);
            ptr[k] += 4;
        }
    for (int k = 0; k < active; k++)
        if (xs[k]) {
            uint32_t w = (uint32_t)xs[k];
            memcpy(out + ptr[k], &w, 4);
            if (xs[k] >> 32) {
                w = (uint32_t)(xs[k] >> 32);
                memcpy(out + ptr[k] + 4, &w, 4);
            }
        }
    return pos;
}
#endif

#define PUT(k)                                                                                               \
    x##k = ans_put(x##k, w##k, &n##k, tab + ctx[base + k] * A + sym[base + k])
int64_t wp_lanes_encode(const uint16_t *restrict sym, const uint8_t *restrict ctx, int64_t n, int64_t lane,
                        const EncSym *restrict tab, int64_t C, int64_t A, uint32_t *restrict scratch,
                        uint8_t *restrict out, int64_t cap) {
    if (lane < 1 || n < 0 || C < 1 || A < 1)
        return -1;
    uint16_t smax = 0;
    uint8_t cmax = 0;
    for (int64_t i = 0; i < n; i++) { /* (vectorized) */
        smax = sym[i] > smax ? sym[i] : smax;
        cmax = ctx[i] > cmax ? ctx[i] : cmax;
    }
    if (n && (smax >= A || cmax >= C))
        return -1;
    int64_t nl = (n + lane - 1) / lane, pos = 4 * nl;
    if (pos > cap)
        return -1;
#ifdef WP_AVX512
    if (wp_simd(-1) && (int64_t)C * A <= (1 << 20)) {
        uint32_t *masks = scratch, *stream = scratch + lane + 8;
        for (int64_t j0 = 0; j0 < nl && pos >= 0; j0 += 32)
            pos = lanes_encode_avx512(sym, ctx, n, nl, j0, nl - j0 < 32 ? nl - j0 : 32, tab, A, stream, masks, out, pos,
                                      cap);
        return pos;
    }
#endif
    uint32_t *w0 = scratch, *w1 = w0 + lane + 2, *w2 = w1 + lane + 2, *w3 = w2 + lane + 2;
    for (int64_t j0 = 0; j0 < nl; j0 += 4) {
        uint64_t x0 = 0, x1 = 0, x2 = 0, x3 = 0;
        int64_t n0 = 0, n1 = 0, n2 = 0, n3 = 0, cnt[4];
        for (int i = 0; i < 4; i++)
            cnt[i] = j0 + i < nl ? (n - 1 - (j0 + i)) / nl + 1 : 0; /* non-increasing in i */
        /* steps t = cnt - 1 down to 0; lane i takes part in step t when t < cnt[i] */
        int64_t t = cnt[0] - 1;
        for (; t >= cnt[3]; t--) { /* the top steps, where not every lane has a symbol */
            const int64_t base = t * nl + j0;
            PUT(0);
            if (t < cnt[1])
                PUT(1);
            if (t < cnt[2])
                PUT(2);
        }
        for (; t >= 0; t--) {
            const int64_t base = t * nl + j0;
            PUT(0);
            PUT(1);
            PUT(2);
            PUT(3);
        }
        ans_flush(x0, w0, &n0), ans_flush(x1, w1, &n1), ans_flush(x2, w2, &n2), ans_flush(x3, w3, &n3);
        const uint32_t *ws[4] = {w0, w1, w2, w3};
        const int64_t nws[4] = {n0, n1, n2, n3};
        for (int i = 0; i < 4 && j0 + i < nl; i++) {
            uint32_t count = (uint32_t)nws[i];
            if (pos + 4 * nws[i] > cap)
                return -1;
            memcpy(out + 4 * (j0 + i), &count, 4); /* little-endian, as the decoders read it (x86, arm) */
            memcpy(out + pos, ws[i], 4 * (size_t)nws[i]);
            pos += 4 * nws[i];
        }
    }
    return pos;
}

/* Pack n values of `width` bits (x) as fields.pack_bits does: byte planes, then a 4-, 2- and 1-bit plane,
 * lowest bits first; out holds packed_size(n, width) bytes. */
static void pack_planes(const uint64_t *restrict x, int64_t n, int64_t width, uint8_t *restrict out) {
    int64_t shift = 0;
    for (int64_t k = 0; k < width / 8; k++, shift += 8, out += n)
        for (int64_t j = 0; j < n; j++)
            out[j] = (uint8_t)(x[j] >> shift);
    int64_t r = width % 8;
    if (r & 4) {
        int64_t full = n / 2;
        for (int64_t g = 0; g < full; g++)
            out[g] = (uint8_t)(((x[2 * g] >> shift) & 15) | (((x[2 * g + 1] >> shift) & 15) << 4));
        if (n & 1)
            out[full] = (uint8_t)((x[n - 1] >> shift) & 15);
        shift += 4, out += (n * 4 + 7) / 8;
    }
    if (r & 2) {
        int64_t full = n / 4;
        for (int64_t g = 0; g < full; g++) {
            const uint64_t *q = x + 4 * g;
            out[g] = (uint8_t)(((q[0] >> shift) & 3) | (((q[1] >> shift) & 3) << 2) | (((q[2] >> shift) & 3) << 4) |
                               (((q[3] >> shift) & 3) << 6));
        }
        if (n & 3) {
            uint8_t v = 0;
            for (int64_t j = 4 * full; j < n; j++)
                v |= (uint8_t)(((x[j] >> shift) & 3) << ((j & 3) << 1));
            out[full] = v;
        }
        shift += 2, out += (n * 2 + 7) / 8;
    }
    if (r & 1) {
        int64_t full = n / 8;
        for (int64_t g = 0; g < full; g++) {
            const uint64_t *q = x + 8 * g;
            uint8_t v = 0;
            for (int k = 0; k < 8; k++)
                v |= (uint8_t)(((q[k] >> shift) & 1) << k);
            out[g] = v;
        }
        if (n & 7) {
            uint8_t v = 0;
            for (int64_t j = 8 * full; j < n; j++)
                v |= (uint8_t)(((x[j] >> shift) & 1) << (j & 7));
            out[full] = v;
        }
    }
}

/* A fields chunk's heads and tails (m elements of W bits, blocks of L, the last maybe shorter):
 * sym/ctx (when sym is given): the head symbols lut[head] grouped by block class (classes in order, blocks
 * in order within a class) and each one's class; tail: for each trailing-zero count tz in order, the tails
 * (low T bits without their tz zeros, the sign on top when S) of the blocks with btz == tz, packed at
 * width T - tz + S as fields.pack_bits packs them. scratch: m uint64. Returns the tail's length, or -1 on
 * inconsistent arguments. */
#define SPLIT(NAME, U)                                                                                       \
    static void NAME##_heads(const U *restrict u, int64_t m, int64_t T, uint64_t hmask, int64_t L,            \
                             const uint8_t *restrict bcls, int64_t nb, const int32_t *restrict lut,           \
                             int64_t *restrict off, uint16_t *restrict sym, uint8_t *restrict ctx) {          \
        for (int64_t b = 0; b < nb; b++) {                                                                   \
            int64_t a = b * L, len = b == nb - 1 ? m - a : L, c = bcls[b], o = off[c];                       \
            const U *ub = u + a;                                                                             \
            uint16_t *sb = sym + o;                                                                          \
            for (int64_t i = 0; i < len; i++)                                                                \
                sb[i] = (uint16_t)lut[(ub[i] >> T) & hmask];                                                 \
            memset(ctx + o, (int)c, (size_t)len);                                                            \
            off[c] += len;                                                                                   \
        }                                                                                                    \
    }                                                                                                        \
    static int64_t NAME##_gather(const U *restrict u, int64_t m, int64_t S, int64_t T, int64_t L,            \
                                 const uint8_t *restrict btz, int64_t nb, int64_t tz, uint64_t *restrict x) { \
        uint64_t tmask = ((uint64_t)1 << T) - 1; /* T <= 63 */                                               \
        int64_t t = T - tz, k = 0, top = (int64_t)sizeof(U) * 8 - 1;                                         \
        for (int64_t b = 0; b < nb; b++) {                                                                   \
            if (btz[b] != tz)                                                                                \
                continue;                                                                                    \
            int64_t a = b * L, len = b == nb - 1 ? m - a : L;                                                \
            const U *ub = u + a;                                                                             \
            if (S)                                                                                           \
                for (int64_t i = 0; i < len; i++)                                                            \
                    x[k + i] = (((uint64_t)ub[i] & tmask) >> tz) | (((uint64_t)ub[i] >> top) << t);          \
            else                                                                                             \
                for (int64_t i = 0; i < len; i++)                                                            \
                    x[k + i] = ((uint64_t)ub[i] & tmask) >> tz;                                              \
            k += len;                                                                                        \
        }                                                                                                    \
        return k;                                                                                            \
    }
SPLIT(split8, uint8_t)
SPLIT(split16, uint16_t)
SPLIT(split32, uint32_t)
SPLIT(split64, uint64_t)

#ifdef WP_AVX512
/* split16's two halves with AVX-512, 32 elements a step (the same bytes as split16_heads and split16_gather
 * with pack_planes): head symbols from the lut copied to 16-bit registers, 64 entries each (heads of up to 9
 * bits; wider ones, up to 12, gathered), and the tails of a trailing-zero group packed into their planes
 * straight from the elements. */
static WP_AVX512 void split16_heads_avx512(const uint16_t *restrict u, int64_t m, int64_t T, uint64_t hmask,
                                           int64_t L, const uint8_t *restrict bcls, int64_t nb,
                                           const int32_t *restrict lut, int64_t *restrict off,
                                           uint16_t *restrict sym, uint8_t *restrict ctx) {
    uint16_t l16[512] = {0};
    const int64_t nlut = (int64_t)hmask + 1, ntab = (nlut + 63) / 64, regs = ntab <= 8;
    __m512i tab[16];
    if (regs) {
        for (int64_t h = 0; h < nlut; h++)
            l16[h] = (uint16_t)lut[h];
        for (int64_t k = 0; k < 2 * ntab; k++)
            tab[k] = _mm512_loadu_si512(l16 + 32 * k);
    }
    const __m512i vmask = _mm512_set1_epi16((short)hmask);
    const __m128i shift = _mm_cvtsi32_si128((int)T), six = _mm_cvtsi32_si128(6);
    for (int64_t b = 0; b < nb; b++) {
        int64_t a = b * L, len = b == nb - 1 ? m - a : L, c = bcls[b], o = off[c];
        for (int64_t i = 0; i < len; i += 32) {
            const int64_t k = len - i < 32 ? len - i : 32;
            const __mmask32 km = k == 32 ? 0xFFFFFFFFu : (__mmask32)((1u << k) - 1);
            __m512i h = _mm512_and_si512(_mm512_srl_epi16(_mm512_maskz_loadu_epi16(km, u + a + i), shift), vmask);
            if (!regs) { /* heads of 10 to 12 bits: the lut gathered, sixteen at a time */
                __m512i lo = _mm512_i32gather_epi32(_mm512_cvtepu16_epi32(_mm512_castsi512_si256(h)), lut, 4);
                __m512i hi = _mm512_i32gather_epi32(_mm512_cvtepu16_epi32(_mm512_extracti64x4_epi64(h, 1)), lut, 4);
                __m512i r = _mm512_inserti64x4(_mm512_castsi256_si512(_mm512_cvtepi32_epi16(lo)), _mm512_cvtepi32_epi16(hi), 1);
                _mm512_mask_storeu_epi16(sym + o + i, km, r);
                continue;
            }
            __m512i r = _mm512_permutex2var_epi16(tab[0], h, tab[1]);
            if (ntab > 1) {
                __m512i hi = _mm512_srl_epi16(h, six);
                for (int64_t t = 1; t < ntab; t++)
                    r = _mm512_mask_mov_epi16(r, _mm512_cmpeq_epi16_mask(hi, _mm512_set1_epi16((short)t)),
                                              _mm512_permutex2var_epi16(tab[2 * t], h, tab[2 * t + 1]));
            }
            _mm512_mask_storeu_epi16(sym + o + i, km, r);
        }
        memset(ctx + o, (int)c, (size_t)len);
        off[c] += len;
    }
}

/* The tails of the blocks with btz == tz (width T - tz + S, the sign on top), packed as pack_planes packs them
 * (n of them in all): whole steps of 32 with vectors, the last n % 32 one at a time. */
static inline uint32_t tail16(uint16_t v, int64_t S, uint32_t tmask, int64_t tz, int64_t t) {
    return ((v & tmask) >> tz) | (S ? (uint32_t)(v >> 15) << t : 0);
}
static WP_AVX512 void split16_tails_avx512(const uint16_t *restrict u, int64_t m, int64_t S, int64_t T, int64_t L,
                                           const uint8_t *restrict btz, int64_t nb, int64_t tz, int64_t n,
                                           uint8_t *restrict out) {
    const int64_t t = T - tz, width = t + S, nbytes = width / 8, r = width % 8;
    const uint32_t tmask = (uint32_t)((1u << T) - 1);
    uint8_t *p4 = out + nbytes * n, *p2 = p4 + ((r & 4) ? (n * 4 + 7) / 8 : 0), *p1 = p2 + ((r & 2) ? (n * 2 + 7) / 8 : 0);
    const int sh4 = 8 * (int)nbytes, sh2 = sh4 + ((r & 4) ? 4 : 0), sh1 = sh2 + ((r & 2) ? 2 : 0);
    const __m512i vt = _mm512_set1_epi16((short)tmask);
    const __m128i ctz = _mm_cvtsi32_si128((int)tz), ct = _mm_cvtsi32_si128((int)t);
    uint16_t rest[32];
    int64_t j = 0, nrest = 0; /* j: tails written so far (a multiple of 32 until the last partial step) */
    for (int64_t b = 0; b < nb; b++) {
        if (btz[b] != tz)
            continue;
        const int64_t a = b * L, len = b == nb - 1 ? m - a : L;
        for (int64_t i = 0; i < len;) {
            if (nrest || len - i < 32) { /* gather a step of 32 across block ends one at a time */
                rest[nrest++] = (uint16_t)tail16(u[a + i], S, tmask, tz, t);
                i++;
                if (nrest < 32)
                    continue;
            }
            __m512i x;
            if (nrest == 32) {
                x = _mm512_loadu_si512(rest);
                nrest = 0;
            } else {
                x = _mm512_loadu_si512(u + a + i);
                __m512i v = _mm512_srl_epi16(_mm512_and_si512(x, vt), ctz);
                if (S)
                    v = _mm512_or_si512(v, _mm512_sll_epi16(_mm512_srli_epi16(x, 15), ct));
                x = v;
                i += 32;
            }
            for (int64_t q = 0; q < nbytes; q++)
                _mm256_storeu_si256((__m256i *)(out + q * n + j), _mm512_cvtepi16_epi8(_mm512_srl_epi16(x, _mm_cvtsi32_si128(8 * (int)q))));
            if (r & 4) { /* pairs of nibbles: in 32-bit lanes, low | high << 4 */
                __m512i v = _mm512_and_si512(_mm512_srl_epi16(x, _mm_cvtsi32_si128(sh4)), _mm512_set1_epi16(15));
                v = _mm512_or_si512(v, _mm512_srli_epi32(v, 12));
                _mm_storeu_si128((__m128i *)(p4 + j / 2), _mm512_cvtepi32_epi8(v));
            }
            if (r & 2) { /* fours of two bits: in 64-bit lanes */
                __m512i v = _mm512_and_si512(_mm512_srl_epi16(x, _mm_cvtsi32_si128(sh2)), _mm512_set1_epi16(3));
                v = _mm512_or_si512(v, _mm512_srli_epi64(v, 14));
                v = _mm512_or_si512(v, _mm512_srli_epi64(v, 28));
                _mm_storel_epi64((__m128i *)(p2 + j / 4), _mm512_cvtepi64_epi8(v));
            }
            if (r & 1) {
                uint32_t bits = _mm512_test_epi16_mask(x, _mm512_set1_epi16((short)(1 << sh1)));
                memcpy(p1 + j / 8, &bits, 4);
            }
            j += 32;
        }
    }
    for (int64_t k = 0; k < nrest; k++, j++) { /* the last tails, fewer than 32 */
        uint32_t v = rest[k];
        for (int64_t q = 0; q < nbytes; q++)
            out[q * n + j] = (uint8_t)(v >> (8 * q));
        if (r & 4)
            p4[j / 2] = (uint8_t)((j & 1 ? p4[j / 2] : 0) | ((v >> sh4) & 15) << (4 * (j & 1)));
        if (r & 2)
            p2[j / 4] = (uint8_t)((j & 3 ? p2[j / 4] : 0) | ((v >> sh2) & 3) << (2 * (j & 3)));
        if (r & 1)
            p1[j / 8] = (uint8_t)((j & 7 ? p1[j / 8] : 0) | ((v >> sh1) & 1) << (j & 7));
    }
}
#endif

int64_t wp_fields_split(const void *u, int64_t m, int64_t W, int64_t S, int64_t H, int64_t T, int64_t L,
                        const uint8_t *bcls, const uint8_t *btz, int64_t nb, int64_t C, const int32_t *lut,
                        uint16_t *sym, uint8_t *ctx, uint8_t *tail, int64_t tail_cap, uint64_t *scratch) {
    int64_t off[256], tcount[65];
    if (L < 1 || nb != (m + L - 1) / L || C < 1 || C > 256 || T < 0 || T > 63 || H < 1 || H > 16 ||
        (S != 0 && S != 1) || S + H + T != W)
        return -1;
    uint64_t hmask = ((uint64_t)1 << H) - 1;
    if (sym) { /* heads, grouped by class */
        int64_t acc = 0;
        for (int64_t c = 0; c < C; c++)
            off[c] = 0;
        for (int64_t b = 0; b < nb; b++) {
            if (bcls[b] >= C)
                return -1;
            off[bcls[b]] += b == nb - 1 ? m - b * L : L;
        }
        for (int64_t c = 0; c < C; c++) {
            int64_t k = off[c];
            off[c] = acc;
            acc += k;
        }
        switch (W) {
        case 8: split8_heads(u, m, T, hmask, L, bcls, nb, lut, off, sym, ctx); break;
        case 16:
#ifdef WP_AVX512
            if (wp_simd(-1) && H <= 12) {
                split16_heads_avx512(u, m, T, hmask, L, bcls, nb, lut, off, sym, ctx);
                break;
            }
#endif
            split16_heads(u, m, T, hmask, L, bcls, nb, lut, off, sym, ctx);
            break;
        case 32: split32_heads(u, m, T, hmask, L, bcls, nb, lut, off, sym, ctx); break;
        case 64: split64_heads(u, m, T, hmask, L, bcls, nb, lut, off, sym, ctx); break;
        default: return -1;
        }
    }
    if (T + S == 0)
        return 0;
    for (int64_t tz = 0; tz <= T; tz++)
        tcount[tz] = 0;
    for (int64_t b = 0; b < nb; b++) {
        if (btz[b] > T)
            return -1;
        tcount[btz[b]] += b == nb - 1 ? m - b * L : L;
    }
    int64_t pos = 0;
    for (int64_t tz = 0; tz <= T; tz++)
        if (tcount[tz])
            pos += packed_size(tcount[tz], T - tz + S);
    if (pos > tail_cap)
        return -1;
    pos = 0;
    for (int64_t tz = 0; tz <= T; tz++) {
        if (!tcount[tz])
            continue;
        int64_t k;
#ifdef WP_AVX512
        if (W == 16 && wp_simd(-1)) {
            split16_tails_avx512(u, m, S, T, L, btz, nb, tz, tcount[tz], tail + pos);
            pos += packed_size(tcount[tz], T - tz + S);
            continue;
        }
#endif
        switch (W) {
        case 8: k = split8_gather(u, m, S, T, L, btz, nb, tz, scratch); break;
        case 16: k = split16_gather(u, m, S, T, L, btz, nb, tz, scratch); break;
        case 32: k = split32_gather(u, m, S, T, L, btz, nb, tz, scratch); break;
        case 64: k = split64_gather(u, m, S, T, L, btz, nb, tz, scratch); break;
        default: return -1;
        }
        pack_planes(scratch, k, T - tz + S, tail + pos);
        pos += packed_size(k, T - tz + S);
    }
    return pos;
}

/* The byte counts of a sample of data (storage.py's probe): `pieces` pieces of `piece` bytes (a multiple of
 * `planes`) at k * (n / pieces), byte j of a piece counted in plane j % planes: counts[plane * 256 + byte]
 * (added to). Caller: (pieces - 1) * (n / pieces) + piece <= n. */
void wp_sample_counts(const uint8_t *data, int64_t n, int64_t planes, int64_t pieces, int64_t piece, int64_t *counts) {
    const int64_t step = n / pieces;
    for (int64_t k = 0; k < pieces; k++) {
        const uint8_t *p = data + k * step;
        for (int64_t i = 0; i < piece; i += planes)
            for (int64_t j = 0; j < planes; j++)
                counts[j * 256 + p[i + j]]++;
    }
}

static struct PyModuleDef native_module = {PyModuleDef_HEAD_INIT, "_native", "ctypes kernels", -1, NULL};

PyMODINIT_FUNC PyInit__native(void) { return PyModule_Create(&native_module); }

/* -- crc32 (zlib's: the reflected polynomial 0xEDB88320) ----------------------------------------------
 *
 * The checksums of every chunk, coded and decoded, on both sides. zlib's crc32 here runs at ~2.7 GB/s;
 * with carry-less multiplication (PCLMULQDQ) four 128-bit accumulators fold 64 bytes a step, then one,
 * then 64 -> 32 bits by Barrett reduction (the method of Gopal et al., "Fast CRC Computation for Generic
 * Polynomials Using PCLMULQDQ", Intel, 2009, with its constants for this polynomial). The bytes outside
 * whole 16-byte blocks, and CPUs without the instruction, go through a byte table. Same value as
 * zlib.crc32(data, value) (tests/test_coding_native.py). */
static uint32_t crc_table[256];
static void crc_table_init(void) {
    for (uint32_t i = 0; i < 256; i++) {
        uint32_t c = i;
        for (int k = 0; k < 8; k++)
            c = (c >> 1) ^ (0xEDB88320u & -(c & 1));
        crc_table[i] = c;
    }
}
static uint32_t crc_bytes(uint32_t c, const uint8_t *p, int64_t n) { /* c: the register (not inverted) */
    for (int64_t i = 0; i < n; i++)
        c = crc_table[(c ^ p[i]) & 0xFF] ^ (c >> 8);
    return c;
}

#if defined(__x86_64__) && defined(__GNUC__)
#define WP_CLMUL __attribute__((target("pclmul,sse4.1")))
#define WP_VCLMUL __attribute__((target("avx512f,avx512vl,vpclmulqdq,pclmul,sse4.1")))
static int clmul_ok = -1, vclmul_ok = -1;
#define FOLD(X, K, D) _mm_xor_si128(_mm_xor_si128(_mm_clmulepi64_si128(X, K, 0x00), _mm_clmulepi64_si128(X, K, 0x11)), D)
/* four accumulators of 16 bytes (consecutive blocks) folded on by 64 bytes a step over p[0, n), n % 16 == 0,
 * then into one, and reduced to the register's 32 bits */
static WP_CLMUL uint32_t crc_fold(__m128i x1, __m128i x2, __m128i x3, __m128i x4, const uint8_t *p, int64_t n) {
    const __m128i k1k2 = _mm_set_epi64x(0x1c6e41596LL, 0x154442bd4LL);
    const __m128i k3k4 = _mm_set_epi64x(0x0ccaa009eLL, 0x1751997d0LL);
    const __m128i k5 = _mm_set_epi64x(0, 0x163cd6124LL);
    const __m128i poly = _mm_set_epi64x(0x1F7011641LL, 0x1DB710641LL);
    const __m128i mask32 = _mm_set_epi32(0, 0, 0, -1);
    for (; n >= 64; p += 64, n -= 64) {
        x1 = FOLD(x1, k1k2, _mm_loadu_si128((const __m128i *)p));
        x2 = FOLD(x2, k1k2, _mm_loadu_si128((const __m128i *)(p + 16)));
        x3 = FOLD(x3, k1k2, _mm_loadu_si128((const __m128i *)(p + 32)));
        x4 = FOLD(x4, k1k2, _mm_loadu_si128((const __m128i *)(p + 48)));
    }
    x1 = FOLD(x1, k3k4, x2);
    x1 = FOLD(x1, k3k4, x3);
    x1 = FOLD(x1, k3k4, x4);
    for (; n >= 16; p += 16, n -= 16)
        x1 = FOLD(x1, k3k4, _mm_loadu_si128((const __m128i *)p));
    /* 128 -> 64 bits (also appending 32 zero bits), then 64 -> 32 */
    __m128i t = _mm_xor_si128(_mm_clmulepi64_si128(x1, k3k4, 0x10), _mm_srli_si128(x1, 8));
    t = _mm_xor_si128(_mm_clmulepi64_si128(_mm_and_si128(t, mask32), k5, 0x00), _mm_srli_si128(t, 4));
    __m128i u = _mm_clmulepi64_si128(_mm_and_si128(t, mask32), poly, 0x10);
    u = _mm_clmulepi64_si128(_mm_and_si128(u, mask32), poly, 0x00);
    return (uint32_t)_mm_extract_epi32(_mm_xor_si128(u, t), 1);
}
#undef FOLD

static WP_CLMUL uint32_t crc_clmul(uint32_t c, const uint8_t *p, int64_t n) { /* n >= 64, n % 16 == 0 */
    __m128i x1 = _mm_xor_si128(_mm_loadu_si128((const __m128i *)p), _mm_cvtsi32_si128((int)c));
    return crc_fold(x1, _mm_loadu_si128((const __m128i *)(p + 16)), _mm_loadu_si128((const __m128i *)(p + 32)),
                    _mm_loadu_si128((const __m128i *)(p + 48)), p + 64, n - 64);
}

/* The same with VPCLMULQDQ: four 64-byte accumulators fold 256 bytes a step (constants for 2048 bits),
 * are folded into one (512 bits apart), whose four 16-byte lanes go on as crc_fold's accumulators. */
static WP_VCLMUL uint32_t crc_vclmul(uint32_t c, const uint8_t *p, int64_t n) { /* n >= 256, n % 16 == 0 */
    const __m512i k2048 = _mm512_broadcast_i32x4(_mm_set_epi64x(0x1322d1430LL, 0x11542778aLL));
    const __m512i k512 = _mm512_broadcast_i32x4(_mm_set_epi64x(0x1c6e41596LL, 0x154442bd4LL));
#define ZFOLD(Z, K, D) _mm512_ternarylogic_epi64(_mm512_clmulepi64_epi128(Z, K, 0x00), _mm512_clmulepi64_epi128(Z, K, 0x11), D, 0x96)
    __m512i z1 = _mm512_xor_si512(_mm512_loadu_si512(p), _mm512_castsi128_si512(_mm_cvtsi32_si128((int)c)));
    __m512i z2 = _mm512_loadu_si512(p + 64), z3 = _mm512_loadu_si512(p + 128), z4 = _mm512_loadu_si512(p + 192);
    for (p += 256, n -= 256; n >= 256; p += 256, n -= 256) {
        z1 = ZFOLD(z1, k2048, _mm512_loadu_si512(p));
        z2 = ZFOLD(z2, k2048, _mm512_loadu_si512(p + 64));
        z3 = ZFOLD(z3, k2048, _mm512_loadu_si512(p + 128));
        z4 = ZFOLD(z4, k2048, _mm512_loadu_si512(p + 192));
    }
    z1 = ZFOLD(z1, k512, z2);
    z1 = ZFOLD(z1, k512, z3);
    z1 = ZFOLD(z1, k512, z4);
#undef ZFOLD
    return crc_fold(_mm512_extracti32x4_epi32(z1, 0), _mm512_extracti32x4_epi32(z1, 1),
                    _mm512_extracti32x4_epi32(z1, 2), _mm512_extracti32x4_epi32(z1, 3), p, n);
}
#endif

/* zlib.crc32(data, value) */
uint32_t wp_crc32(const uint8_t *p, int64_t n, uint32_t value) {
    uint32_t c = ~value;
    if (!crc_table[1])
        crc_table_init();
#ifdef WP_CLMUL
    if (clmul_ok < 0) {
        __builtin_cpu_init();
        clmul_ok = __builtin_cpu_supports("pclmul") && __builtin_cpu_supports("sse4.1");
        vclmul_ok = clmul_ok && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vl") &&
                    __builtin_cpu_supports("vpclmulqdq");
    }
    if (clmul_ok && simd_on != 0 && n >= 64) {
        int64_t whole = n & ~(int64_t)15;
        c = vclmul_ok && whole >= 256 ? crc_vclmul(c, p, whole) : crc_clmul(c, p, whole);
        p += whole, n -= whole;
    }
#endif
    return ~crc_bytes(c, p, n);
}
