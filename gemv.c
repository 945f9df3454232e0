/* Matrix-vector products for decoding on an x86 CPU: y = x W^T for a few rows of x (one per sequence decoding),
   W in fp32, bf16, int8 or int4, or a gated MLP's hidden layer act(x W_gate^T) * (x W_up^T) from its gate_up matrix;
   and the decode step's attention for one query, with its RoPE and KV cache write (rope_attend; attend_one without
   them), and RMSNorm (rms_norm). gemv.py compiles this file on first use (cc -O3 -march=native -fopenmp) and calls
   it.

   Decoding one token multiplies one vector by every weight matrix once, so its speed is how fast the weights stream
   from memory; the arithmetic is a few instructions per weight. torch's kernels are made for matrices, not vectors:
   on this project's 2-core AVX2 EPYC they stream SmolLM2-135M's block weights at 8-14 GB/s, these at 17-25.
   What makes them fast is little: each output row is one thread's dot product over a contiguous row of W, in four
   independent accumulators (an FMA waits four cycles for its result: four chains keep the unit busy), with the
   weights converted to fp32 in registers, never in memory. Several rows of x (a batch, a prompt) meet each row of W
   three at a time, so that a weight is loaded and converted once for three of them.

   Every output element is computed by one thread in one fixed order, whatever the number of rows M and threads:
   a sequence's numbers do not depend on what else is in the batch (generate.py's engine relies on it). */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <immintrin.h>
#include <math.h>
#include <omp.h>

#if !defined(__AVX2__) || !defined(__FMA__)
#error "these kernels need AVX2 and FMA (x86-64 since 2013); gemv.py falls back to torch's kernels"
#endif

/* Each kernel asks for the weights PREFETCH bytes ahead of those it multiplies (rows are contiguous: near a row's
   end, the next rows'). On a 2-core Intel Xeon (AVX-512) the hardware prefetchers alone kept a core's stream at 5-8
   GB/s; with this, SmolLM2's block matrices streamed 10% (fp32), 25-45% (bf16) and 50-60% (int8) faster on 2
   threads (1024 and 4096 bytes ahead did less well or no better). On a 2-core AVX2 EPYC (Zen 3) the same made the
   fp32 kernel 20% slower (17-21 GB/s against 22-27, alternating runs) and bf16 and int8 no slower (int8 5-10% faster):
   there its hardware prefetcher keeps up with one fp32 stream, and the extra instructions only cost. So fp32 rows
   are prefetched on CPUs with AVX-512 only (FP32_PREFETCH; measured on an Intel Xeon, not on an AMD one with AVX-512).
   A prefetch never faults: past the end of W it is harmless. */
#define PREFETCH 2048
#ifdef __AVX512F__
#define FP32_PREFETCH 1
#else
#define FP32_PREFETCH 0
#endif

/* (an asm statement, not _mm_prefetch: GCC 12's dead-code elimination drops the intrinsic from dot_rows' loop) */
static inline void prefetch(const void *p) { __asm__ volatile("prefetcht0 %0" : : "m"(*((const char *)p + PREFETCH))); }

static inline float sum8(__m256 v) {                    /* the 8 lanes of v, added */
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
}

static inline float sum_acc(__m256 a0, __m256 a1, __m256 a2, __m256 a3) {
    return sum8(_mm256_add_ps(_mm256_add_ps(a0, a1), _mm256_add_ps(a2, a3)));
}

/* bf16 is the upper half of an fp32: widening is a shift, rounding back is round-to-nearest-even on the lower half */
static inline float bf16_to_f32(uint16_t h) { uint32_t u = (uint32_t)h << 16; float f; memcpy(&f, &u, 4); return f; }

static inline uint16_t f32_to_bf16(float f) {
    uint32_t u;
    memcpy(&u, &f, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x40);   /* NaN stays a (quiet) NaN */
    return (uint16_t)((u + 0x7fffu + ((u >> 16) & 1)) >> 16);
}

static inline void store(void *y, int64_t i, float v, int bf16_out) {
    if (bf16_out) ((uint16_t *)y)[i] = f32_to_bf16(v);
    else ((float *)y)[i] = v;
}

