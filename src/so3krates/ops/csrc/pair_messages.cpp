// The message chain of one fused transformer layer, summed over each centre atom's edges, for edges in pair
// order (edge p + P is edge p reversed, P = E / 2) whose filters are given once per pair.
// See so3krates/ops/pair_messages.py for the equations and why this is written by hand.
//
// Per edge e = (i, j) with pair p:   s_h  = Σ_{f ∈ head h} q_i[f] w_p[f] k_j[f]           (head sums)
//                                    c_h  = s_h · scale_h · φ_e                           (α_ij, β_ij)
//                                    U_i += [c_{h(f)} v_j[f] for f < F | c_{h(m)} Y_e[m] for m < S]
// The filter row w_p is given, or given plus the radial part read from a cubic spline in the pair's distance
// d_p (so3krates/ops/spline.py: c0 + t c1 + t² c2 + t³ c3 on the interval of d_p), or that radial part
// alone; with the spline the backward pass returns ∂E/∂d_p, and the radial rows never exist in memory.
// Pair by pair, both edges of a pair at once: each filter row is read once, in order, forward and backward,
// and each pair's filter gradient written once. A thread adds its pairs' contributions to per-atom rows of
// its own (the first thread into the result, the others into scratch rows summed afterwards in a fixed
// order), so no row is written by two threads and the numbers are the same on every call.
// Whole graph (pair_messages, ..._backward): the pairs split evenly among torch's intra-op threads.
// Blocks (pair_messages_block, ..._backward): one block of pairs on the calling thread, adding into per-atom
// buffers that the caller owns (one set per thread of blocks).
// ATen and the operator registry only: no Python headers are needed to build it.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <vector>

