// Checks every kernel of ../ops.cu, run on the host through emulate.h, against the same
// arithmetic in double precision, in f32, bf16 and f16: the cases of model/fused.rs's and ops.rs's
// tests (rows narrower and wider than a block, a row with nothing visible, teacher ids repeated by
// padding). Prints one line per check; exits non-zero if any fails. Built and run by
// tests/kernels.rs, with empty stand-ins for cuda_bf16.h and cuda_fp16.h on the include path
// (emulate.h has what they would give).
#include "../ops.cu"
#include <algorithm>
#include <cstdio>
#include <random>
#include <tuple>
#include <unistd.h>

// What flash.rs's BACKWARD_SHARED_BYTES gives the backward.
static_assert(sizeof(BackwardTiles) == 76320, "flash.rs's BACKWARD_SHARED_BYTES");

std::mt19937 rng(7);
double randn() {
  static std::normal_distribution<double> d(0, 1);
  return d(rng);
}
double uniform() {
  static std::uniform_real_distribution<double> d(0, 1);
  return d(rng);
}
template <typename T> T cast(double x);
template <> float cast<float>(double x) { return float(x); }
template <> __nv_bfloat16 cast<__nv_bfloat16>(double x) { return __float2bfloat16(float(x)); }
template <> __half cast<__half>(double x) { return __float2half(float(x)); }
double back(float x) { return x; }
double back(__nv_bfloat16 x) { return __bfloat162float(x); }
double back(__half x) { return __half2float(x); }
// An output buffer as a GPU allocation starts: not zeros (NaN here), so an element a kernel never
// writes fails its check.
template <typename T> std::vector<T> unset(size_t n) { return std::vector<T>(n, cast<T>(NAN)); }
// The larger error, NaN (an element left unset, or worse) counting as infinite.
double worst(double error, double next) {
  return std::isnan(next) ? INFINITY : std::max(error, next);
}
int failures = 0;
void check(const char *what, double error, double tolerance) {
  bool ok = error <= tolerance;
  if (!ok)
    failures++;
  printf("%-52s %s (error %.3g, tolerance %.3g)\n", what, ok ? "ok" : "FAILED", error, tolerance);
}

template <typename T>
void masked_softmax_case(int T_,
                         void (*kernel)(const T *, const T *, T *, uint32_t, uint32_t, uint32_t),
                         double tol, const char *name) {
  int B = 2, H = 3, L = 4, rows = B * H * L;
  std::vector<T> s(rows * T_), m(B * L * T_), out = unset<T>(rows * T_);
  for (auto &x : s)
    x = cast<T>(3 * randn());
  for (int i = 0; i < B * L * T_; i++)
    m[i] = cast<T>(uniform() < 0.35 ? -INFINITY : 0.0);
  for (int j = 0; j < T_; j++) {
    m[1 * T_ + j] = cast<T>(-INFINITY);
    m[(1 * L + 0) * T_ + j] = cast<T>(0.0);
  }
  launch(rows, [&] { kernel(s.data(), m.data(), out.data(), T_, L, H); });
  double error = 0;
  bool hidden_zero = true;
  for (int r = 0; r < rows; r++) {
    int b = r / (H * L), l = r % L;
    const T *mr = &m[(b * L + l) * T_];
    double mx = -INFINITY;
    for (int j = 0; j < T_; j++)
      mx = std::max(mx, back(s[r * T_ + j]) + back(mr[j]));
    double sum = 0;
    for (int j = 0; j < T_; j++) {
      double v = back(s[r * T_ + j]) + back(mr[j]);
      if (v != -INFINITY)
        sum += std::exp(v - mx);
    }
    for (int j = 0; j < T_; j++) {
      double v = back(s[r * T_ + j]) + back(mr[j]);
      double want = (mx == -INFINITY || v == -INFINITY) ? 0 : std::exp(v - mx) / sum;
      error = worst(error, std::fabs(back(out[r * T_ + j]) - want));
      if (b == 0 && l == 1 && back(out[r * T_ + j]) != 0)
        hidden_zero = false;
    }
  }
  char what[100];
  snprintf(what, 100, "%s, %d keys", name, T_);
  check(what, error, tol);
  snprintf(what, 100, "%s, %d keys: hidden row is zeros", name, T_);
  check(what, hidden_zero ? 0 : 1, 0);
}

