/* Blockwise 4-bit kernels for the CPU, compiled at first use by nf4/native.py.

   nf4_dequantize: the same values as nf4.format.dequantize, faster than TorchInductor can.
   out[i] = round_to_dtype(flush(level[code i] * absmax[i / blocksize])), codes two per byte, first in the high
   nibble. Inductor turns the level lookup into one scalar load per element; here AVX2 looks 8 levels up at once
   with a register permute (vpermps over the 16-entry table split in two halves), so the loop runs at the speed
   of memory. The scalar loop is the same computation for other CPUs and for the tail.

   nf4_matmul: x [M, K] times the decoded W [N, K] transposed, for a few rows of x (decoding, generation): W is
   streamed once as 4-bit and never written out as floats. In fp32: per block, the code values dotted with x,
   then times the block's scale (one multiply per block; the loops are bound by the decode, not by memory).
   AVX-512 where the CPU has it (NF4_NO_AVX512=1 in the environment takes AVX2 instead), else AVX2, else scalar. */

#include <stdint.h>
#include <stdlib.h>
#include <string.h>

enum { OUT_F32 = 0, OUT_BF16 = 1, OUT_F16 = 2 };
enum { MATMUL_MAX_M = 16 };

static const float FLT_MIN_ = 1.17549435e-38f;

static inline float block_scale(const float *absmax, const uint8_t *absmax_codes, const float *nested_map,
                                const float *nested_absmax, float offset, int64_t block) {
    /* double quantization: flush(nested_map[code] * nested_absmax[block / 256]) + offset, as format.py */
    if (!absmax_codes) return absmax[block];
    float v = nested_map[absmax_codes[block]] * nested_absmax[block >> 8];
    /* a select, not a branch: the product's sign is random across blocks (a mispredict on half of them) */
    return (__builtin_fabsf(v) < FLT_MIN_ ? 0.0f : v) + offset;
}