namespace {

constexpr int kMaxHeads = 64;
// Pairs per thread below which a whole-graph call uses fewer threads (scratch rows are not free).
constexpr int64_t kMinPairsPerThread = 512;
// Pairs ahead whose neighbour atom's rows are prefetched.
constexpr int64_t kAhead = 2;

// Contiguous ranges of features [start, stop) that belong to one head: rows of an (R, 3) int32 tensor.
struct Ranges {
  const int* r;
  int n;
  int start(int t) const { return r[3 * t]; }
  int stop(int t) const { return r[3 * t + 1]; }
  int head(int t) const { return r[3 * t + 2]; }
};

template <typename T>
inline void head_sums(const T* q, const T* w, const T* k, Ranges in, T* s) {
  for (int t = 0; t < in.n; ++t) {
    T acc = 0;
#pragma omp simd reduction(+ : acc)
    for (int f = in.start(t); f < in.stop(t); ++f) acc += q[f] * w[f] * k[f];
    s[in.head(t)] = acc;
  }
}

// ∂E/∂c_h of one edge: the incoming gradient of its centre atom against the values it multiplies.
template <typename T>
inline void coefficient_grads(const T* g, const T* v, const T* y, int64_t F, Ranges out, T* gc) {
  for (int t = 0; t < out.n; ++t) {
    const int lo = out.start(t), hi = out.stop(t);
    const T* value = lo < F ? v : y - F;
    T acc = 0;
#pragma omp simd reduction(+ : acc)
    for (int f = lo; f < hi; ++f) acc += g[f] * value[f];
    gc[out.head(t)] = acc;
  }
}

// Asks for the rows of a later pair's neighbour atom (random in memory) while this pair computes.
template <typename T>
inline void prefetch_rows(const T* row, int64_t length) {
  for (int64_t f = 0; f < length; f += 64 / sizeof(T)) __builtin_prefetch(row + f);
}

// The rows of atom j that a later pair reads: queries, keys and values, and (backward) its incoming gradient.
template <typename T>
inline void prefetch_atom(int64_t j, const T* q, const T* kv, int64_t W, int64_t KVW, const T* g, int64_t C) {
  prefetch_rows(kv + j * KVW, KVW);
  prefetch_rows(q + j * W, W);
  if (g != nullptr) prefetch_rows(g + j * C, C);
}

// The radial spline of one layer's filters (absent: table == nullptr): per pair its distance d, and per
// interval the four coefficient rows c0..c3 side by side, (n_intervals, 4, W).
template <typename T>
struct Radial {
  const T *d, *table;
  int64_t n_intervals;
  T inv_spacing, end;
};

// The checked inputs of one call: data pointers and shapes (W: queries' width, KVW: keys' and values', F:
// values', S: Y's, P: pairs, H: heads). w == nullptr: the filters are the spline's radial part alone.
template <typename T>
struct Inputs {
  const T *q, *kv, *w, *phi, *y, *scale;
  const int64_t *idx_i, *idx_j;
  int64_t n, W, KVW, F, S, P;
  int H;
  Ranges in, out;
  Radial<T> radial;
};

// Where pair p's distance falls in the spline: its interval's coefficient rows and t ∈ [0, 1]; inside is
// false where d was clamped to [0, end] (there the radial part does not change with d).
template <typename T>
struct Knot {
  const T* c;
  T t;
  bool inside;
};

template <typename T>
inline Knot<T> knot(const Radial<T>& r, int64_t p, int64_t W) {
  const T d = r.d[p];
  const T s = std::min(std::max(d, T(0)), r.end) * r.inv_spacing;
  const T g = std::min(std::floor(s), T(r.n_intervals - 1));
  return {r.table + static_cast<int64_t>(g) * 4 * W, s - g, d >= T(0) && d <= r.end};
}

// Pair p's filter row: the given row, or (with a spline) the given row plus the radial part, or the radial
// part alone, written into buf.
template <typename T>
inline const T* filter_row(const Inputs<T>& x, int64_t p, T* buf) {
  const int64_t W = x.W;
  if (x.radial.table == nullptr) return x.w + p * W;
  const Knot<T> k = knot(x.radial, p, W);
  const T t = k.t, t2 = t * t, t3 = t2 * t;
  const T *c0 = k.c, *c1 = c0 + W, *c2 = c1 + W, *c3 = c2 + W;
  if (x.w != nullptr) {
    const T* base = x.w + p * W;
#pragma omp simd
    for (int64_t f = 0; f < W; ++f) buf[f] = base[f] + ((c0[f] + t * c1[f]) + (t2 * c2[f] + t3 * c3[f]));
  } else {
#pragma omp simd
    for (int64_t f = 0; f < W; ++f) buf[f] = (c0[f] + t * c1[f]) + (t2 * c2[f] + t3 * c3[f]);
  }
  return buf;
}

// ∂E/∂d_p from the gradient of pair p's filter row: Σ_f dw[f] ∂S_f/∂t / spacing (0 where d was clamped).
template <typename T>
inline T distance_grad(const Radial<T>& r, int64_t p, int64_t W, const T* dw) {
  const Knot<T> k = knot(r, p, W);
  if (!k.inside) return T(0);
  const T t2 = 2 * k.t, t3 = 3 * k.t * k.t;
  const T *c1 = k.c + W, *c2 = c1 + W, *c3 = c2 + W;
  T acc = 0;
#pragma omp simd reduction(+ : acc)
  for (int64_t f = 0; f < W; ++f) acc += dw[f] * (c1[f] + t2 * c2[f] + t3 * c3[f]);
  return acc * r.inv_spacing;
}

// The pairs [p0, p1): edge p = (a, b) into U_a and its reverse p + P = (b, a) into U_b.
template <typename T>
void pairs_forward(const Inputs<T>& x, int64_t p0, int64_t p1, T* u) {
  const T *q = x.q, *kv = x.kv, *phi = x.phi, *y = x.y, *scale = x.scale;
  const int64_t *idx_i = x.idx_i, *idx_j = x.idx_j, W = x.W, KVW = x.KVW, F = x.F, S = x.S, P = x.P, C = F + S;
  const int H = x.H;
  const Ranges in = x.in, out = x.out;
  T s[kMaxHeads];
  std::vector<T> row(x.radial.table != nullptr ? W : 0);
  for (int64_t p = p0; p < p1; ++p) {
    const int64_t a = idx_i[p], b = idx_j[p];
    if (p + kAhead < p1) prefetch_atom<T>(idx_j[p + kAhead], q, kv, W, KVW, nullptr, C);
    const int64_t edge[2] = {p, p + P}, centre[2] = {a, b}, other[2] = {b, a};
    const T* wp = filter_row(x, p, row.data());
    for (int d = 0; d < 2; ++d) {
      const int64_t e = edge[d];
      const T* kj = kv + other[d] * KVW;
      head_sums(q + centre[d] * W, wp, kj, in, s);
      for (int h = 0; h < H; ++h) s[h] *= scale[h] * phi[e];
      T* ui = u + centre[d] * C;
      for (int t = 0; t < out.n; ++t) {
        const int lo = out.start(t), hi = out.stop(t);
        const T c = s[out.head(t)];
        const T* value = lo < F ? kj + W : y + e * S - F;
#pragma omp simd
        for (int f = lo; f < hi; ++f) ui[f] += c * value[f];
      }
    }
  }
}

// The backward pass of pairs_forward for ∂E/∂U = g: adds into dq and dkv, writes the pairs' rows of dw (where
// the filters were given), their edges' rows of dphi and dy, and with a spline the pairs' dd.
template <typename T>
void pairs_backward(const Inputs<T>& x, const T* g, int64_t p0, int64_t p1, T* dq, T* dkv, T* dw, T* dphi, T* dy,
                    T* dd) {
  const T *q = x.q, *kv = x.kv, *phi = x.phi, *y = x.y, *scale = x.scale;
  const int64_t *idx_i = x.idx_i, *idx_j = x.idx_j, W = x.W, KVW = x.KVW, F = x.F, S = x.S, P = x.P, C = F + S;
  const int H = x.H;
  const Ranges in = x.in, out = x.out;
  T s[2][kMaxHeads], gs[2][kMaxHeads];
  const bool spline = x.radial.table != nullptr;
  std::vector<T> row(spline ? W : 0), grad_row(spline && x.w == nullptr ? W : 0);
  for (int64_t p = p0; p < p1; ++p) {
    const int64_t a = idx_i[p], b = idx_j[p];
    if (p + kAhead < p1) prefetch_atom(idx_j[p + kAhead], q, kv, W, KVW, g, C);
    const int64_t edge[2] = {p, p + P}, centre[2] = {a, b}, other[2] = {b, a};
    const T* wp = filter_row(x, p, row.data());
    for (int d = 0; d < 2; ++d) {
      const int64_t e = edge[d];
      const T *qi = q + centre[d] * W, *kvj = kv + other[d] * KVW, *gi = g + centre[d] * C;
      head_sums(qi, wp, kvj, in, s[d]);
      coefficient_grads(gi, kvj + W, y + e * S, F, out, gs[d]);
      T dphi_e = 0;
      for (int h = 0; h < H; ++h) {
        dphi_e += gs[d][h] * s[d][h] * scale[h];
        gs[d][h] *= scale[h] * phi[e];  // ∂E/∂s_h of e
        s[d][h] *= scale[h] * phi[e];   // c_h of e
      }
      dphi[e] = dphi_e;
      T* dvj = dkv + other[d] * KVW + W;
      for (int t = 0; t < out.n; ++t) {
        const int lo = out.start(t), hi = out.stop(t);
        const T c = s[d][out.head(t)];
        if (lo >= F) {
          T* dye = dy + e * S - F;
          for (int f = lo; f < hi; ++f) dye[f] = c * gi[f];
        } else {
#pragma omp simd
          for (int f = lo; f < hi; ++f) dvj[f] += c * gi[f];
        }
      }
      T *dqi = dq + centre[d] * W, *dkj = dkv + other[d] * KVW;
      for (int t = 0; t < in.n; ++t) {
        const int lo = in.start(t), hi = in.stop(t);
        const T gh = gs[d][in.head(t)];
#pragma omp simd
        for (int f = lo; f < hi; ++f) {
          dqi[f] += gh * wp[f] * kvj[f];
          dkj[f] += gh * qi[f] * wp[f];
        }
      }
    }
    const T *qa = q + a * W, *qb = q + b * W, *ka = kv + a * KVW, *kb = kv + b * KVW;
    T* dwp = x.w != nullptr ? dw + p * W : grad_row.data();
    for (int t = 0; t < in.n; ++t) {
      const int lo = in.start(t), hi = in.stop(t), h = in.head(t);
      const T x_e = gs[0][h], x_r = gs[1][h];
#pragma omp simd
      for (int f = lo; f < hi; ++f) dwp[f] = x_e * qa[f] * kb[f] + x_r * qb[f] * ka[f];
    }
    if (spline) dd[p] = distance_grad(x.radial, p, W, dwp);
  }
}

// How many threads a whole-graph call of P pairs uses, and the pairs of thread k: [P k / T, P (k + 1) / T).
int64_t threads_for(int64_t P) {
  return std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), P / kMinPairsPerThread));
}

