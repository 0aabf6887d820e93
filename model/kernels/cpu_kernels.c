/* Fused fp32 CPU kernels for the Llama block: RMSNorm, RoPE on the fused q/k/v projection, SwiGLU.
 *
 * Each kernel makes one pass over its activations where eager PyTorch makes four to ten (one per
 * operator, forward and backward, plus the concatenations autograd inserts around the fused q/k/v and
 * gate/up GEMMs). Built and loaded by model/kernels/build.py; the Python side (model/kernels/__init__.py)
 * checks shapes, dtypes and contiguity before any call, so these functions trust their arguments.
 *
 * Threads: OpenMP with the thread count passed in (torch.get_num_threads()). The library links libgomp by
 * soname, so in a process where torch has loaded its bundled libgomp both share one OpenMP runtime and one
 * thread pool.
 *
 * Numerics: operations in the order of the eager formulas of model/llama.py, without FMA contraction
 * (built with -ffp-contract=off); reductions (RMSNorm's mean, the weight gradient) sum in a different
 * order than torch's, and exp is the polynomial below instead of Sleef's, so results agree with eager
 * PyTorch to float rounding (~1e-7 relative), not bit for bit.
 */
#include <math.h>
#include <stdint.h>
#include <string.h>
#ifdef _OPENMP
#include <omp.h>
#endif

/* exp(x) for float: Cephes' range reduction and degree-6 polynomial (max error ~1 ulp on [-87, 88]),
 * written with arithmetic and selects only (n = round(x / ln 2) by the 1.5 * 2^23 trick, 2^n from the
 * exponent bits), so that the compiler vectorizes it without libm. Inputs are clamped to [-87, 88]; NaN is
 * returned unchanged. */
static inline float exp_f32(float x) {
    float xc = x > 88.0f ? 88.0f : x;
    xc = xc < -87.0f ? -87.0f : xc;
    const float magic = 12582912.0f; /* 1.5 * 2^23: adding it rounds to an integer held in the low bits */
    float t = xc * 1.44269504088896341f + magic;
    float n = t - magic;
    int32_t t_bits;
    memcpy(&t_bits, &t, sizeof t_bits);
    float r = xc - n * 0.693359375f;
    r = r + n * 2.12194440e-4f;
    float p = 1.9875691500e-4f;
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    float y = p * r * r + r + 1.0f;
    int32_t bits = (t_bits - 0x4B400000 + 127) << 23; /* 0x4B400000: the bits of `magic` itself */
    float scale;
    memcpy(&scale, &bits, sizeof scale);
    float result = y * scale;
    return x == x ? result : x;
}

/* ---------------------------------------------------------------------------------------------------
 * RMSNorm: y = x * rstd * w, rstd = 1 / sqrt(mean(x^2) + eps), per row of `dim` values.
 * ------------------------------------------------------------------------------------------------- */
void rms_norm_forward(const float *x, const float *w, float *y, float *rstd, int64_t rows, int64_t dim,
                      float eps, int threads) {
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t r = 0; r < rows; r++) {
        const float *xr = x + r * dim;
        float *yr = y + r * dim;
        float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
        for (int64_t i = 0; i < dim; i++) sum += xr[i] * xr[i];
        float s = 1.0f / sqrtf(sum / (float)dim + eps);
        if (rstd) rstd[r] = s;
#pragma omp simd
        for (int64_t i = 0; i < dim; i++) yr[i] = (xr[i] * s) * w[i];
    }
}

/* dx = rstd * (g - xhat * mean(g * xhat)), g = dy * w, xhat = x * rstd;
 * dw_partial[t] += sum over thread t's rows of dy * xhat (the caller sums the `threads` partial rows). */
void rms_norm_backward(const float *dy, const float *x, const float *w, const float *rstd, float *dx,
                       float *dw_partial, int64_t rows, int64_t dim, int threads) {
#pragma omp parallel num_threads(threads)
    {
        int t = 0;
#ifdef _OPENMP
        t = omp_get_thread_num();
#endif
        float *dw = dw_partial ? dw_partial + (int64_t)t * dim : 0;
#pragma omp for schedule(static)
        for (int64_t r = 0; r < rows; r++) {
            const float *xr = x + r * dim, *gr = dy + r * dim;
            float *dxr = dx + r * dim;
            float s = rstd[r];
            float dot = 0.0f;
#pragma omp simd reduction(+ : dot)
            for (int64_t i = 0; i < dim; i++) dot += gr[i] * w[i] * xr[i];
            float c = dot * s * s / (float)dim;
#pragma omp simd
            for (int64_t i = 0; i < dim; i++) dxr[i] = s * (gr[i] * w[i] - xr[i] * c);
            if (dw) {
#pragma omp simd
                for (int64_t i = 0; i < dim; i++) dw[i] += gr[i] * (xr[i] * s);
            }
        }
    }
}

