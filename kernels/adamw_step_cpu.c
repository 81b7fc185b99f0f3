/* Fused AdamW step on block-quantized moments for the CPU: one pass per block.
 *
 * The CPU twin of the Triton kernel in adamw_step.py, with the same oracle:
 * lowprec.optim.functional.adamw_blocks_ (eager PyTorch). For each block of B elements it reads
 * the parameter, the gradient, the two moments' codes and absmax, decodes, updates m, v and the
 * parameter in float32, takes the new per-block absmax, requantizes and writes back. The block's
 * working set (at most 4 x 256 floats) stays in L1, so memory sees each byte once: 14.1 bytes per
 * fp32 parameter at 4-bit states against 28 for torch's fused fp32 AdamW.
 *
 * Bit-exactness with the reference rests on doing exactly its float32 operations in its order:
 * no FMA contraction (built with -ffp-contract=off), correctly rounded sqrt and division (the
 * IEEE instructions; -fno-math-errno only drops the errno branch), code-book encoding as the
 * count of midpoints below the value (what the reference's binary search computes), FP8
 * encoding by round-to-nearest-even on the float32 bits, bf16 by round-to-nearest-even and fp16
 * by the compiler's conversion (also RNE). The portable loops are written so GCC/Clang vectorise
 * them (-O3 -march=native, -fno-trapping-math); where AVX-512 is available the 4-bit maps (16
 * entries: one register, a lookup is one permute) and the hot packed-4-bit block run as
 * intrinsics instead, doing the very same operations. The tests hold both builds against the
 * reference.
 *
 * Plain C with no PyTorch headers: it compiles in about a second with the system compiler and is
 * called through ctypes (kernels/cpu_library.py), which releases the GIL, so block ranges run in
 * parallel on Python threads. Measured on one 4096x4096 fp32 parameter, 1 thread (AMD EPYC,
 * AVX-512): 0.48 ns per element at 4-bit states, torch's fused fp32 AdamW 0.52.
 */
#include <math.h>
#include <stdint.h>
#include <string.h>
#if defined(__AVX512F__) && defined(__AVX512BW__)
#include <immintrin.h>
#define LP_AVX512 1
#else
#define LP_AVX512 0
#endif

#define LP_MAX_BLOCK 256

enum {
    LP_KIND_CODEBOOK16 = 0, /* 16 codes: code = #{k : mids[k] < n}, 15 compares */
    LP_KIND_LINEAR16 = 1,   /* table[i] = (i + 1) / 16: code = clamp(ceil(16 n - 1.5), 0, 15) */
    LP_KIND_CODEBOOK256 = 2, /* 256 codes: a table of #midpoints below each bucket of floats (by
                                their top bits), then 1 compare */
    LP_KIND_FP8 = 3,        /* code = FP8 bits of clamp(n * fmax), round to nearest even */
};

enum { LP_F32 = 0, LP_BF16 = 1, LP_F16 = 2 };

/* One moment's storage format. Mirrors kernels/adamw_step_cpu.py's _Format. */
typedef struct {
    int32_t kind;
    int32_t packed;              /* two 4-bit codes per byte, half-block layout */
    const float *table;          /* decoded (normalised) value of each code */
    const float *mids;           /* ascending midpoints, padded with +inf to the code count */
    const uint8_t *bucket_start; /* CODEBOOK256: #{mids below the lowest value of each bucket} */
    int32_t bucket_shift;        /* CODEBOOK256: bucket = float bits >> bucket_shift */
    int32_t fp8_mbits;           /* FP8: mantissa bits */
    int32_t fp8_bias;            /* FP8: exponent bias */
    float fp8_max;               /* FP8: largest finite value */
    float fp8_minnorm;           /* FP8: smallest normal value */
    float fp8_subscale;          /* FP8: 1 / smallest subnormal (a power of two) */
    float fp8_inv_max;           /* FP8: float32(1 / max), the table's scale (table[c] = value(c) * it) */
    int32_t fp8_special_mask;    /* FP8: codes c with (c & mask) == value are Inf/NaN: decoded by the */
    int32_t fp8_special_value;   /*      table; the others by arithmetic. mask 0: always the table */
} lp_format;

/* Hyperparameter vector (lowprec.optim.functional.hyperparams). */
enum { HP_BETA1, HP_1M_BETA1, HP_BETA2, HP_1M_BETA2, HP_DECAY, HP_NEG_STEP, HP_BC2_SQRT, HP_EPS };

/* Smallest positive normal float32: an absmax below it is stored as 0 (state_quant.FLOAT32_TINY). */
#define LP_FLOAT32_TINY 1.17549435082228750797e-38f

static inline uint32_t f2u(float x) { uint32_t u; memcpy(&u, &x, 4); return u; }

/* The multi-tensor entry points number items (blocks or elements) across their tensors in order and
 * work on the range [r0, r1) of that numbering: the part of a tensor whose items are numbered
 * [base, base + n), as indices [*lo, *hi) into that tensor (empty when *lo >= *hi). */
static inline void clip_range(int64_t base, int64_t n, int64_t r0, int64_t r1, int64_t *lo, int64_t *hi) {
    *lo = (r0 > base ? r0 : base) - base;
    *hi = (r1 < base + n ? r1 : base + n) - base;
}
static inline float u2f(uint32_t u) { float x; memcpy(&x, &u, 4); return x; }

/* ---------------------------------------------------------------------------------------------
 * Encoders: normalised float32 values -> int32 codes (unpacked)
 * ------------------------------------------------------------------------------------------- */