int64_t part_start(int64_t P, int64_t k, int64_t T) { return P * k / T; }

template <typename T>
Inputs<T> check(const at::Tensor& q, const at::Tensor& kv, const at::Tensor& w, const at::Tensor& phi,
                const at::Tensor& y, const at::Tensor& d, const at::Tensor& table, double spacing,
                const at::Tensor& idx_i, const at::Tensor& idx_j, const at::Tensor& ranges_in,
                const at::Tensor& ranges_out, const at::Tensor& scale, int64_t F) {
  for (const auto* t : {&q, &kv, &w, &phi, &y, &d, &table, &scale})
    TORCH_CHECK(t->device().is_cpu() && t->scalar_type() == q.scalar_type() && t->is_contiguous(),
                "pair_messages: every float input must be a contiguous CPU tensor of one dtype");
  TORCH_CHECK(idx_i.scalar_type() == at::kLong && idx_j.scalar_type() == at::kLong,
              "pair_messages: edge indices must be int64");
  TORCH_CHECK(ranges_in.scalar_type() == at::kInt && ranges_out.scalar_type() == at::kInt,
              "pair_messages: head ranges must be int32");
  const int64_t E = idx_i.size(0), W = q.size(1);
  // An absent input is an empty 1-d tensor (not 2- or 3-d).
  const bool given = w.dim() == 2, spline = table.dim() == 3;
  TORCH_CHECK(E % 2 == 0, "pair_messages: edges must come in pairs");
  TORCH_CHECK(given || spline, "pair_messages: filters or a radial spline (or both) are needed");
  TORCH_CHECK(!given || (w.dim() == 2 && w.size(0) == E / 2 && w.size(1) == W),
              "pair_messages: the filters must have one row per pair, as wide as the queries");
  TORCH_CHECK(!spline || (table.dim() == 3 && table.size(1) == 4 && table.size(2) == W && d.dim() == 1 &&
                          d.size(0) == E / 2 && table.size(0) > 0 && spacing > 0),
              "pair_messages: the radial spline must be (intervals, 4, queries' width), with one distance per pair");
  TORCH_CHECK(phi.size(0) == E && y.size(0) == E && idx_j.size(0) == E, "pair_messages: per-edge sizes differ");
  TORCH_CHECK(scale.size(0) <= kMaxHeads, "pair_messages: at most ", kMaxHeads, " heads");
  // Pair order is what the backward pass relies on: edge e + P is edge e reversed. O(edges), checked.
  const int64_t *ii = idx_i.data_ptr<int64_t>(), *jj = idx_j.data_ptr<int64_t>(), n = q.size(0), P = E / 2;
  for (int64_t e = 0; e < P; ++e) {
    TORCH_CHECK(ii[e] == jj[e + P] && jj[e] == ii[e + P], "pair_messages: edges are not in pair order (edge ",
                e + P, " is not edge ", e, " reversed)");
    TORCH_CHECK(jj[e] >= 0 && jj[e] < n && ii[e] >= 0 && ii[e] < n, "pair_messages: atom index out of range ",
                "for ", n, " atoms");
  }
  const Radial<T> radial{spline ? d.data_ptr<T>() : nullptr,
                         spline ? table.data_ptr<T>() : nullptr,
                         spline ? table.size(0) : 0,
                         static_cast<T>(1.0 / spacing),
                         static_cast<T>(spacing * (spline ? table.size(0) : 0))};
  return {q.data_ptr<T>(),
          kv.data_ptr<T>(),
          given ? w.data_ptr<T>() : nullptr,
          phi.data_ptr<T>(),
          y.data_ptr<T>(),
          scale.data_ptr<T>(),
          ii,
          jj,
          n,
          q.size(1),
          kv.size(1),
          F,
          y.size(1),
          P,
          static_cast<int>(scale.size(0)),
          {ranges_in.data_ptr<int>(), static_cast<int>(ranges_in.size(0))},
          {ranges_out.data_ptr<int>(), static_cast<int>(ranges_out.size(0))},
          radial};
}

}  // namespace