static inline __m256 int8x8(const int8_t *p) {          /* 8 int8 -> 8 fp32 */
    return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)p)));
}

/* How W's elements are stored. bf16 rows are read as 32-bit words, each a pair of bf16: the even element in the low
   half, the odd one in the high half. Widening the odd ones is a mask (the high half already is an fp32) and the even
   ones a shift: two instructions for 16 weights. So in a block of 32 elements the kernel meets the weights in the
   order (even elements of the first 16, odd of the first 16, even of the last 16, odd of the last 16), and x is put
   in that order once per call (x_rows) to be multiplied with them. int4 rows (gemv.py's copy of a model file's
   Int4Linear) hold each block of 32 in 16 bytes, byte i element i in its low half and element i + 16 in its high
   half: the elements in their own order, with an fp32 (scale, zero - 8 * scale) pair per group of G elements (a
   power of two, 32 or more), w = (q - 8) * scale + zero, widened in registers as the rest. */
enum { W_F32, W_INT8, W_BF16, W_INT4 };

static inline int64_t bytes_of(int64_t k, int kind) {       /* of k elements of a row */
    return kind == W_F32 ? 4 * k : kind == W_BF16 ? 2 * k : kind == W_INT8 ? k : k / 2;
}

/* The j-th 8 weights (j = 0 to 3) of the 32-element block of a row at k, widened to fp32, in x_rows' order
   (kind is a constant wherever this is inlined: no branch is left) */
static inline __m256 weights8(const void *row, int64_t k, int j, int kind) {
    if (kind == W_F32) return _mm256_loadu_ps((const float *)row + k + 8 * j);
    if (kind == W_INT8) return int8x8((const int8_t *)row + k + 8 * j);
    if (kind == W_INT4) {                                  /* q, not yet scaled: dot_rows scales a block at a time */
        const uint8_t *bytes = (const uint8_t *)row + k / 2 + 8 * (j & 1);           /* 8 bytes: 8 low, 8 high q */
        const __m256i b = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)bytes));
        return _mm256_cvtepi32_ps(j < 2 ? _mm256_and_si256(b, _mm256_set1_epi32(15)) : _mm256_srli_epi32(b, 4));
    }
    __m256i pairs = _mm256_loadu_si256((const __m256i *)((const uint16_t *)row + k + 16 * (j >> 1)));
    return _mm256_castsi256_ps(j & 1 ? _mm256_and_si256(pairs, _mm256_set1_epi32((int)0xffff0000u))
                                     : _mm256_slli_epi32(pairs, 16));
}

static inline float weight1(const void *row, int64_t k, int kind) {       /* element k, for a row's last < 32 */
    if (kind == W_F32) return ((const float *)row)[k];
    if (kind == W_INT8) return ((const int8_t *)row)[k];
    if (kind == W_INT4) return 0;                           /* (never: int4 rows are whole groups of 32 or more) */
    return bf16_to_f32(((const uint16_t *)row)[k]);
}

/* R rows of x (R = 1 to 3, each K long, in x_rows' order) . one row of W over K: sums[r]. Each row has its own four
   accumulators, in the same order whatever R, so each sum is the same bit for bit; R rows at once load and widen each
   weight once for all of them (a prompt's or a batch's rows: 1.3-2x faster than one row at a time). fetch: prefetch
   the row's weights (one row of x, where W streams from memory once; several rows of x re-read a tile of W from L2,
   and prefetching there made int8 16 rows 1.6x slower). int4: zs is the row's (scale, zero - 8 * scale) pairs, one
   per group of 2^group_bits elements. */