static void encode_codebook16(const lp_format *f, const float *restrict x, float scale, int32_t *restrict out,
                              int n) {
#if LP_AVX512
    if (n % 16 == 0) {
        /* binary search: 4 steps, each threshold fetched by a permute of the (inf-padded) midpoints */
        const __m512 mids = _mm512_loadu_ps(f->mids), s = _mm512_set1_ps(scale);
        const __m512i one = _mm512_set1_epi32(1);
        for (int i = 0; i < n; i += 16) {
            __m512 v = _mm512_mul_ps(_mm512_loadu_ps(x + i), s);
            __m512i idx = _mm512_setzero_si512();
            for (int step = 8; step >= 1; step >>= 1) {
                __m512i cand = _mm512_add_epi32(idx, _mm512_set1_epi32(step));
                __m512 thr = _mm512_permutexvar_ps(_mm512_sub_epi32(cand, one), mids);
                idx = _mm512_mask_mov_epi32(idx, _mm512_cmp_ps_mask(v, thr, _CMP_GT_OQ), cand);
            }
            _mm512_storeu_si512(out + i, idx);
        }
        return;
    }
#endif
    float v[LP_MAX_BLOCK];
    for (int i = 0; i < n; i++) {
        v[i] = x[i] * scale;
        out[i] = 0;
    }
    for (int k = 0; k < 15; k++) {
        const float mid = f->mids[k];
        for (int i = 0; i < n; i++) out[i] += v[i] > mid;
    }
}

static void encode_linear16(const float *restrict x, float scale, int32_t *restrict out, int n) {
    for (int i = 0; i < n; i++) {
        float t = x[i] * scale * 16.0f - 1.5f;
        /* clamp(ceil(t), 0, 15) = ceil(clamp(t, 0, 15)); NaN -> 0, as every comparison is false */
        float c = t < 15.0f ? t : 15.0f;
        c = t > 0.0f ? c : 0.0f;
        out[i] = (int32_t)ceilf(c);
    }
}

static void encode_codebook256(const lp_format *f, const float *restrict x, float scale, int32_t *restrict out,
                               int n) {
    const uint8_t *start = f->bucket_start;
    const float *mids = f->mids;
    const int shift = f->bucket_shift;
#if LP_AVX512
    if (n % 16 == 0) { /* two gathers: the bucket's start (a byte; the table has 3 bytes of tail
                          padding for the 4-byte gather) and the midpoint above it */
        const __m512 s = _mm512_set1_ps(scale);
        const __m512i byte = _mm512_set1_epi32(0xFF), one = _mm512_set1_epi32(1);
        for (int i = 0; i < n; i += 16) {
            __m512 v = _mm512_mul_ps(_mm512_loadu_ps(x + i), s);
            __m512i key = _mm512_srli_epi32(_mm512_castps_si512(v), shift);
            __m512i st = _mm512_and_si512(_mm512_i32gather_epi32(key, start, 1), byte);
            __m512 mid = _mm512_i32gather_ps(st, mids, 4);
            __m512i c = _mm512_mask_add_epi32(st, _mm512_cmp_ps_mask(v, mid, _CMP_GT_OQ), st, one);
            _mm512_storeu_si512(out + i, _mm512_maskz_mov_epi32(_mm512_cmp_ps_mask(v, v, _CMP_ORD_Q), c));
        }
        return;
    }
#endif
    for (int i = 0; i < n; i++) {
        float v = x[i] * scale;
        int32_t s = start[f2u(v) >> shift];
        int32_t c = s + (v > mids[s]);
        out[i] = v == v ? c : 0;
    }
}

static void encode_fp8(const lp_format *f, const float *restrict x, float scale, int32_t *restrict out, int n) {
    const float fmax = f->fp8_max, minnorm = f->fp8_minnorm, subscale = f->fp8_subscale;
    const int mbits = f->fp8_mbits, drop = 23 - mbits, rebias = 127 - f->fp8_bias;
    const uint32_t mmask = (1u << mbits) - 1u;
    const int32_t nan_code = 0x7F;
    for (int i = 0; i < n; i++) {
        float v = x[i] * scale * fmax;
        v = v < -fmax ? -fmax : v;
        v = v > fmax ? fmax : v;
        uint32_t bits = f2u(v);
        uint32_t sign = (bits >> 31) << 7;
        uint32_t a = bits & 0x7FFFFFFFu;
        /* normal: keep mbits mantissa bits, round to nearest even */
        uint32_t r = (a + ((1u << (drop - 1)) - 1u) + ((a >> drop) & 1u)) >> drop;
        uint32_t normal = ((uint32_t)((int32_t)(r >> mbits) - rebias) << mbits) | (r & mmask);
        /* subnormal: in units of the smallest subnormal; +-2^23 rounds to an integer, ties to even
           (an input that rounds up to the smallest normal gives that normal's code) */
        float y = u2f(a) >= minnorm ? 0.0f : u2f(a) * subscale; /* < 2^mbits: no int overflow */
        uint32_t sub = (uint32_t)(int32_t)((y + 8388608.0f) - 8388608.0f);
        uint32_t code = u2f(a) >= minnorm ? normal : sub;
        out[i] = v == v ? (int32_t)((code & 0x7Fu) | sign) : (int32_t)(nan_code | sign);
    }
}

