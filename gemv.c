/* Matrix-vector products for decoding on an x86 CPU: y = x W^T for a few rows of x (one per sequence decoding),
   W in fp32, bf16 or int8. gemv.py compiles this file on first use (cc -O3 -march=native -fopenmp) and calls it.

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

static inline void prefetch(const void *p) { _mm_prefetch((const char *)p + PREFETCH, _MM_HINT_T0); }

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

/* 8 weights of a row from k on, widened to fp32 (int8 is a constant where this is inlined: no branch is left) */
static inline __m256 weights8(const void *row, int64_t k, int int8) {
    return int8 ? int8x8((const int8_t *)row + k) : _mm256_loadu_ps((const float *)row + k);
}

/* x . row over K: fp32 or int8 row */
static inline float dot(const float *x, const void *row, int64_t K, int int8) {
    __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
    int64_t k = 0;
    for (; k + 32 <= K; k += 32) {
        if (int8) prefetch((const int8_t *)row + k);                      /* 32 bytes a step */
        else if (FP32_PREFETCH) { prefetch((const float *)row + k); prefetch((const float *)row + k + 16); }
        a0 = _mm256_fmadd_ps(_mm256_loadu_ps(x + k), weights8(row, k, int8), a0);
        a1 = _mm256_fmadd_ps(_mm256_loadu_ps(x + k + 8), weights8(row, k + 8, int8), a1);
        a2 = _mm256_fmadd_ps(_mm256_loadu_ps(x + k + 16), weights8(row, k + 16, int8), a2);
        a3 = _mm256_fmadd_ps(_mm256_loadu_ps(x + k + 24), weights8(row, k + 24, int8), a3);
    }
    float s = sum_acc(a0, a1, a2, a3);
    for (; k < K; k++) s += x[k] * (int8 ? ((const int8_t *)row)[k] : ((const float *)row)[k]);
    return s;
}

/* R rows of x (R = 1 to 3, each K long) . one row of W over K, fp32 or int8: sums[r]. Each row has its own four
   accumulators, in the same order whatever R, so each sum is the same bit for bit; R rows at once load and widen each
   weight once for all of them (a prompt's or a batch's rows: 1.3-2x faster than one row at a time). */
static inline __attribute__((always_inline)) void dot_rows(const float *x, const void *row, int64_t K, int int8,
                                                           int R, float *sums) {
    __m256 a[3][4];
    for (int r = 0; r < R; r++) a[r][0] = a[r][1] = a[r][2] = a[r][3] = _mm256_setzero_ps();
    int64_t k = 0;
    for (; k + 32 <= K; k += 32) {
        if (int8) prefetch((const int8_t *)row + k);                      /* 32 bytes a step */
        else if (FP32_PREFETCH) { prefetch((const float *)row + k); prefetch((const float *)row + k + 16); }
        for (int j = 0; j < 4; j++) {
            __m256 w = weights8(row, k + 8 * j, int8);
            if (!int8 && R > 1) __asm__("" : "+x"(w));   /* one load for the R rows, not R */
            for (int r = 0; r < R; r++) a[r][j] = _mm256_fmadd_ps(_mm256_loadu_ps(x + r * K + k + 8 * j), w, a[r][j]);
        }
    }
    for (int r = 0; r < R; r++) {
        float s = sum_acc(a[r][0], a[r][1], a[r][2], a[r][3]);
        for (int64_t i = k; i < K; i++) s += x[r * K + i] * (int8 ? ((const int8_t *)row)[i] : ((const float *)row)[i]);
        sums[r] = s;
    }
}

/* y[m, n] = x[m] . W[n] (times scale[n] for int8, plus bias[n]) for every m and for this thread's share of n (a
   contiguous range, as `omp for schedule(static)` would give it), into y (M, N) in fp32 or bf16. The range goes in
   tiles of W's rows that stay in the core's L2 cache (128 KB), each tile three rows of x at a time (they stay in L1):
   a row of W meets three of x in registers, and W comes from memory once. For one row of x: the plain loop over n. */
