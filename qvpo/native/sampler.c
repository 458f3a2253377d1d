/* The diffusion sampler's element-wise work, fused and vectorised for CPUs.
 *
 * Compiled on first use by torch.utils.cpp_extension, as C++ (-O3 -march=native, OpenMP), with
 * ops.cpp, which registers these functions as torch.library ops (qvpo_native::*): see
 * qvpo/native/__init__.py. The code is C that is also valid C++ (sampler.h declares the entry
 * points). Why it exists: on a 2-core AVX-512 CPU, PyTorch's Mish (and a one-exp form of it in
 * torch ops) costs about as much as the 256x256 matmuls that feed it, because every op is a pass
 * over memory with a fresh allocation. Here each element is read once, kept in registers, and
 * written once.
 *
 * Maths: Mish(x) = x tanh(softplus(x)) = x n / (n + 2), n = e^x (e^x + 2), exact up to float32
 * rounding of exp (a degree-6 polynomial after Cody-Waite range reduction: relative error
 * below 4e-7). e^x is clamped to x in [-87, 20]: for x > 20, n / (n + 2) is 1 in float32; for
 * x < -87, |Mish(x)| < 1e-35. NaN inputs give NaN outputs. Built with -ffp-contract=off: no
 * multiply-add is fused that the source does not write as one, so every path rounds as written.
 */
#ifndef _GNU_SOURCE
#define _GNU_SOURCE  /* syscall() for the AMX permission request (g++ defines it already) */
#endif
#ifdef __cplusplus
#define restrict __restrict__  /* C99's restrict, as GCC and Clang spell it in C++ */
#endif
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "sampler.h"

/* Below this many elements a call runs on one thread: a fork-join costs more than the work,
 * and far more when processes share the cores (a sweep's workers), as torch's own ops do. */
#define PARALLEL_MIN 65536

static inline float exp_clamped(float x) {
    float c = x > -87.0f ? (x < 20.0f ? x : 20.0f) : -87.0f;  /* NaN -> -87: no NaN-to-int below */
    float kf = __builtin_roundf(c * 1.44269504088896341f);
    float r = c - kf * 0.693145751953125f;       /* ln 2 = hi + lo (Cody-Waite) */
    r = r - kf * 1.428606765330187045e-06f;
    float p = 1.0f / 720.0f;
    p = p * r + 1.0f / 120.0f;
    p = p * r + 1.0f / 24.0f;
    p = p * r + 1.0f / 6.0f;
    p = p * r + 0.5f;
    p = p * r + 1.0f;
    p = p * r + 1.0f;
    int32_t bits = ((int32_t)kf + 127) << 23;     /* 2^k, k in [-126, 29] */
    float scale;
    memcpy(&scale, &bits, sizeof scale);
    return p * scale;
}

static inline float mish1(float x) {
    float e = exp_clamped(x);
    float n = e * (e + 2.0f);
    return x * (n / (n + 2.0f));  /* not (x n) / (n + 2): x n overflows for huge x */
}

#if defined(__AVX512F__) && defined(__AVX512BW__)
#include <immintrin.h>
/* AVX-512: the same Mish 16 lanes at a time. */

/* x clamped to [-87, 20] = k ln 2 + r with |r| <= ln2 / 2 (Cody-Waite: ln 2 = hi + lo);
 * returns r and sets *k. */
static inline __m512 reduce16(__m512 x, __m512 *k) {
    __m512 c = _mm512_min_ps(_mm512_max_ps(x, _mm512_set1_ps(-87.0f)), _mm512_set1_ps(20.0f));
    *k = _mm512_roundscale_ps(_mm512_mul_ps(c, _mm512_set1_ps(1.44269504088896341f)),
                              _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 r = _mm512_fnmadd_ps(*k, _mm512_set1_ps(0.693145751953125f), c);
    return _mm512_fnmadd_ps(*k, _mm512_set1_ps(1.428606765330187045e-06f), r);
}

/* Mish from e = e^x: x n / (n + 2), n = e (e + 2), as x (n / (n + 2)) (n / (n + 2) <= 1: no
 * overflow for huge x; a NaN in x stays NaN). The division is a 14-bit reciprocal estimate,
 * refined by one Newton step when `refine` (relative error ~1e-7; a vdivps would occupy the
 * divider for ~10 cycles per vector). */
static inline __m512 ratio16(__m512 x, __m512 e, int refine) {
    const __m512 two = _mm512_set1_ps(2.0f);
    __m512 n = _mm512_mul_ps(e, _mm512_add_ps(e, two));
    __m512 d = _mm512_add_ps(n, two);
    __m512 inv = _mm512_rcp14_ps(d);
    if (refine) inv = _mm512_mul_ps(inv, _mm512_fnmadd_ps(d, inv, two));
    return _mm512_mul_ps(x, _mm512_mul_ps(n, inv));
}

/* Exact Mish, 16 lanes: the scalar maths above with e^x = 2^k p(r) by vscalefps. */
static inline __m512 mish16(__m512 x) {
    __m512 k, r = reduce16(x, &k);
    __m512 p = _mm512_set1_ps(1.0f / 720.0f);
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 120.0f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 24.0f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 6.0f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.5f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
    return ratio16(x, _mm512_scalef_ps(p, k), 1);
}

/* For outputs rounded to bfloat16 (relative step 2^-8): the same Mish with a degree-4 exp
 * polynomial (relative error < 5e-5) and the reciprocal estimate without its Newton step
 * (< 6.1e-5): both far below the rounding that follows, for 4 fewer instructions. */
static inline __m512 mish16_bf16(__m512 x) {
    __m512 k, r = reduce16(x, &k);
    __m512 p = _mm512_set1_ps(1.0f / 24.0f);
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 6.0f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.5f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
    return ratio16(x, _mm512_scalef_ps(p, k), 0);
}

/* 16 values from float32 or bfloat16 memory (bf16: the top half of a float32), and back
 * (bf16 rounded to nearest even, as torch rounds). */
static inline __m512 load16(const void *p, int64_t j, __mmask16 m, int bf16) {
    if (!bf16) return _mm512_maskz_loadu_ps(m, (const float *)p + j);
    __m512i w = _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(m, (const uint16_t *)p + j));
    return _mm512_castsi512_ps(_mm512_slli_epi32(w, 16));
}