static inline uint16_t bf16_bits(float v) {
    uint32_t u;
    memcpy(&u, &v, 4);
    return (uint16_t)((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16); /* round to nearest even; inputs are finite */
}

static void scalar(const uint8_t *codes, const float *absmax, const float *levels, int64_t begin, int64_t end,
                   int64_t blocksize, void *out, int kind) {
    for (int64_t i = begin; i < end; i++) {
        uint8_t byte = codes[i >> 1];
        float v = levels[(i & 1) ? (byte & 15) : (byte >> 4)] * absmax[i / blocksize];
        if (v < FLT_MIN_ && v > -FLT_MIN_) v = 0.0f;
        if (kind == OUT_F32) ((float *)out)[i] = v;
        else if (kind == OUT_BF16) ((uint16_t *)out)[i] = bf16_bits(v);
        else ((_Float16 *)out)[i] = (_Float16)v;
    }
}

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>

/* 16 code values (unscaled levels) from 8 code bytes, high nibble first. */
__attribute__((target("avx2"))) static inline void levels16(const uint8_t *codes, __m256 lo_table, __m256 hi_table,
                                                            __m256 *a, __m256 *b) {
    __m128i bytes = _mm_loadl_epi64((const __m128i *)codes);
    __m128i low = _mm_and_si128(bytes, _mm_set1_epi8(15));
    __m128i high = _mm_and_si128(_mm_srli_epi16(bytes, 4), _mm_set1_epi8(15));
    __m128i nibbles = _mm_unpacklo_epi8(high, low); /* output order: high nibble first */
    __m256i i0 = _mm256_cvtepu8_epi32(nibbles);
    __m256i i1 = _mm256_cvtepu8_epi32(_mm_srli_si128(nibbles, 8));
    /* vpermps uses the index's low 3 bits; bit 3 picks the table half (blendv reads the sign bit). */
    *a = _mm256_blendv_ps(_mm256_permutevar8x32_ps(lo_table, i0), _mm256_permutevar8x32_ps(hi_table, i0),
                          _mm256_castsi256_ps(_mm256_slli_epi32(i0, 28)));
    *b = _mm256_blendv_ps(_mm256_permutevar8x32_ps(lo_table, i1), _mm256_permutevar8x32_ps(hi_table, i1),
                          _mm256_castsi256_ps(_mm256_slli_epi32(i1, 28)));
}

/* 16 outputs from 8 code bytes: the levels times the block's scale, products below FLT_MIN flushed. */
__attribute__((target("avx2,f16c"))) static inline void decode16(const uint8_t *codes, __m256 lo_table,
                                                                 __m256 hi_table, __m256 scale, __m256 *a,
                                                                 __m256 *b) {
    __m256 v0, v1;
    levels16(codes, lo_table, hi_table, &v0, &v1);
    v0 = _mm256_mul_ps(v0, scale);
    v1 = _mm256_mul_ps(v1, scale);
    const __m256 sign = _mm256_set1_ps(-0.0f), tiny = _mm256_set1_ps(FLT_MIN_);
    *a = _mm256_and_ps(v0, _mm256_cmp_ps(_mm256_andnot_ps(sign, v0), tiny, _CMP_GE_OQ));
    *b = _mm256_and_ps(v1, _mm256_cmp_ps(_mm256_andnot_ps(sign, v1), tiny, _CMP_GE_OQ));
}

__attribute__((target("avx2"))) static inline __m256i bf16_round(__m256 v) {
    __m256i u = _mm256_castps_si256(v);
    __m256i odd = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
    return _mm256_srli_epi32(_mm256_add_epi32(u, _mm256_add_epi32(odd, _mm256_set1_epi32(0x7FFF))), 16);
}

/* Whole blocks [block0, block1); blocksize is a multiple of 16. */
__attribute__((target("avx2,f16c"))) static void avx2(const uint8_t *codes, const float *absmax,
                                                      const float *levels, int64_t block0, int64_t block1,
                                                      int64_t blocksize, void *out, int kind) {
    __m256 lo_table = _mm256_loadu_ps(levels), hi_table = _mm256_loadu_ps(levels + 8), a, b;
    for (int64_t blk = block0; blk < block1; blk++) {
        __m256 scale = _mm256_set1_ps(absmax[blk]);
        for (int64_t i = blk * blocksize; i < (blk + 1) * blocksize; i += 16) {
            decode16(codes + i / 2, lo_table, hi_table, scale, &a, &b);
            if (kind == OUT_F32) {
                _mm256_storeu_ps((float *)out + i, a);
                _mm256_storeu_ps((float *)out + i + 8, b);
            } else if (kind == OUT_BF16) {
                /* packus works per 128-bit lane: [a0-3 b0-3 a4-7 b4-7], put back in order */
                __m256i packed = _mm256_packus_epi32(bf16_round(a), bf16_round(b));
                _mm256_storeu_si256((__m256i *)((uint16_t *)out + i), _mm256_permute4x64_epi64(packed, 0xD8));
            } else {
                _mm_storeu_si128((__m128i *)((uint16_t *)out + i), _mm256_cvtps_ph(a, _MM_FROUND_TO_NEAREST_INT));
                _mm_storeu_si128((__m128i *)((uint16_t *)out + i + 8),
                                 _mm256_cvtps_ph(b, _MM_FROUND_TO_NEAREST_INT));
            }
        }
    }
}

/* Rows [n0, n1) of W whose rows are whole blocks (K % blocksize == 0, blocksize % 16 == 0), M rows of x.
   Per block: the code values dotted with x, then times the block's scale (one multiply per block, not per value).
   Inlined for each M from 1 to MATMUL_MAX_M (MATMUL_ROWS_OF): with M a constant the accumulators live in
   registers; with M a variable they went through memory, a store-to-load wait on every FMA. */
__attribute__((target("avx2,fma"), always_inline)) static inline void
matmul_avx2(const uint8_t *codes, const float *absmax, const uint8_t *absmax_codes, const float *nested_map,
            const float *nested_absmax, float offset, const float *levels, const float *x, const int64_t M,
            int64_t K, int64_t N, int64_t n0, int64_t n1, int64_t blocksize, float *out) {
    __m256 lo_table = _mm256_loadu_ps(levels), hi_table = _mm256_loadu_ps(levels + 8), a, b;
    const int64_t blocks_per_row = K / blocksize;
    for (int64_t n = n0; n < n1; n++) {
        __m256 acc[MATMUL_MAX_M], even[MATMUL_MAX_M], odd[MATMUL_MAX_M];
        for (int64_t m = 0; m < M; m++) acc[m] = _mm256_setzero_ps();
        for (int64_t j = 0; j < blocks_per_row; j++) {
            int64_t blk = n * blocks_per_row + j;
            __m256 scale = _mm256_set1_ps(block_scale(absmax, absmax_codes, nested_map, nested_absmax, offset, blk));
            for (int64_t m = 0; m < M; m++) even[m] = odd[m] = _mm256_setzero_ps();
            for (int64_t k = j * blocksize; k < (j + 1) * blocksize; k += 16) {
                levels16(codes + (n * K + k) / 2, lo_table, hi_table, &a, &b);
                for (int64_t m = 0; m < M; m++) {
                    /* up to 4 rows, two FMA chains per row hide the FMA latency; more rows hide it among
                       themselves, and 3 registers a row would spill (16 ymm registers) */
                    even[m] = _mm256_fmadd_ps(a, _mm256_loadu_ps(x + m * K + k), even[m]);
                    if (M <= 4) odd[m] = _mm256_fmadd_ps(b, _mm256_loadu_ps(x + m * K + k + 8), odd[m]);
                    else even[m] = _mm256_fmadd_ps(b, _mm256_loadu_ps(x + m * K + k + 8), even[m]);
                }
            }
            for (int64_t m = 0; m < M; m++) acc[m] = _mm256_fmadd_ps(_mm256_add_ps(even[m], odd[m]), scale, acc[m]);
        }
        for (int64_t m = 0; m < M; m++) {
            __m128 s = _mm_add_ps(_mm256_castps256_ps128(acc[m]), _mm256_extractf128_ps(acc[m], 1));
            s = _mm_add_ps(s, _mm_movehl_ps(s, s));
            s = _mm_add_ss(s, _mm_movehdup_ps(s));
            out[m * N + n] = _mm_cvtss_f32(s);
        }
    }
}

/* One function per M from 1 to MATMUL_MAX_M for a kernel, each the kernel inlined with M a constant, and their
   table by M (KERNEL##_ROWS). */
typedef void (*matmul_fn)(const uint8_t *, const float *, const uint8_t *, const float *, const float *, float,
                          const float *, const float *, int64_t, int64_t, int64_t, int64_t, int64_t, float *);
#define MATMUL_FOR(kernel, isa, m)                                                                                 \
    __attribute__((target(isa))) static void kernel##_m##m(                                                       \
        const uint8_t *codes, const float *absmax, const uint8_t *absmax_codes, const float *nested_map,           \
        const float *nested_absmax, float offset, const float *levels, const float *x, int64_t K, int64_t N,      \
        int64_t n0, int64_t n1, int64_t blocksize, float *out) {                                                   \
        kernel(codes, absmax, absmax_codes, nested_map, nested_absmax, offset, levels, x, m, K, N, n0, n1,        \
               blocksize, out);                                                                                    \
    }