/* ---------------------------------------------------------------------------------------------------
 * RoPE, half-split pairing (dimension i rotates with i + head_dim/2), on the q and k columns of the fused
 * projection qkv [batch*seq, (heads + 2*kv_heads) * head_dim], in place. cos/sin: [pos_batch, seq, half]
 * with pos_batch 1 (shared positions) or batch.
 * ------------------------------------------------------------------------------------------------- */
void rope_qk_forward(float *qkv, const float *cos, const float *sin, int64_t batch, int64_t seq,
                     int64_t pos_batch, int64_t heads, int64_t kv_heads, int64_t head_dim, int threads) {
    const int64_t half = head_dim / 2, width = (heads + 2 * kv_heads) * head_dim;
    const int64_t rotated = heads + kv_heads; /* q heads then k heads, contiguous in a row */
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t r = 0; r < batch * seq; r++) {
        const int64_t b = r / seq, s = r % seq;
        const float *c = cos + ((b % pos_batch) * seq + s) * half, *sn = sin + ((b % pos_batch) * seq + s) * half;
        float *row = qkv + r * width;
        for (int64_t h = 0; h < rotated; h++) {
            float *x1 = row + h * head_dim, *x2 = x1 + half;
#pragma omp simd
            for (int64_t i = 0; i < half; i++) {
                float a = x1[i], bb = x2[i];
                x1[i] = a * c[i] - bb * sn[i];
                x2[i] = bb * c[i] + a * sn[i];
            }
        }
    }
}

/* The transpose of the rotation, from the gradients of q, k and v (each [batch, seq, heads, head_dim] with
 * the given element strides for batch, seq and head; unit stride along head_dim) into dqkv, laid out like
 * qkv above: dx1 = dy1 cos + dy2 sin, dx2 = dy2 cos - dy1 sin; v's gradient is copied. */
void rope_qk_backward(const float *dq, const int64_t *q_strides, const float *dk, const int64_t *k_strides,
                      const float *dv, const int64_t *v_strides, const float *cos, const float *sin,
                      float *dqkv, int64_t batch, int64_t seq, int64_t pos_batch, int64_t heads,
                      int64_t kv_heads, int64_t head_dim, int threads) {
    const int64_t half = head_dim / 2, width = (heads + 2 * kv_heads) * head_dim;
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t r = 0; r < batch * seq; r++) {
        const int64_t b = r / seq, s = r % seq;
        const float *c = cos + ((b % pos_batch) * seq + s) * half, *sn = sin + ((b % pos_batch) * seq + s) * half;
        float *row = dqkv + r * width;
        for (int64_t h = 0; h < heads + kv_heads; h++) {
            const int is_q = h < heads;
            const int64_t *st = is_q ? q_strides : k_strides;
            const float *src = (is_q ? dq : dk) + b * st[0] + s * st[1] + (is_q ? h : h - heads) * st[2];
            const float *y1 = src, *y2 = src + half;
            float *x1 = row + h * head_dim, *x2 = x1 + half;
#pragma omp simd
            for (int64_t i = 0; i < half; i++) {
                x1[i] = y1[i] * c[i] + y2[i] * sn[i];
                x2[i] = y2[i] * c[i] - y1[i] * sn[i];
            }
        }
        float *vrow = row + (heads + kv_heads) * head_dim;
        for (int64_t h = 0; h < kv_heads; h++)
            memcpy(vrow + h * head_dim, dv + b * v_strides[0] + s * v_strides[1] + h * v_strides[2],
                   (size_t)head_dim * sizeof(float));
    }
}

/* ---------------------------------------------------------------------------------------------------
 * SwiGLU on the fused gate/up projection gu [rows, 2*ffn] (gate columns first):
 * h = silu(gate) * up, silu(g) = g / (1 + exp(-g)).
 * ------------------------------------------------------------------------------------------------- */