template <typename T>
void gradient_case(int T_, void (*kernel)(const T *, const T *, const float *, T *, uint32_t),
                   double tol, const char *name) {
  int rows = 24;
  std::vector<T> p(rows * T_), dp(rows * T_), out = unset<T>(rows * T_);
  std::vector<float> sums(rows);
  for (auto &x : p)
    x = cast<T>(uniform());
  for (auto &x : dp)
    x = cast<T>(randn());
  for (auto &x : sums)
    x = float(randn());
  launch(rows, [&] { kernel(p.data(), dp.data(), sums.data(), out.data(), T_); });
  double error = 0;
  for (int r = 0; r < rows; r++)
    for (int j = 0; j < T_; j++) {
      int i = r * T_ + j;
      error = worst(error, std::fabs(back(out[i]) - back(p[i]) * (back(dp[i]) - sums[r])));
    }
  char what[100];
  snprintf(what, 100, "%s, %d keys", name, T_);
  check(what, error, tol);
}

// Rows of 701 logits are read an element at a time; of 704, 16 bytes at a time.
template <typename T>
void cross_entropy_case(int V,
                        void (*forward)(const T *, const uint32_t *, const float *, float *,
                                        uint32_t, uint32_t, uint32_t),
                        void (*backward)(const T *, const uint32_t *, const float *, const float *,
                                         const float *, T *, uint32_t, uint32_t),
                        double tol, const char *name) {
  const int rows = 3, k = 4;
  std::vector<T> x(rows * V), dx = unset<T>(rows * V);
  for (auto &v : x)
    v = cast<T>(4 * randn());
  uint32_t ids[rows * k] = {5, 700, 17, 3, 0, 44, 0, 0, 640, 1, 2, 699};
  float p[rows * k] = {0.5, 0.25, 0.125, 0.125, 0.75, 0.25, 0, 0, 0.25, 0.25, 0.25, 0.25};
  float grad[rows] = {1.0, -2.0, 0.5};
  // The losses, then the log-sum-exps the gradient takes.
  std::vector<float> loss = unset<float>(2 * rows);
  launch(rows, [&] { forward(x.data(), ids, p, loss.data(), V, k, rows); });
  launch(rows, [&] { backward(x.data(), ids, p, loss.data() + rows, grad, dx.data(), V, k); });
  double loss_error = 0, grad_error = 0;
  for (int r = 0; r < rows; r++) {
    double mx = -INFINITY, sum = 0, mass = 0;
    for (int j = 0; j < V; j++)
      mx = std::max(mx, back(x[r * V + j]));
    for (int j = 0; j < V; j++)
      sum += std::exp(back(x[r * V + j]) - mx);
    double lse = mx + std::log(sum), want = 0;
    for (int s = 0; s < k; s++) {
      want -= p[r * k + s] * (back(x[r * V + ids[r * k + s]]) - lse);
      mass += p[r * k + s];
    }
    loss_error = worst(loss_error, std::fabs(loss[r] - want));
    loss_error = worst(loss_error, std::fabs(loss[rows + r] - lse));
    for (int j = 0; j < V; j++) {
      double target = 0;
      for (int s = 0; s < k; s++)
        if (ids[r * k + s] == (uint32_t)j)
          target += p[r * k + s];
      double g = grad[r] * (mass * std::exp(back(x[r * V + j]) - lse) - target);
      grad_error = worst(grad_error, std::fabs(back(dx[r * V + j]) - g));
    }
  }
  char what[100];
  snprintf(what, 100, "%s, %d logits: losses", name, V);
  check(what, loss_error, 1e-4);
  snprintf(what, 100, "%s, %d logits: gradient", name, V);
  check(what, grad_error, tol);
}

// With `add`, the kernel that adds a residual gradient.
template <typename T>
void rms_case(int C,
              void (*kernel)(const T *, const T *, const T *, T *, uint32_t, uint32_t, float),
              void (*add)(const T *, const T *, const T *, const T *, T *, uint32_t, uint32_t,
                          float),
              double tol, const char *name) {
  int rows = 10;
  float eps = 1e-5f;
  std::vector<T> x(rows * C), g(rows * C), w(C), residual(rows * C), out = unset<T>(rows * C);
  for (auto &v : x)
    v = cast<T>(randn());
  for (auto &v : g)
    v = cast<T>(randn());
  for (auto &v : w)
    v = cast<T>(randn());
  for (auto &v : residual)
    v = cast<T>(add ? randn() : 0.0);
  // A warp a row: 10 rows take 2 blocks, the second with 2 rows.
  launch((rows + 7) / 8, [&] {
    if (add)
      add(x.data(), g.data(), w.data(), residual.data(), out.data(), C, rows, eps);
    else
      kernel(x.data(), g.data(), w.data(), out.data(), C, rows, eps);
  });
  double error = 0, largest = 0;
  for (int r = 0; r < rows; r++) {
    double sq = 0, dot = 0;
    for (int j = 0; j < C; j++) {
      double v = back(x[r * C + j]);
      sq += v * v;
      dot += back(g[r * C + j]) * back(w[j]) * v;
    }
    double rr = 1 / std::sqrt(sq / C + eps), c = dot / C * rr * rr * rr;
    for (int j = 0; j < C; j++) {
      double want = rr * back(g[r * C + j]) * back(w[j]) - back(x[r * C + j]) * c +
                    back(residual[r * C + j]);
      largest = std::max(largest, std::fabs(want));
      error = worst(error, std::fabs(back(out[r * C + j]) - want));
    }
  }
  char what[100];
  snprintf(what, 100, "%s%s, %d wide (relative)", name, add ? " with a residual" : "", C);
  check(what, error / largest, tol);
}