#define MATMUL_ROWS_OF(kernel, isa)                                                                                \
    MATMUL_FOR(kernel, isa, 1) MATMUL_FOR(kernel, isa, 2) MATMUL_FOR(kernel, isa, 3) MATMUL_FOR(kernel, isa, 4)   \
    MATMUL_FOR(kernel, isa, 5) MATMUL_FOR(kernel, isa, 6) MATMUL_FOR(kernel, isa, 7) MATMUL_FOR(kernel, isa, 8)   \
    MATMUL_FOR(kernel, isa, 9) MATMUL_FOR(kernel, isa, 10) MATMUL_FOR(kernel, isa, 11)                           \
    MATMUL_FOR(kernel, isa, 12) MATMUL_FOR(kernel, isa, 13) MATMUL_FOR(kernel, isa, 14)                          \
    MATMUL_FOR(kernel, isa, 15) MATMUL_FOR(kernel, isa, 16)                                                       \
    static const matmul_fn kernel##_ROWS[MATMUL_MAX_M + 1] = {                                                    \
        0, kernel##_m1, kernel##_m2, kernel##_m3, kernel##_m4, kernel##_m5, kernel##_m6, kernel##_m7,            \
        kernel##_m8, kernel##_m9, kernel##_m10, kernel##_m11, kernel##_m12, kernel##_m13, kernel##_m14,          \
        kernel##_m15, kernel##_m16};