void swiglu_forward(const float *gu, float *h, int64_t rows, int64_t ffn, int threads) {
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t r = 0; r < rows; r++) {
        const float *g = gu + r * 2 * ffn, *u = g + ffn;
        float *hr = h + r * ffn;
#pragma omp simd
        for (int64_t i = 0; i < ffn; i++) hr[i] = (g[i] / (1.0f + exp_f32(-g[i]))) * u[i];
    }
}

/* d gate = dh * up * sig * (1 + g (1 - sig)), d up = dh * silu(g), written into dgu laid out like gu. */
void swiglu_backward(const float *dh, const float *gu, float *dgu, int64_t rows, int64_t ffn, int threads) {
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t r = 0; r < rows; r++) {
        const float *g = gu + r * 2 * ffn, *u = g + ffn, *d = dh + r * ffn;
        float *dg = dgu + r * 2 * ffn, *du = dg + ffn;
#pragma omp simd
        for (int64_t i = 0; i < ffn; i++) {
            float sig = 1.0f / (1.0f + exp_f32(-g[i]));
            du[i] = d[i] * (g[i] * sig);
            dg[i] = d[i] * u[i] * (sig * (1.0f + g[i] * (1.0f - sig)));
        }
    }
}

/* ---------------------------------------------------------------------------------------------------
 * Causal attention probabilities for one block of query rows (model/kernels/__init__.py: causal_attention).
 * scores: [groups, rows, keys] (groups = batch * kv_heads * heads-per-kv-head blocks of `rows` query rows
 * each), the query row r of every group sits at sequence position row0 + r and may see keys 0..row0 + r;
 * `mask` (optional, bytes [batch, seq, seq], a subset of the causal triangle: the Llama 3 document mask)
 * further limits them. group g belongs to batch g / groups_per_batch. In place: scores become
 * softmax(scale * scores) over the visible keys, and 0 elsewhere.
 * ------------------------------------------------------------------------------------------------- */
void causal_softmax_forward(float *scores, int64_t groups, int64_t rows, int64_t keys, int64_t row0, float scale,
                            const uint8_t *mask, int64_t groups_per_batch, int64_t seq, int threads) {
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t gr = 0; gr < groups * rows; gr++) {
        const int64_t g = gr / rows, pos = row0 + gr % rows;
        float *row = scores + gr * keys;
        const int64_t visible = pos + 1 < keys ? pos + 1 : keys;
        const uint8_t *allowed = mask ? mask + ((g / groups_per_batch) * seq + pos) * seq : 0;
        if (allowed) {
            for (int64_t j = 0; j < visible; j++) row[j] = allowed[j] ? row[j] * scale : -INFINITY;
        } else {
#pragma omp simd
            for (int64_t j = 0; j < visible; j++) row[j] *= scale;
        }
        float max = -INFINITY;
#pragma omp simd reduction(max : max)
        for (int64_t j = 0; j < visible; j++) max = row[j] > max ? row[j] : max;
        float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
        for (int64_t j = 0; j < visible; j++) {
            float e = exp_f32(row[j] - max);
            e = row[j] == -INFINITY ? 0.0f : e;
            row[j] = e;
            sum += e;
        }
        const float inv = 1.0f / sum;
#pragma omp simd
        for (int64_t j = 0; j < visible; j++) row[j] *= inv;
        for (int64_t j = visible; j < keys; j++) row[j] = 0.0f;
    }
}

/* In place: grad (dP, laid out like the probabilities P) becomes dS = scale * P * (dP - delta[row]),
 * delta = rowsum(dO * O); zero outside the visible keys. */
void causal_softmax_backward(float *grad, const float *probs, const float *delta, int64_t groups, int64_t rows,
                             int64_t keys, int64_t row0, float scale, int threads) {
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t gr = 0; gr < groups * rows; gr++) {
        const int64_t pos = row0 + gr % rows;
        float *dp = grad + gr * keys;
        const float *p = probs + gr * keys;
        const int64_t visible = pos + 1 < keys ? pos + 1 : keys;
        const float dlt = delta[gr];
#pragma omp simd
        for (int64_t j = 0; j < visible; j++) dp[j] = scale * (p[j] * (dp[j] - dlt));
        for (int64_t j = visible; j < keys; j++) dp[j] = 0.0f;
    }
}
