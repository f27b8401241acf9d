/* −Σ_i log Σ_j π_j N(w_i | μ_j, 1/λ_j) and every sum its gradient needs, in one pass over the
 * weights: the native kernel of soft weight-sharing (compaware/regularizers/sws.py, where the
 * maths is; built on first use, with native_kernels=true, by compaware/native/__init__.py;
 * called by compaware/native/mixture.py).
 *
 * Why by hand: torch.compile's kernel for the same sums makes several passes over a
 * components × weights block (one per reduction axis) and spends ~100 cycles per weight at 17
 * components; here a block of BLOCK weights keeps its J × BLOCK terms in L1, each exponential
 * is computed once, and the compiler vectorises the inner loops (with -ffast-math, through
 * the C library's vector expf). Timed against torch.compile's kernel by
 * scripts/bench_overhead.py (rows sws and sws (native), docs/performance.md). Pieces of the
 * weights are shared among OpenMP's threads: torch's own, as the library links to the OpenMP
 * runtime torch has loaded (compaware/native/__init__.py). */
#include <math.h>
#include <string.h>

#define BLOCK 32          /* weights at a time */
#define UNDERFLOW 1e-30f  /* a total below this: shift each weight by its own largest term */
#define FLUSH 256         /* blocks summed in float before the sums move to double */

/* e[j][i] = exp(q_ij − shift_i), q_ij = log_norm_j − ½ λ_j (x_i − μ_j)², and their sum over j. */
static void exp_terms(const float *x, int J, const float *means, const float *precisions,
                      const float *log_norms, const float *shift, float e[][BLOCK],
                      float *total) {
    for (int i = 0; i < BLOCK; i++) total[i] = 0.0f;
    for (int j = 0; j < J; j++) {
        const float mu = means[j], half = 0.5f * precisions[j], c = log_norms[j];
        for (int i = 0; i < BLOCK; i++) {
            const float d = x[i] - mu;
            const float v = expf(c - half * d * d - shift[i]);
            e[j][i] = v;
            total[i] += v;
        }
    }
}

/* Adds the float partial sums to the double ones and clears them. */
static void flush(int J, float acc_r[][BLOCK], float acc_rd[][BLOCK], float acc_rdd[][BLOCK],
                  double *sum_r, double *sum_rd, double *sum_rdd) {
    for (int j = 0; j < J; j++) {
        for (int i = 0; i < BLOCK; i++) {
            sum_r[j] += acc_r[j][i];
            sum_rd[j] += acc_rd[j][i];
            sum_rdd[j] += acc_rdd[j][i];
            acc_r[j][i] = acc_rd[j][i] = acc_rdd[j][i] = 0.0f;
        }
    }
}

/* Over the n weights w: returns Σ_i log Σ_j π_j N(w_i | μ_j, 1/λ_j) (log_norms_j =
 * log π_j + ½ log(λ_j / 2π)); writes grad_i = Σ_j r_ij λ_j d_ij (r the responsibilities,
 * d = w − μ) and, per component, Σ_i r_ij, Σ_i r_ij d_ij and Σ_i r_ij d_ij². The log-sum-exp
 * is shifted by `shift` = max_j log_norms_j, a bound on every term; a block holding a weight
 * whose terms all underflow under it is recomputed with each weight's own largest term. */
static double mixture_sums(const float *w, long n, int J, const float *means,
                           const float *precisions, const float *log_norms, float shift,
                           float *grad, double *sum_r, double *sum_rd, double *sum_rdd) {
    float e[J][BLOCK], acc_r[J][BLOCK], acc_rd[J][BLOCK], acc_rdd[J][BLOCK];
    memset(acc_r, 0, sizeof acc_r);
    memset(acc_rd, 0, sizeof acc_rd);
    memset(acc_rdd, 0, sizeof acc_rdd);
    for (int j = 0; j < J; j++) sum_r[j] = sum_rd[j] = sum_rdd[j] = 0.0;
    double log_total = 0.0;
    for (long start = 0; start < n; start += BLOCK) {
        const int m = n - start < BLOCK ? (int)(n - start) : BLOCK;
        float x[BLOCK], live[BLOCK], shifts[BLOCK], total[BLOCK], inv[BLOCK], g[BLOCK];
        for (int i = 0; i < BLOCK; i++) {  /* a short last block repeats its last weight */
            x[i] = w[start + (i < m ? i : m - 1)];
            live[i] = i < m ? 1.0f : 0.0f;
            shifts[i] = shift;
        }
        exp_terms(x, J, means, precisions, log_norms, shifts, e, total);
        int underflow = 0;
        for (int i = 0; i < m; i++) underflow |= total[i] < UNDERFLOW;
        if (underflow) {
            for (int i = 0; i < BLOCK; i++) {
                float top = -INFINITY;
                for (int j = 0; j < J; j++) {
                    const float d = x[i] - means[j];
                    const float q = log_norms[j] - 0.5f * precisions[j] * d * d;
                    top = q > top ? q : top;
                }
                shifts[i] = top;
            }
            exp_terms(x, J, means, precisions, log_norms, shifts, e, total);
        }
        for (int i = 0; i < m; i++) log_total += (double)logf(total[i]) + shifts[i];
        for (int i = 0; i < BLOCK; i++) {
            inv[i] = live[i] / total[i];
            g[i] = 0.0f;
        }
        for (int j = 0; j < J; j++) {
            const float mu = means[j], lambda = precisions[j];
            for (int i = 0; i < BLOCK; i++) {
                const float d = x[i] - mu, r = e[j][i] * inv[i], rd = r * d;
                acc_r[j][i] += r;
                acc_rd[j][i] += rd;
                acc_rdd[j][i] += rd * d;
                g[i] += lambda * rd;
            }
        }
        for (int i = 0; i < m; i++) grad[start + i] = g[i];
        if ((start / BLOCK) % FLUSH == FLUSH - 1)
            flush(J, acc_r, acc_rd, acc_rdd, sum_r, sum_rd, sum_rdd);
    }
    flush(J, acc_r, acc_rd, acc_rdd, sum_r, sum_rd, sum_rdd);
    return log_total;
}

/* mixture_sums over `count` pieces of weights, shared among OpenMP's threads: piece p holds
 * n[p] weights at w[p], its gradient goes to grad[p], its log-likelihood to log_totals[p]
 * and its per-component sums to sums[p] (Σ r, Σ r d, Σ r d², J doubles each). The caller
 * adds the pieces' results up in order: the same sums whatever the number of threads. */
void mixture_sums_pieces(int count, const float *const *w, const long *n, int J,
                         const float *means, const float *precisions, const float *log_norms,
                         float shift, float *const *grad, double *log_totals, double *sums) {
    #pragma omp parallel for schedule(dynamic)
    for (int p = 0; p < count; p++) {
        double *s = sums + (long)p * 3 * J;
        log_totals[p] = mixture_sums(w[p], n[p], J, means, precisions, log_norms, shift,
                                     grad[p], s, s + J, s + 2 * J);
    }
}
