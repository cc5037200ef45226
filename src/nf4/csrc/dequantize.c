/* Blockwise 4-bit dequantize on CPU: the same values as nf4.format.dequantize, faster than TorchInductor can.

   out[i] = round_to_dtype(flush(level[code i] * absmax[i / blocksize])), codes two per byte, first in the high
   nibble. Inductor turns the level lookup into one scalar load per element; here AVX2 looks 8 levels up at once
   with a register permute (vpermps over the 16-entry table split in two halves), so the loop runs at the speed
   of memory. Compiled at first use by nf4/native.py; the scalar loop is the same computation for other CPUs and
   for the tail. */

#include <stdint.h>
#include <string.h>

enum { OUT_F32 = 0, OUT_BF16 = 1, OUT_F16 = 2 };

static const float FLT_MIN_ = 1.17549435e-38f;

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

/* 16 outputs from 8 code bytes. */
__attribute__((target("avx2,f16c"))) static inline void decode16(const uint8_t *codes, __m256 lo_table,
                                                                 __m256 hi_table, __m256 scale, __m256 *a,
                                                                 __m256 *b) {
    __m128i bytes = _mm_loadl_epi64((const __m128i *)codes);
    __m128i low = _mm_and_si128(bytes, _mm_set1_epi8(15));
    __m128i high = _mm_and_si128(_mm_srli_epi16(bytes, 4), _mm_set1_epi8(15));
    __m128i nibbles = _mm_unpacklo_epi8(high, low); /* output order: high nibble first */
    __m256i i0 = _mm256_cvtepu8_epi32(nibbles);
    __m256i i1 = _mm256_cvtepu8_epi32(_mm_srli_si128(nibbles, 8));
    /* vpermps uses the index's low 3 bits; bit 3 picks the table half (blendv reads the sign bit). */
    __m256 v0 = _mm256_blendv_ps(_mm256_permutevar8x32_ps(lo_table, i0), _mm256_permutevar8x32_ps(hi_table, i0),
                                 _mm256_castsi256_ps(_mm256_slli_epi32(i0, 28)));
    __m256 v1 = _mm256_blendv_ps(_mm256_permutevar8x32_ps(lo_table, i1), _mm256_permutevar8x32_ps(hi_table, i1),
                                 _mm256_castsi256_ps(_mm256_slli_epi32(i1, 28)));
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
#endif

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