static inline __attribute__((always_inline)) void gemv_share(const float *x, const void *w, const uint16_t *scale,
                                                             const float *bias, void *y, int64_t M, int64_t N,
                                                             int64_t K, int int8, int bf16) {
    const int64_t t = omp_get_thread_num(), T = omp_get_num_threads(), n0 = N * t / T, n1 = N * (t + 1) / T;
    const int64_t row_bytes = K * (int8 ? 1 : 4), tile = row_bytes >= (128 << 10) ? 1 : (128 << 10) / row_bytes;
    if (M == 1) {                /* decoding one sequence: dot() is dot_rows() for one row, and 10-25% faster */
        for (int64_t n = n0; n < n1; n++) {
            float v = dot(x, (const char *)w + n * row_bytes, K, int8) * (int8 ? bf16_to_f32(scale[n]) : 1.0f);
            store(y, n, bias ? v + bias[n] : v, bf16);
        }
        return;
    }
    for (int64_t nt = n0; nt < n1; nt += tile)
        for (int64_t m = 0; m < M; m += 3) {
            const int64_t R = M - m < 3 ? M - m : 3;
            for (int64_t n = nt; n < n1 && n < nt + tile; n++) {
                const void *row = (const char *)w + n * row_bytes;
                float sums[3];
                if (R == 3) dot_rows(x + m * K, row, K, int8, 3, sums);
                else if (R == 2) dot_rows(x + m * K, row, K, int8, 2, sums);
                else dot_rows(x + m * K, row, K, int8, 1, sums);
                for (int64_t r = 0; r < R; r++) {
                    float v = int8 ? sums[r] * bf16_to_f32(scale[n]) : sums[r];
                    store(y, (m + r) * N + n, bias ? v + bias[n] : v, bf16);
                }
            }
        }
}

/* x in fp32, or bf16 widened to fp32 once here (into a buffer the caller frees: NULL when x already is fp32) */
static const float *fp32_rows(const void *x, int x_bf16, int64_t n, float **owned) {
    *owned = NULL;
    if (!x_bf16) return (const float *)x;
    float *f = malloc(sizeof(float) * n);
    for (int64_t i = 0; i < n; i++) f[i] = bf16_to_f32(((const uint16_t *)x)[i]);
    return *owned = f;
}

/* x: (M, K) fp32, or bf16 (bf16: x and y in bf16); w: (N, K) fp32; bias: (N,) fp32 or NULL; y: (M, N) */
void gemv_f32(const void *x_in, const float *w, const float *bias, void *y, int64_t M, int64_t N, int64_t K,
              int bf16) {
    float *owned;
    const float *x = fp32_rows(x_in, bf16, M * K, &owned);
    #pragma omp parallel
    gemv_share(x, w, NULL, bias, y, M, N, K, 0, bf16);
    free(owned);
}

/* R rows (1 to 3) of x split into their even and odd elements (e, o: R rows of P each) . one row of W in bf16 pairs
   (P of them): sums[r], in gemv_bf16's four accumulators (even and odd of pairs p..p+7, then of p+8..p+15), so each
   is what the loop for one row computes, bit for bit; the weights are widened once for the R rows. */
static inline __attribute__((always_inline)) void dot_rows_bf16(const float *e, const float *o, const uint32_t *row,
                                                                int64_t P, int R, float *sums) {
    const __m256i high = _mm256_set1_epi32((int)0xffff0000u);
    __m256 a[3][4];
    for (int r = 0; r < R; r++) a[r][0] = a[r][1] = a[r][2] = a[r][3] = _mm256_setzero_ps();
    int64_t p = 0;
    for (; p + 16 <= P; p += 16) {
        prefetch(row + p);
        __m256i w0 = _mm256_loadu_si256((const __m256i *)(row + p));
        __m256i w1 = _mm256_loadu_si256((const __m256i *)(row + p + 8));
        __m256 w[4] = {_mm256_castsi256_ps(_mm256_slli_epi32(w0, 16)), _mm256_castsi256_ps(_mm256_and_si256(w0, high)),
                       _mm256_castsi256_ps(_mm256_slli_epi32(w1, 16)), _mm256_castsi256_ps(_mm256_and_si256(w1, high))};
        for (int j = 0; j < 4; j++)
            for (int r = 0; r < R; r++)
                a[r][j] = _mm256_fmadd_ps(_mm256_loadu_ps((j & 1 ? o : e) + r * P + p + (j & 2) * 4), w[j], a[r][j]);
    }
    for (int r = 0; r < R; r++) {
        float s = sum_acc(a[r][0], a[r][1], a[r][2], a[r][3]);
        for (int64_t i = p; i < P; i++)
            s += e[r * P + i] * bf16_to_f32((uint16_t)row[i]) + o[r * P + i] * bf16_to_f32((uint16_t)(row[i] >> 16));
        sums[r] = s;
    }
}