// RMSNorm against the same arithmetic in double precision, and a residual add in place (rows
// of 600 added a Pack at a time, of 18 an element at a time).
template <typename T>
void norm_case(int C, void (*norm)(const T *, const T *, T *, uint32_t, uint32_t, float),
               void (*add)(const T *, T *, uint32_t, uint32_t), double tol, const char *name) {
  const int rows = 10;
  const float eps = 1e-5f;
  std::vector<T> x(rows * C), residual(rows * C), w(C), out = unset<T>(rows * C);
  for (auto &v : x)
    v = cast<T>(randn());
  for (auto &v : residual)
    v = cast<T>(randn());
  for (auto &v : w)
    v = cast<T>(randn());
  std::vector<T> sum(residual);
  // A warp a row: 10 rows take 2 blocks, the second with 2 rows.
  launch((rows + 7) / 8, [&] { add(x.data(), sum.data(), C, rows); });
  launch((rows + 7) / 8, [&] { norm(x.data(), w.data(), out.data(), C, rows, eps); });
  double sum_error = 0, error = 0;
  for (int r = 0; r < rows; r++) {
    double squares = 0;
    for (int j = 0; j < C; j++) {
      const double want = back(x[r * C + j]) + back(residual[r * C + j]);
      sum_error = worst(sum_error, std::fabs(back(sum[r * C + j]) - want) / (1 + std::fabs(want)));
      squares += back(x[r * C + j]) * back(x[r * C + j]);
    }
    const double inverse = 1 / std::sqrt(squares / C + eps);
    for (int j = 0; j < C; j++) {
      const double want = back(x[r * C + j]) * inverse * back(w[j]);
      error = worst(error, std::fabs(back(out[r * C + j]) - want) / (1 + std::fabs(want)));
    }
  }
  char what[100];
  snprintf(what, 100, "%s, %d wide: normed", name, C);
  check(what, error, tol);
  snprintf(what, 100, "%s, %d wide: residual added", name, C);
  check(what, sum_error, tol);
}

template <typename T>
void place_rows_case(void (*kernel)(const T *, const uint32_t *, T *, uint32_t), const char *name) {
  const int rows = 7, columns = 300;
  const uint32_t source[rows] = {1, UINT32_MAX, UINT32_MAX, 2, UINT32_MAX, 0, UINT32_MAX};
  std::vector<T> selected(3 * columns), out = unset<T>(rows * columns);
  for (auto &v : selected)
    v = cast<T>(randn());
  launch(rows, [&] { kernel(selected.data(), source, out.data(), columns); });
  double error = 0;
  for (int r = 0; r < rows; r++)
    for (int j = 0; j < columns; j++) {
      double want = source[r] == UINT32_MAX ? 0 : back(selected[source[r] * columns + j]);
      error = worst(error, std::fabs(back(out[r * columns + j]) - want));
    }
  check(name, error, 0);
}

// The MLP's gate and its gradients, errors relative to 1 + |the reference|. Rows of 300 are
// read a Pack at a time in f32 only; of 304, in every dtype.
template <typename T>
void swiglu_case(int C, void (*forward)(const T *, T *, uint32_t),
                 void (*backward)(const T *, const T *, T *, uint32_t), double tol,
                 const char *name) {
  const int rows = 3;
  // Each row's gate, then its up; the gradients the same way.
  std::vector<T> gate_up(2 * rows * C), d(rows * C), out = unset<T>(rows * C),
                                                     grads = unset<T>(2 * rows * C);
  for (int i = 0; i < rows * C; i++) {
    const int gate = i / C * 2 * C + i % C;
    // Gates from about -45 to 45: silu's tails, where exp(-g) overflows or vanishes.
    gate_up[gate] = cast<T>(i % 2 ? 3 * randn() : 0.1 * (i - rows * C / 2));
    gate_up[gate + C] = cast<T>(randn());
    d[i] = cast<T>(randn());
  }
  launch(rows, [&] { forward(gate_up.data(), out.data(), C); });
  launch(rows, [&] { backward(gate_up.data(), d.data(), grads.data(), C); });
  double error = 0, gradient_error = 0;
  for (int i = 0; i < rows * C; i++) {
    const int gate = i / C * 2 * C + i % C;
    const double x = back(gate_up[gate]), u = back(gate_up[gate + C]), s = 1 / (1 + std::exp(-x));
    const double y = x * s * u;
    error = worst(error, std::fabs(back(out[i]) - y) / (1 + std::fabs(y)));
    const double dg = back(d[i]) * u * s * (1 + x * (1 - s)), du = back(d[i]) * x * s;
    gradient_error =
        worst(gradient_error, std::fabs(back(grads[gate]) - dg) / (1 + std::fabs(dg)));
    gradient_error =
        worst(gradient_error, std::fabs(back(grads[gate + C]) - du) / (1 + std::fabs(du)));
  }
  char what[100];
  snprintf(what, 100, "%s, %d wide", name, C);
  check(what, error, tol);
  snprintf(what, 100, "%s, %d wide: gradients", name, C);
  check(what, gradient_error, tol);
}