static inline void store16(void *p, int64_t j, __mmask16 m, __m512 v, int bf16) {
    if (!bf16) { _mm512_mask_storeu_ps((float *)p + j, m, v); return; }
#if defined(__AVX512BF16__)
    _mm256_mask_storeu_epi16((uint16_t *)p + j, m, (__m256i)_mm512_cvtneps_pbh(v));  /* one vcvtneps2bf16 */
    return;
#endif
    __m512i b = _mm512_castps_si512(v);
    __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(b, 16), _mm512_set1_epi32(1));
    b = _mm512_add_epi32(b, _mm512_add_epi32(_mm512_set1_epi32(0x7FFF), lsb));
    _mm256_mask_storeu_epi16((uint16_t *)p + j, m, _mm512_cvtepi32_epi16(_mm512_srli_epi32(b, 16)));
}

/* One row of the first layer and its activation: out[o + j] = Mish(xr @ W_a + spr + sbs)[j] for
 * j < H (W_a rows of H), one output vector at a time in a register; out float32 or (out_bf16)
 * bfloat16. Shared by qvpo_first_layer_mish and the fused calls. */
static inline void first_layer_row(const float *restrict xr, const float *restrict w,
                                   const float *restrict spr, const float *restrict sbs,
                                   void *restrict out, int64_t o, int64_t A, int64_t H, int out_bf16) {
    for (int64_t j = 0; j < H; j += 16) {
        const __mmask16 m = H - j >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << (H - j)) - 1);
        __m512 acc = _mm512_add_ps(_mm512_maskz_loadu_ps(m, spr + j), _mm512_maskz_loadu_ps(m, sbs + j));
        for (int64_t k = 0; k < A; k++)
            acc = _mm512_fmadd_ps(_mm512_set1_ps(xr[k]), _mm512_maskz_loadu_ps(m, w + k * H + j), acc);
        store16(out, o + j, m, out_bf16 ? mish16_bf16(acc) : mish16(acc), out_bf16);
    }
}
#endif

static inline float bf16_to_float(uint16_t h) {
    uint32_t b = (uint32_t)h << 16;
    float f;
    memcpy(&f, &b, sizeof f);
    return f;
}

static inline uint16_t float_to_bf16(float f) {
    uint32_t b;
    memcpy(&b, &f, sizeof b);
    b += 0x7FFFu + ((b >> 16) & 1u);
    return (uint16_t)(b >> 16);
}

static inline float get1(const void *p, int64_t i, int bf16) {
    return bf16 ? bf16_to_float(((const uint16_t *)p)[i]) : ((const float *)p)[i];
}

static inline void put1(void *p, int64_t i, float v, int bf16) {
    if (bf16) ((uint16_t *)p)[i] = float_to_bf16(v); else ((float *)p)[i] = v;
}

/* d Mish / dx = t + x sech^2(softplus x) sigmoid(x), with t = n / (n + 2) = tanh(softplus x),
 * sech^2 = 1 - t^2 = 4 (n + 1) / (n + 2)^2 (written without the cancellation of 1 - t^2) and
 * sigmoid(x) = e / (1 + e). x is clamped like e^x: beyond 20 the derivative is 1 in float32. */
static inline float mish_grad1(float x) {
    float xc = x > -87.0f ? (x < 20.0f ? x : 20.0f) : -87.0f;
    if (x != x) return x;  /* NaN stays NaN (the clamp above maps it to -87) */
    float e = exp_clamped(xc);
    float n = e * (e + 2.0f);
    float inv = 1.0f / (n + 2.0f);
    return n * inv + xc * (4.0f * (n + 1.0f) * inv * inv) * (e / (1.0f + e));
}