static inline __attribute__((always_inline)) void dot_rows(const float *x, const void *row, const float *zs,
                                                           int group_bits, int64_t K, int kind, int R, int fetch,
                                                           float *sums) {
    __m256 a[3][4];
    for (int r = 0; r < R; r++) a[r][0] = a[r][1] = a[r][2] = a[r][3] = _mm256_setzero_ps();
    int64_t k = 0;
    for (; k + 32 <= K; k += 32) {
        if (fetch && (kind != W_F32 || FP32_PREFETCH))       /* a step is 16, 32, 64 or 128 bytes of W: a line per */
            prefetch((const char *)row + bytes_of(k, kind));                             /* 64 bytes, at most 2 */
        if (fetch && kind == W_F32 && FP32_PREFETCH) prefetch((const char *)row + k * 4 + 64);
        __m256 scale = _mm256_setzero_ps(), zero = scale;      /* int4: w = q * scale + (zero - 8 * scale) */
        if (kind == W_INT4) {
            scale = _mm256_broadcast_ss(zs + 2 * (k >> group_bits));
            zero = _mm256_broadcast_ss(zs + 2 * (k >> group_bits) + 1);
        }
        for (int j = 0; j < 4; j++) {
            __m256 w = weights8(row, k, j, kind);
            if (kind == W_INT4) w = _mm256_fmadd_ps(w, scale, zero);
            if (kind == W_F32 && R > 1) __asm__("" : "+x"(w));   /* one load for the R rows, not R (GCC reloads) */
            for (int r = 0; r < R; r++) a[r][j] = _mm256_fmadd_ps(_mm256_loadu_ps(x + r * K + k + 8 * j), w, a[r][j]);
        }
    }
    for (int r = 0; r < R; r++) {
        float s = sum_acc(a[r][0], a[r][1], a[r][2], a[r][3]);
        for (int64_t i = k; i < K; i++) s += x[r * K + i] * weight1(row, i, kind);
        sums[r] = s;
    }
}

static inline __attribute__((always_inline)) void dot_rows_any(const float *x, const void *row, const float *zs,
                                                               int group_bits, int64_t K, int kind, int64_t R,
                                                               float *sums) {
    if (R == 3) dot_rows(x, row, zs, group_bits, K, kind, 3, 0, sums);     /* (R a constant in each: unrolled) */
    else if (R == 2) dot_rows(x, row, zs, group_bits, K, kind, 2, 0, sums);
    else dot_rows(x, row, zs, group_bits, K, kind, 1, 0, sums);
}

/* Output n from its sum: times int8's scale, plus the bias */
static inline float finish(float sum, int64_t n, int kind, const void *scale, const float *bias) {
    const float v = kind == W_INT8 ? sum * bf16_to_f32(((const uint16_t *)scale)[n]) : sum;
    return bias ? v + bias[n] : v;
}

/* A gated MLP's hidden value (Shazeer 2020), act(gate) * up, with act silu (Llama, Qwen, Phi-3) or GELU's tanh form
   (Gemma); in bf16 each step rounded where the model files' ops round it (gate_up's output, act's, the product's). */
enum { GLU_NONE, GLU_SILU, GLU_GELU_TANH };

static inline float glu_value(float gate, float up, int glu, int bf16) {
    if (bf16) { gate = bf16_to_f32(f32_to_bf16(gate)); up = bf16_to_f32(f32_to_bf16(up)); }
    float a = glu == GLU_SILU ? gate / (1.0f + expf(-gate))
                              : 0.5f * gate * (1.0f + tanhf(0.7978845608f * (gate + 0.044715f * gate * gate * gate)));
    if (bf16) a = bf16_to_f32(f32_to_bf16(a));
    return a * up;
}

/* y[m, n] = x[m] . W[n] (finished: scale, bias) for every m and for this thread's share of n (a contiguous range,
   as `omp for schedule(static)` would give it), into y (M, Y) in fp32 or bf16. With glu, W is a gated MLP's gate_up
   (N = 2Y: the gates' rows, then the ups') and y[m, n] = glu_value(gate: x[m] . W[n], up: x[m] . W[Y + n]): the
   MLP's hidden layer from one call, without its 2Y-wide product in memory. Several rows of x go in tiles of W's
   rows that stay in the core's L2 cache (128 KB), each tile three rows of x at a time (they stay in L1): a row of W
   meets three of x in registers, and W comes from memory once. */