// The rotary embedding of stacked queries, keys and values (SmolLM2's 9 query heads, 3 key
// heads, 64 dimensions: more pairs a row than a block has threads), against the rotation in
// double precision, and its gradient as the rotation back of given gradients.
template <typename T>
void rope_qkv_case(void (*forward)(const T *, const T *, const T *, T *, uint32_t, uint32_t,
                                   uint32_t, uint32_t),
                   void (*backward)(const T *, const T *, const T *, const T *, const T *, T *,
                                    uint32_t, uint32_t, uint32_t),
                   double tol, const char *name) {
  const int rows = 5, heads = 9, kv_heads = 3, half = 32, dim = 2 * half;
  const int width = (heads + 2 * kv_heads) * dim, n = rows * width;
  std::vector<T> qkv(n), cos(rows * half), sin(rows * half), out = unset<T>(n),
      grads(n), back_out = unset<T>(n);
  for (auto &x : qkv)
    x = cast<T>(randn());
  for (auto &x : grads)
    x = cast<T>(randn());
  for (int i = 0; i < rows * half; i++) {
    const double angle = 3 * randn();
    cos[i] = cast<T>(std::cos(angle));
    sin[i] = cast<T>(std::sin(angle));
  }
  launch(rows, [&] {
    forward(qkv.data(), cos.data(), sin.data(), out.data(), heads, kv_heads, half, rows);
  });
  // The split layout: queries, keys, values, each [rows, its heads, dim].
  const auto split = [&](int r, int h, int d) {
    return h < heads ? (r * heads + h) * dim + d
                     : rows * heads * dim + (h < heads + kv_heads ? 0 : rows * kv_heads * dim) +
                           (r * kv_heads + (h - heads) % kv_heads) * dim + d;
  };
  const T *g = grads.data();
  launch(rows, [&] {
    backward(g, g + rows * heads * dim, g + rows * (heads + kv_heads) * dim, cos.data(),
             sin.data(), back_out.data(), heads, kv_heads, half);
  });
  double error = 0, gradient_error = 0;
  for (int r = 0; r < rows; r++)
    for (int h = 0; h < heads + 2 * kv_heads; h++)
      for (int d = 0; d < dim; d++) {
        const int i = d % half, stacked = r * width + h * dim;
        const bool rotated = h < heads + kv_heads;
        const double c = rotated ? back(cos[r * half + i]) : 1,
                     s = rotated ? back(sin[r * half + i]) : 0;
        // Pair (a, b) of the stacked row, and of the gradients in the split layout.
        const double a = back(qkv[stacked + i]), b = back(qkv[stacked + i + half]);
        const double want = d < half ? a * c - b * s : a * s + b * c;
        error = worst(error, std::fabs(back(out[split(r, h, d)]) - want));
        const double ga = back(g[split(r, h, i)]), gb = back(g[split(r, h, i + half)]);
        const double back_want = d < half ? ga * c + gb * s : -ga * s + gb * c;
        gradient_error = worst(gradient_error, std::fabs(back(back_out[stacked + d]) - back_want));
      }
  char what[100];
  snprintf(what, 100, "%s", name);
  check(what, error, tol);
  snprintf(what, 100, "%s: gradient", name);
  check(what, gradient_error, tol);
}