/* out[i] = g[i] * Mish'(x[i]): the backward pass of Mish (training's networks). */
void qvpo_mish_backward(const float *x, const float *g, float *out, int64_t n, int threads) {
    #pragma omp parallel for num_threads(threads) schedule(static) if(threads > 1 && n >= PARALLEL_MIN)
    for (int64_t i = 0; i < n; i++) out[i] = g[i] * mish_grad1(x[i]);
}

/* out[i] = Mish(in[i]); out may be in (in place). */
void qvpo_mish(const float *in, float *out, int64_t n, int threads) {
#if defined(__AVX512F__) && defined(__AVX512BW__)
    const int64_t chunks = (n + 15) / 16;
    #pragma omp parallel for num_threads(threads) schedule(static) if(threads > 1 && n >= PARALLEL_MIN)
    for (int64_t c = 0; c < chunks; c++) {
        const int64_t i = c * 16;
        const __mmask16 m = n - i >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << (n - i)) - 1);
        _mm512_mask_storeu_ps(out + i, m, mish16(_mm512_maskz_loadu_ps(m, in + i)));
    }
#else
    #pragma omp parallel for num_threads(threads) schedule(static) if(threads > 1 && n >= PARALLEL_MIN)
    for (int64_t i = 0; i < n; i++) out[i] = mish1(in[i]);
#endif
}

/* The sampler's first layer and its activation in one pass, per seed s and row r:
 *   out[s, r, :] = Mish(x[s, r, :] @ Wa[s] + sp[s, r / rows_per_state, :] + sb[s, :])
 * x (N, R, A) contiguous; Wa (A, H) rows of stride H per seed (seed stride wa_ss); sp the
 * first layer's state part, rows of H (seed stride sp_ss); sb its time part plus bias at this
 * step (seed stride sb_ss); out (N, R, H) contiguous, float32 or (out_bf16) bfloat16. A is the
 * action dimension (3 to 17 for the MuJoCo tasks), so this small matmul is a few FMAs per
 * output and fuses with the rest. */
void qvpo_first_layer_mish(const float *restrict x, const float *restrict Wa,
                           const float *restrict sp, const float *restrict sb,
                           void *restrict out, int64_t N, int64_t R, int64_t A, int64_t H,
                           int64_t rows_per_state, int64_t wa_ss, int64_t sp_ss, int64_t sb_ss,
                           int out_bf16, int threads) {
    #pragma omp parallel for collapse(2) num_threads(threads) schedule(static) if(threads > 1 && N * R * H >= PARALLEL_MIN)
    for (int64_t s = 0; s < N; s++) {
        for (int64_t r = 0; r < R; r++) {
            const float *restrict xr = x + (s * R + r) * A;
            const float *restrict w = Wa + s * wa_ss;
            const float *restrict spr = sp + s * sp_ss + (r / rows_per_state) * H;
            const float *restrict sbs = sb + s * sb_ss;
            const int64_t o = (s * R + r) * H;
#if defined(__AVX512F__) && defined(__AVX512BW__)
            first_layer_row(xr, w, spr, sbs, out, o, A, H, out_bf16);
#else
            for (int64_t j = 0; j < H; j++) {
                float acc = spr[j] + sbs[j];
                for (int64_t k = 0; k < A; k++) acc += xr[k] * w[k * H + j];
                put1(out, o + j, mish1(acc), out_bf16);
            }
#endif
        }
    }
}

/* out[s, r, :] = Mish(in[s, r, :] + bias[s, :]): a hidden layer's bias and activation after a
 * plain matmul (in, out (N, R, H) contiguous, float32 or (bf16) both bfloat16, out may be in;
 * bias float32 rows of H, seed stride bias_ss). Saves the pass that copies the bias into the
 * matmul's output first. */
void qvpo_bias_mish(const void *in, const float *restrict bias, void *out, int64_t N,
                    int64_t R, int64_t H, int64_t bias_ss, int bf16, int threads) {
    #pragma omp parallel for collapse(2) num_threads(threads) schedule(static) if(threads > 1 && N * R * H >= PARALLEL_MIN)
    for (int64_t s = 0; s < N; s++) {
        for (int64_t r = 0; r < R; r++) {
            const int64_t o = (s * R + r) * H;
            const float *restrict b = bias + s * bias_ss;
#if defined(__AVX512F__) && defined(__AVX512BW__)
            for (int64_t j = 0; j < H; j += 16) {
                const __mmask16 m = H - j >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << (H - j)) - 1);
                __m512 v = _mm512_add_ps(load16(in, o + j, m, bf16), _mm512_maskz_loadu_ps(m, b + j));
                store16(out, o + j, m, bf16 ? mish16_bf16(v) : mish16(v), bf16);
            }
#else
            for (int64_t j = 0; j < H; j++) put1(out, o + j, mish1(get1(in, o + j, bf16) + b[j]), bf16);
#endif
        }
    }
}