static void encode_values(const lp_format *f, const float *x, float scale, int32_t *out, int n) {
    switch (f->kind) {
    case LP_KIND_CODEBOOK16: encode_codebook16(f, x, scale, out, n); break;
    case LP_KIND_LINEAR16: encode_linear16(x, scale, out, n); break;
    case LP_KIND_CODEBOOK256: encode_codebook256(f, x, scale, out, n); break;
    default: encode_fp8(f, x, scale, out, n); break;
    }
}

/* Codes of one block of B values x under 1/absmax `scale`, stored packed or one per byte. */
static void encode_block(const lp_format *f, const float *x, float scale, uint8_t *restrict codes, int B) {
    int32_t c[LP_MAX_BLOCK];
    encode_values(f, x, scale, c, B);
    if (f->packed) {
        const int H = B / 2;
        for (int j = 0; j < H; j++) codes[j] = (uint8_t)(c[j] | (c[j + H] << 4));
    } else {
        for (int j = 0; j < B; j++) codes[j] = (uint8_t)c[j];
    }
}

/* table[c] for 4-bit codes c as a tree of selects on the code's bits (vectorises; a gather from a
 * 16-entry table does not, or slowly). */
static inline float lookup16(const float *t, uint32_t c) {
    float a0 = (c & 1) ? t[1] : t[0], a1 = (c & 1) ? t[3] : t[2], a2 = (c & 1) ? t[5] : t[4];
    float a3 = (c & 1) ? t[7] : t[6], a4 = (c & 1) ? t[9] : t[8], a5 = (c & 1) ? t[11] : t[10];
    float a6 = (c & 1) ? t[13] : t[12], a7 = (c & 1) ? t[15] : t[14];
    float b0 = (c & 2) ? a1 : a0, b1 = (c & 2) ? a3 : a2, b2 = (c & 2) ? a5 : a4, b3 = (c & 2) ? a7 : a6;
    float d0 = (c & 4) ? b1 : b0, d1 = (c & 4) ? b3 : b2;
    return (c & 8) ? d1 : d0;
}

/* FP8 codes to values without the table's gather: sign, exponent and mantissa fields placed in
 * a float32 (normal) or the mantissa times the smallest subnormal (exact), times the table's
 * scale. Returns 0 (nothing written) when a code is Inf/NaN, whose table entries differ. */
static int decode_fp8_arith(const lp_format *f, const uint8_t *restrict codes, float absmax, float *restrict out,
                            int B) {
    const uint32_t smask = (uint32_t)f->fp8_special_mask, sval = (uint32_t)f->fp8_special_value;
    if (smask == 0) return 0;
    uint32_t special = 0;
    for (int j = 0; j < B; j++) special |= (uint32_t)((codes[j] & smask) == sval);
    if (special) return 0;
    const int mb = f->fp8_mbits;
    const uint32_t emask = (1u << (7 - mb)) - 1u, mmask = (1u << mb) - 1u, rebias = (uint32_t)(127 - f->fp8_bias);
    const float unit = 1.0f / f->fp8_subscale, inv = f->fp8_inv_max;
    for (int j = 0; j < B; j++) {
        const uint32_t c = codes[j], e = (c >> mb) & emask, m = c & mmask, sign = (c >> 7) << 31;
        float normal = u2f(sign | ((e + rebias) << 23) | (m << (23 - mb)));
        float sub = u2f(f2u((float)m * unit) | sign);
        out[j] = (e ? normal : sub) * inv * absmax;
    }
    return 1;
}

/* Values of one block: table[code] * absmax. */
static void decode_block(const lp_format *f, const uint8_t *restrict codes, float absmax, float *restrict out,
                         int B) {
    const float *table = f->table;
    if (!f->packed) {
        if (f->kind == LP_KIND_FP8 && decode_fp8_arith(f, codes, absmax, out, B)) return;
        for (int j = 0; j < B; j++) out[j] = table[codes[j]] * absmax;
        return;
    }
    const int H = B / 2;
    if (f->kind == LP_KIND_LINEAR16) { /* table[c] = (c + 1) / 16, exactly */
        for (int j = 0; j < H; j++) {
            uint32_t c = codes[j];
            out[j] = ((float)(c & 15u) + 1.0f) * 0.0625f * absmax;
            out[j + H] = ((float)(c >> 4) + 1.0f) * 0.0625f * absmax;
        }
        return;
    }
#if LP_AVX512
    if (H % 16 == 0) {
        const __m512 t = _mm512_loadu_ps(table), a = _mm512_set1_ps(absmax);
        const __m512i low = _mm512_set1_epi32(15);
        for (int j = 0; j < H; j += 16) {
            __m512i c = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)(codes + j)));
            _mm512_storeu_ps(out + j, _mm512_mul_ps(_mm512_permutexvar_ps(_mm512_and_si512(c, low), t), a));
            _mm512_storeu_ps(out + j + H, _mm512_mul_ps(_mm512_permutexvar_ps(_mm512_srli_epi32(c, 4), t), a));
        }
        return;
    }
#endif
    float t[16];
    for (int k = 0; k < 16; k++) t[k] = table[k];
    for (int j = 0; j < H; j++) {
        uint32_t c = codes[j];
        out[j] = lookup16(t, c & 15u) * absmax;
        out[j + H] = lookup16(t, c >> 4) * absmax;
    }
}

/* max |x| over a block, flushed to 0 below FLOAT32_TINY (NaN if an element is NaN, as torch's
 * amax). On non-negative floats the order of the bit patterns is the order of the values (NaN
 * above +inf), so this is an integer max, which vectorises without fast-math. */