// One Adam step against the same arithmetic in double precision (f32 only: the trainer keeps the
// cartridge and its moments in f32).
void adam_case() {
  const int rows = 3, C = 300, n = rows * C;
  std::vector<float> p(n), g(n), moments(2 * n), out = unset<float>(3 * n);
  for (int i = 0; i < n; i++) {
    p[i] = float(randn());
    g[i] = float(randn());
    moments[i] = float(0.1 * randn());
    moments[n + i] = float(0.01 * uniform());
  }
  const double lr = 0.02, b1 = 0.9, b2 = 0.999, eps = 1e-8, c1 = 1 - b1 * b1 * b1,
               c2 = 1 - b2 * b2 * b2;
  launch(rows, [&] {
    adam_step_f32(p.data(), g.data(), moments.data(), out.data(), C, rows, lr, b1, 1 - b1, b2,
                  1 - b2, eps, c1, c2);
  });
  double error = 0;
  for (int i = 0; i < n; i++) {
    const double m = moments[i] * b1 + g[i] * (1 - b1),
                 v = moments[n + i] * b2 + double(g[i]) * g[i] * (1 - b2);
    const double step = (m / c1) / (std::sqrt(v / c2) + eps);
    error = worst(error, std::fabs(out[i] - (p[i] - lr * step)));
    error = worst(error, std::fabs(out[n + i] - m));
    error = worst(error, std::fabs(out[2 * n + i] - v));
  }
  check("adam_step_f32", error, 1e-6);
}

// The row of `[sequences, length, kv_heads · group, 64]` queries (or output, or a gradient of
// either) that is row r of key head h's stacked query heads.
size_t query_row(int h, int r, int length, int kv_heads, int group) {
  return (size_t(h / kv_heads) * length + r % length) * kv_heads * group +
         h % kv_heads * group + r / length;
}