/* The last hidden layer's bias and Mish fused with the output layer (H -> A, A <= 32):
 *   eps[s, r, :] = Mish(in[s, r, :] + bias[s, :]) @ Wt[s]^T + b_out[s, :]
 * in (N, R, H) contiguous, float32 or (bf16) bfloat16; bias float32 rows of H (seed stride
 * bias_ss); Wt the output layer's weight transposed, (A, H) per seed, contiguous rows (seed
 * stride wt_ss); b_out float32 (seed stride bo_ss); eps (N, R, A) float32 contiguous. The
 * activation never goes back to memory: the output layer, a matmul with 3 to 17 columns, is
 * memory-bound as a separate GEMM. */
void qvpo_bias_mish_out(const void *in, const float *restrict bias, const float *restrict Wt,
                        const float *restrict b_out, float *restrict eps, int64_t N, int64_t R,
                        int64_t H, int64_t A, int64_t bias_ss, int64_t wt_ss, int64_t bo_ss,
                        int bf16, int threads) {
    #pragma omp parallel for collapse(2) num_threads(threads) schedule(static) if(threads > 1 && N * R * H >= PARALLEL_MIN)
    for (int64_t s = 0; s < N; s++) {
        for (int64_t r = 0; r < R; r++) {
            const int64_t o = (s * R + r) * H;
            const float *restrict b = bias + s * bias_ss;
            const float *restrict w = Wt + s * wt_ss;
            float *restrict e = eps + (s * R + r) * A;
#if defined(__AVX512F__) && defined(__AVX512BW__)
            __m512 acc[32];
            for (int64_t a = 0; a < A; a++) acc[a] = _mm512_setzero_ps();
            for (int64_t j = 0; j < H; j += 16) {
                const __mmask16 m = H - j >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << (H - j)) - 1);
                __m512 v = _mm512_add_ps(load16(in, o + j, m, bf16), _mm512_maskz_loadu_ps(m, b + j));
                v = bf16 ? mish16_bf16(v) : mish16(v);  /* bf16 input: bf16-level accuracy is enough */
                for (int64_t a = 0; a < A; a++)
                    acc[a] = _mm512_fmadd_ps(v, _mm512_maskz_loadu_ps(m, w + a * H + j), acc[a]);
            }
            for (int64_t a = 0; a < A; a++) e[a] = _mm512_reduce_add_ps(acc[a]) + b_out[s * bo_ss + a];
#else
            for (int64_t a = 0; a < A; a++) e[a] = b_out[s * bo_ss + a];
            for (int64_t j = 0; j < H; j++) {
                const float v = mish1(get1(in, o + j, bf16) + b[j]);
                for (int64_t a = 0; a < A; a++) e[a] += v * w[a * H + j];
            }
#endif
        }
    }
}

/* ---------------------------------------------------------------------------------------------
 * The whole sampler in one call: every denoising step of a block of chains, block after block.
 *
 * Why: in the sampler above, each layer of each step is a PyTorch matmul followed by one of the
 * element-wise kernels, each a pass over a 16384 x 256 activation, with a fork-join of the
 * threads per call. Here a block of rows runs through all T steps with its activations in
 * L1/L2: the first layer and Mish (as qvpo_first_layer_mish); each hidden layer as a matmul
 * whose results get bias and Mish while still in registers (float32: an AVX-512 FMA kernel) or
 * in L1 (bfloat16: AMX tiles); the output layer; the DDPM posterior step. OpenMP over blocks:
 * the cores never wait for each other between layers or steps.
 *
 * The maths is the sampler's (qvpo/diffusion.py: denoise_step + posterior_step). float32: the
 * same operations, summed in another order. bfloat16: the same rounding points as the bf16 path
 * in torch ops (the first layer and every hidden Mish output rounded to bfloat16 once; bias,
 * Mish, the output layer and the DDPM update in float32), except that the matmul's float32 sum
 * is not rounded to bfloat16 before the bias is added.
 */
#if defined(__AVX512F__) && defined(__AVX512BW__)
#define QVPO_FUSED 1
#define FMA_ROWS 24   /* rows per block, float32 (fewer when a call has fewer rows) */
#define MAX_ROWS 32   /* rows per block, either precision (AMX: 32) */

/* hout[r, n0:n0 + 32] = Mish(hin[r, :] @ W[:, n0:n0 + 32] + bias[n0:n0 + 32]) for MR rows:
 * hin (rows of K float32, stride K); Bp the panel of W for columns n0..n0+31, (K, 32) contiguous
 * (so the panel streams through L1 in order); hout rows of stride Nout. The MR x 32 sums stay
 * in registers from the first product to the Mish (12 rows: 24 of the 32 vector registers). */