#define SO3KRATES_CHECK(scalar) \
  check<scalar>(q, kv, w, phi, y, d, table, spacing, idx_i, idx_j, ranges_in, ranges_out, scale, F)


at::Tensor pair_messages(at::Tensor q, at::Tensor kv, at::Tensor w, at::Tensor phi, at::Tensor y, at::Tensor d,
                         at::Tensor table, double spacing, at::Tensor idx_i, at::Tensor idx_j,
                         at::Tensor ranges_in, at::Tensor ranges_out, at::Tensor scale, int64_t F) {
  at::Tensor u;
  AT_DISPATCH_FLOATING_TYPES(q.scalar_type(), "pair_messages", [&] {
    const auto x = SO3KRATES_CHECK(scalar_t);
    const int64_t T = threads_for(x.P);
    // Rows of thread 0 are the result; threads 1.. add into scratch rows of their own, summed in order.
    u = at::zeros({T, x.n, x.F + x.S}, q.options());
    at::parallel_for(0, T, 1, [&](int64_t begin, int64_t end) {
      for (int64_t k = begin; k < end; ++k)
        pairs_forward(x, part_start(x.P, k, T), part_start(x.P, k + 1, T), u[k].data_ptr<scalar_t>());
    });
  });
  for (int64_t k = 1; k < u.size(0); ++k) u[0].add_(u[k]);
  return u[0];
}