static inline __attribute__((always_inline)) void gemv_share(const float *x, const void *w, int kind,
                                                             const void *scale, int group_bits, const float *bias,
                                                             void *y, int64_t M, int64_t N, int64_t K, int glu,
                                                             int bf16) {
    const int64_t Y = glu ? N / 2 : N, t = omp_get_thread_num(), T = omp_get_num_threads();
    const int64_t n0 = Y * t / T, n1 = Y * (t + 1) / T, row_bytes = bytes_of(K, kind);
    const int64_t tile = row_bytes * (glu ? 2 : 1) >= (128 << 10) ? 1 : (128 << 10) / (row_bytes * (glu ? 2 : 1));
    const float *zs = scale;                                  /* int4: (scale, zero - 8 * scale) pairs, a row's: */
    const int64_t zs_row = kind == W_INT4 ? 2 * (K >> group_bits) : 0;
    for (int64_t n = n0; n < n1 && M == 1; n++) {          /* one row of x (decoding one sequence): no tiles */
        float sum, up;
        dot_rows(x, (const char *)w + n * row_bytes, zs + n * zs_row, group_bits, K, kind, 1, 1, &sum);
        float v = finish(sum, n, kind, scale, bias);
        if (glu) {
            dot_rows(x, (const char *)w + (Y + n) * row_bytes, zs + (Y + n) * zs_row, group_bits, K, kind, 1, 1,
                     &up);
            v = glu_value(v, finish(up, Y + n, kind, scale, bias), glu, bf16);
        }
        store(y, n, v, bf16);
    }
    for (int64_t nt = n0; nt < n1 && M > 1; nt += tile)
        for (int64_t m = 0; m < M; m += 3) {
            const int64_t R = M - m < 3 ? M - m : 3;
            for (int64_t n = nt; n < n1 && n < nt + tile; n++) {
                float sums[3], ups[3];
                dot_rows_any(x + m * K, (const char *)w + n * row_bytes, zs + n * zs_row, group_bits, K, kind, R,
                             sums);
                if (glu)
                    dot_rows_any(x + m * K, (const char *)w + (Y + n) * row_bytes, zs + (Y + n) * zs_row,
                                 group_bits, K, kind, R, ups);
                for (int64_t r = 0; r < R; r++) {
                    float v = finish(sums[r], n, kind, scale, bias);
                    if (glu) v = glu_value(v, finish(ups[r], Y + n, kind, scale, bias), glu, bf16);
                    store(y, (m + r) * Y + n, v, bf16);
                }
            }
        }
}

/* x (M, K), fp32 or bf16, as dot_rows reads it: in fp32, and for bf16 weights each whole block of 32 elements in
   weights8's order (the last K % 32 as they are). NULL where x itself will do; else a buffer for the caller to free. */
static float *x_rows(const void *x, int x_bf16, int64_t M, int64_t K, int kind) {
    if (!x_bf16 && kind != W_BF16) return NULL;
    float *f = aligned_alloc(64, (sizeof(float) * M * K + 63) / 64 * 64);     /* (aligned: bf16 M = 1 7% faster) */
    const int64_t blocks = kind == W_BF16 ? K - K % 32 : 0;                    /* the elements reordered */
    for (int64_t m = 0; m < M; m++) {
        const float *xf = (const float *)x + m * K;
        const uint16_t *xh = (const uint16_t *)x + m * K;
        float *row = f + m * K;
        for (int64_t k = 0; k < blocks; k += 32)         /* the even elements of 16, the odd, the next 16's even, odd */
            for (int e = 0; e < 8; e++)
                for (int j = 0; j < 4; j++) {
                    const int64_t src = k + 16 * (j / 2) + 2 * e + j % 2;
                    row[k + 8 * j + e] = x_bf16 ? bf16_to_f32(xh[src]) : xf[src];
                }
        for (int64_t k = blocks; k < K; k++) row[k] = x_bf16 ? bf16_to_f32(xh[k]) : xf[k];
    }
    return f;
}