MATMUL_ROWS_OF(matmul_avx2, "avx2,fma")

/* Several rows of x (AVX-512): mt rows of x (from row m0) against nt rows of W (from row n), mt, nt <= 4 and
   constants where this is inlined, so that the 16 accumulators stay in registers. One row of W at a time (M = 1's
   loop) streams all M rows of x from L2 for each row of W and is bound by those loads; here each x load feeds nt
   rows' FMAs. The decoded weights are multiplied by their block's scale first (one multiply per 16 weights), so
   one accumulator per (x row, W row) is enough. */
__attribute__((target("avx512f"), always_inline)) static inline void
avx512_tile(const uint8_t *codes, const float *absmax, const uint8_t *absmax_codes, const float *nested_map,
            const float *nested_absmax, float offset, const __m512 table, const float *xd, int64_t m0,
            const int64_t mt, int64_t K, int64_t N, int64_t n, const int64_t nt, int64_t blocksize, float *out) {
    const int64_t blocks_per_row = K / blocksize;
    __m512 acc[4][4];
    for (int64_t m = 0; m < mt; m++)
        for (int64_t r = 0; r < nt; r++) acc[m][r] = _mm512_setzero_ps();
    for (int64_t j = 0; j < blocks_per_row; j++) {
        float scale[4];
        for (int64_t r = 0; r < nt; r++)
            scale[r] =
                block_scale(absmax, absmax_codes, nested_map, nested_absmax, offset, (n + r) * blocks_per_row + j);
        for (int64_t k = j * blocksize; k < (j + 1) * blocksize; k += 32) {
            __m512 high[4], low[4];
            for (int64_t r = 0; r < nt; r++) {
                __m512i bytes = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)(codes + ((n + r) * K + k) / 2)));
                __m512 s = _mm512_set1_ps(scale[r]);
                high[r] = _mm512_mul_ps(_mm512_permutexvar_ps(_mm512_srli_epi32(bytes, 4), table), s);
                low[r] = _mm512_mul_ps(_mm512_permutexvar_ps(bytes, table), s);
            }
            for (int64_t m = 0; m < mt; m++) {
                const float *xm = xd + (m0 + m) * K + k;
                __m512 even = _mm512_loadu_ps(xm), odd = _mm512_loadu_ps(xm + 16);
                for (int64_t r = 0; r < nt; r++)
                    acc[m][r] = _mm512_fmadd_ps(low[r], odd, _mm512_fmadd_ps(high[r], even, acc[m][r]));
            }
        }
    }
    for (int64_t m = 0; m < mt; m++)
        for (int64_t r = 0; r < nt; r++) out[(m0 + m) * N + n + r] = _mm512_reduce_add_ps(acc[m][r]);
}

