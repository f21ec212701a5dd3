// The message chain of one fused transformer layer, summed over each centre atom's edges, for edges in pair
// order (edge p + P is edge p reversed, P = E / 2) whose filters are given once per pair.
// See so3krates/ops/pair_messages.py for the equations and why this is written by hand.
//
// Per edge e = (i, j) with pair p:   s_h  = Σ_{f ∈ head h} q_i[f] w_p[f] k_j[f]           (head sums)
//                                    c_h  = s_h · scale_h · φ_e                           (α_ij, β_ij)
//                                    U_i += [c_{h(f)} v_j[f] for f < F | c_{h(m)} Y_e[m] for m < S]
// The filter row w_p is the sum of up to three parts, each optional: a given row; the radial part read from a
// cubic spline in the pair's distance d_p (so3krates/ops/spline.py: c0 + t c1 + t² c2 + t³ c3 on the
// interval of d_p); and the spherical part, the last layer of the spherical filter MLP, Σ_k h_p[b, k] V[b, k, f]
// per branch b (h_p: the MLP's hidden row of the pair). With the spline the backward pass returns ∂E/∂d_p,
// with the spherical part ∂E/∂h_p, and the (pairs × B·F) filters never exist in memory.
// Pair by pair, both edges of a pair at once: each filter row is read once, in order, forward and backward,
// and each pair's filter gradient written once. A thread adds its pairs' contributions to per-atom rows of
// its own (the first thread into the result, the others into scratch rows summed afterwards in a fixed
// order), so no row is written by two threads and the numbers are the same on every call.
// Whole graph (pair_messages, ..._backward): the pairs split evenly among torch's intra-op threads, or, where
// the caller runs torch on one thread and allows the kernel more (set_kernel_threads), between the calling
// thread and a helper thread of the kernel's own (Helper).
// Blocks (pair_messages_block, ..._backward): one block of pairs on the calling thread, adding into per-atom
// buffers that the caller owns (one set per thread of blocks).
// ATen and the operator registry only: no Python headers are needed to build it.
#include <ATen/ATen.h>
#include <ATen/EmptyTensor.h>
#include <ATen/Parallel.h>
#include <ATen/ops/mm_cpu_dispatch.h>
#if defined(__AVX512F__)
#include <immintrin.h>
#endif
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <cstring>
#include <vector>

#include "helper.h"

namespace {

constexpr int kMaxHeads = 64;
// Hidden units of the spherical filter MLP, all branches (the paper model: 2 × 33).
constexpr int64_t kMaxHidden = 512;
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

#if defined(__AVX512F__)
// float on AVX-512: each range's products summed in one vector with masked loads for its last chunk, then
// added across lanes in a tree. The generic versions above leave the lane sums of their `omp simd` reductions
// to GCC, which adds the 16 lanes one after another, a chain of dependent additions per head; at molecule
// sizes, where the rows are in the cache, those chains were a quarter of the forward pass.
inline __mmask16 lanes_below(int n) { return n >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << n) - 1u); }

inline float range_sum(const float* a, const float* b, const float* c, int lo, int hi) {
  __m512 acc = _mm512_setzero_ps();
  for (int f = lo; f < hi; f += 16) {
    const __mmask16 m = lanes_below(hi - f);
    const __m512 ab = _mm512_mul_ps(_mm512_maskz_loadu_ps(m, a + f), _mm512_maskz_loadu_ps(m, b + f));
    acc = _mm512_fmadd_ps(ab, _mm512_maskz_loadu_ps(m, c + f), acc);
  }
  return _mm512_reduce_add_ps(acc);
}

inline float range_dot(const float* a, const float* b, int lo, int hi) {
  __m512 acc = _mm512_setzero_ps();
  for (int f = lo; f < hi; f += 16) {
    const __mmask16 m = lanes_below(hi - f);
    acc = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(m, a + f), _mm512_maskz_loadu_ps(m, b + f), acc);
  }
  return _mm512_reduce_add_ps(acc);
}

template <>
inline void head_sums<float>(const float* q, const float* w, const float* k, Ranges in, float* s) {
  for (int t = 0; t < in.n; ++t) s[in.head(t)] = range_sum(q, w, k, in.start(t), in.stop(t));
}

template <>
inline void coefficient_grads<float>(const float* g, const float* v, const float* y, int64_t F, Ranges out,
                                     float* gc) {
  for (int t = 0; t < out.n; ++t) {
    const int lo = out.start(t), hi = out.stop(t);
    gc[out.head(t)] = range_dot(g, lo < F ? v : y - F, lo, hi);
  }
}
#endif

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

// The spherical part of the filters (absent: h == nullptr): per pair the hidden row h (B·K), and the last
// layer's weights per branch, V (B, K, Fb), V with its rows padded with zeros to Fbp columns (a multiple of
// kLanes; group_product) and V's transpose Vt (B, Fb, K), each made only where a call needs it (check);
// B·Fb = W.
template <typename T>
struct Spherical {
  const T *h, *v, *vp, *vt;
  int64_t B, K, Fb, Fbp;
};