/* y = x W^T (times scale, plus bias): x (M, K) fp32 or bf16 (bf16: y in bf16 too); w (N, K) of this kind (bf16:
   K even; int4: K / 2 bytes a row, K a multiple of the group); scale (N,) bf16 for int8 weights (models'
   Int8Linear: W ~ scale[n] * w[n, :]), (N, K / group, 2) fp32 (scale, zero - 8 * scale) pairs for int4 (w = (q - 8)
   * scale + zero), else NULL; group: int4's,
   a power of two from 32 on (else unused); bias (N,) fp32 or NULL; y (M, N), or with glu (GLU_SILU, GLU_GELU_TANH;
   N even) a gated MLP's hidden layer (M, N / 2) */
void gemv(const void *x, const void *w, int kind, const void *scale, int64_t group, const float *bias, void *y,
          int64_t M, int64_t N, int64_t K, int glu, int bf16) {
    int group_bits = 0;
    while (kind == W_INT4 && ((int64_t)1 << group_bits) < group) group_bits++;
    float *owned = x_rows(x, bf16, M, K, kind);
    const float *xf = owned ? owned : (const float *)x;
    if (kind == W_F32) {                   /* (a parallel region each: one for the three made fp32 5-7% slower) */
        #pragma omp parallel
        gemv_share(xf, w, W_F32, scale, 0, bias, y, M, N, K, glu, bf16);
    } else if (kind == W_INT8) {
        #pragma omp parallel
        gemv_share(xf, w, W_INT8, scale, 0, bias, y, M, N, K, glu, bf16);
    } else if (kind == W_BF16) {
        #pragma omp parallel
        gemv_share(xf, w, W_BF16, scale, 0, bias, y, M, N, K, glu, bf16);
    } else {
        #pragma omp parallel
        gemv_share(xf, w, W_INT4, scale, group_bits, bias, y, M, N, K, glu, bf16);
    }
    free(owned);
}

/* Attention for one query per sequence, the decode step's: y = softmax(q k^T * scale + mask) v, per query head, over
   its key/value head's S cached positions (grouped-query: query head h reads key/value head h / (H / K)).
   q: (B, H, D); k, v: (B, K, S, D), fp32 or bf16 as q; mask: additive fp32, (S,) for every row (mask_rows 0) or
   (B, S); softcap > 0: scores go through softcap * tanh(scores / softcap) before the mask (Gemma 2).
   y: (B, H, D) in q's dtype. Computed in fp32; the same numbers whatever B and the thread count. */
static inline __m256 load8(const void *p, int64_t i, int bf16) {
    if (!bf16) return _mm256_loadu_ps((const float *)p + i);
    __m128i h = _mm_loadu_si128((const __m128i *)((const uint16_t *)p + i));
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}

static inline float load1(const void *p, int64_t i, int bf16) {
    return bf16 ? bf16_to_f32(((const uint16_t *)p)[i]) : ((const float *)p)[i];
}

/* One query head's attention over its key/value head's S cached positions k, v (S, D): q (D,) in fp32, m the additive
   mask (S,), y (D,) written in the cache's dtype */
static void attend_head(const float *q, const void *k, const void *v, const float *m, int64_t S, int64_t D,
                        float scale, float softcap, int bf16, void *y) {
    /* Only the positions between the first and the last the mask lets through: a decoding cache is longer than what
       is written in it (LLM rounds its length up), and a masked position's weight is exactly 0 */
    int64_t lo = 0, hi = S;
    while (hi > 0 && m[hi - 1] == -INFINITY) hi--;
    while (lo < hi && m[lo] == -INFINITY) lo++;
    float *scores = malloc(sizeof(float) * S), *out = malloc(sizeof(float) * D), top = -INFINITY;
    for (int64_t s = lo; s < hi; s++) {                      /* scores, and the largest */
        __m256 acc = _mm256_setzero_ps();
        int64_t d = 0;
        for (; d + 8 <= D; d += 8) acc = _mm256_fmadd_ps(_mm256_loadu_ps(q + d), load8(k, s * D + d, bf16), acc);
        float dot = sum8(acc);
        for (; d < D; d++) dot += q[d] * load1(k, s * D + d, bf16);
        dot *= scale;
        if (softcap > 0) dot = softcap * tanhf(dot / softcap);
        scores[s] = dot + m[s];
        if (scores[s] > top) top = scores[s];
    }
    float total = 0;
    for (int64_t d = 0; d < D; d++) out[d] = 0;
    for (int64_t s = lo; s < hi && top > -INFINITY; s++) {     /* (every position masked: zeros, not NaN) */
        float p = expf(scores[s] - top);                      /* softmax's numerator; masked positions give 0 */
        if (p == 0) continue;
        total += p;
        __m256 pv = _mm256_set1_ps(p);
        int64_t d = 0;
        for (; d + 8 <= D; d += 8)
            _mm256_storeu_ps(out + d, _mm256_fmadd_ps(pv, load8(v, s * D + d, bf16), _mm256_loadu_ps(out + d)));
        for (; d < D; d++) out[d] += p * load1(v, s * D + d, bf16);
    }
    for (int64_t d = 0; d < D; d++) store(y, d, total > 0 ? out[d] / total : 0, bf16);
    free(scores);
    free(out);
}