/* Rows n .. n + nt - 1 of W against all M rows of x, in tiles of 4 x rows: every tile's sizes constants. */
__attribute__((target("avx512f"), always_inline)) static inline void
avx512_rows(const uint8_t *codes, const float *absmax, const uint8_t *absmax_codes, const float *nested_map,
            const float *nested_absmax, float offset, const __m512 table, const float *xd, const int64_t M,
            int64_t K, int64_t N, int64_t n, const int64_t nt, int64_t blocksize, float *out) {
    for (int64_t m0 = 0; m0 + 4 <= M; m0 += 4)
        avx512_tile(codes, absmax, absmax_codes, nested_map, nested_absmax, offset, table, xd, m0, 4, K, N, n, nt,
                    blocksize, out);
    if (M % 4)
        avx512_tile(codes, absmax, absmax_codes, nested_map, nested_absmax, offset, table, xd, M - M % 4, M % 4, K,
                    N, n, nt, blocksize, out);
}

/* AVX-512: the 16-entry table is one register, so one vpermps looks 16 levels up (AVX2: two and a blend for 8).
   16 code bytes widen to 16 dword lanes; vpermps reads an index's low 4 bits, so the lanes as they are give the
   low-nibble (odd) weights and shifted right by 4 the high-nibble (even) ones, with no interleaving of the two:
   instead x comes de-interleaved (xd, per 32 elements: the 16 even ones, then the 16 odd ones). 3 shuffle-port
   operations per 32 weights, against 7 per 16 for AVX2. blocksize a multiple of 32. */
__attribute__((target("avx512f"), always_inline)) static inline void
matmul_avx512(const uint8_t *codes, const float *absmax, const uint8_t *absmax_codes, const float *nested_map,
              const float *nested_absmax, float offset, const float *levels, const float *xd, const int64_t M,
              int64_t K, int64_t N, int64_t n0, int64_t n1, int64_t blocksize, float *out) {
    const __m512 table = _mm512_loadu_ps(levels);
    const int64_t blocks_per_row = K / blocksize;
    if (M >= 4) { /* a row's result does not depend on its tile (the same operations in the same order) */
        int64_t n = n0;
        for (; n + 4 <= n1; n += 4)
            avx512_rows(codes, absmax, absmax_codes, nested_map, nested_absmax, offset, table, xd, M, K, N, n, 4,
                        blocksize, out);
        switch (n1 - n) { /* the last 1-3 rows of W, each count a constant */
        case 3:
            avx512_rows(codes, absmax, absmax_codes, nested_map, nested_absmax, offset, table, xd, M, K, N, n, 3,
                        blocksize, out);
            break;
        case 2:
            avx512_rows(codes, absmax, absmax_codes, nested_map, nested_absmax, offset, table, xd, M, K, N, n, 2,
                        blocksize, out);
            break;
        case 1:
            avx512_rows(codes, absmax, absmax_codes, nested_map, nested_absmax, offset, table, xd, M, K, N, n, 1,
                        blocksize, out);
            break;
        }
        return;
    }
    for (int64_t n = n0; n < n1; n++) { /* 1-3 rows of x: a row of W at a time, two FMA chains per x row */
        __m512 acc[3], even[3], odd[3];
        for (int64_t m = 0; m < M; m++) acc[m] = _mm512_setzero_ps();
        for (int64_t j = 0; j < blocks_per_row; j++) {
            __m512 scale = _mm512_set1_ps(
                block_scale(absmax, absmax_codes, nested_map, nested_absmax, offset, n * blocks_per_row + j));
            for (int64_t m = 0; m < M; m++) even[m] = odd[m] = _mm512_setzero_ps();
            for (int64_t k = j * blocksize; k < (j + 1) * blocksize; k += 32) {
                __m512i bytes = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)(codes + (n * K + k) / 2)));
                __m512 high = _mm512_permutexvar_ps(_mm512_srli_epi32(bytes, 4), table);
                __m512 low = _mm512_permutexvar_ps(bytes, table);
                for (int64_t m = 0; m < M; m++) {
                    even[m] = _mm512_fmadd_ps(high, _mm512_loadu_ps(xd + m * K + k), even[m]);
                    odd[m] = _mm512_fmadd_ps(low, _mm512_loadu_ps(xd + m * K + k + 16), odd[m]);
                }
            }
            for (int64_t m = 0; m < M; m++) acc[m] = _mm512_fmadd_ps(_mm512_add_ps(even[m], odd[m]), scale, acc[m]);
        }
        for (int64_t m = 0; m < M; m++) out[m * N + n] = _mm512_reduce_add_ps(acc[m]);
    }
}