static float block_absmax(const float *restrict x, int B) {
    uint32_t m = 0;
    for (int i = 0; i < B; i++) {
        uint32_t u = f2u(x[i]) & 0x7FFFFFFFu;
        m = u > m ? u : m;
    }
    float r = u2f(m);
    return r >= LP_FLOAT32_TINY || r != r ? r : 0.0f;
}

static inline float bf16_to_f32(uint16_t h) { return u2f((uint32_t)h << 16); }
static inline uint16_t f32_to_bf16(float x) {
    uint32_t u = f2u(x);
    return x != x ? (uint16_t)0x7FC0 : (uint16_t)((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
}

/* The float32 update of one block, p and g of element type T (loaded as float32). */
#define LP_DEFINE_UPDATE(NAME, T, LOAD, STORE)                                                              \
    static void NAME(T *restrict p, const T *restrict g, float *restrict m, float *restrict v,              \
                     const float *hp, int maximize, int64_t n) {                                            \
        const float b1 = hp[HP_BETA1], omb1 = hp[HP_1M_BETA1], b2 = hp[HP_BETA2], omb2 = hp[HP_1M_BETA2];   \
        const float decay = hp[HP_DECAY], neg_step = hp[HP_NEG_STEP], bc2 = hp[HP_BC2_SQRT], eps = hp[HP_EPS]; \
        const float gsign = maximize ? -1.0f : 1.0f;                                                        \
        for (int64_t i = 0; i < n; i++) {                                                                   \
            float gi = LOAD(g[i]) * gsign;                                                                  \
            float mi = m[i] * b1 + gi * omb1;                                                               \
            float vi = v[i] * b2 + (gi * gi) * omb2;                                                        \
            m[i] = mi;                                                                                      \
            v[i] = vi;                                                                                      \
            float denom = sqrtf(vi) / bc2 + eps;                                                            \
            p[i] = STORE(LOAD(p[i]) * decay + neg_step * (mi / denom));                                     \
        }                                                                                                   \
    }

#define LP_IDENTITY(x) (x)
LP_DEFINE_UPDATE(update_f32, float, LP_IDENTITY, LP_IDENTITY)
LP_DEFINE_UPDATE(update_bf16, uint16_t, bf16_to_f32, f32_to_bf16)
#ifdef __FLT16_MAX__ /* the compiler has _Float16 (GCC 12+, Clang 15+ on x86-64) */
#define LP_HAS_F16 1
#define LP_F16_LOAD(x) ((float)(x))
#define LP_F16_STORE(x) ((_Float16)(x))
LP_DEFINE_UPDATE(update_f16, _Float16, LP_F16_LOAD, LP_F16_STORE)
#else
#define LP_HAS_F16 0
#endif

#if LP_AVX512
/* The hot case, packed 4-bit m and v with float32 or bf16 parameters, as one loop over 16-lane
 * vectors: decode, update, absmax in registers, then encode and pack. The same float32
 * operations in the same order as the scalar path (explicit mul/add intrinsics; no FMA), so the
 * same bits (tests build both). */
static inline __m512 avx_decode4(__m512i c, const lp_format *f, __m512 table, __m512 absmax) {
    if (f->kind == LP_KIND_LINEAR16)
        return _mm512_mul_ps(_mm512_mul_ps(_mm512_add_ps(_mm512_cvtepi32_ps(c), _mm512_set1_ps(1.0f)),
                                           _mm512_set1_ps(0.0625f)), absmax);
    return _mm512_mul_ps(_mm512_permutexvar_ps(c, table), absmax);
}

static inline __m512i avx_encode4(__m512 x, __m512 scale, const lp_format *f, __m512 mids) {
    __m512 v = _mm512_mul_ps(x, scale);
    if (f->kind == LP_KIND_LINEAR16) {
        __m512 t = _mm512_sub_ps(_mm512_mul_ps(v, _mm512_set1_ps(16.0f)), _mm512_set1_ps(1.5f));
        __m512 c = _mm512_mask_mov_ps(_mm512_set1_ps(15.0f), _mm512_cmp_ps_mask(t, _mm512_set1_ps(15.0f), _CMP_LT_OQ), t);
        c = _mm512_maskz_mov_ps(_mm512_cmp_ps_mask(t, _mm512_setzero_ps(), _CMP_GT_OQ), c);
        return _mm512_cvttps_epi32(_mm512_roundscale_ps(c, _MM_FROUND_TO_POS_INF | _MM_FROUND_NO_EXC));
    }
    const __m512i one = _mm512_set1_epi32(1);
    __m512i idx = _mm512_setzero_si512();
    for (int step = 8; step >= 1; step >>= 1) {
        __m512i cand = _mm512_add_epi32(idx, _mm512_set1_epi32(step));
        __m512 thr = _mm512_permutexvar_ps(_mm512_sub_epi32(cand, one), mids);
        idx = _mm512_mask_mov_epi32(idx, _mm512_cmp_ps_mask(v, thr, _CMP_GT_OQ), cand);
    }
    return idx;
}

static inline __m512 avx_load(const void *base, int64_t i, int32_t dtype) {
    if (dtype == LP_F32) return _mm512_loadu_ps((const float *)base + i);
    __m256i h = _mm256_loadu_si256((const __m256i *)((const uint16_t *)base + i));
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}

static inline void avx_store(void *base, int64_t i, int32_t dtype, __m512 x) {
    if (dtype == LP_F32) {
        _mm512_storeu_ps((float *)base + i, x);
        return;
    }
    __m512i u = _mm512_castps_si512(x); /* bf16, round to nearest even; NaN -> 0x7FC0 */
    __m512i r = _mm512_add_epi32(u, _mm512_add_epi32(_mm512_set1_epi32(0x7FFF),
                                                     _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1))));
    r = _mm512_srli_epi32(r, 16);
    r = _mm512_mask_mov_epi32(r, _mm512_cmp_ps_mask(x, x, _CMP_UNORD_Q), _mm512_set1_epi32(0x7FC0));
    _mm256_storeu_si256((__m256i *)((uint16_t *)base + i), _mm512_cvtepi32_epi16(r));
}