void attend_one(const void *q, const void *k, const void *v, const float *mask, int mask_rows, void *y,
                int64_t B, int64_t H, int64_t K, int64_t S, int64_t D, float scale, float softcap, int bf16) {
    const int64_t G = H / K;                                 /* query heads per key/value head */
    const size_t e = bf16 ? 2 : 4;                           /* bytes an element */
    #pragma omp parallel for schedule(static)
    for (int64_t bh = 0; bh < B * H; bh++) {
        const int64_t b = bh / H, h = bh % H, kv = (b * K + h / G) * S * D;     /* this head's keys and values */
        float *qf = malloc(sizeof(float) * D);
        for (int64_t d = 0; d < D; d++) qf[d] = load1(q, bh * D + d, bf16);
        attend_head(qf, (const char *)k + kv * e, (const char *)v + kv * e, mask + (mask_rows ? b * S : 0), S, D,
                    scale, softcap, bf16, (char *)y + bh * D * e);
        free(qf);
    }
}

/* RoPE on one head's D values x (strided: element d at x[d]) into out (D,), fp32, what the model files' apply_rope
   computes: the first R channels rotate in pairs (i, i + R/2), out = x * cos + roll(x, R/2) * sin with the tables'
   sin signed (-sin, sin); the channels from R on (Phi-2's partial rotary) are copied. In bf16 each product and the
   sum are rounded to bf16, as torch's ops round them; no product is fused into the sum (the asm statements keep the
   compiler from contracting them into an FMA, which rounds once). */
static void rope_head(const void *x, const void *cos, const void *sin, int64_t R, int64_t D, int bf16, float *out) {
    for (int64_t d = 0; d < D; d++) {
        const float v = load1(x, d, bf16);
        if (d >= R) { out[d] = v; continue; }
        float a = v * load1(cos, d, bf16), b = load1(x, d < R / 2 ? d + R / 2 : d - R / 2, bf16) * load1(sin, d, bf16);
        __asm__("" : "+x"(a));
        __asm__("" : "+x"(b));
        if (bf16) { a = bf16_to_f32(f32_to_bf16(a)); b = bf16_to_f32(f32_to_bf16(b)); }
        const float sum = a + b;
        out[d] = bf16 ? bf16_to_f32(f32_to_bf16(sum)) : sum;
    }
}

/* A model file's Attention for one query per sequence, from q, k, v before RoPE: RoPE on q and k, k and v written into
   the KV cache at each sequence's position, attention over the cache (attend_head): what apply_rope, KVCache.update
   and the explicit attention compute there, in one call (in torch they are about 20 small ops a layer).
   q (B, H, D), k, v (B, K, D): element (b, h, d) at b * qs[0] + h * qs[1] + d (strided views of the qkv projection);
   cos, sin (R columns): one row for every sequence (cs_rows 0) or one each (B, R); cache_k, cache_v (B, K, S, D),
   these sequences' rows; pos: the position each writes at, one for all (pos_rows 0) or one each (B,); mask as
   attend_one's; y (B, H, D).
   Everything in the cache's dtype, fp32 or bf16. */