using Grads = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

Grads pair_messages_backward(at::Tensor grad, at::Tensor q, at::Tensor kv, at::Tensor w, at::Tensor phi,
                             at::Tensor y, at::Tensor d, at::Tensor table, double spacing, at::Tensor idx_i,
                             at::Tensor idx_j, at::Tensor ranges_in, at::Tensor ranges_out, at::Tensor scale,
                             int64_t F) {
  grad = grad.contiguous();
  // Every row of these is written (each pair's once, each edge's once); an absent input's gradient is as empty.
  auto dw = at::empty_like(w), dphi = at::empty_like(phi), dy = at::empty_like(y), dd = at::empty_like(d);
  at::Tensor dq, dkv;
  AT_DISPATCH_FLOATING_TYPES(q.scalar_type(), "pair_messages_backward", [&] {
    const auto x = SO3KRATES_CHECK(scalar_t);
    const int64_t T = threads_for(x.P);
    dq = at::zeros({T, x.n, x.W}, q.options());
    dkv = at::zeros({T, x.n, x.KVW}, q.options());
    at::parallel_for(0, T, 1, [&](int64_t begin, int64_t end) {
      for (int64_t k = begin; k < end; ++k)
        pairs_backward(x, grad.data_ptr<scalar_t>(), part_start(x.P, k, T), part_start(x.P, k + 1, T),
                       dq[k].data_ptr<scalar_t>(), dkv[k].data_ptr<scalar_t>(), dw.data_ptr<scalar_t>(),
                       dphi.data_ptr<scalar_t>(), dy.data_ptr<scalar_t>(), dd.data_ptr<scalar_t>());
    });
  });
  for (int64_t k = 1; k < dq.size(0); ++k) {
    dq[0].add_(dq[k]);
    dkv[0].add_(dkv[k]);
  }
  return {dq[0], dkv[0], dw, dphi, dy, dd};
}