// Attention in tiles against the composed arithmetic in double precision: `sequences` x 2 key
// heads, 3 query heads to each, `length` positions after `prefix` keys every row sees, 64
// dimensions. Sequence 0's rows are packed conversations (each position sees its conversation
// up to itself; one starts at a position with probability `restart`, so at 0 the rows are
// causal), the last `padding` padding (nothing of their own); sequence 1's spans are random,
// some empty, its first row's too, and one row sees every key. The backward is given the
// reference's log-sum-exp and rowsum(dO·O), and the forward's reach, so each kernel's
// arithmetic is checked on its own and the backward's choice of row tiles by the forward's.
// Errors are relative to the largest element of each reference.
template <typename T>
void flash_case(int length, int prefix, double restart, int padding,
                void (*forward)(const T *, const T *, const T *, const T *, const T *, uint32_t,
                                const uint32_t *, uint32_t, T *, float *, uint32_t *, uint32_t,
                                uint32_t, uint32_t, float),
                void (*backward)(const T *, const T *, const T *, const T *, const T *, uint32_t,
                                 const uint32_t *, uint32_t, const uint32_t *, const T *,
                                 const float *, const float *, float *, float *, T *, float *,
                                 T *, uint32_t, uint32_t, uint32_t, float),
                double tol, const char *name) {
  const int sequences = 2, kv_heads = 2, group = 3, D = 64, heads = sequences * kv_heads;
  const int rows = group * length, columns = prefix + length;
  const float scale = 0.125f;
  // The prefix's keys and values are shared by the sequences, `[kv_heads, prefix, 64]`; the
  // rest are each sequence's own, `[sequences, length, kv_heads, 64]`. Key j of head h, and
  // its gradient, is in the one or the other (the shared ones' summed over the sequences).
  std::vector<T> q(heads * rows * D), dout(heads * rows * D), k_shared(kv_heads * prefix * D),
      v_shared(kv_heads * prefix * D), k_own(heads * length * D), v_own(heads * length * D);
  for (auto *m : {&q, &dout, &k_shared, &v_shared, &k_own, &v_own})
    for (auto &x : *m)
      x = cast<T>(randn());
  const auto own = [&](int h, int j) {
    return ((size_t(h / kv_heads) * length + j - prefix) * kv_heads + h % kv_heads) * D;
  };
  std::vector<T> k(heads * columns * D), v(heads * columns * D);
  for (int h = 0; h < heads; h++)
    for (int j = 0; j < columns; j++)
      for (int d = 0; d < D; d++) {
        const size_t at = (size_t(h) * columns + j) * D + d,
                     shared_at = (size_t(h % kv_heads) * prefix + j) * D + d;
        k[at] = j < prefix ? k_shared[shared_at] : k_own[own(h, j) + d];
        v[at] = j < prefix ? v_shared[shared_at] : v_own[own(h, j) + d];
      }
  std::vector<uint32_t> spans(sequences * length * 2);
  for (int i = 0, start = 0; i < length; i++) {
    if (uniform() < restart)
      start = i;
    const bool padded = i >= length - padding;
    spans[2 * i] = padded ? columns : prefix + start;
    spans[2 * i + 1] = padded ? 0 : prefix + i;
  }
  for (int i = 0; i < length; i++) {
    uint32_t *span = &spans[2 * (length + i)];
    span[0] = uint32_t(uniform() * columns);
    span[1] = span[0] + uint32_t(uniform() * (columns - span[0])) - 1;
  }
  spans[2 * length] = 1;
  spans[2 * length + 1] = 0;
  spans[2 * (length + 1)] = 0;
  spans[2 * (length + 1) + 1] = columns - 1;
  const auto sees = [&](int sequence, int position, int key) {
    const uint32_t *span = &spans[2 * (sequence * length + position)];
    return key < prefix || (uint32_t(key) >= span[0] && uint32_t(key) <= span[1]);
  };
  // The reference, per head and row.
  std::vector<double> o(heads * rows * D), lse(heads * rows), dsum(heads * rows),
      dq(heads * rows * D, 0), dk(heads * columns * D, 0), dv(heads * columns * D, 0);
  for (int h = 0; h < heads; h++)
    for (int r = 0; r < rows; r++) {
      const size_t row = size_t(h) * rows + r, at = query_row(h, r, length, kv_heads, group);
      std::vector<double> s(columns), p(columns, 0.0), dp(columns);
      double top = -INFINITY, sum = 0;
      for (int j = 0; j < columns; j++) {
        double dot = 0;
        for (int d = 0; d < D; d++)
          dot += back(q[at * D + d]) * back(k[(size_t(h) * columns + j) * D + d]);
        s[j] = sees(h / kv_heads, r % length, j) ? dot * scale : -INFINITY;
        top = std::max(top, s[j]);
      }
      for (int j = 0; j < columns; j++)
        if (top != -INFINITY)
          sum += std::exp(s[j] - top);
      lse[row] = top == -INFINITY ? INFINITY : top + std::log(sum);
      for (int j = 0; j < columns; j++)
        p[j] = std::exp(s[j] - lse[row]);
      double ds_sum = 0;
      for (int d = 0; d < D; d++) {
        double x = 0;
        for (int j = 0; j < columns; j++)
          x += p[j] * back(v[(size_t(h) * columns + j) * D + d]);
        o[row * D + d] = x;
        ds_sum += x * back(dout[at * D + d]);
      }
      dsum[row] = ds_sum;
      for (int j = 0; j < columns; j++) {
        const size_t key = size_t(h) * columns + j;
        double x = 0;
        for (int d = 0; d < D; d++)
          x += back(dout[at * D + d]) * back(v[key * D + d]);
        const double ds = p[j] * (x - ds_sum);
        for (int d = 0; d < D; d++) {
          dq[row * D + d] += scale * ds * back(k[key * D + d]);
          dk[key * D + d] += scale * ds * back(q[at * D + d]);
          dv[key * D + d] += p[j] * back(dout[at * D + d]);
        }
      }
    }
  std::vector<T> out = unset<T>(q.size()), dk_own = unset<T>(k_own.size()),
                 dv_own = unset<T>(v_own.size());
  std::vector<float> dk_shared(kv_heads * prefix * D, 0.f), dv_shared(kv_heads * prefix * D, 0.f);
  // The kernels' log-sum-exps are in base 2.
  std::vector<float> lse_out = unset<float>(lse.size()), lse_in(lse.size()),
                     dsum_in(dsum.begin(), dsum.end()), dq_out(q.size(), 0.f);
  for (size_t i = 0; i < lse.size(); i++)
    lse_in[i] = float(lse[i] * M_LOG2E);
  // Unset: a tile the forward leaves so sees no key beyond the prefix.
  std::vector<uint32_t> reach(heads * ((rows + 63) / 64) * 4, 0xdeadbeefu);
  const dim3 queries{unsigned(heads), unsigned(rows + 127) / 128, 1},
      keys{unsigned(heads), unsigned(columns + 127) / 128, 1};
  launch(queries, 128, [&] {
    forward(q.data(), k_shared.data(), k_own.data(), v_shared.data(), v_own.data(), prefix,
            spans.data(), prefix, out.data(), lse_out.data(), reach.data(), rows, length, kv_heads,
            scale);
  });
  launch(keys, 256, [&] {
    backward(q.data(), k_shared.data(), k_own.data(), v_shared.data(), v_own.data(), prefix,
             spans.data(), prefix, reach.data(), dout.data(), lse_in.data(), dsum_in.data(),
             dq_out.data(), dk_shared.data(), dk_own.data(), dv_shared.data(), dv_own.data(), rows,
             length, kv_heads, scale);
  });
  const auto relative = [](const std::vector<double> &want, auto got) {
    double largest = 0, error = 0;
    for (double x : want)
      largest = std::max(largest, std::fabs(x));
    for (size_t i = 0; i < want.size(); i++)
      error = worst(error, std::fabs(got(i) - want[i]));
    return error / largest;
  };
  char what[100];
  const auto report = [&](const char *part, double error, double tolerance) {
    snprintf(what, 100, "%s, %d positions after %d: %s", name, length, prefix, part);
    check(what, error, tolerance);
  };
  // The reference's rows are the kernels' (head, row); the outputs' are the projections'.
  const auto moved = [&](size_t i) {
    return query_row(i / D / rows, i / D % rows, length, kv_heads, group) * D + i % D;
  };
  report("output", relative(o, [&](size_t i) { return back(out[moved(i)]); }), tol);
  double lse_error = 0;
  for (size_t i = 0; i < lse.size(); i++)
    lse_error = lse[i] == INFINITY ? worst(lse_error, lse_out[i] == INFINITY ? 0 : INFINITY)
                                   : worst(lse_error, std::fabs(lse_out[i] - lse[i] * M_LOG2E));
  report("log-sum-exp", lse_error, 1e-4);
  report("dq", relative(dq, [&](size_t i) { return double(dq_out[moved(i)]); }), tol);
  // The reference's shared keys' gradients, each sequence's, summed.
  std::vector<double> dk_sum(kv_heads * prefix * D, 0), dv_sum(kv_heads * prefix * D, 0);
  for (int h = 0; h < heads; h++)
    for (int j = 0; j < columns; j++)
      for (int d = 0; d < D; d++) {
        const size_t at = (size_t(h) * columns + j) * D + d;
        if (j < prefix) {
          dk_sum[(size_t(h % kv_heads) * prefix + j) * D + d] += dk[at];
          dv_sum[(size_t(h % kv_heads) * prefix + j) * D + d] += dv[at];
        }
      }
  // Errors relative to the largest of all the keys' gradients.
  const auto key_gradient = [&](const std::vector<double> &want, const std::vector<double> &sum,
                                const std::vector<float> &shared,
                                const std::vector<T> &own_rows) {
    double largest = 0, error = 0;
    for (double x : want)
      largest = std::max(largest, std::fabs(x));
    for (double x : sum)
      largest = std::max(largest, std::fabs(x));
    for (size_t i = 0; i < sum.size(); i++)
      error = worst(error, std::fabs(shared[i] - sum[i]));
    for (size_t i = 0; i < want.size(); i++) {
      const int h = i / D / columns, j = i / D % columns, d = i % D;
      if (j >= prefix)
        error = worst(error, std::fabs(back(own_rows[own(h, j) + d]) - want[i]));
    }
    return error / largest;
  };
  report("dk", key_gradient(dk, dk_sum, dk_shared, dk_own), tol);
  report("dv", key_gradient(dv, dv_sum, dv_shared, dv_own), tol);
}