void rope_attend(const void *q, const int64_t *qs, const void *k, const int64_t *ks, const void *v, const int64_t *vs,
                 const void *cos, const void *sin, int cs_rows, int64_t R, void *cache_k, void *cache_v,
                 const int64_t *pos, int pos_rows, const float *mask, int mask_rows, void *y, int64_t B, int64_t H,
                 int64_t K, int64_t S, int64_t D, float scale, float softcap, int bf16) {
    const size_t e = bf16 ? 2 : 4;
    float *rotated = malloc(sizeof(float) * D);
    for (int64_t b = 0; b < B; b++)                          /* the cache writes first: a few hundred values */
        for (int64_t h = 0; h < K; h++) {
            const int64_t at = ((b * K + h) * S + pos[pos_rows ? b : 0]) * D;
            const int64_t cs = (cs_rows ? b : 0) * R;
            rope_head((const char *)k + (b * ks[0] + h * ks[1]) * e, (const char *)cos + cs * e,
                      (const char *)sin + cs * e, R, D, bf16, rotated);
            for (int64_t d = 0; d < D; d++) {
                store(cache_k, at + d, rotated[d], bf16);
                store(cache_v, at + d, load1((const char *)v + (b * vs[0] + h * vs[1]) * e, d, bf16), bf16);
            }
        }
    free(rotated);
    const int64_t G = H / K;
    #pragma omp parallel for schedule(static)
    for (int64_t bh = 0; bh < B * H; bh++) {
        const int64_t b = bh / H, h = bh % H, kv = (b * K + h / G) * S * D, cs = (cs_rows ? b : 0) * R;
        float *qf = malloc(sizeof(float) * D);
        rope_head((const char *)q + (b * qs[0] + h * qs[1]) * e, (const char *)cos + cs * e, (const char *)sin + cs * e,
                  R, D, bf16, qf);
        attend_head(qf, (const char *)cache_k + kv * e, (const char *)cache_v + kv * e, mask + (mask_rows ? b * S : 0),
                    S, D, scale, softcap, bf16, (char *)y + bh * D * e);
        free(qf);
    }
}

/* RMSNorm of M rows of C values: n = x / sqrt(mean(x^2) + eps) in fp32, then scaled by the weight as the model
   files do: offset 0 (Llama, Qwen, Phi-3) n rounded to x's dtype, times w, rounded again (HF's order in half
   precision: normalise in fp32, cast back, multiply); offset 1 (Gemma) n times (1 + w) in fp32, rounded once.
   x, w, y: fp32, or all bf16. torch's rms_norm on a CPU is five ops (pow, mean, add, rsqrt, mul), bf16 two casts more:
   30-40 us for one row of 576, 61 calls a SmolLM2 token; this is one call. Each row is one thread's, in one order. */
void rms_norm(const void *x, const void *w, void *y, int64_t M, int64_t C, float eps, int offset, int bf16) {
    #pragma omp parallel for schedule(static) if (M * C >= 65536)
    for (int64_t m = 0; m < M; m++) {
        __m256 a0 = _mm256_setzero_ps(), a1 = a0;
        int64_t c = 0;
        for (; c + 16 <= C; c += 16) {
            __m256 v0 = load8(x, m * C + c, bf16), v1 = load8(x, m * C + c + 8, bf16);
            a0 = _mm256_fmadd_ps(v0, v0, a0);
            a1 = _mm256_fmadd_ps(v1, v1, a1);
        }
        float ss = sum8(_mm256_add_ps(a0, a1));
        for (; c < C; c++) { float v = load1(x, m * C + c, bf16); ss += v * v; }
        const float r = 1.0f / sqrtf(ss / (float)C + eps);
        for (c = 0; c < C; c++) {
            float n = load1(x, m * C + c, bf16) * r, wc = load1(w, c, bf16);
            if (offset) n *= 1.0f + wc;
            else n = (bf16 ? bf16_to_f32(f32_to_bf16(n)) : n) * wc;
            store(y, m * C + c, n, bf16);
        }
    }
}
