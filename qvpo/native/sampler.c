/* The diffusion sampler's element-wise work, fused and vectorised for CPUs.
 *
 * Built on first use by qvpo/native/__init__.py with the machine's C compiler (-O3
 * -march=native) and called through ctypes on float32 tensors' data pointers. Why it exists:
 * on a 2-core AVX-512 CPU, PyTorch's Mish (and a one-exp form of it in torch ops) costs about
 * as much as the 256x256 matmuls that feed it, because every op is a pass over memory with a
 * fresh allocation. Here each element is read once, kept in registers, and written once.
 *
 * Maths: Mish(x) = x tanh(softplus(x)) = x n / (n + 2), n = e^x (e^x + 2), exact up to float32
 * rounding of exp (a degree-6 polynomial after Cody-Waite range reduction: relative error
 * below 4e-7). e^x is clamped to x in [-87, 20]: for x > 20, n / (n + 2) is 1 in float32; for
 * x < -87, |Mish(x)| < 1e-35. NaN inputs give NaN outputs.
 */
#include <stdint.h>
#include <string.h>

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
            for (int64_t j = 0; j < H; j += 16) {  /* one output vector stays in a register */
                const __mmask16 m = H - j >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << (H - j)) - 1);
                __m512 acc = _mm512_add_ps(_mm512_maskz_loadu_ps(m, spr + j), _mm512_maskz_loadu_ps(m, sbs + j));
                for (int64_t k = 0; k < A; k++)
                    acc = _mm512_fmadd_ps(_mm512_set1_ps(xr[k]), _mm512_maskz_loadu_ps(m, w + k * H + j), acc);
                store16(out, o + j, m, out_bf16 ? mish16_bf16(acc) : mish16(acc), out_bf16);
            }
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