/* x: (M, K) fp32 or bf16 (y in x's dtype, as above); w: (N, K) bf16 with K even; bias: (N,) fp32 or NULL; y: (M, N).
   W is read as 32-bit words, each a pair of bf16: the even element in the low half, the odd one in the high half.
   Widening the odd ones is a mask (the high half already is an fp32) and the even ones a shift: two instructions
   for 16 weights. So x is split once into its even and odd elements, to multiply them with. Several rows of x go as
   in gemv_share: tiles of W's rows, three rows of x at a time. */
void gemv_bf16(const void *x, const uint32_t *w, const float *bias, void *y, int64_t M, int64_t N, int64_t K,
               int bf16) {
    const int64_t P = K / 2;                                 /* pairs per row */
    float *even = malloc(sizeof(float) * M * P), *odd = malloc(sizeof(float) * M * P);
    for (int64_t i = 0; i < M * P; i++) {
        even[i] = bf16 ? bf16_to_f32(((const uint16_t *)x)[2 * i]) : ((const float *)x)[2 * i];
        odd[i] = bf16 ? bf16_to_f32(((const uint16_t *)x)[2 * i + 1]) : ((const float *)x)[2 * i + 1];
    }
    const int64_t tile = 4 * P >= (128 << 10) ? 1 : (128 << 10) / (4 * P);
    const __m256i high = _mm256_set1_epi32((int)0xffff0000u);
    #pragma omp parallel
    {
        const int64_t t = omp_get_thread_num(), T = omp_get_num_threads(), n0 = N * t / T, n1 = N * (t + 1) / T;
        for (int64_t n = n0; n < n1 && M == 1; n++) {     /* decoding one sequence: dot_rows_bf16 for one row, */
            const uint32_t *row = w + n * P;                /* written out: 5-10% faster (the same sums) */
            __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
            int64_t p = 0;
            for (; p + 16 <= P; p += 16) {
                prefetch(row + p);                                          /* 64 bytes a step */
                __m256i w0 = _mm256_loadu_si256((const __m256i *)(row + p));
                __m256i w1 = _mm256_loadu_si256((const __m256i *)(row + p + 8));
                a0 = _mm256_fmadd_ps(_mm256_loadu_ps(even + p), _mm256_castsi256_ps(_mm256_slli_epi32(w0, 16)), a0);
                a1 = _mm256_fmadd_ps(_mm256_loadu_ps(odd + p), _mm256_castsi256_ps(_mm256_and_si256(w0, high)), a1);
                a2 = _mm256_fmadd_ps(_mm256_loadu_ps(even + p + 8), _mm256_castsi256_ps(_mm256_slli_epi32(w1, 16)), a2);
                a3 = _mm256_fmadd_ps(_mm256_loadu_ps(odd + p + 8), _mm256_castsi256_ps(_mm256_and_si256(w1, high)), a3);
            }
            float s = sum_acc(a0, a1, a2, a3);
            for (; p < P; p++)
                s += even[p] * bf16_to_f32((uint16_t)row[p]) + odd[p] * bf16_to_f32((uint16_t)(row[p] >> 16));
            store(y, n, bias ? s + bias[n] : s, bf16);
        }
        for (int64_t nt = n0; nt < n1 && M > 1; nt += tile)
            for (int64_t m = 0; m < M; m += 3) {
                const int64_t R = M - m < 3 ? M - m : 3;
                for (int64_t n = nt; n < n1 && n < nt + tile; n++) {
                    float sums[3];
                    if (R == 3) dot_rows_bf16(even + m * P, odd + m * P, w + n * P, P, 3, sums);
                    else if (R == 2) dot_rows_bf16(even + m * P, odd + m * P, w + n * P, P, 2, sums);
                    else dot_rows_bf16(even + m * P, odd + m * P, w + n * P, P, 1, sums);
                    for (int64_t r = 0; r < R; r++) store(y, (m + r) * N + n, bias ? sums[r] + bias[n] : sums[r], bf16);
                }
            }
    }
    free(even);
    free(odd);
}