#define FMA_KERNEL(MR)                                                                            \
static inline void fma_##MR##x32_mish(const float *restrict hin, const float *restrict Bp,       \
                                      const float *restrict bias, float *restrict hout,         \
                                      int64_t K, int64_t Nout, int64_t n0) {                    \
    __m512 c[MR][2];                                                                              \
    for (int i = 0; i < MR; i++) c[i][0] = c[i][1] = _mm512_setzero_ps();                         \
    for (int64_t k = 0; k < K; k++) {                                                             \
        const __m512 b0 = _mm512_load_ps(Bp + k * 32), b1 = _mm512_load_ps(Bp + k * 32 + 16);     \
        _Pragma("GCC unroll 12")                                                                  \
        for (int i = 0; i < MR; i++) {                                                            \
            const __m512 a = _mm512_set1_ps(hin[i * K + k]);                                      \
            c[i][0] = _mm512_fmadd_ps(a, b0, c[i][0]);                                            \
            c[i][1] = _mm512_fmadd_ps(a, b1, c[i][1]);                                            \
        }                                                                                         \
    }                                                                                             \
    const __m512 bias0 = _mm512_loadu_ps(bias + n0), bias1 = _mm512_loadu_ps(bias + n0 + 16);     \
    for (int i = 0; i < MR; i++) {                                                                \
        _mm512_store_ps(hout + i * Nout + n0, mish16(_mm512_add_ps(c[i][0], bias0)));             \
        _mm512_store_ps(hout + i * Nout + n0 + 16, mish16(_mm512_add_ps(c[i][1], bias1)));        \
    }                                                                                             \
}
FMA_KERNEL(12)
FMA_KERNEL(4)

/* A float32 hidden layer for a block of `rows` rows (a multiple of 4): 12-row kernels, then
 * 4-row ones for the rest; the loop over column panels is outside, so a panel stays in L1. */
static void fma_layer_mish(const float *hin, const float *W, const float *bias, float *hout,
                           int64_t rows, int64_t H) {
    for (int64_t n0 = 0; n0 < H; n0 += 32) {
        int64_t m0 = 0;
        for (; m0 + 12 <= rows; m0 += 12) fma_12x32_mish(hin + m0 * H, W + n0 * H, bias, hout + m0 * H, H, H, n0);
        for (; m0 < rows; m0 += 4) fma_4x32_mish(hin + m0 * H, W + n0 * H, bias, hout + m0 * H, H, H, n0);
    }
}
#endif

#if defined(QVPO_FUSED) && defined(__AMX_TILE__) && defined(__AMX_BF16__)
#include <sys/syscall.h>
#include <unistd.h>
#define QVPO_AMX 1
#define ARCH_REQ_XCOMP_PERM 0x1023
#define XFEATURE_XTILEDATA 18
#define AMX_ROWS 32   /* rows per block, bfloat16: two 16-row A tiles */

typedef struct {
    uint8_t palette_id, start_row, reserved[14];
    uint16_t colsb[16];
    uint8_t rows[16];
} tile_config;

/* Tiles 0-3 = A (32 x K bf16, row stride K) @ B[:, n0:n0 + 32], B packed as (K/2, Nout, 2)
 * bf16 (AMX's VNNI layout: each 32-bit element of a B-tile row holds two consecutive k). Tiles:
 * 0-3 the result (rows x cols: 0-15 x 0-15, 0-15 x 16-31, 16-31 x 0-15, 16-31 x 16-31), 4-5 A
 * (rows 0-15 and 16-31), 6-7 B (cols 0-15 and 16-31). */
static inline void amx_32x32(const uint16_t *A, const uint16_t *B, int64_t K, int64_t Nout, int64_t n0) {
    _tile_zero(0); _tile_zero(1); _tile_zero(2); _tile_zero(3);
    for (int64_t k0 = 0; k0 < K; k0 += 32) {
        _tile_loadd(4, A + k0, K * 2);
        _tile_loadd(5, A + 16 * K + k0, K * 2);
        _tile_loadd(6, B + ((k0 / 2) * Nout + n0) * 2, Nout * 4);
        _tile_loadd(7, B + ((k0 / 2) * Nout + n0 + 16) * 2, Nout * 4);
        _tile_dpbf16ps(0, 4, 6);
        _tile_dpbf16ps(1, 4, 7);
        _tile_dpbf16ps(2, 5, 6);
        _tile_dpbf16ps(3, 5, 7);
    }
}

/* The result tiles into C (32 x 32 float32, row stride 32). */
static inline void amx_store_32x32(float *C) {
    _tile_stored(0, C, 128);
    _tile_stored(1, C + 16, 128);
    _tile_stored(2, C + 16 * 32, 128);
    _tile_stored(3, C + 16 * 32 + 16, 128);
}

/* hout = Mish(hin @ W + bias) for a block of 32 rows (hin bf16 rows of K; hout bf16, or float32
 * when out_f32: the last hidden layer, which feeds the float32 output layer). Software-pipelined:
 * the tiles of the next 32 columns are issued before the vector units apply bias and Mish to the
 * last ones, so the two units can overlap. */