static inline float avx_absmax_of_bits(__m512i max_bits) {
    float r = u2f((uint32_t)_mm512_reduce_max_epu32(max_bits));
    return r >= LP_FLOAT32_TINY || r != r ? r : 0.0f; /* flush_tiny */
}

static void block4_avx512(void *p, const void *g, int32_t dtype, int64_t b, int32_t B, uint8_t *mcb, float *ma,
                          uint8_t *vcb, float *va, const float *hp, const lp_format *mf, const lp_format *vf,
                          int32_t maximize) {
    const int H = B / 2;
    const __m512 b1 = _mm512_set1_ps(hp[HP_BETA1]), omb1 = _mm512_set1_ps(hp[HP_1M_BETA1]);
    const __m512 b2 = _mm512_set1_ps(hp[HP_BETA2]), omb2 = _mm512_set1_ps(hp[HP_1M_BETA2]);
    const __m512 decay = _mm512_set1_ps(hp[HP_DECAY]), neg_step = _mm512_set1_ps(hp[HP_NEG_STEP]);
    const __m512 bc2 = _mm512_set1_ps(hp[HP_BC2_SQRT]), eps = _mm512_set1_ps(hp[HP_EPS]);
    const __m512 gsign = _mm512_set1_ps(maximize ? -1.0f : 1.0f);
    const __m512 mtab = _mm512_loadu_ps(mf->table), vtab = _mm512_loadu_ps(vf->table);
    const __m512 mabs = _mm512_set1_ps(*ma), vabs = _mm512_set1_ps(*va);
    const __m512i low = _mm512_set1_epi32(15), nosign = _mm512_set1_epi32(0x7FFFFFFF);
    float mbuf[LP_MAX_BLOCK], vbuf[LP_MAX_BLOCK];
    __m512i mmax = _mm512_setzero_si512(), vmax = _mm512_setzero_si512();
    const int64_t base = b * B;
    for (int j = 0; j < H; j += 16) {
        __m512i cm = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)(mcb + j)));
        __m512i cv = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)(vcb + j)));
        for (int h = 0; h < 2; h++) {
            const int k = j + h * H;
            __m512 mo = avx_decode4(h ? _mm512_srli_epi32(cm, 4) : _mm512_and_si512(cm, low), mf, mtab, mabs);
            __m512 vo = avx_decode4(h ? _mm512_srli_epi32(cv, 4) : _mm512_and_si512(cv, low), vf, vtab, vabs);
            __m512 gi = _mm512_mul_ps(avx_load(g, base + k, dtype), gsign);
            __m512 m = _mm512_add_ps(_mm512_mul_ps(mo, b1), _mm512_mul_ps(gi, omb1));
            __m512 v = _mm512_add_ps(_mm512_mul_ps(vo, b2), _mm512_mul_ps(_mm512_mul_ps(gi, gi), omb2));
            __m512 denom = _mm512_add_ps(_mm512_div_ps(_mm512_sqrt_ps(v), bc2), eps);
            __m512 pn = _mm512_add_ps(_mm512_mul_ps(avx_load(p, base + k, dtype), decay),
                                      _mm512_mul_ps(neg_step, _mm512_div_ps(m, denom)));
            avx_store(p, base + k, dtype, pn);
            _mm512_storeu_ps(mbuf + k, m);
            _mm512_storeu_ps(vbuf + k, v);
            mmax = _mm512_max_epu32(mmax, _mm512_and_si512(_mm512_castps_si512(m), nosign));
            vmax = _mm512_max_epu32(vmax, _mm512_and_si512(_mm512_castps_si512(v), nosign));
        }
    }
    const float m_absmax = avx_absmax_of_bits(mmax), v_absmax = avx_absmax_of_bits(vmax);
    const __m512 ms = _mm512_set1_ps(m_absmax > 0.0f ? 1.0f / m_absmax : 0.0f); /* safe_reciprocal */
    const __m512 vs = _mm512_set1_ps(v_absmax > 0.0f ? 1.0f / v_absmax : 0.0f);
    const __m512 mmids = _mm512_loadu_ps(mf->mids), vmids = _mm512_loadu_ps(vf->mids);
    for (int j = 0; j < H; j += 16) {
        __m512i m0 = avx_encode4(_mm512_loadu_ps(mbuf + j), ms, mf, mmids);
        __m512i m1 = avx_encode4(_mm512_loadu_ps(mbuf + j + H), ms, mf, mmids);
        __m512i v0 = avx_encode4(_mm512_loadu_ps(vbuf + j), vs, vf, vmids);
        __m512i v1 = avx_encode4(_mm512_loadu_ps(vbuf + j + H), vs, vf, vmids);
        _mm_storeu_si128((__m128i *)(mcb + j), _mm512_cvtepi32_epi8(_mm512_or_si512(m0, _mm512_slli_epi32(m1, 4))));
        _mm_storeu_si128((__m128i *)(vcb + j), _mm512_cvtepi32_epi8(_mm512_or_si512(v0, _mm512_slli_epi32(v1, 4))));
    }
    *ma = m_absmax;
    *va = v_absmax;
}
#endif