// The checked inputs of one call: data pointers and shapes (W: queries' width, KVW: keys' and values', F:
// values', S: Y's, P: pairs, H: heads). w == nullptr: no given filter rows.
template <typename T>
struct Inputs {
  const T *q, *kv, *w, *phi, *y, *scale;
  const int64_t *idx_i, *idx_j;
  int64_t n, W, KVW, F, S, P;
  int H;
  Ranges in, out;
  Radial<T> radial;
  Spherical<T> spherical;
  // Width of a row kept for the backward pass (pair_messages): the pair's filter row and its two edges'
  // head sums.
  int64_t kept_width() const { return W + 2 * H; }
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

// The spherical products run over groups of kGroup pairs: each weight vector loaded is used for every pair
// of the group (a pair alone would read all of V, ~35 KB in the paper model, from the L2 cache per pair).
// Accumulators: kGroup × kLanes values, kept in vector registers (8 AVX-512 registers of float).
constexpr int64_t kGroup = 8;
constexpr int64_t kLanes = 16;

// out[i, f] += Σ_k h[i, k] v[k, f] for the kGroup rows i of a group (h's rows hs apart, out's os apart), f <
// Fb; v's rows are Fbp = Fb rounded up to kLanes apart, zero past Fb, so that the last Fb mod kLanes columns
// (the paper model: 4 of 132) run as one more chunk of kLanes, only partly stored. As scalar sums over k, one
// chain of dependent additions per column and row, those 4 columns took longer than the other 128.
template <typename T>
inline void group_product(const T* h, int64_t hs, const T* v, int64_t K, int64_t Fb, int64_t Fbp, T* out,
                          int64_t os) {
  for (int64_t f0 = 0; f0 < Fb; f0 += kLanes) {
    const int64_t n = std::min(kLanes, Fb - f0);
    T acc[kGroup][kLanes];
    for (int64_t i = 0; i < kGroup; ++i)
#pragma omp simd
      for (int64_t j = 0; j < kLanes; ++j) acc[i][j] = j < n ? out[i * os + f0 + j] : T(0);
    for (int64_t k = 0; k < K; ++k) {
      const T* row = v + k * Fbp + f0;
#pragma GCC unroll 8
      for (int64_t i = 0; i < kGroup; ++i) {
        const T hik = h[i * hs + k];
#pragma omp simd
        for (int64_t j = 0; j < kLanes; ++j) acc[i][j] += hik * row[j];
      }
    }
    for (int64_t i = 0; i < kGroup; ++i)
#pragma omp simd
      for (int64_t j = 0; j < kLanes; ++j)
        if (j < n) out[i * os + f0 + j] = acc[i][j];
  }
}

// The filter rows of pairs [g0, g1) (at most kGroup) into buf (kGroup rows of W): the given row, plus the
// spline's radial part, plus the spherical part; rows past g1 (the last group of a range) stay zero.
template <typename T>
void filter_rows(const Inputs<T>& x, int64_t g0, int64_t g1, T* buf) {
  const int64_t W = x.W;
  std::fill(buf + (g1 - g0) * W, buf + kGroup * W, T(0));
  for (int64_t p = g0; p < g1; ++p) {
    T* out = buf + (p - g0) * W;
    const T* base = x.w != nullptr ? x.w + p * W : nullptr;
    if (x.radial.table != nullptr) {
      const Knot<T> k = knot(x.radial, p, W);
      const T t = k.t, t2 = t * t, t3 = t2 * t;
      const T *c0 = k.c, *c1 = c0 + W, *c2 = c1 + W, *c3 = c2 + W;
#pragma omp simd
      for (int64_t f = 0; f < W; ++f) out[f] = (c0[f] + t * c1[f]) + (t2 * c2[f] + t3 * c3[f]);
      if (base != nullptr) {
#pragma omp simd
        for (int64_t f = 0; f < W; ++f) out[f] += base[f];
      }
    } else {
      for (int64_t f = 0; f < W; ++f) out[f] = base != nullptr ? base[f] : T(0);
    }
  }
  const Spherical<T>& sp = x.spherical;
  if (sp.h == nullptr) return;
  const int64_t BK = sp.B * sp.K;
  T hidden[kGroup * kMaxHidden];
  for (int64_t i = 0; i < kGroup; ++i)
    for (int64_t c = 0; c < BK; ++c) hidden[i * BK + c] = g0 + i < g1 ? sp.h[(g0 + i) * BK + c] : T(0);
  for (int64_t b = 0; b < sp.B; ++b)
    group_product(hidden + b * sp.K, BK, sp.vp + b * sp.K * sp.Fbp, sp.K, sp.Fb, sp.Fbp, buf + b * sp.Fb, W);
}

// ∂E/∂h of a group from its pairs' filter-row gradients g[i] (kGroup rows; zero rows past the group's
// end): dh[i, b, k] = Σ_f g[i][b, f] V[b, k, f], through the transpose (vectorized over k: no horizontal
// sums). Writes the rows of the first `count` pairs, dh's rows BK apart.
template <typename T>
void group_hidden_grads(const Spherical<T>& sp, const T* const* g, int64_t count, T* dh) {
  const int64_t BK = sp.B * sp.K;
  for (int64_t b = 0; b < sp.B; ++b) {
    const T* vt = sp.vt + b * sp.Fb * sp.K;
    for (int64_t k0 = 0; k0 + kLanes <= sp.K; k0 += kLanes) {
      T acc[kGroup][kLanes] = {};
      for (int64_t f = 0; f < sp.Fb; ++f) {
        const T* row = vt + f * sp.K + k0;
#pragma GCC unroll 8
        for (int64_t i = 0; i < kGroup; ++i) {
          const T gif = g[i][b * sp.Fb + f];
#pragma omp simd
          for (int64_t j = 0; j < kLanes; ++j) acc[i][j] += gif * row[j];
        }
      }
      for (int64_t i = 0; i < count; ++i)
        for (int64_t j = 0; j < kLanes; ++j) dh[i * BK + b * sp.K + k0 + j] = acc[i][j];
    }
    // The last K mod kLanes units (the paper model: 1 of 33) as dot products with V's rows, not as a
    // chunk of kLanes mostly padded ones.
    for (int64_t k = sp.K / kLanes * kLanes; k < sp.K; ++k) {
      const T* row = sp.v + (b * sp.K + k) * sp.Fb;
      for (int64_t i = 0; i < count; ++i) {
        const T* gi = g[i] + b * sp.Fb;
        T acc = 0;
#pragma omp simd reduction(+ : acc)
        for (int64_t f = 0; f < sp.Fb; ++f) acc += gi[f] * row[f];
        dh[i * BK + b * sp.K + k] = acc;
      }
    }
  }
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

// The pairs [p0, p1): edge p = (a, b) into U_a and its reverse p + P = (b, a) into U_b. keep (or nullptr):
// a row of x.kept_width() per pair, for the pair's filter row and its two edges' head sums.
template <typename T>
void pairs_forward(const Inputs<T>& x, int64_t p0, int64_t p1, T* u, T* keep) {
  const T *q = x.q, *kv = x.kv, *phi = x.phi, *y = x.y, *scale = x.scale;
  const int64_t *idx_i = x.idx_i, *idx_j = x.idx_j, W = x.W, KVW = x.KVW, F = x.F, S = x.S, P = x.P, C = F + S;
  const int H = x.H;
  const Ranges in = x.in, out = x.out;
  T s[kMaxHeads];
  const bool made = x.radial.table != nullptr || x.spherical.h != nullptr;
  std::vector<T> rows(made ? kGroup * W : 0);
  for (int64_t g0 = p0; g0 < p1; g0 += kGroup) {
    const int64_t g1 = std::min(g0 + kGroup, p1);
    if (made) filter_rows(x, g0, g1, rows.data());
    if (keep != nullptr)
      for (int64_t p = g0; p < g1; ++p)
        std::copy(rows.data() + (p - g0) * W, rows.data() + (p - g0 + 1) * W, keep + p * x.kept_width());
    for (int64_t p = g0; p < g1; ++p) {
      const int64_t a = idx_i[p], b = idx_j[p];
      if (p + kAhead < p1) prefetch_atom<T>(idx_j[p + kAhead], q, kv, W, KVW, nullptr, C);
      const int64_t edge[2] = {p, p + P}, centre[2] = {a, b}, other[2] = {b, a};
      const T* wp = made ? rows.data() + (p - g0) * W : x.w + p * W;
      for (int d = 0; d < 2; ++d) {
        const int64_t e = edge[d];
        const T* kj = kv + other[d] * KVW;
        head_sums(q + centre[d] * W, wp, kj, in, s);
        if (keep != nullptr) std::copy(s, s + H, keep + p * x.kept_width() + W + d * H);
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
}

// The pairs' gradients of the filters' parts: rows of dw (given filters), dd (spline), dh (spherical part).
template <typename T>
struct FilterGrads {
  T *dw, *dd, *dh;
};

// The backward pass of pairs_forward for ∂E/∂U = g: adds into dq and dkv, writes the pairs' rows of the
// filters' parts' gradients and their edges' rows of dphi and dy.
template <typename T>
void pairs_backward(const Inputs<T>& x, const T* g, int64_t p0, int64_t p1, T* dq, T* dkv, T* dphi, T* dy,
                    FilterGrads<T> grads, const T* kept) {
  const T *q = x.q, *kv = x.kv, *phi = x.phi, *y = x.y, *scale = x.scale;
  const int64_t *idx_i = x.idx_i, *idx_j = x.idx_j, W = x.W, KVW = x.KVW, F = x.F, S = x.S, P = x.P, C = F + S;
  const int H = x.H;
  const Ranges in = x.in, out = x.out;
  T s[2][kMaxHeads], gs[2][kMaxHeads];
  const bool spline = x.radial.table != nullptr, spherical = x.spherical.h != nullptr, made = spline || spherical;
  std::vector<T> rows(made ? kGroup * W : 0), grad_rows(x.w == nullptr ? kGroup * W : 0), zeros(W, T(0));
  const T* dws[kGroup];
  for (int64_t g0 = p0; g0 < p1; g0 += kGroup) {
    const int64_t g1 = std::min(g0 + kGroup, p1);
    // Kept rows: each pair's filter row, then the head sums of its two edges (pairs_forward).
    const int64_t stride = kept != nullptr ? x.kept_width() : W;
    const T* source = kept != nullptr ? kept + g0 * stride : rows.data();
    if (made && kept == nullptr) filter_rows(x, g0, g1, rows.data());
    for (int64_t p = g0; p < g1; ++p) {
      const int64_t a = idx_i[p], b = idx_j[p];
      if (p + kAhead < p1) prefetch_atom(idx_j[p + kAhead], q, kv, W, KVW, g, C);
      const int64_t edge[2] = {p, p + P}, centre[2] = {a, b}, other[2] = {b, a};
      const T* wp = made ? source + (p - g0) * stride : x.w + p * W;
      for (int d = 0; d < 2; ++d) {
        const int64_t e = edge[d];
        const T *qi = q + centre[d] * W, *kvj = kv + other[d] * KVW, *gi = g + centre[d] * C;
        if (kept != nullptr) {
          std::copy(wp + W + d * H, wp + W + (d + 1) * H, s[d]);
        } else {
          head_sums(qi, wp, kvj, in, s[d]);
        }
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
      T* dwp = x.w != nullptr ? grads.dw + p * W : grad_rows.data() + (p - g0) * W;
      for (int t = 0; t < in.n; ++t) {
        const int lo = in.start(t), hi = in.stop(t), h = in.head(t);
        const T x_e = gs[0][h], x_r = gs[1][h];
#pragma omp simd
        for (int f = lo; f < hi; ++f) dwp[f] = x_e * qa[f] * kb[f] + x_r * qb[f] * ka[f];
      }
      if (spline) grads.dd[p] = distance_grad(x.radial, p, W, dwp);
      dws[p - g0] = dwp;
    }
    if (spherical) {
      for (int64_t i = g1 - g0; i < kGroup; ++i) dws[i] = zeros.data();
      group_hidden_grads(x.spherical, dws, g1 - g0, grads.dh + g0 * x.spherical.B * x.spherical.K);
    }
  }
}

// Pairs per part below which a call does not use the helper even where allowed (the planner allows it from
// 50 edges: Planner.kernel_helper_min_edges).
constexpr int64_t kMinPairsPerHelperPart = 16;

// How many threads a whole-graph call of P pairs uses, and the pairs of thread k: [P k / T, P (k + 1) / T).
int64_t threads_for(int64_t P) {
  if (helper_allowed() && P >= 2 * kMinPairsPerHelperPart) return 2;
  return std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), P / kMinPairsPerThread));
}

// part(k) for each of the T parts of a whole-graph call: on torch's threads, or, where torch runs on one
// thread (threads_for), the second part on the helper.
template <typename Part>
void run_parts(int64_t T, const Part& part) {
  if (T == 2 && helper_allowed()) {
    helper().run([&] { part(0); }, [&] { part(1); });
    return;
  }
  at::parallel_for(0, T, 1, [&](int64_t begin, int64_t end) {
    for (int64_t k = begin; k < end; ++k) part(k);
  });
}

int64_t part_start(int64_t P, int64_t k, int64_t T) { return P * k / T; }

// The operators' inputs after the first (sums or gradient buffers): the float tensors, the edge indices and
// head ranges, the spline's spacing and F. An absent filter part is an empty 1-d tensor.
#define SO3KRATES_INPUTS                                                                                 \
  at::Tensor q, at::Tensor kv, at::Tensor w, at::Tensor phi, at::Tensor y, at::Tensor d, at::Tensor table, \
      at::Tensor hidden, at::Tensor v, at::Tensor idx_i, at::Tensor idx_j, at::Tensor ranges_in,         \
      at::Tensor ranges_out, at::Tensor scale, double spacing, int64_t F

struct Tensors {
  at::Tensor q, kv, w, phi, y, d, table, hidden, v, idx_i, idx_j, ranges_in, ranges_out, scale;
  double spacing;
  int64_t F;
};

void check_spherical(const Tensors& a) {
  const at::Tensor &v = a.v, &hidden = a.hidden;
  TORCH_CHECK(v.dim() != 3 || (v.size(0) * v.size(2) == a.q.size(1) && hidden.dim() == 2 &&
                               hidden.size(0) == a.idx_i.size(0) / 2 && hidden.size(1) == v.size(0) * v.size(1)),
              "pair_messages: the spherical part must be hidden rows (pairs, B·K) and weights (B, K, F_b) with "
              "B·F_b the queries' width");
}

// Which copies of the spherical weights V a call makes (check): padded rows, the transpose.
constexpr int kPadded = 1, kTransposed = 2;

// V padded (for the products that make filter rows) and transposed (for ∂E/∂h), each made by hand where a
// call needs it (as ATen operators, each cost several dispatched calls per call of the kernel), in buffers of
// the calling thread. They are kept between calls (a program's weights stay where they are: one entry per
// layer) and used only while V's entries are those they were made from, compared in full, a fraction of
// making them again (made at every call, they took ~5 µs of ethanol's ~110 µs in the kernel per evaluation).
template <typename T>
struct WeightCopies {
  const T* source = nullptr;
  int64_t B = 0, K = 0, Fb = 0;
  std::vector<T> values, padded, transposed;
  bool has_padded = false, has_transposed = false;
};

constexpr int kCachedWeights = 8;

template <typename T>
const WeightCopies<T>& weight_copies(const T* values, int64_t B, int64_t K, int64_t Fb, int copies) {
  thread_local std::array<WeightCopies<T>, kCachedWeights> cache;
  thread_local int next = 0;
  const int64_t n = B * K * Fb, Fbp = (Fb + kLanes - 1) / kLanes * kLanes;
  WeightCopies<T>* entry = nullptr;
  for (auto& c : cache)
    if (c.source == values && c.B == B && c.K == K && c.Fb == Fb &&
        std::memcmp(c.values.data(), values, n * sizeof(T)) == 0) {
      entry = &c;
      break;
    }
  if (entry == nullptr) {  // a new V, or one whose entries changed: the oldest entry is made again
    entry = &cache[next];
    next = (next + 1) % kCachedWeights;
    *entry = WeightCopies<T>{};
    entry->source = values;
    entry->B = B, entry->K = K, entry->Fb = Fb;
    entry->values.assign(values, values + n);
  }
  if ((copies & kPadded) && !entry->has_padded) {
    entry->padded.assign(B * K * Fbp, T(0));
    for (int64_t row = 0; row < B * K; ++row)
      std::copy(values + row * Fb, values + (row + 1) * Fb, entry->padded.data() + row * Fbp);
    entry->has_padded = true;
  }
  if ((copies & kTransposed) && !entry->has_transposed) {
    entry->transposed.resize(B * Fb * K);
    for (int64_t b = 0; b < B; ++b)
      for (int64_t f = 0; f < Fb; ++f)
        for (int64_t k = 0; k < K; ++k) entry->transposed[(b * Fb + f) * K + k] = values[(b * K + k) * Fb + f];
    entry->has_transposed = true;
  }
  return *entry;
}

template <typename T>
Inputs<T> check(const Tensors& a, int copies) {
  const at::Tensor &q = a.q, &w = a.w, &d = a.d, &table = a.table, &hidden = a.hidden, &v = a.v;
  for (const auto* t : {&a.q, &a.kv, &a.w, &a.phi, &a.y, &a.d, &a.table, &a.hidden, &a.v, &a.scale})
    TORCH_CHECK(t->device().is_cpu() && t->scalar_type() == q.scalar_type() && t->is_contiguous(),
                "pair_messages: every float input must be a contiguous CPU tensor of one dtype");
  TORCH_CHECK(a.idx_i.scalar_type() == at::kLong && a.idx_j.scalar_type() == at::kLong,
              "pair_messages: edge indices must be int64");
  TORCH_CHECK(a.ranges_in.scalar_type() == at::kInt && a.ranges_out.scalar_type() == at::kInt,
              "pair_messages: head ranges must be int32");
  const int64_t E = a.idx_i.size(0), W = q.size(1), P = E / 2;
  // An absent part is an empty 1-d tensor (the given filters are 2-d, the spline's table and V 3-d).
  const bool given = w.dim() == 2, spline = table.dim() == 3, spherical = v.dim() == 3;
  TORCH_CHECK(E % 2 == 0, "pair_messages: edges must come in pairs");
  TORCH_CHECK(given || spline, "pair_messages: filters or a radial spline (or both) are needed");
  TORCH_CHECK(!given || (w.size(0) == P && w.size(1) == W),
              "pair_messages: the filters must have one row per pair, as wide as the queries");
  TORCH_CHECK(!spline || (table.size(1) == 4 && table.size(2) == W && d.dim() == 1 && d.size(0) == P &&
                          table.size(0) > 0 && a.spacing > 0),
              "pair_messages: the radial spline must be (intervals, 4, queries' width), with one distance per pair");
  check_spherical(a);
  TORCH_CHECK(a.phi.size(0) == E && a.y.size(0) == E && a.idx_j.size(0) == E,
              "pair_messages: per-edge sizes differ");
  TORCH_CHECK(a.scale.size(0) <= kMaxHeads, "pair_messages: at most ", kMaxHeads, " heads");
  // Pair order is what the backward pass relies on: edge e + P is edge e reversed. O(edges), checked.
  const int64_t *ii = a.idx_i.data_ptr<int64_t>(), *jj = a.idx_j.data_ptr<int64_t>(), n = q.size(0);
  for (int64_t e = 0; e < P; ++e) {
    TORCH_CHECK(ii[e] == jj[e + P] && jj[e] == ii[e + P], "pair_messages: edges are not in pair order (edge ",
                e + P, " is not edge ", e, " reversed)");
    TORCH_CHECK(jj[e] >= 0 && jj[e] < n && ii[e] >= 0 && ii[e] < n, "pair_messages: atom index out of range ",
                "for ", n, " atoms");
  }
  const Radial<T> radial{spline ? d.data_ptr<T>() : nullptr, spline ? table.data_ptr<T>() : nullptr,
                         spline ? table.size(0) : 0, static_cast<T>(1.0 / a.spacing),
                         static_cast<T>(a.spacing * (spline ? table.size(0) : 0))};
  TORCH_CHECK(!spherical || v.size(0) * v.size(1) <= kMaxHidden, "pair_messages: at most ", kMaxHidden,
              " hidden units in the spherical filter MLP");
  Spherical<T> sph{nullptr, nullptr, nullptr, nullptr, 0, 0, 0, 0};
  if (spherical) {
    const int64_t B = v.size(0), K = v.size(1), Fb = v.size(2), Fbp = (Fb + kLanes - 1) / kLanes * kLanes;
    const T* values = v.data_ptr<T>();
    const WeightCopies<T>& copy = weight_copies(values, B, K, Fb, copies);
    sph = {hidden.data_ptr<T>(), values, copy.padded.data(), copy.transposed.data(), B, K, Fb, Fbp};
  }
  return {q.data_ptr<T>(),
          a.kv.data_ptr<T>(),
          given ? w.data_ptr<T>() : nullptr,
          a.phi.data_ptr<T>(),
          a.y.data_ptr<T>(),
          a.scale.data_ptr<T>(),
          ii,
          jj,
          n,
          W,
          a.kv.size(1),
          a.F,
          a.y.size(1),
          P,
          static_cast<int>(a.scale.size(0)),
          {a.ranges_in.data_ptr<int>(), static_cast<int>(a.ranges_in.size(0))},
          {a.ranges_out.data_ptr<int>(), static_cast<int>(a.ranges_out.size(0))},
          radial,
          sph};
}

// Pairs of a whole-graph call up to which the forward pass keeps the filter rows it makes (spline, spherical
// products) for the backward pass, which then need not make them again: in small graphs they stay in the
// cache and the products cost more than reading them; in large ones memory traffic costs more (999 water
// atoms: ~2 ms per layer to read the rows back, against ~1.2 ms to recompute them).
constexpr int64_t kKeepRowsMaxPairs = 2048;

bool keeps_rows(int64_t P, bool made) { return made && P <= kKeepRowsMaxPairs; }

}  // namespace

// The inputs of an entry point as one struct.
#define SO3KRATES_TENSORS \
  Tensors { q, kv, w, phi, y, d, table, hidden, v, idx_i, idx_j, ranges_in, ranges_out, scale, spacing, F }

// Uninitialised and zeroed CPU tensors made directly, not through the dispatcher (~25 per evaluation of the
// paper model, each a dispatched call of a few hundred ns at molecule sizes).
at::Tensor new_empty(at::IntArrayRef sizes, const at::Tensor& like) {
  return at::detail::empty_cpu(sizes, like.scalar_type());
}

at::Tensor new_empty_like(const at::Tensor& like) { return new_empty(like.sizes(), like); }

at::Tensor new_zeros(at::IntArrayRef sizes, const at::Tensor& like) {
  at::Tensor out = new_empty(sizes, like);
  if (out.numel() > 0) std::memset(out.data_ptr(), 0, out.numel() * out.element_size());
  return out;
}

// Zeroed per-atom rows for each of T threads: the first thread's are the result, the others' are added to it
// in thread order afterwards (sum_parts).
std::vector<at::Tensor> zeroed_parts(int64_t T, int64_t n, int64_t width, const at::Tensor& like) {
  std::vector<at::Tensor> parts;
  for (int64_t k = 0; k < T; ++k) parts.push_back(new_zeros({n, width}, like));
  return parts;
}

at::Tensor sum_parts(std::vector<at::Tensor>& parts) {
  for (size_t k = 1; k < parts.size(); ++k) parts[0].add_(parts[k]);
  return parts[0];
}

// Whether a whole-graph call keeps the filter rows it makes (from the spline or the spherical part) in its
// forward pass for its backward pass (keeps_rows).
bool rows_kept(const Tensors& a) {
  return keeps_rows(a.idx_i.size(0) / 2, a.table.dim() == 3 || a.v.dim() == 3);
}

// Gradients of the filters' parts, each as its input (empty where the part is absent).
#define SO3KRATES_FILTER_GRADS(scalar) \
  FilterGrads<scalar> { dw.data_ptr<scalar>(), dd.data_ptr<scalar>(), dh.data_ptr<scalar>() }

// The sums, and the rows that the backward pass reads where the forward pass keeps them (keeps_rows): per
// pair its filter row and the head sums s_h of its two edges (W + 2 H), which the backward pass then need not
// make again (at 3BPA the head sums were ~10 % of it); (min(pairs, kKeepRowsMaxPairs), W + 2 H), so that the
// shape is one expression of the size for the compilers; where the rows are not kept, neither written nor
// read.
std::tuple<at::Tensor, at::Tensor> pair_messages(SO3KRATES_INPUTS) {
  const Tensors a = SO3KRATES_TENSORS;
  at::Tensor rows;
  std::vector<at::Tensor> u;
  AT_DISPATCH_FLOATING_TYPES(q.scalar_type(), "pair_messages", [&] {
    const auto x = check<scalar_t>(a, kPadded);
    const int64_t T = threads_for(x.P);
    rows = new_empty({std::min(x.P, kKeepRowsMaxPairs), x.kept_width()}, q);
    scalar_t* keep = rows_kept(a) ? rows.data_ptr<scalar_t>() : nullptr;
    // Rows of thread 0 are the result; threads 1.. add into scratch rows of their own, summed in order.
    u = zeroed_parts(T, x.n, x.F + x.S, q);
    run_parts(T, [&](int64_t k) {
      pairs_forward(x, part_start(x.P, k, T), part_start(x.P, k + 1, T), u[k].data_ptr<scalar_t>(), keep);
    });
  });
  return {sum_parts(u), rows};
}

using Grads = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

Grads pair_messages_backward(at::Tensor grad, at::Tensor rows, SO3KRATES_INPUTS) {
  const Tensors a = SO3KRATES_TENSORS;
  grad = grad.contiguous();
  // Every row of these is written (each pair's once, each edge's once); an absent part's gradient is empty.
  auto dw = new_empty_like(w), dphi = new_empty_like(phi), dy = new_empty_like(y), dd = new_empty_like(d),
       dh = new_empty_like(hidden);
  std::vector<at::Tensor> dq, dkv;
  AT_DISPATCH_FLOATING_TYPES(q.scalar_type(), "pair_messages_backward", [&] {
    const bool kept_rows = rows_kept(a);  // the filter rows are read, not made again
    const auto x = check<scalar_t>(a, kept_rows ? kTransposed : kPadded | kTransposed);
    const int64_t T = threads_for(x.P);
    TORCH_CHECK(rows.is_contiguous() && rows.scalar_type() == q.scalar_type() && rows.dim() == 2 &&
                    rows.size(0) == std::min(x.P, kKeepRowsMaxPairs) && rows.size(1) == x.kept_width(),
                "pair_messages_backward: the forward pass's filter rows must be the forward pass's output");
    const scalar_t* kept = kept_rows ? rows.data_ptr<scalar_t>() : nullptr;
    dq = zeroed_parts(T, x.n, x.W, q);
    dkv = zeroed_parts(T, x.n, x.KVW, q);
    run_parts(T, [&](int64_t k) {
      pairs_backward(x, grad.data_ptr<scalar_t>(), part_start(x.P, k, T), part_start(x.P, k + 1, T),
                     dq[k].data_ptr<scalar_t>(), dkv[k].data_ptr<scalar_t>(), dphi.data_ptr<scalar_t>(),
                     dy.data_ptr<scalar_t>(), SO3KRATES_FILTER_GRADS(scalar_t), kept);
    });
  });
  return {sum_parts(dq), sum_parts(dkv), dw, dphi, dy, dd, dh};
}

void pair_messages_block(at::Tensor u, SO3KRATES_INPUTS) {
  const Tensors a = SO3KRATES_TENSORS;
  AT_DISPATCH_FLOATING_TYPES(q.scalar_type(), "pair_messages_block", [&] {
    const auto x = check<scalar_t>(a, kPadded);
    TORCH_CHECK(u.is_contiguous() && u.scalar_type() == q.scalar_type() && u.size(0) == x.n &&
                    u.size(1) == x.F + x.S,
                "pair_messages_block: the sums must be a contiguous (n_atoms, F + n_sph) tensor of the same dtype");
    pairs_forward(x, 0, x.P, u.data_ptr<scalar_t>(), static_cast<scalar_t*>(nullptr));
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> pair_messages_block_backward(
    at::Tensor dq, at::Tensor dkv, at::Tensor grad, SO3KRATES_INPUTS) {
  const Tensors a = SO3KRATES_TENSORS;
  grad = grad.contiguous();
  auto dw = new_empty_like(w), dphi = new_empty_like(phi), dy = new_empty_like(y), dd = new_empty_like(d),
       dh = new_empty_like(hidden);
  AT_DISPATCH_FLOATING_TYPES(q.scalar_type(), "pair_messages_block_backward", [&] {
    const auto x = check<scalar_t>(a, kPadded | kTransposed);
    TORCH_CHECK(dq.is_contiguous() && dkv.is_contiguous() && dq.sizes() == q.sizes() &&
                    dkv.sizes() == kv.sizes() && dq.scalar_type() == q.scalar_type() &&
                    dkv.scalar_type() == q.scalar_type(),
                "pair_messages_block_backward: the gradient buffers must be contiguous and shaped as the inputs");
    TORCH_CHECK(grad.size(0) == x.n && grad.size(1) == x.F + x.S, "pair_messages_block_backward: grad shape");
    pairs_backward(x, grad.data_ptr<scalar_t>(), 0, x.P, dq.data_ptr<scalar_t>(), dkv.data_ptr<scalar_t>(),
                   dphi.data_ptr<scalar_t>(), dy.data_ptr<scalar_t>(), SO3KRATES_FILTER_GRADS(scalar_t),
                   static_cast<const scalar_t*>(nullptr));
  });
  return {dw, dphi, dy, dd, dh};
}

// Threads the whole-graph calls of the calling thread may use while torch runs on one thread (1 or 2; the
// second is the kernel's helper, woken here); returns the value before.
int64_t set_kernel_threads(int64_t threads) {
  TORCH_CHECK(threads >= 1, "set_kernel_threads: at least one thread");
  const int64_t before = kernel_threads;
  kernel_threads = std::min<int64_t>(threads, 2);
  if (kernel_threads > 1) helper().call();
  return before;
}

// Diagnostics of the helper (tests): tasks its callers ran both parts of themselves because it had been
// slower than they would have been alone (Helper::run), the matrix-product library's threads on the helper
// thread, and a delay before each of its tasks (a slow helper, which also clears its record); returns the
// delay before.
int64_t helper_skipped() { return helper().skipped(); }
int64_t helper_library_threads() { return helper().library_threads(); }
int64_t helper_test_delay(int64_t microseconds) {
  TORCH_CHECK(microseconds >= 0, "helper_test_delay: a delay of at least 0 µs");
  return helper().test_delay(microseconds);
}

// a @ b (so3krates::products): where the calling thread's kernel calls may use the helper
// (set_kernel_threads) and torch runs on one thread, the columns of b split into chunks of whole vectors (two,
// or up to four of at least kMinChunkColumns), which the caller and the helper take in turn (run_chunks: a
// helper slower than the caller takes fewer), each a product of the matrix-product library on one thread
// (the helper's own OpenMP setting is one thread) written into its columns of the result. The programs with
// the kernel call it for their large products (so3krates/runtime/rewrites.py: products_with_helper). One
// thread, 27 rows: 27 × 132 × 660 in 54 µs, split in two 32 µs; 27 × 660 × 132 57 -> 36 µs. Smaller products
// than kMinSplitProduct multiply-adds gain less than the hand-over costs.
constexpr int64_t kMinSplitProduct = 1 << 18;
constexpr int64_t kMinChunkColumns = 160;
// The helper's part of a product takes longer than the caller's part of as many columns, by about as long
// as this many multiply-adds (~3 µs: it reads the rows of a that the caller has just written, from the other
// core's cache). Timed per part at 3BPA (27 rows): 27 × 135 × 135 in two chunks of 64 / 71 columns, caller
// 8.4 µs, helper 11.9; 27 × 660 × 132, 64 / 68 columns, 31.8 and 36.7 µs.
constexpr int64_t kHandOverMacs = 84000;
at::Tensor products(const at::Tensor& a, const at::Tensor& b) {
  TORCH_CHECK(a.dim() == 2 && b.dim() == 2 && a.size(1) == b.size(0), "products: (M, K) @ (K, N)");
  const int64_t M = a.size(0), K = a.size(1), N = b.size(1);
  at::Tensor out = new_empty({M, N}, a);
  if (helper_allowed() && N >= 64 && M * K * N >= kMinSplitProduct) {
    const int64_t n = std::clamp<int64_t>(N / kMinChunkColumns, 2, 4);
    // Chunk k's first column: the nearest multiple of 16 to N k / n. Of two chunks, the first (the caller's:
    // it starts taking before the helper wakes to) gets the columns of kHandOverMacs / 2 more multiply-adds,
    // so that both parts end together; more chunks balance themselves (run_chunks).
    const int64_t extra = n == 2 ? kHandOverMacs / (2 * M * K) : 0;
    const auto start = [&](int64_t k) {
      return k == n ? N : k == 0 ? 0 : std::min(N, (N * k / n + extra + 8) / 16 * 16);
    };
    helper().run_chunks(n, [&](int64_t k) {
      const int64_t c0 = start(k), width = start(k + 1) - c0;
      at::Tensor columns = out.narrow(1, c0, width);
      at::cpu::mm_out(columns, a, b.narrow(1, c0, width));
    });
  } else {
    at::cpu::mm_out(out, a, b);
  }
  return out;
}

// Registered with the dispatcher (not as a Python module), so that compiled programs call it directly.
// Shapes for tracing and the autograd formula are registered from Python (so3krates/ops/pair_messages.py).
#define SO3KRATES_SCHEMA                                                                                      \
  "Tensor queries, Tensor keys_values, Tensor filters, Tensor cutoff, Tensor sph, Tensor distances, "        \
  "Tensor spline, Tensor hidden, Tensor spherical_out, Tensor idx_i, Tensor idx_j, Tensor ranges_in, "       \
  "Tensor ranges_out, Tensor scale, float spacing, int n_features"

TORCH_LIBRARY(so3krates, m) {
  m.def("pair_messages(" SO3KRATES_SCHEMA ") -> (Tensor, Tensor)");
  m.def("pair_messages_backward(Tensor grad, Tensor rows, " SO3KRATES_SCHEMA
        ") -> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
  m.def("pair_messages_block(Tensor(a!) sums, " SO3KRATES_SCHEMA ") -> ()");
  m.def("pair_messages_block_backward(Tensor(a!) grad_queries, Tensor(b!) grad_keys_values, Tensor grad, "
        SO3KRATES_SCHEMA ") -> (Tensor, Tensor, Tensor, Tensor, Tensor)");
  m.def("set_kernel_threads(int threads) -> int", &set_kernel_threads);
  m.def("products(Tensor a, Tensor b) -> Tensor");
  m.def("helper_skipped() -> int", &helper_skipped);
  m.def("helper_library_threads() -> int", &helper_library_threads);
  m.def("helper_test_delay(int microseconds) -> int", &helper_test_delay);
}

TORCH_LIBRARY_IMPL(so3krates, CPU, m) {
  m.impl("pair_messages", &pair_messages);
  m.impl("pair_messages_backward", &pair_messages_backward);
  m.impl("pair_messages_block", &pair_messages_block);
  m.impl("pair_messages_block_backward", &pair_messages_block_backward);
  m.impl("products", &products);
}