static void amx_layer_mish(const uint16_t *hin, const uint16_t *B, const float *bias, void *hout,
                           int out_f32, int64_t H, float C[2][AMX_ROWS * 32]) {
    amx_32x32(hin, B, H, H, 0);
    amx_store_32x32(C[0]);
    for (int64_t n0 = 0; n0 < H; n0 += 32) {
        const int more = n0 + 32 < H;
        if (more) amx_32x32(hin, B, H, H, n0 + 32);
        const float *Cn = C[(n0 / 32) & 1];
        const __m512 b0 = _mm512_loadu_ps(bias + n0), b1 = _mm512_loadu_ps(bias + n0 + 16);
        for (int64_t r = 0; r < AMX_ROWS; r++) {
            const __m512 v0 = mish16_bf16(_mm512_add_ps(_mm512_load_ps(Cn + r * 32), b0));
            const __m512 v1 = mish16_bf16(_mm512_add_ps(_mm512_load_ps(Cn + r * 32 + 16), b1));
            if (out_f32) {
                _mm512_store_ps((float *)hout + r * H + n0, v0);
                _mm512_store_ps((float *)hout + r * H + n0 + 16, v1);
            } else {
                store16(hout, r * H + n0, 0xFFFF, v0, 1);
                store16(hout, r * H + n0 + 16, 0xFFFF, v1, 1);
            }
        }
        if (more) amx_store_32x32(C[(n0 / 32 + 1) & 1]);
    }
}

static int amx_permitted = -1;

/* 1 if this process may use AMX tiles (Linux asks for it once per process), else 0. */
int qvpo_amx_init(void) {
    if (amx_permitted < 0)
        amx_permitted = syscall(SYS_arch_prctl, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA) == 0;
    return amx_permitted;
}
#else
int qvpo_amx_init(void) { return 0; }
#endif

/* 1 if qvpo_sample_fused runs on this build in this precision (float32: AVX-512; bf16: AMX). */
int qvpo_fused_available(int bf16) {
#ifdef QVPO_FUSED
    return bf16 ? qvpo_amx_init() : 1;
#else
    (void)bf16;
    return 0;
#endif
}

#ifdef QVPO_FUSED
/* Per-thread buffers of the fused calls: one block's activations (two alternating hidden
 * buffers, the last one in float32), its chains x and its outputs, and AMX's result tiles. */
typedef struct {
    void *h0, *h1;
    float *hf;
    float x[MAX_ROWS * 32], eps[MAX_ROWS * 32];  /* A <= 32 */
#ifdef QVPO_AMX
    float C[2][AMX_ROWS * 32] __attribute__((aligned(64)));  /* two: see amx_layer_mish */
#endif
} block_buffers;

static int buffers_init(block_buffers *b, int64_t rows_blk, int64_t H, int bf16) {
    const size_t elem = bf16 ? 2 : 4;
    b->h0 = aligned_alloc(64, rows_blk * H * elem);
    b->h1 = aligned_alloc(64, rows_blk * H * elem);
    b->hf = (float *)aligned_alloc(64, rows_blk * H * 4);
#ifdef QVPO_AMX
    if (bf16) {
        tile_config cfg __attribute__((aligned(64)));
        memset(&cfg, 0, sizeof cfg);
        cfg.palette_id = 1;
        for (int t = 0; t < 8; t++) { cfg.rows[t] = 16; cfg.colsb[t] = 64; }
        /* some GCC versions do not see that ldtilecfg reads cfg and drop the stores above
         * (then the CPU faults on a config of garbage): make them happen first */
        __asm__ volatile("" : : "r"(&cfg) : "memory");
        _tile_loadconfig(&cfg);
    }
#endif
    return b->h0 && b->h1 && b->hf;
}

static void buffers_free(block_buffers *b, int bf16) {
    free(b->h0); free(b->h1); free(b->hf);
#ifdef QVPO_AMX
    if (bf16) _tile_release();
#endif
    (void)bf16;
}

/* One forward pass of a Mish MLP for a block of rows_blk rows (rows r0.. of a seed, the last
 * nr - 1.. repeated as padding): the first layer Mish(x W_a + sp[row / rows_per_state] + sb)
 * (x: b->x, rows of A), L hidden H x H layers (Wp, bias: this seed's), the output layer
 * eps = h Wt^T + b_out (O outputs) into b->eps, rows of O. */