/* One AdamW step over blocks [b0, b1) of (n_blocks, B) parameter/gradient views.
 * mc/vc: codes, B/2 (packed) or B bytes per block; ma/va: per-block absmax (read, then written).
 * Returns 0, or -1 on an unsupported block size or dtype (nothing written). */
int lowprec_adamw_blocks(void *p, const void *g, int32_t dtype, uint8_t *mc, float *ma, uint8_t *vc, float *va,
                         const float *hp, int64_t b0, int64_t b1, int32_t B, const lp_format *mf,
                         const lp_format *vf, int32_t maximize) {
    if (B <= 0 || B > LP_MAX_BLOCK || B % 32 != 0) return -1;
    if (dtype != LP_F32 && dtype != LP_BF16 && !(dtype == LP_F16 && LP_HAS_F16)) return -1;
    const int64_t mstride = mf->packed ? B / 2 : B, vstride = vf->packed ? B / 2 : B;
    float m[LP_MAX_BLOCK], v[LP_MAX_BLOCK];
#if LP_AVX512
    const int is4 = mf->packed && vf->packed && (mf->kind == LP_KIND_LINEAR16 || mf->kind == LP_KIND_CODEBOOK16) &&
                    (vf->kind == LP_KIND_LINEAR16 || vf->kind == LP_KIND_CODEBOOK16);
    if (is4 && (dtype == LP_F32 || dtype == LP_BF16) && (B / 2) % 16 == 0) {
        for (int64_t b = b0; b < b1; b++)
            block4_avx512(p, g, dtype, b, B, mc + b * mstride, ma + b, vc + b * vstride, va + b, hp, mf, vf, maximize);
        return 0;
    }
#endif
    for (int64_t b = b0; b < b1; b++) {
        uint8_t *mcb = mc + b * mstride, *vcb = vc + b * vstride;
        decode_block(mf, mcb, ma[b], m, B);
        decode_block(vf, vcb, va[b], v, B);
        if (dtype == LP_F32)
            update_f32((float *)p + b * B, (const float *)g + b * B, m, v, hp, maximize, B);
        else if (dtype == LP_BF16)
            update_bf16((uint16_t *)p + b * B, (const uint16_t *)g + b * B, m, v, hp, maximize, B);
#if LP_HAS_F16
        else
            update_f16((_Float16 *)p + b * B, (const _Float16 *)g + b * B, m, v, hp, maximize, B);
#endif
        float m_absmax = block_absmax(m, B), v_absmax = block_absmax(v, B); /* v >= 0: max |v| = max v */
        float m_scale = m_absmax > 0.0f ? 1.0f / m_absmax : 0.0f; /* safe_reciprocal */
        float v_scale = v_absmax > 0.0f ? 1.0f / v_absmax : 0.0f;
        encode_block(mf, m, m_scale, mcb, B);
        encode_block(vf, v, v_scale, vcb, B);
        ma[b] = m_absmax;
        va[b] = v_absmax;
    }
    return 0;
}

/* The step on several tensors in one call (a param group: no per-tensor call overhead). Tensor t
 * has nblocks[t] blocks; blocks are numbered across the tensors in order and [gb0, gb1) of that
 * numbering is stepped, so threads can split a group evenly. Returns 0, or -1 as above. */
int lowprec_adamw_tensors(int32_t count, void *const *p, const void *const *g, const int32_t *dtype,
                          uint8_t *const *mc, float *const *ma, uint8_t *const *vc, float *const *va,
                          const float *const *hp, const int64_t *nblocks, int64_t gb0, int64_t gb1, int32_t B,
                          const lp_format *mf, const lp_format *vf, int32_t maximize) {
    int64_t base = 0;
    for (int32_t t = 0; t < count && base < gb1; t++) {
        int64_t lo, hi;
        clip_range(base, nblocks[t], gb0, gb1, &lo, &hi);
        if (lo < hi && lowprec_adamw_blocks(p[t], g[t], dtype[t], mc[t], ma[t], vc[t], va[t], hp[t], lo, hi, B, mf, vf,
                                            maximize) != 0)
            return -1;
        base += nblocks[t];
    }
    return 0;
}

/* The same step on float32 states (tensors below the quantization threshold, or kept in fp32 by
 * name): m and v are updated in place, no blocks. Elements are numbered across the tensors in
 * order and [e0, e1) of that numbering is stepped. Returns 0, or -1 on an unsupported dtype. */
