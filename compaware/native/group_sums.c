/* The two passes over the weights that SSL's group lasso makes every step
 * (compaware/regularizers/ssl.py, where the maths is; built on first use, with
 * native_kernels=true, by compaware/native/__init__.py).
 * A weight is seen as a matrix: its first axis indexes the rows (filters, output units), the
 * others flattened the columns (input channel × kernel position, or input units).
 *
 * Why by hand: torch reads a weight several times for the same sums (the column sums of a
 * row-major matrix, a reduction along its outer axis, cost 3–13× a pass, and a broadcast
 * factor of rows × columns is written out before it is used); here each is one pass, in
 * memory order, which is what a memory-bound step over ResNet-50's 23.5 M weights pays for.
 * The weights are shared among OpenMP's threads (torch's own: compaware/native/__init__.py),
 * one whole weight at a time, in the order given (the caller puts the largest first). */

#define FLUSH 64  /* rows summed into float columns before they move to double */

/* rows[n] = Σ_j w[n][j]², columns[j] = Σ_n w[n][j]². columns_acc: a scratch of n_cols
 * floats; the column sums move to double every FLUSH rows (columns_total, n_cols doubles). */
static void square_sums(const float *w, long n_rows, long n_cols, float *rows,
                        float *columns, float *columns_acc, double *columns_total) {
    for (long j = 0; j < n_cols; j++) columns_total[j] = 0.0;
    for (long start = 0; start < n_rows; start += FLUSH) {
        const long end = start + FLUSH < n_rows ? start + FLUSH : n_rows;
        for (long j = 0; j < n_cols; j++) columns_acc[j] = 0.0f;
        for (long n = start; n < end; n++) {
            const float *row = w + n * n_cols;
            float acc = 0.0f;
            for (long j = 0; j < n_cols; j++) {
                const float v = row[j] * row[j];
                acc += v;
                columns_acc[j] += v;
            }
            rows[n] = acc;
        }
        for (long j = 0; j < n_cols; j++) columns_total[j] += columns_acc[j];
    }
    for (long j = 0; j < n_cols; j++) columns[j] = (float)columns_total[j];
}

/* grad[n][j] += w[n][j] · (rows[n] + columns[j]): the group lasso's subgradient, whose
 * factor is the sum of 1/‖w_g‖ (times the strength) over the groups w[n][j] belongs to. */
static void add_subgradient(const float *w, float *grad, long n_rows, long n_cols,
                            const float *rows, const float *columns) {
    for (long n = 0; n < n_rows; n++) {
        const float *w_row = w + n * n_cols;
        float *grad_row = grad + n * n_cols;
        const float r = rows[n];
        for (long j = 0; j < n_cols; j++) grad_row[j] += w_row[j] * (r + columns[j]);
    }
}

/* square_sums for `count` weights: weight t at w[t], n_rows[t] × n_cols[t], its sums into
 * rows[t] and columns[t]; columns_acc and columns_total are scratch of Σ_t n_cols[t] floats
 * and doubles, cut in that order. */
void square_sums_each(int count, const float *const *w, const long *n_rows, const long *n_cols,
                      float *const *rows, float *const *columns, float *columns_acc,
                      double *columns_total) {
    long offsets[count > 0 ? count : 1];
    for (long t = 0, offset = 0; t < count; offset += n_cols[t], t++) offsets[t] = offset;
    #pragma omp parallel for schedule(dynamic)
    for (int t = 0; t < count; t++)
        square_sums(w[t], n_rows[t], n_cols[t], rows[t], columns[t], columns_acc + offsets[t],
                    columns_total + offsets[t]);
}

/* add_subgradient for `count` weights, laid out as for square_sums_each. */
void add_subgradient_each(int count, const float *const *w, float *const *grad,
                          const long *n_rows, const long *n_cols, const float *const *rows,
                          const float *const *columns) {
    #pragma omp parallel for schedule(dynamic)
    for (int t = 0; t < count; t++)
        add_subgradient(w[t], grad[t], n_rows[t], n_cols[t], rows[t], columns[t]);
}
