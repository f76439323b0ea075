/* One-pass fixed-scale fake quant on the CPU (float32), built at first use by
 * qat/quant/cpu_kernel.py and called through ctypes.
 *
 *   v    = nearbyint(x * inv)            (round half to even, as torch.round)
 *   q    = clamp(v, lo, hi)              (NaN stays NaN, as torch.clamp)
 *   out  = q * s
 *   mask = (q == v)                      (inside the grid: the clipped STE's gradient)
 *
 * x is seen as `rows` rows of `cols` contiguous values; row r uses s[r % srows], inv[..], and
 * lo_arr[r] / hi_arr[r] when given, else the scalars lo / hi. The same float32 operations in the
 * same order as the tensor ops they replace, so the results are bit for bit theirs. Threads come
 * from the OpenMP runtime PyTorch has loaded (the same pool, the same thread count).
 */
#include <stdint.h>
#include <stddef.h>

static void segment(const float *restrict x, float *restrict out, uint8_t *restrict mask,
                    int64_t n, float s, float inv, float lo, float hi) {
    if (mask) {
        for (int64_t i = 0; i < n; i++) {
            float v = __builtin_nearbyintf(x[i] * inv);
            float q = v < lo ? lo : (v > hi ? hi : v);
            mask[i] = q == v;
            out[i] = q * s;
        }
    } else {
        for (int64_t i = 0; i < n; i++) {
            float v = __builtin_nearbyintf(x[i] * inv);
            float q = v < lo ? lo : (v > hi ? hi : v);
            out[i] = q * s;
        }
    }
}

/* elements [a, b) of the rows x cols view */
static void span(const float *x, float *out, uint8_t *mask, int64_t cols, const float *s,
                 const float *inv, int64_t srows, const float *lo_arr, const float *hi_arr,
                 float lo, float hi, int64_t a, int64_t b) {
    while (a < b) {
        int64_t r = a / cols;
        int64_t end = (r + 1) * cols < b ? (r + 1) * cols : b;
        int64_t k = srows == 1 ? 0 : r;
        segment(x + a, out + a, mask ? mask + a : NULL, end - a, s[k], inv[k],
                lo_arr ? lo_arr[r] : lo, hi_arr ? hi_arr[r] : hi);
        a = end;
    }
}

void qat_fake_quant(const float *x, float *out, uint8_t *mask, int64_t rows, int64_t cols,
                    const float *s, const float *inv, int64_t srows, const float *lo_arr,
                    const float *hi_arr, float lo, float hi, int nthreads) {
    int64_t n = rows * cols;
    if (nthreads <= 1) {
        span(x, out, mask, cols, s, inv, srows, lo_arr, hi_arr, lo, hi, 0, n);
        return;
    }
    /* chunks of whole cache lines (16 floats), one per thread */
    int64_t chunk = ((n + nthreads - 1) / nthreads + 15) / 16 * 16;
#pragma omp parallel for num_threads(nthreads) schedule(static, 1)
    for (int t = 0; t < nthreads; t++) {
        int64_t a = (int64_t)t * chunk;
        int64_t b = a + chunk < n ? a + chunk : n;
        if (a < b)
            span(x, out, mask, cols, s, inv, srows, lo_arr, hi_arr, lo, hi, a, b);
    }
}

/* A strided x (a permuted view: attention heads) with one scale: rows of sizes[ndim - 1]
 * values, contiguous in x (stride 1) and written contiguous to out / mask, row after row in
 * x's logical order. sizes / strides: in elements, ndim <= 8. */
void qat_fake_quant_strided(const float *x, float *out, uint8_t *mask, int ndim,
                            const int64_t *sizes, const int64_t *strides, const float *s,
                            const float *inv, float lo, float hi, int nthreads) {
    int64_t inner = sizes[ndim - 1], outer = 1;
    for (int d = 0; d < ndim - 1; d++)
        outer *= sizes[d];
    if (nthreads < 1)
        nthreads = 1;
#pragma omp parallel for num_threads(nthreads) schedule(static)
    for (int64_t r = 0; r < outer; r++) {
        int64_t off = 0, rem = r;  /* row r's offset in x: its index, digit by digit */
        for (int d = ndim - 2; d >= 0; d--) {
            off += (rem % sizes[d]) * strides[d];
            rem /= sizes[d];
        }
        segment(x + off, out + r * inner, mask ? mask + r * inner : NULL, inner, s[0], inv[0],
                lo, hi);
    }
}
