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
#include <unistd.h>

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

template <typename T>
void cross_entropy_case(void (*forward)(const T *, const uint32_t *, const float *, float *,
                                        uint32_t, uint32_t),
                        void (*backward)(const T *, const uint32_t *, const float *, const float *,
                                         T *, uint32_t, uint32_t),
                        double tol, const char *name) {
  const int rows = 3, V = 701, k = 4;
  std::vector<T> x(rows * V), dx = unset<T>(rows * V);
  for (auto &v : x)
    v = cast<T>(4 * randn());
  uint32_t ids[rows * k] = {5, 700, 17, 3, 0, 44, 0, 0, 640, 1, 2, 699};
  float p[rows * k] = {0.5, 0.25, 0.125, 0.125, 0.75, 0.25, 0, 0, 0.25, 0.25, 0.25, 0.25};
  float grad[rows] = {1.0, -2.0, 0.5};
  std::vector<float> loss = unset<float>(rows);
  launch(rows, [&] { forward(x.data(), ids, p, loss.data(), V, k); });
  launch(rows, [&] { backward(x.data(), ids, p, grad, dx.data(), V, k); });
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
  snprintf(what, 100, "%s: losses", name);
  check(what, loss_error, 1e-4);
  snprintf(what, 100, "%s: gradient", name);
  check(what, grad_error, tol);
}

template <typename T>
void rms_case(int C, void (*kernel)(const T *, const T *, const T *, T *, uint32_t, float),
              double tol, const char *name) {
  int rows = 10;
  float eps = 1e-5f;
  std::vector<T> x(rows * C), g(rows * C), w(C), out = unset<T>(rows * C);
  for (auto &v : x)
    v = cast<T>(randn());
  for (auto &v : g)
    v = cast<T>(randn());
  for (auto &v : w)
    v = cast<T>(randn());
  launch(rows, [&] { kernel(x.data(), g.data(), w.data(), out.data(), C, eps); });
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
      double want = rr * back(g[r * C + j]) * back(w[j]) - back(x[r * C + j]) * c;
      largest = std::max(largest, std::fabs(want));
      error = worst(error, std::fabs(back(out[r * C + j]) - want));
    }
  }
  char what[100];
  snprintf(what, 100, "%s, %d wide (relative)", name, C);
  check(what, error / largest, tol);
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

int main() {
  // A kernel whose threads miss a barrier the others wait at would hang here: end it instead.
  alarm(120);
  for (int T_ : {7, 300, 701}) {
    masked_softmax_case<float>(T_, masked_softmax_f32, 1e-6, "masked_softmax_f32");
    masked_softmax_case<__nv_bfloat16>(T_, masked_softmax_bf16, 4e-3, "masked_softmax_bf16");
    gradient_case<float>(T_, softmax_gradient_f32, 1e-6, "softmax_gradient_f32");
    gradient_case<__nv_bfloat16>(T_, softmax_gradient_bf16, 2e-2, "softmax_gradient_bf16");
    masked_softmax_case<__half>(T_, masked_softmax_f16, 1e-3, "masked_softmax_f16");
    gradient_case<__half>(T_, softmax_gradient_f16, 4e-3, "softmax_gradient_f16");
  }
  cross_entropy_case<float>(top_k_cross_entropy_f32, top_k_cross_entropy_gradient_f32, 1e-6,
                            "top_k_cross_entropy_f32");
  cross_entropy_case<__nv_bfloat16>(top_k_cross_entropy_bf16, top_k_cross_entropy_gradient_bf16,
                                    8e-3, "top_k_cross_entropy_bf16");
  cross_entropy_case<__half>(top_k_cross_entropy_f16, top_k_cross_entropy_gradient_f16, 2e-3,
                             "top_k_cross_entropy_f16");
  for (int C : {16, 600}) {
    rms_case<float>(C, rms_norm_gradient_f32, 1e-6, "rms_norm_gradient_f32");
    rms_case<__nv_bfloat16>(C, rms_norm_gradient_bf16, 1e-2, "rms_norm_gradient_bf16");
    rms_case<__half>(C, rms_norm_gradient_f16, 2e-3, "rms_norm_gradient_f16");
  }
  place_rows_case<float>(place_rows_f32, "place_rows_f32");
  place_rows_case<__nv_bfloat16>(place_rows_bf16, "place_rows_bf16");
  place_rows_case<__half>(place_rows_f16, "place_rows_f16");
  printf("%s\n", failures ? "FAILURES" : "all ok");
  return failures != 0;
}