/* x: (M, K) fp32 or bf16 (y in x's dtype); w: (N, K) int8 with a bf16 scale per row (models' Int8Linear:
   W ~ scale[n] * w[n, :]); bias: (N,) fp32 or NULL; y: (M, N) */
void gemv_int8(const void *x_in, const int8_t *w, const uint16_t *scale, const float *bias, void *y, int64_t M,
               int64_t N, int64_t K, int bf16) {
    float *owned;
    const float *x = fp32_rows(x_in, bf16, M * K, &owned);
    #pragma omp parallel
    gemv_share(x, w, scale, bias, y, M, N, K, 1, bf16);
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

void attend_one(const void *q, const void *k, const void *v, const float *mask, int mask_rows, void *y,
                int64_t B, int64_t H, int64_t K, int64_t S, int64_t D, float scale, float softcap, int bf16) {
    const int64_t G = H / K;                                 /* query heads per key/value head */
    #pragma omp parallel for schedule(static)
    for (int64_t bh = 0; bh < B * H; bh++) {
        const int64_t b = bh / H, h = bh % H;
        const int64_t kv = (b * K + h / G) * S * D;          /* this head's keys and values start here */
        const float *m = mask + (mask_rows ? b * S : 0);
        /* Only the positions between the first and the last the mask lets through: a decoding cache is longer than
           what is written in it (LLM rounds its length up), and a masked position's weight is exactly 0 */
        int64_t lo = 0, hi = S;
        while (hi > 0 && m[hi - 1] == -INFINITY) hi--;
        while (lo < hi && m[lo] == -INFINITY) lo++;
        float *scores = malloc(sizeof(float) * S), *out = malloc(sizeof(float) * D), top = -INFINITY;
        for (int64_t s = lo; s < hi; s++) {                  /* scores, and the largest */
            __m256 acc = _mm256_setzero_ps();
            int64_t d = 0;
            for (; d + 8 <= D; d += 8)
                acc = _mm256_fmadd_ps(load8(q, bh * D + d, bf16), load8(k, kv + s * D + d, bf16), acc);
            float dot = sum8(acc);
            for (; d < D; d++) dot += load1(q, bh * D + d, bf16) * load1(k, kv + s * D + d, bf16);
            dot *= scale;
            if (softcap > 0) dot = softcap * tanhf(dot / softcap);
            scores[s] = dot + m[s];
            if (scores[s] > top) top = scores[s];
        }
        float total = 0;
        for (int64_t d = 0; d < D; d++) out[d] = 0;
        for (int64_t s = lo; s < hi && top > -INFINITY; s++) {  /* (every position masked: zeros, not NaN) */
            float p = expf(scores[s] - top);                  /* softmax's numerator; masked positions give 0 */
            if (p == 0) continue;
            total += p;
            __m256 pv = _mm256_set1_ps(p);
            int64_t d = 0;
            for (; d + 8 <= D; d += 8) {
                __m256 sum = _mm256_fmadd_ps(pv, load8(v, kv + s * D + d, bf16), _mm256_loadu_ps(out + d));
                _mm256_storeu_ps(out + d, sum);
            }
            for (; d < D; d++) out[d] += p * load1(v, kv + s * D + d, bf16);
        }
        for (int64_t d = 0; d < D; d++) store(y, bh * D + d, total > 0 ? out[d] / total : 0, bf16);
        free(scores);
        free(out);
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
