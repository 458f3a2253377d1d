/* The entry points of sampler.c (documented there), called by ops.cpp's torch bindings. Arrays
 * are float32 unless `void *` (float32 or bfloat16 by a flag); `threads` is torch's intra-op
 * thread count. C linkage, so the file builds as C or as C++ alike. */
#ifndef QVPO_SAMPLER_H
#define QVPO_SAMPLER_H
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

void qvpo_mish(const float *in, float *out, int64_t n, int threads);
void qvpo_mish_backward(const float *x, const float *g, float *out, int64_t n, int threads);
void qvpo_first_layer_mish(const float *x, const float *Wa, const float *sp, const float *sb, void *out,
                           int64_t N, int64_t R, int64_t A, int64_t H, int64_t rows_per_state,
                           int64_t wa_ss, int64_t sp_ss, int64_t sb_ss, int out_bf16, int threads);
void qvpo_bias_mish(const void *in, const float *bias, void *out, int64_t N, int64_t R, int64_t H,
                    int64_t bias_ss, int bf16, int threads);
void qvpo_bias_mish_out(const void *in, const float *bias, const float *Wt, const float *b_out, float *eps,
                        int64_t N, int64_t R, int64_t H, int64_t A, int64_t bias_ss, int64_t wt_ss,
                        int64_t bo_ss, int bf16, int threads);
int qvpo_amx_init(void);
int qvpo_fused_available(int bf16);
int qvpo_sample_fused(const float *noise, const float *sp, const float *sb, const float *Wa, const void *Wp,
                      const float *bias, const float *Wt, const float *b_out, const float *coefs, float *out,
                      int64_t N, int64_t T, int64_t R, int64_t A, int64_t H, int64_t L, int64_t rows_per_state,
                      int64_t sp_ss, int64_t wa_ss, int clip_x0, int bf16, int threads);
int qvpo_mlp_fused(const float *x, const float *sp, const float *b1, const float *Wa, const void *Wp,
                   const float *bias, const float *Wt, const float *b_out, float *out, int64_t N, int64_t R,
                   int64_t A, int64_t H, int64_t L, int64_t O, int64_t rows_per_state, int64_t sp_ss,
                   int64_t b1_ss, int64_t wa_ss, int bf16, int threads);

#ifdef __cplusplus
}
#endif
#endif