int lowprec_adamw_fp32_tensors(int32_t count, void *const *p, const void *const *g, const int32_t *dtype,
                               float *const *m, float *const *v, const float *const *hp, const int64_t *numel,
                               int64_t e0, int64_t e1, int32_t maximize) {
    int64_t base = 0;
    for (int32_t t = 0; t < count && base < e1; t++) {
        int64_t lo, hi;
        clip_range(base, numel[t], e0, e1, &lo, &hi);
        base += numel[t];
        if (lo >= hi) continue;
        if (dtype[t] == LP_F32)
            update_f32((float *)p[t] + lo, (const float *)g[t] + lo, m[t] + lo, v[t] + lo, hp[t], maximize, hi - lo);
        else if (dtype[t] == LP_BF16)
            update_bf16((uint16_t *)p[t] + lo, (const uint16_t *)g[t] + lo, m[t] + lo, v[t] + lo, hp[t], maximize,
                        hi - lo);
#if LP_HAS_F16
        else if (dtype[t] == LP_F16)
            update_f16((_Float16 *)p[t] + lo, (const _Float16 *)g[t] + lo, m[t] + lo, v[t] + lo, hp[t], maximize,
                       hi - lo);
#endif
        else
            return -1;
    }
    return 0;
}

/* ---------------------------------------------------------------------------------------------
 * Rank-1 normalised v (Li et al. 2023): the tensor is viewed as (rows, cols); element (i, j) of v
 * is stored as the code of v_ij / min(row_i, col_j), row and col being the row and column maxima
 * of v. m is block-quantized as above. The new maxima need the whole new v before any v code can
 * be written, so the step takes two passes over blocks of B flattened elements:
 *   pass 1: decode m and v (old normaliser), update m, v and p, write p and m's codes and absmax,
 *           and fold the new v into per-thread row/col maxima (v's codes are left as they were);
 *   pass 2: recompute the same new v from the old codes (same operations, same bits) and encode it
 *           under the new normaliser.
 * Oracle: lowprec.optim.functional.adamw_rank1_.
 * ------------------------------------------------------------------------------------------- */

/* The old normaliser min(row[i], col[j]) of flattened elements [k0, k0 + len), as `out`. */
static void rank1_normaliser(const float *row, const float *col, int64_t cols, int64_t k0, int len, float *out) {
    int64_t i = k0 / cols, j = k0 % cols;
    int t = 0;
    while (t < len) {
        int seg = (int)(cols - j < len - t ? cols - j : len - t); /* the rest of row i */
        const float r = row[i];
        const float *c = col + j;
        for (int u = 0; u < seg; u++) out[t + u] = r < c[u] ? r : c[u];
        t += seg;
        i++;
        j = 0;
    }
}

/* v's old values of one block: table[code] * min(row_i, col_j). Pads (beyond n) are 0. */
static void rank1_decode_v(const lp_format *vf, const uint8_t *vcb, const float *row, const float *col, int64_t cols,
                           int64_t k0, int len, int B, float *v) {
    float norm[LP_MAX_BLOCK];
    decode_block(vf, vcb, 1.0f, v, B); /* table[code] * 1.0f is exact */
    rank1_normaliser(row, col, cols, k0, len, norm);
    for (int t = 0; t < len; t++) v[t] = v[t] * norm[t];
    for (int t = len; t < B; t++) v[t] = 0.0f;
}

static inline float f32_load(const void *x, int32_t dtype, int64_t k) {
    if (dtype == LP_F32) return ((const float *)x)[k];
    if (dtype == LP_BF16) return bf16_to_f32(((const uint16_t *)x)[k]);
#if LP_HAS_F16
    return (float)((const _Float16 *)x)[k];
#else
    return 0.0f;
#endif
}

/* Pass 1 over blocks [b0, b1) of a tensor of n elements viewed as (rows, cols). row_new/col_new:
 * this thread's running maxima of |new v| as float32 bit patterns (zeroed by the caller; on
 * non-negative floats the order of the bits is the order of the values, and an integer max
 * vectorises). */
int lowprec_adamw_rank1_pass1(void *p, const void *g, int32_t dtype, uint8_t *mc, float *ma, const uint8_t *vc,
                              const float *row, const float *col, uint32_t *row_new, uint32_t *col_new, const float *hp,
                              int64_t b0, int64_t b1, int64_t n, int64_t cols, int32_t B, const lp_format *mf,
                              const lp_format *vf, int32_t maximize) {
    if (B <= 0 || B > LP_MAX_BLOCK || B % 32 != 0 || cols <= 0) return -1;
    if (dtype != LP_F32 && dtype != LP_BF16 && !(dtype == LP_F16 && LP_HAS_F16)) return -1;
    const int64_t mstride = mf->packed ? B / 2 : B, vstride = vf->packed ? B / 2 : B;
    float m[LP_MAX_BLOCK], v[LP_MAX_BLOCK], pb[LP_MAX_BLOCK], gb[LP_MAX_BLOCK];
    for (int64_t b = b0; b < b1; b++) {
        const int64_t k0 = b * B;
        const int len = (int)(n - k0 < B ? n - k0 : B);
        uint8_t *mcb = mc + b * mstride;
        decode_block(mf, mcb, ma[b], m, B);
        rank1_decode_v(vf, vc + b * vstride, row, col, cols, k0, len, B, v);
        if (len == B && dtype == LP_F32) {
            update_f32((float *)p + k0, (const float *)g + k0, m, v, hp, maximize, B);
        } else if (len == B && dtype == LP_BF16) {
            update_bf16((uint16_t *)p + k0, (const uint16_t *)g + k0, m, v, hp, maximize, B);
        } else { /* a partial last block or fp16: through float32 copies, pads with g = 0 */
            for (int t = 0; t < B; t++) {
                pb[t] = t < len ? f32_load(p, dtype, k0 + t) : 0.0f;
                gb[t] = t < len ? f32_load(g, dtype, k0 + t) : 0.0f;
            }
            update_f32(pb, gb, m, v, hp, maximize, B);
            for (int t = 0; t < len; t++) {
                if (dtype == LP_F32) ((float *)p)[k0 + t] = pb[t];
                else if (dtype == LP_BF16) ((uint16_t *)p)[k0 + t] = f32_to_bf16(pb[t]);
#if LP_HAS_F16
                else ((_Float16 *)p)[k0 + t] = (_Float16)pb[t];
#endif
            }
        }
        const float m_absmax = block_absmax(m, B);
        encode_block(mf, m, m_absmax > 0.0f ? 1.0f / m_absmax : 0.0f, mcb, B);
        ma[b] = m_absmax;
        /* fold |v| (v >= 0) into the row/column maxima, a row segment at a time */
        int64_t i = k0 / cols, j = k0 % cols;
        int t = 0;
        while (t < len) {
            int seg = (int)(cols - j < len - t ? cols - j : len - t);
            uint32_t r = row_new[i];
            uint32_t *c = col_new + j;
            for (int u = 0; u < seg; u++) {
                uint32_t a = f2u(v[t + u]) & 0x7FFFFFFFu;
                r = a > r ? a : r;
                c[u] = a > c[u] ? a : c[u];
            }
            row_new[i] = r;
            t += seg;
            i++;
            j = 0;
        }
    }
    return 0;
}