void pair_messages_block(at::Tensor u, at::Tensor q, at::Tensor kv, at::Tensor w, at::Tensor phi, at::Tensor y,
                         at::Tensor d, at::Tensor table, double spacing, at::Tensor idx_i, at::Tensor idx_j,
                         at::Tensor ranges_in, at::Tensor ranges_out, at::Tensor scale, int64_t F) {
  AT_DISPATCH_FLOATING_TYPES(q.scalar_type(), "pair_messages_block", [&] {
    const auto x = SO3KRATES_CHECK(scalar_t);
    TORCH_CHECK(u.is_contiguous() && u.scalar_type() == q.scalar_type() && u.size(0) == x.n &&
                    u.size(1) == x.F + x.S,
                "pair_messages_block: the sums must be a contiguous (n_atoms, F + n_sph) tensor of the same dtype");
    pairs_forward(x, 0, x.P, u.data_ptr<scalar_t>());
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> pair_messages_block_backward(
    at::Tensor dq, at::Tensor dkv, at::Tensor grad, at::Tensor q, at::Tensor kv, at::Tensor w, at::Tensor phi,
    at::Tensor y, at::Tensor d, at::Tensor table, double spacing, at::Tensor idx_i, at::Tensor idx_j,
    at::Tensor ranges_in, at::Tensor ranges_out, at::Tensor scale, int64_t F) {
  grad = grad.contiguous();
  auto dw = at::empty_like(w), dphi = at::empty_like(phi), dy = at::empty_like(y), dd = at::empty_like(d);
  AT_DISPATCH_FLOATING_TYPES(q.scalar_type(), "pair_messages_block_backward", [&] {
    const auto x = SO3KRATES_CHECK(scalar_t);
    TORCH_CHECK(dq.is_contiguous() && dkv.is_contiguous() && dq.sizes() == q.sizes() &&
                    dkv.sizes() == kv.sizes() && dq.scalar_type() == q.scalar_type() &&
                    dkv.scalar_type() == q.scalar_type(),
                "pair_messages_block_backward: the gradient buffers must be contiguous and shaped as the inputs");
    TORCH_CHECK(grad.size(0) == x.n && grad.size(1) == x.F + x.S, "pair_messages_block_backward: grad shape");
    pairs_backward(x, grad.data_ptr<scalar_t>(), 0, x.P, dq.data_ptr<scalar_t>(), dkv.data_ptr<scalar_t>(),
                   dw.data_ptr<scalar_t>(), dphi.data_ptr<scalar_t>(), dy.data_ptr<scalar_t>(), dd.data_ptr<scalar_t>());
  });
  return {dw, dphi, dy, dd};
}

// Registered with the dispatcher (not as a Python module), so that compiled programs call it directly.
// Shapes for tracing and the autograd formula are registered from Python (so3krates/ops/pair_messages.py).
TORCH_LIBRARY(so3krates, m) {
  m.def(
      "pair_messages(Tensor queries, Tensor keys_values, Tensor filters, Tensor cutoff, Tensor sph, "
      "Tensor distances, Tensor spline, float spacing, Tensor idx_i, Tensor idx_j, Tensor ranges_in, "
      "Tensor ranges_out, Tensor scale, int n_features) -> Tensor");
  m.def(
      "pair_messages_backward(Tensor grad, Tensor queries, Tensor keys_values, Tensor filters, Tensor cutoff, "
      "Tensor sph, Tensor distances, Tensor spline, float spacing, Tensor idx_i, Tensor idx_j, "
      "Tensor ranges_in, Tensor ranges_out, Tensor scale, int n_features) "
      "-> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
  m.def(
      "pair_messages_block(Tensor(a!) sums, Tensor queries, Tensor keys_values, Tensor filters, Tensor cutoff, "
      "Tensor sph, Tensor distances, Tensor spline, float spacing, Tensor idx_i, Tensor idx_j, "
      "Tensor ranges_in, Tensor ranges_out, Tensor scale, int n_features) -> ()");
  m.def(
      "pair_messages_block_backward(Tensor(a!) grad_queries, Tensor(b!) grad_keys_values, Tensor grad, "
      "Tensor queries, Tensor keys_values, Tensor filters, Tensor cutoff, Tensor sph, Tensor distances, "
      "Tensor spline, float spacing, Tensor idx_i, Tensor idx_j, Tensor ranges_in, Tensor ranges_out, "
      "Tensor scale, int n_features) -> (Tensor, Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(so3krates, CPU, m) {
  m.impl("pair_messages", &pair_messages);
  m.impl("pair_messages_backward", &pair_messages_backward);
  m.impl("pair_messages_block", &pair_messages_block);
  m.impl("pair_messages_block_backward", &pair_messages_block_backward);
}