// rowsum(dO·O) of rows of 64 against double precision, each in the kernels' place: 2 sequences
// of 3 positions, 1 key head, 3 query heads (18 rows, not a multiple of a block's 4).
template <typename T>
void row_sums_case(void (*kernel)(const T *, const T *, float *, uint32_t, uint32_t, uint32_t,
                                  uint32_t),
                   const char *name) {
  const int sequences = 2, length = 3, kv_heads = 1, group = 3;
  const uint32_t count = sequences * length * kv_heads * group;
  std::vector<T> dout(count * 64), out(count * 64);
  for (auto *m : {&dout, &out})
    for (auto &x : *m)
      x = cast<T>(randn());
  std::vector<float> sums = unset<float>(count);
  launch(dim3{(count + 3) / 4, 1, 1}, 128, [&] {
    kernel(dout.data(), out.data(), sums.data(), count, length, kv_heads, group);
  });
  double error = 0;
  for (int h = 0; h < sequences * kv_heads; h++)
    for (int r = 0; r < group * length; r++) {
      const size_t at = query_row(h, r, length, kv_heads, group) * 64;
      double want = 0;
      for (int d = 0; d < 64; d++)
        want += back(dout[at + d]) * back(out[at + d]);
      error = worst(error, std::fabs(sums[h * group * length + r] - want));
    }
  check(name, error, 1e-4);
}