static void mlp_block(block_buffers *b, int64_t A, const float *sp, int64_t rows_per_state,
                      const float *sb, const float *Wa, const void *Wp, const float *bias,
                      const float *Wt, const float *b_out, int64_t O, int64_t L, int64_t H,
                      int64_t r0, int64_t nr, int64_t rows_blk, int bf16) {
    for (int64_t r = 0; r < rows_blk; r++) {
        const int64_t row = r0 + (r < nr ? r : nr - 1);
        first_layer_row(b->x + r * A, Wa, sp + (row / rows_per_state) * H, sb, b->h0, r * H, A, H, bf16);
    }
    void *hin = b->h0, *hout = b->h1;
    for (int64_t l = 0; l < L; l++) {  /* the last hidden layer's output in float32 (hf) */
        void *dst = l == L - 1 ? (void *)b->hf : hout;
#ifdef QVPO_AMX
        if (bf16)
            amx_layer_mish((const uint16_t *)hin, (const uint16_t *)Wp + l * H * H, bias + l * H, dst, l == L - 1, H, b->C);
        else
#endif
            fma_layer_mish((const float *)hin, (const float *)Wp + l * H * H, bias + l * H, (float *)dst, rows_blk, H);
        void *tmp = hin; hin = hout; hout = tmp;
    }
    for (int64_t r = 0; r < rows_blk; r++) {
        for (int64_t o = 0; o < O; o++) {
            __m512 acc = _mm512_setzero_ps();
            for (int64_t j = 0; j < H; j += 16)
                acc = _mm512_fmadd_ps(_mm512_load_ps(b->hf + r * H + j), _mm512_loadu_ps(Wt + o * H + j), acc);
            b->eps[r * O + o] = _mm512_reduce_add_ps(acc) + b_out[o];
        }
    }
}

/* Rows per block: bf16 (AMX) 32; float32 as few blocks as FMA_ROWS allows, of equal size
 * rounded up to 4 rows (a behaviour action samples 4 rows, an evaluation action 32: padding
 * them to 24 and 48 rows would do 6 and 1.5 times the work). */
static int64_t block_rows(int64_t R, int bf16) {
#ifdef QVPO_AMX
    if (bf16) return AMX_ROWS;
#endif
    (void)bf16;
    const int64_t nblk = (R + FMA_ROWS - 1) / FMA_ROWS;
    return ((R + nblk - 1) / nblk + 3) / 4 * 4;
}

static int fused_shapes(int bf16, int64_t H, int64_t A, int64_t O, int64_t L) {
    return qvpo_fused_available(bf16) && H % 32 == 0 && H <= 1024 && A >= 1 && A <= 32
        && O >= 1 && O <= 32 && L >= 1;
}
#endif

#ifdef QVPO_FUSED
/* The block loop of both fused calls, OpenMP over (seed, block) jobs. steps > 0: sampling, `src`
 * is the noise (N, steps, R, A) and each block runs `steps` denoising steps (MLP, then the
 * posterior), writing x_0 (N, R, A); steps == 0: one MLP pass, `src` the rows' inputs (N, R, A),
 * writing the outputs (N, R, O). sb: the first layer's per-step (or, steps == 0, only) bias
 * term, seed stride sb_ss. Returns 0, or -2 if a thread could not allocate its buffers. */
static int fused_blocks(const float *src, const float *sp, int64_t sp_ss, const float *sb,
                        int64_t sb_ss, const float *Wa, int64_t wa_ss, const void *Wp,
                        const float *bias, const float *Wt, const float *b_out, int64_t O,
                        const float *coefs, float *out, int64_t N, int64_t steps, int64_t R,
                        int64_t A, int64_t H, int64_t L, int64_t rows_per_state, int clip_x0,
                        int bf16, int threads) {
    const int64_t rows_blk = block_rows(R, bf16), blocks = (R + rows_blk - 1) / rows_blk;
    const int64_t T = steps > 0 ? steps : 1;  /* src holds T slices of (R, A) per seed */
    const size_t welem = bf16 ? 2 : 4;
    int failed = 0;
    #pragma omp parallel num_threads(threads) if(threads > 1 && N * blocks > 1)
    {
        block_buffers b;
        const int ok = buffers_init(&b, rows_blk, H, bf16);
        if (!ok) {
            #pragma omp atomic write
            failed = 1;
        }
        /* every thread must reach the worksharing loop: one without buffers skips its jobs */
        #pragma omp for schedule(static)
        for (int64_t job = 0; job < N * blocks; job++) {
            if (!ok) continue;
            const int64_t s = job / blocks, r0 = (job % blocks) * rows_blk;
            const int64_t nr = R - r0 < rows_blk ? R - r0 : rows_blk;  /* valid rows */
            const float *in = src + s * T * R * A;
            for (int64_t r = 0; r < rows_blk; r++)  /* padding rows repeat the last valid one */
                for (int64_t a = 0; a < A; a++) b.x[r * A + a] = in[(r0 + (r < nr ? r : nr - 1)) * A + a];
            for (int64_t i = T - 1; i >= 0; i--) {
                mlp_block(&b, A, sp + s * sp_ss, rows_per_state, sb + s * sb_ss + (steps > 0 ? i * H : 0),
                          Wa + s * wa_ss, (const char *)Wp + s * L * H * H * welem, bias + s * L * H,
                          Wt + s * O * H, b_out + s * O, O, L, H, r0, nr, rows_blk, bf16);
                if (steps == 0) break;
                /* the posterior step, in float32 */
                const float *c = coefs + i * 5, *z = i > 0 ? in + (T - i) * R * A : NULL;
                for (int64_t r = 0; r < rows_blk; r++) {
                    const int64_t row = r0 + (r < nr ? r : nr - 1);
                    for (int64_t a = 0; a < A; a++) {
                        const float xv = b.x[r * A + a];
                        float x0 = c[0] * xv - c[1] * b.eps[r * A + a];
                        if (clip_x0) x0 = x0 < -1.0f ? -1.0f : (x0 > 1.0f ? 1.0f : x0);
                        b.x[r * A + a] = c[2] * x0 + c[3] * xv + (z ? c[4] * z[row * A + a] : 0.0f);
                    }
                }
            }
            const float *res = steps > 0 ? b.x : b.eps;
            for (int64_t r = 0; r < nr; r++)
                for (int64_t o = 0; o < O; o++) out[(s * R + r0 + r) * O + o] = res[r * O + o];
        }
        buffers_free(&b, bf16);
    }
    return failed ? -2 : 0;
}
#endif