/* Pass 2 over blocks [b0, b1): v's codes under the new maxima (row_new/col_new, flushed). */
int lowprec_adamw_rank1_pass2(const void *g, int32_t dtype, uint8_t *vc, const float *row, const float *col,
                              const float *row_new, const float *col_new, const float *hp, int64_t b0, int64_t b1,
                              int64_t n, int64_t cols, int32_t B, const lp_format *vf) {
    if (B <= 0 || B > LP_MAX_BLOCK || B % 32 != 0 || cols <= 0) return -1;
    const int64_t vstride = vf->packed ? B / 2 : B;
    const float b2 = hp[HP_BETA2], omb2 = hp[HP_1M_BETA2];
    float v[LP_MAX_BLOCK], norm[LP_MAX_BLOCK];
    for (int64_t b = b0; b < b1; b++) {
        const int64_t k0 = b * B;
        const int len = (int)(n - k0 < B ? n - k0 : B);
        uint8_t *vcb = vc + b * vstride;
        rank1_decode_v(vf, vcb, row, col, cols, k0, len, B, v);
        for (int t = 0; t < len; t++) { /* (-g)^2 = g^2: maximize does not matter here */
            float gi = f32_load(g, dtype, k0 + t);
            v[t] = v[t] * b2 + (gi * gi) * omb2;
        }
        rank1_normaliser(row_new, col_new, cols, k0, len, norm);
        for (int t = 0; t < len; t++) { /* v * safe_reciprocal(min(row, col)); v >= 0 so |v| = v */
            float r = norm[t] > 0.0f ? 1.0f / norm[t] : 0.0f;
            v[t] = fabsf(v[t]) * r;
        }
        encode_block(vf, v, 1.0f, vcb, B); /* pads are 0 from rank1_decode_v */
    }
    return 0;
}

/* 1 when every element of elements [e0, e1) (numbered across the tensors in order) is finite, else
 * 0: an exponent field of all ones is Inf or NaN in float32, bf16 and fp16 alike. One read of
 * the data and one call for a whole param group (a float sum per tensor, the other way to find a
 * NaN, costs a dispatch per tensor). */
int32_t lowprec_all_finite(int32_t count, const void *const *x, const int32_t *dtype, const int64_t *numel,
                           int64_t e0, int64_t e1) {
    int64_t base = 0;
    for (int32_t t = 0; t < count && base < e1; t++) {
        int64_t lo, hi;
        clip_range(base, numel[t], e0, e1, &lo, &hi);
        base += numel[t];
        uint32_t bad = 0;
        if (dtype[t] == LP_F32) {
            const uint32_t *u = (const uint32_t *)x[t];
            for (int64_t i = lo; i < hi; i++) bad |= (u[i] & 0x7F800000u) == 0x7F800000u;
        } else {
            const uint16_t *h = (const uint16_t *)x[t];
            const uint16_t e = dtype[t] == LP_BF16 ? 0x7F80u : 0x7C00u;
            for (int64_t i = lo; i < hi; i++) bad |= (uint32_t)((h[i] & e) == e);
        }
        if (bad) return 0;
    }
    return 1;
}

/* Add 1 to each of count float32 scalars (the optimizer's per-tensor step counters, advanced in
 * one call once the step has run: torch's _foreach_add_ on 0-dim tensors costs ~1.3 us each). */
void lowprec_increment(int32_t count, float *const *x) {
    for (int32_t t = 0; t < count; t++) *x[t] += 1.0f;
}

/* Unpacked codes of n normalised values (for testing the encoders against the reference). */
void lowprec_encode(const lp_format *f, const float *x, int32_t *out, int64_t n) {
    int32_t buf[LP_MAX_BLOCK];
    for (int64_t i = 0; i < n; i += LP_MAX_BLOCK) {
        int k = (int)(n - i < LP_MAX_BLOCK ? n - i : LP_MAX_BLOCK);
        encode_values(f, x + i, 1.0f, buf, k);
        memcpy(out + i, buf, (size_t)k * sizeof(int32_t));
    }
}

/* 1 when fp16 parameters are supported (the compiler has _Float16). */
int32_t lowprec_has_f16(void) { return LP_HAS_F16; }