int main() {
  // A kernel whose threads miss a barrier the others wait at would hang here: end it instead.
  // About 140 s alone on 2 cores (mostly the attention cases' warp barriers), several times
  // that beside a build.
  alarm(900);
  for (int T_ : {7, 300, 701}) {
    masked_softmax_case<float>(T_, masked_softmax_f32, 1e-6, "masked_softmax_f32");
    masked_softmax_case<__nv_bfloat16>(T_, masked_softmax_bf16, 4e-3, "masked_softmax_bf16");
    gradient_case<float>(T_, softmax_gradient_f32, 1e-6, "softmax_gradient_f32");
    gradient_case<__nv_bfloat16>(T_, softmax_gradient_bf16, 2e-2, "softmax_gradient_bf16");
    masked_softmax_case<__half>(T_, masked_softmax_f16, 1e-3, "masked_softmax_f16");
    gradient_case<__half>(T_, softmax_gradient_f16, 4e-3, "softmax_gradient_f16");
  }
  for (int V : {701, 704}) {
    cross_entropy_case<float>(V, top_k_cross_entropy_f32, top_k_cross_entropy_gradient_f32, 1e-6,
                              "top_k_cross_entropy_f32");
    cross_entropy_case<__nv_bfloat16>(V, top_k_cross_entropy_bf16,
                                      top_k_cross_entropy_gradient_bf16, 8e-3,
                                      "top_k_cross_entropy_bf16");
    cross_entropy_case<__half>(V, top_k_cross_entropy_f16, top_k_cross_entropy_gradient_f16, 2e-3,
                               "top_k_cross_entropy_f16");
  }
  for (int C : {18, 600}) {
    norm_case<float>(C, rms_norm_f32, add_in_place_f32, 1e-6, "rms_norm_f32");
    norm_case<__nv_bfloat16>(C, rms_norm_bf16, add_in_place_bf16, 8e-3, "rms_norm_bf16");
    norm_case<__half>(C, rms_norm_f16, add_in_place_f16, 1e-3, "rms_norm_f16");
  }
  for (int C : {16, 600}) {
    for (bool residual : {false, true}) {
      rms_case<float>(C, rms_norm_gradient_f32, residual ? rms_norm_gradient_add_f32 : nullptr,
                      1e-6, "rms_norm_gradient_f32");
      rms_case<__nv_bfloat16>(C, rms_norm_gradient_bf16,
                              residual ? rms_norm_gradient_add_bf16 : nullptr, 1e-2,
                              "rms_norm_gradient_bf16");
      rms_case<__half>(C, rms_norm_gradient_f16, residual ? rms_norm_gradient_add_f16 : nullptr,
                       2e-3, "rms_norm_gradient_f16");
    }
  }
  for (int C : {300, 304}) {
    swiglu_case<float>(C, swiglu_f32, swiglu_gradient_f32, 1e-6, "swiglu_f32");
    swiglu_case<__nv_bfloat16>(C, swiglu_bf16, swiglu_gradient_bf16, 8e-3, "swiglu_bf16");
    swiglu_case<__half>(C, swiglu_f16, swiglu_gradient_f16, 1e-3, "swiglu_f16");
  }
  adam_case();
  rope_qkv_case<float>(rope_qkv_f32, rope_qkv_gradient_f32, 1e-6, "rope_qkv_f32");
  rope_qkv_case<__nv_bfloat16>(rope_qkv_bf16, rope_qkv_gradient_bf16, 3e-2, "rope_qkv_bf16");
  rope_qkv_case<__half>(rope_qkv_f16, rope_qkv_gradient_f16, 4e-3, "rope_qkv_f16");
  place_rows_case<float>(place_rows_f32, "place_rows_f32");
  place_rows_case<__nv_bfloat16>(place_rows_bf16, "place_rows_bf16");
  place_rows_case<__half>(place_rows_f16, "place_rows_f16");
  // Partial tiles of rows and keys; a prefix of whole tiles, and one that ends within a
  // backward block; none, so that rows see nothing and tiles of rows and keys that do not meet
  // are skipped; rows that are causal (one conversation), so that tiles every row sees whole
  // beyond the prefix are taken without spans, with and without padding (without, whole tiles
  // of rows past the last, and of keys past a prefix that ends within them).
  for (auto [length, prefix, restart, padding] :
       {std::tuple{21, 19, 0.05, 3}, std::tuple{70, 80, 0.05, 3}, std::tuple{50, 78, 0.05, 3},
        std::tuple{40, 128, 0.05, 3}, std::tuple{150, 0, 0.05, 3}, std::tuple{128, 19, 0.05, 3},
        std::tuple{100, 192, 0.05, 3}, std::tuple{256, 64, 0.0, 3}, std::tuple{150, 19, 0.0, 0}}) {
    flash_case<__nv_bfloat16>(length, prefix, restart, padding, flash_forward_bf16,
                              flash_backward_bf16, 2e-2, "flash_bf16");
    flash_case<__half>(length, prefix, restart, padding, flash_forward_f16, flash_backward_f16,
                       2e-3, "flash_f16");
  }
  row_sums_case<__nv_bfloat16>(flash_row_sums_bf16, "flash_row_sums_bf16");
  row_sums_case<__half>(flash_row_sums_f16, "flash_row_sums_f16");
  printf("%s\n", failures ? "FAILURES" : "all ok");
  return failures != 0;
}