/* x_0 of R chains per seed after T denoising steps; returns 0, -1 (not available in this build
 * or precision, or unsupported widths) or -2 (out of memory).
 *   noise (N, T, R, A) float32: x_T, then the noise of steps T-1 .. 1;
 *   sp (N, S, H): the first layer's state part, row r uses state r / rows_per_state (seed stride sp_ss);
 *   sb (N, T, H): its time part plus bias at each step, contiguous;
 *   Wa (N, A, H): its action part, rows of H (seed stride wa_ss);
 *   Wp: the L hidden H x H layers, contiguous: bf16 (N, L, H/2, H, 2) (AMX's layout), float32
 *     (N, L, H/32, H, 32) (column panels of 32);
 *   bias (N, L, H); Wt (N, A, H): the output layer transposed; b_out (N, A); coefs (T, 5): per
 *   step sqrt(1/ab), sqrt(1/ab - 1), posterior c0, ct, std;
 *   out (N, R, A): x_0 before the final clamp. H a multiple of 32, at most 1024; A at most 32. */
int qvpo_sample_fused(const float *noise, const float *sp, const float *sb, const float *Wa,
                      const void *Wp, const float *bias, const float *Wt, const float *b_out,
                      const float *coefs, float *out, int64_t N, int64_t T, int64_t R, int64_t A,
                      int64_t H, int64_t L, int64_t rows_per_state, int64_t sp_ss, int64_t wa_ss,
                      int clip_x0, int bf16, int threads) {
#ifdef QVPO_FUSED
    if (!fused_shapes(bf16, H, A, A, L) || N < 1 || R < 1 || T < 1 || rows_per_state < 1) return -1;
    return fused_blocks(noise, sp, sp_ss, sb, T * H, Wa, wa_ss, Wp, bias, Wt, b_out, A, coefs, out,
                        N, T, R, A, H, L, rows_per_state, clip_x0, bf16, threads);
#else
    (void)noise; (void)sp; (void)sb; (void)Wa; (void)Wp; (void)bias; (void)Wt; (void)b_out;
    (void)coefs; (void)out; (void)N; (void)T; (void)R; (void)A; (void)H; (void)L;
    (void)rows_per_state; (void)sp_ss; (void)wa_ss; (void)clip_x0; (void)bf16; (void)threads;
    return -1;
#endif
}

/* out = MLP(x) for R rows per seed, the same network arrangement as one denoising step: the
 * first layer's input is [rows' own part x (A), a part shared by rows_per_state rows], e.g. a
 * critic's Q(s, a) for k candidate actions per state. x (N, R, A) float32 contiguous; sp (N, S,
 * H): the shared part's projection (seed stride sp_ss); b1 (N, H): the first layer's bias (seed
 * stride b1_ss); Wa (N, A, H) (seed stride wa_ss); Wp, bias, as qvpo_sample_fused's; Wt (N, O,
 * H), b_out (N, O): the output layer; out (N, R, O). Returns 0, -1 or -2 as qvpo_sample_fused. */
int qvpo_mlp_fused(const float *x, const float *sp, const float *b1, const float *Wa,
                   const void *Wp, const float *bias, const float *Wt, const float *b_out,
                   float *out, int64_t N, int64_t R, int64_t A, int64_t H, int64_t L, int64_t O,
                   int64_t rows_per_state, int64_t sp_ss, int64_t b1_ss, int64_t wa_ss, int bf16,
                   int threads) {
#ifdef QVPO_FUSED
    if (!fused_shapes(bf16, H, A, O, L) || N < 1 || R < 1 || rows_per_state < 1) return -1;
    return fused_blocks(x, sp, sp_ss, b1, b1_ss, Wa, wa_ss, Wp, bias, Wt, b_out, O, NULL, out,
                        N, 0, R, A, H, L, rows_per_state, 0, bf16, threads);
#else
    (void)x; (void)sp; (void)b1; (void)Wa; (void)Wp; (void)bias; (void)Wt; (void)b_out; (void)out;
    (void)N; (void)R; (void)A; (void)H; (void)L; (void)O; (void)rows_per_state; (void)sp_ss;
    (void)b1_ss; (void)wa_ss; (void)bf16; (void)threads;
    return -1;
#endif
}
