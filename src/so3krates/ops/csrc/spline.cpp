// Rows of the radial spline (so3krates/ops/spline.py) for the plans with hand-written kernels: for each
// argument x, value[c] = c0 + t c1 + t² c2 + t³ c3 on its interval, all columns at once from one contiguous
// (4, C) block of the packed coefficients; the backward pass is Σ_c g[c] ∂value[c]/∂x per row. Rows are
// split among torch's intra-op threads; each row is written by one thread.
// Why by hand: compiled programs fused the backward pass's gathers of three coefficient rows with the sums
// of forces and ran it as one of the slowest kernels of a call (999 water, aoti: 21 ms of 120).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>

namespace {

constexpr int64_t kRowsPerTask = 256;

template <typename T>
struct Position {
  int64_t interval;
  T t;
};

// The interval and the position t ∈ [0, 1] in it of x, clamped to [0, end] as in evaluate_spline.
template <typename T>
inline Position<T> locate(T x, T end, T inverse_spacing, int64_t intervals) {
  const T s = std::min(std::max(x, T(0)), end) * inverse_spacing;
  const int64_t g = std::min<int64_t>(static_cast<int64_t>(std::floor(s)), intervals - 1);
  return {g, s - static_cast<T>(g)};
}

template <typename T>
void rows_forward(const T* x, const T* c, int64_t n, int64_t K, int64_t C, T spacing, T end, T* out) {
  at::parallel_for(0, n, kRowsPerTask, [&](int64_t begin, int64_t stop) {
    for (int64_t r = begin; r < stop; ++r) {
      const Position<T> at_x = locate(x[r], end, T(1) / spacing, K);
      const T t = at_x.t, t2 = t * t, t3 = t2 * t;
      const T* row = c + at_x.interval * 4 * C;
      T* o = out + r * C;
#pragma omp simd
      for (int64_t f = 0; f < C; ++f) o[f] = (row[f] + t * row[C + f]) + (t2 * row[2 * C + f] + t3 * row[3 * C + f]);
    }
  });
}

template <typename T>
void rows_backward(const T* grad, const T* x, const T* c, int64_t n, int64_t K, int64_t C, T spacing, T end,
                   T* dx) {
  at::parallel_for(0, n, kRowsPerTask, [&](int64_t begin, int64_t stop) {
    for (int64_t r = begin; r < stop; ++r) {
      if (!(x[r] >= T(0) && x[r] <= end)) {  // clamped: the value does not depend on x there
        dx[r] = 0;
        continue;
      }
      const Position<T> at_x = locate(x[r], end, T(1) / spacing, K);
      const T two_t = 2 * at_x.t, three_t2 = 3 * at_x.t * at_x.t;
      const T* row = c + at_x.interval * 4 * C;
      const T* g = grad + r * C;
      T acc = 0;
#pragma omp simd reduction(+ : acc)
      for (int64_t f = 0; f < C; ++f) acc += g[f] * (row[C + f] + two_t * row[2 * C + f] + three_t2 * row[3 * C + f]);
      dx[r] = acc / spacing;
    }
  });
}

void check(const at::Tensor& x, const at::Tensor& coefficients) {
  TORCH_CHECK(x.device().is_cpu() && coefficients.device().is_cpu() && x.scalar_type() == coefficients.scalar_type(),
              "spline_rows: x and the coefficients must be CPU tensors of one dtype");
  TORCH_CHECK(x.dim() == 1 && x.is_contiguous(), "spline_rows: x must be a contiguous 1-d tensor");
  TORCH_CHECK(coefficients.dim() == 3 && coefficients.size(1) == 4 && coefficients.size(0) >= 1 &&
                  coefficients.is_contiguous(),
              "spline_rows: the coefficients must be a contiguous (intervals, 4, columns) tensor");
}

}  // namespace

at::Tensor spline_rows(at::Tensor x, at::Tensor coefficients, double spacing, double end) {
  check(x, coefficients);
  auto out = at::empty({x.size(0), coefficients.size(2)}, coefficients.options());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "spline_rows", [&] {
    rows_forward<scalar_t>(x.data_ptr<scalar_t>(), coefficients.data_ptr<scalar_t>(), x.size(0),
                           coefficients.size(0), coefficients.size(2), static_cast<scalar_t>(spacing),
                           static_cast<scalar_t>(end), out.data_ptr<scalar_t>());
  });
  return out;
}

at::Tensor spline_rows_backward(at::Tensor grad, at::Tensor x, at::Tensor coefficients, double spacing, double end) {
  check(x, coefficients);
  grad = grad.contiguous();
  TORCH_CHECK(grad.dim() == 2 && grad.size(0) == x.size(0) && grad.size(1) == coefficients.size(2) &&
                  grad.scalar_type() == x.scalar_type(),
              "spline_rows_backward: the gradient must be (rows, columns) of the same dtype");
  auto dx = at::empty_like(x);
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "spline_rows_backward", [&] {
    rows_backward<scalar_t>(grad.data_ptr<scalar_t>(), x.data_ptr<scalar_t>(), coefficients.data_ptr<scalar_t>(),
                            x.size(0), coefficients.size(0), coefficients.size(2), static_cast<scalar_t>(spacing),
                            static_cast<scalar_t>(end), dx.data_ptr<scalar_t>());
  });
  return dx;
}

TORCH_LIBRARY_FRAGMENT(so3krates, m) {
  m.def("spline_rows(Tensor x, Tensor coefficients, float spacing, float end) -> Tensor");
  m.def("spline_rows_backward(Tensor grad, Tensor x, Tensor coefficients, float spacing, float end) -> Tensor");
}

TORCH_LIBRARY_IMPL(so3krates, CPU, m) {
  m.impl("spline_rows", &spline_rows);
  m.impl("spline_rows_backward", &spline_rows_backward);
}