MATMUL_ROWS_OF(matmul_avx512, "avx512f")
#endif

/* out[m, n] (row stride N) = sum_k x[m, k] * W[n, k] in fp32 for the rows n in [n0, n1), M <= MATMUL_MAX_M.
   W: blockwise 4-bit codes over the flat [N, K] tensor; absmax fp32 per block, or (absmax_codes not NULL) its
   8-bit double quantization. */
void nf4_matmul(const uint8_t *codes, const float *absmax, const uint8_t *absmax_codes, const float *nested_map,
                const float *nested_absmax, float offset, const float *levels, const float *x, int64_t M,
                int64_t K, int64_t N, int64_t n0, int64_t n1, int64_t blocksize, float *out) {
#if defined(__x86_64__) || defined(__i386__)
    if (M >= 1 && M <= MATMUL_MAX_M && blocksize % 32 == 0 && K % blocksize == 0 &&
        __builtin_cpu_supports("avx512f") && !getenv("NF4_NO_AVX512")) {
        float *xd = malloc((size_t)(M * K) * sizeof(float));
        if (xd) {
            for (int64_t i = 0; i < M * K; i++) xd[(i & ~(int64_t)31) + ((i & 1) << 4) + ((i & 31) >> 1)] = x[i];
            matmul_avx512_ROWS[M](codes, absmax, absmax_codes, nested_map, nested_absmax, offset, levels, xd, K, N,
                                  n0, n1, blocksize, out);
            free(xd);
            return;
        }
    }
    if (M >= 1 && M <= MATMUL_MAX_M && blocksize % 16 == 0 && K % blocksize == 0 && __builtin_cpu_supports("avx2") &&
        __builtin_cpu_supports("fma")) {
        matmul_avx2_ROWS[M](codes, absmax, absmax_codes, nested_map, nested_absmax, offset, levels, x, K, N, n0,
                            n1, blocksize, out);
        return;
    }
#endif
    for (int64_t n = n0; n < n1; n++) {
        for (int64_t m = 0; m < M; m++) out[m * N + n] = 0.0f;
        for (int64_t k = 0; k < K; k++) {
            int64_t i = n * K + k;
            uint8_t byte = codes[i >> 1];
            float scale = block_scale(absmax, absmax_codes, nested_map, nested_absmax, offset, i / blocksize);
            float w = levels[(i & 1) ? (byte & 15) : (byte >> 4)] * scale;
            if (w < FLT_MIN_ && w > -FLT_MIN_) w = 0.0f;
            for (int64_t m = 0; m < M; m++) out[m * N + n] += x[m * K + k] * w;
        }
    }
}

/* Elements [begin, end) of a tensor of blocksize-sized blocks; begin is a multiple of blocksize.
   levels: the 16 fp32 code values; absmax: fp32 per block; out: fp32, bf16 or fp16 by kind. */
void nf4_dequantize(const uint8_t *codes, const float *absmax, const float *levels, int64_t begin, int64_t end,
                    int64_t blocksize, void *out, int kind) {
    int64_t whole = begin;
#if defined(__x86_64__) || defined(__i386__)
    if (blocksize % 16 == 0 && __builtin_cpu_supports("avx2") && __builtin_cpu_supports("f16c")) {
        int64_t blocks = (end - begin) / blocksize;
        avx2(codes, absmax, levels, begin / blocksize, begin / blocksize + blocks, blocksize, out, kind);
        whole = begin + blocks * blocksize;
    }
#endif
    scalar(codes, absmax, levels, whole, end, blocksize, out, kind);
}
