// attnzoo: CPU kernels for attention over a fixed key list per query (neighbourhoods, small windows).
// Plain C ABI (loaded with ctypes; no Python or torch headers). Tensors are contiguous:
// q [B, H, N, D], k and v [B, Hk, M, D], idx [N, K4] int32 key index per query (-1: none; K4 % 4 == 0),
// key_ok [B, M] uint8 or null (key padding: 0 = the key is hidden from every query of that batch element),
// bias [H, n_bias] and bias_idx [N, K4] or null (an additive per-head bias, e.g. relative positions; the
// backward then writes its gradient per (batch, head) into dbias [B, H, n_bias]),
// out [B, H, N, D], lse [B, H, N], and if probs is not null the attention probabilities [B, H, N, K4] (0 for no key).
// The backward takes out, dout, dlse [B, H, N] or null (the gradient of lse), the forward's probs or null (then
// it recomputes them from q, k and lse) and the inverse table (keys -> positions in idx, CSR), and writes dq, dk,
// dv (every element; dbias the caller zero-fills). It computes dq per query and dk, dv per key (accumulating in
// registers, no read-modify-write per pair).
//
// Per query: K dot products, a softmax, K weighted rows of V. The float32 path with D a multiple of 8
// uses explicit vectors (GCC / Clang vector extensions): dot products twelve keys at a time on 4-lane
// vectors (twelve FMA chains in flight), a polynomial exp over four scores at a time, and weighted rows
// held in registers 64 floats at a time on 8-lane vectors (D a multiple of 64) or 32 on 4-lane vectors.
// Other cases (float64, other D) use plain loops.
#include "kernels_exp.h"

#include <cmath>
#include <cstdint>
#include <limits>
#include <type_traits>
#include <vector>

namespace {

typedef float vf __attribute__((vector_size(16), aligned(4), __may_alias__));
typedef int32_t vi __attribute__((vector_size(16), aligned(4), __may_alias__));
typedef float vf8 __attribute__((vector_size(32), aligned(4), __may_alias__));
// vf and vf8 by lane count (a typedef passed as a template argument would lose its alignment attribute).
template <int L> struct Lanes;
template <> struct Lanes<4> { typedef vf V; };
template <> struct Lanes<8> { typedef vf8 V; };

inline vf vload(const float* p) { return *reinterpret_cast<const vf*>(p); }
inline void vstore(float* p, vf x) { *reinterpret_cast<vf*>(p) = x; }
inline float hsum(vf x) { return (x[0] + x[1]) + (x[2] + x[3]); }
inline vf splat(float x) { return vf{x, x, x, x}; }
// Which of idx[0 .. 3] hold a key: a lane of all ones, or 0.
inline vi has_key4(const int32_t* idx) { return vi{idx[0], idx[1], idx[2], idx[3]} >= 0; }
// {sum(a), sum(b), sum(c), sum(d)}: a 4x4 transpose folded into adds, without leaving the vector registers.
inline vf hsum4(vf a, vf b, vf c, vf d) {
  const vf ab = __builtin_shufflevector(a, b, 0, 4, 1, 5) + __builtin_shufflevector(a, b, 2, 6, 3, 7);
  const vf cd = __builtin_shufflevector(c, d, 0, 4, 1, 5) + __builtin_shufflevector(c, d, 2, 6, 3, 7);
  return __builtin_shufflevector(ab, cd, 0, 1, 4, 5) + __builtin_shufflevector(ab, cd, 2, 3, 6, 7);
}

template <typename T, int DC>
constexpr bool kVector = std::is_same<T, float>::value && DC > 0 && DC % 8 == 0;

template <typename T>
inline const T* key_row(const T* rows, int32_t j, int64_t d) {
  return rows + (j < 0 ? 0 : j) * d;
}

// float32 vector path of dots: twelve keys at a time, one accumulator each (twelve FMA chains in flight, one load
// of `a` per step for all twelve); the last 4 or 8 keys go through the four-key loop of dots.
template <int DC>
inline int64_t dots12(const float* __restrict a, const float* rows, const int32_t* idx, int64_t k4, float scale,
                      float* __restrict s) {
  int64_t t = 0;
  for (; t + 12 <= k4; t += 12) {
    const float* p[12];
#pragma GCC unroll 12
    for (int g = 0; g < 12; ++g) p[g] = key_row(rows, idx[t + g], DC);
    vf c[12] = {};
#pragma GCC unroll 32
    for (int i = 0; i < DC; i += 4) {
      const vf x = vload(a + i);
#pragma GCC unroll 12
      for (int g = 0; g < 12; ++g) c[g] += x * vload(p[g] + i);
    }
#pragma GCC unroll 3
    for (int g = 0; g < 12; g += 4) vstore(s + t + g, hsum4(c[g], c[g + 1], c[g + 2], c[g + 3]) * scale);
  }
  return t;
}

// s[t] = scale * <a, rows[idx[t]]> where idx[t] >= 0 (other entries: unspecified); after dots12, four keys
// at a time (on vectors: two partial sums per key, eight FMA chains).
template <typename T, int DC>
inline void dots(const T* __restrict a, const T* rows, const int32_t* idx, int64_t k4, int64_t d_rt, T scale,
                 T* __restrict s) {
  const int64_t d = DC > 0 ? DC : d_rt;
  int64_t start = 0;
  if constexpr (kVector<T, DC>) start = dots12<DC>(a, rows, idx, k4, scale, s);
  for (int64_t t = start; t < k4; t += 4) {
    const T* __restrict p0 = key_row(rows, idx[t], d);
    const T* __restrict p1 = key_row(rows, idx[t + 1], d);
    const T* __restrict p2 = key_row(rows, idx[t + 2], d);
    const T* __restrict p3 = key_row(rows, idx[t + 3], d);
    if constexpr (kVector<T, DC>) {
      vf a0{}, a1{}, a2{}, a3{}, b0{}, b1{}, b2{}, b3{};
#pragma GCC unroll 16
      for (int i = 0; i < DC; i += 8) {
        const vf x = vload(a + i), y = vload(a + i + 4);
        a0 += x * vload(p0 + i);
        a1 += x * vload(p1 + i);
        a2 += x * vload(p2 + i);
        a3 += x * vload(p3 + i);
        b0 += y * vload(p0 + i + 4);
        b1 += y * vload(p1 + i + 4);
        b2 += y * vload(p2 + i + 4);
        b3 += y * vload(p3 + i + 4);
      }
      vstore(s + t, hsum4(a0 + b0, a1 + b1, a2 + b2, a3 + b3) * scale);
    } else {
      T s0 = 0, s1 = 0, s2 = 0, s3 = 0;
#pragma omp simd reduction(+ : s0, s1, s2, s3)
      for (int64_t i = 0; i < d; ++i) {
        const T x = a[i];
        s0 += x * p0[i];
        s1 += x * p1[i];
        s2 += x * p2[i];
        s3 += x * p3[i];
      }
      s[t] = s0 * scale;
      s[t + 1] = s1 * scale;
      s[t + 2] = s2 * scale;
      s[t + 3] = s3 * scale;
    }
  }
}

// s[t] <- exp(s[t] - shift) where idx[t] >= 0, else 0; returns the sum.
template <typename T>
inline T exp_shifted(T* s, const int32_t* idx, int64_t k4, T shift) {
  if constexpr (std::is_same<T, float>::value) {
    vf total{};
    for (int64_t t = 0; t < k4; t += 4) {
      const vi keep = has_key4(idx + t);
      const vf e = (vf)((vi)attnzoo_kernels::vexp<vf, vi>(vload(s + t) - shift) & keep);
      vstore(s + t, e);
      total += e;
    }
    return hsum(total);
  } else {
    T total = 0;
    for (int64_t t = 0; t < k4; ++t) {
      s[t] = idx[t] < 0 ? T(0) : std::exp(s[t] - shift);
      total += s[t];
    }
    return total;
  }
}

// The largest s[t] with idx[t] >= 0 (-inf if none).
template <typename T>
inline T masked_max(const T* s, const int32_t* idx, int64_t k4) {
  if constexpr (std::is_same<T, float>::value) {
    const vf none = splat(-std::numeric_limits<float>::infinity());
    vf m = none;
    for (int64_t t = 0; t < k4; t += 4) {
      const vf x = has_key4(idx + t) ? vload(s + t) : none;
      m = m > x ? m : x;
    }
    const float a = m[0] > m[1] ? m[0] : m[1], b = m[2] > m[3] ? m[2] : m[3];
    return a > b ? a : b;
  } else {
    T m = -std::numeric_limits<T>::infinity();
    for (int64_t t = 0; t < k4; ++t)
      if (idx[t] >= 0 && s[t] > m) m = s[t];
    return m;
  }
}

// One pass of add_weighted_rows over columns [h, h + width) of float rows on L-lane vectors
// (8 accumulators: width <= 8 L, a multiple of L).
template <int L, int DC, bool kByKey>
inline void weighted_rows_pass(const float* w, const int32_t* pos, const int32_t* ids, int64_t lo, int64_t hi,
                               const float* rows, int h, int width, float* __restrict acc) {
  typedef typename Lanes<L>::V V;
  V c[8] = {};
  for (int64_t e = lo; e < hi; ++e) {
    if (!kByKey && ids[e] < 0) continue;
    const V p = V{} + w[kByKey ? pos[e] : e];
    const float* r = rows + static_cast<int64_t>(ids[e]) * DC + h;
#pragma GCC unroll 8
    for (int u = 0; u < 8; ++u)
      if (u * L < width) c[u] += p * *reinterpret_cast<const V*>(r + L * u);
  }
#pragma GCC unroll 8
  for (int u = 0; u < 8; ++u)
    if (u * L < width) *reinterpret_cast<V*>(acc + h + L * u) += c[u];
}

// acc[0..D) += sum over e in [lo, hi) with ids[e] >= 0 of w[e] * rows[ids[e]]: the weighted rows of V
// (forward) and of K (dQ); kByKey: w[pos[e]] over entries that are all valid (the inverse table: rows of Q
// and dOut for dK and dV).
template <typename T, int DC, bool kByKey = false>
inline void add_weighted_rows(const T* w, const int32_t* pos, const int32_t* ids, int64_t lo, int64_t hi,
                              const T* rows, int64_t d_rt, T* __restrict acc) {
  const int64_t d = DC > 0 ? DC : d_rt;
  if constexpr (kVector<T, DC> && DC % 64 == 0) {  // 8-lane vectors, 64 floats per pass
    for (int h = 0; h < DC; h += 64) weighted_rows_pass<8, DC, kByKey>(w, pos, ids, lo, hi, rows, h, 64, acc);
  } else if constexpr (kVector<T, DC>) {  // 4-lane vectors, up to 32 floats per pass
    for (int h = 0; h < DC; h += 32)
      weighted_rows_pass<4, DC, kByKey>(w, pos, ids, lo, hi, rows, h, DC - h < 32 ? DC - h : 32, acc);
  } else {
    for (int64_t e = lo; e < hi; ++e) {
      if (!kByKey && ids[e] < 0) continue;
      const T p = w[kByKey ? pos[e] : e];
      const T* __restrict r = rows + ids[e] * d;
#pragma omp simd
      for (int64_t i = 0; i < d; ++i) acc[i] += p * r[i];
    }
  }
}

inline bool any_key(const int32_t* idx, int64_t k4) {
  for (int64_t t = 0; t < k4; ++t)
    if (idx[t] >= 0) return true;
  return false;
}

// The key list of query n, with keys that key_ok (nullable, [M] for this batch element) rejects set to -1.
inline const int32_t* query_keys(const int32_t* idx, const uint8_t* key_ok, int64_t n, int64_t k4, int32_t* buf) {
  const int32_t* row = idx + n * k4;
  if (key_ok == nullptr) return row;
  for (int64_t t = 0; t < k4; ++t) buf[t] = row[t] >= 0 && key_ok[row[t]] ? row[t] : -1;
  return buf;
}

// s[t] += bias[h, bias_idx[n, t]] (an additive per-head table read at a per-pair index; bias may be null).
template <typename T>
inline void add_bias(T* s, const T* bias, const int32_t* bias_idx, int64_t h, int64_t n_bias, int64_t n, int64_t k4) {
  if (bias == nullptr) return;
  const T* bh = bias + h * n_bias;
  const int32_t* bi = bias_idx + n * k4;
  for (int64_t t = 0; t < k4; ++t) s[t] += bh[bi[t]];
}

// Queries go through the kernels kBlock at a time, each step (dot products, softmax, weighted rows) for the
// whole block before the next: the steps of one query wait on each other, those of different queries do not, so
// the CPU overlaps them (one query at a time left a fifth of the forward in pipeline stalls between steps).
constexpr int64_t kBlock = 16;

// Key lists of queries n0 .. n0 + nb (masked by key_ok into buf [kBlock, k4]); live[i]: query n0 + i has a key.
inline void block_keys(const int32_t* idx, const uint8_t* key_ok, int64_t n0, int64_t nb, int64_t k4, int32_t* buf,
                       const int32_t** rows, bool* live) {
  for (int64_t i = 0; i < nb; ++i) {
    rows[i] = query_keys(idx, key_ok, n0 + i, k4, buf + i * k4);
    live[i] = any_key(rows[i], k4);
  }
}

template <typename T, int DC>
void forward(const T* q, const T* k, const T* v, const int32_t* idx, const uint8_t* key_ok, const T* bias,
             const int32_t* bias_idx, int64_t n_bias, T* out, T* lse, T* probs, int64_t B, int64_t H, int64_t Hk,
             int64_t N, int64_t M, int64_t d_rt, int64_t k4, T scale, int threads) {
  const int64_t G = H / Hk;
  const int64_t d = DC > 0 ? DC : d_rt;
  const T neg_inf = -std::numeric_limits<T>::infinity();
#pragma omp parallel num_threads(threads)
  {
    std::vector<T> s(kBlock * k4), acc(d), inv(kBlock);
    std::vector<int32_t> masked(kBlock * k4);
    const int32_t* rows[kBlock];
    bool live[kBlock];
#pragma omp for schedule(static)
    for (int64_t bh = 0; bh < B * H; ++bh) {
      const int64_t bk = (bh / H) * Hk + (bh % H) / G;
      const T* kb = k + bk * M * d;
      const T* vb = v + bk * M * d;
      const uint8_t* ok = key_ok == nullptr ? nullptr : key_ok + (bh / H) * M;
      for (int64_t n0 = 0; n0 < N; n0 += kBlock) {
        const int64_t nb = N - n0 < kBlock ? N - n0 : kBlock;
        block_keys(idx, ok, n0, nb, k4, masked.data(), rows, live);
        for (int64_t i = 0; i < nb; ++i) {
          if (!live[i]) continue;
          dots<T, DC>(q + (bh * N + n0 + i) * d, kb, rows[i], k4, d, scale, s.data() + i * k4);
          add_bias(s.data() + i * k4, bias, bias_idx, bh % H, n_bias, n0 + i, k4);
        }
        for (int64_t i = 0; i < nb; ++i) {
          if (!live[i]) {
            lse[bh * N + n0 + i] = neg_inf;
            continue;
          }
          const T m = masked_max<T>(s.data() + i * k4, rows[i], k4);
          const T l = exp_shifted<T>(s.data() + i * k4, rows[i], k4, m);
          lse[bh * N + n0 + i] = m + std::log(l);
          inv[i] = T(1) / l;
        }
        for (int64_t i = 0; i < nb; ++i) {
          T* o = out + (bh * N + n0 + i) * d;
          for (int64_t c = 0; c < d; ++c) acc[c] = 0;
          if (live[i]) add_weighted_rows<T, DC>(s.data() + i * k4, nullptr, rows[i], 0, k4, vb, d, acc.data());
          const T w = live[i] ? inv[i] : T(0);
          for (int64_t c = 0; c < d; ++c) o[c] = acc[c] * w;
          if (probs != nullptr) {
            T* pr = probs + (bh * N + n0 + i) * k4;
            for (int64_t t = 0; t < k4; ++t) pr[t] = live[i] ? s[i * k4 + t] * w : T(0);
          }
        }
      }
    }
  }
}

// The inverse of idx, by key: for key j, entries inv_pos[inv_off[j] .. inv_off[j+1]) are the positions
// n * K4 + t with idx[n, t] == j (in increasing order), and inv_q holds their queries n.
template <typename T, int DC>
void backward(const T* q, const T* k, const T* v, const int32_t* idx, const uint8_t* key_ok, const T* bias,
              const int32_t* bias_idx, int64_t n_bias, T* dbias, const int32_t* inv_off, const int32_t* inv_pos,
              const int32_t* inv_q, const T* lse, const T* probs, const T* out, const T* dout, const T* dlse, T* dq,
              T* dk, T* dv, int64_t B, int64_t H, int64_t Hk, int64_t N, int64_t M, int64_t d_rt, int64_t k4, T scale,
              int threads) {
  const int64_t G = H / Hk;
  const int64_t d = DC > 0 ? DC : d_rt;
  const T neg_inf = -std::numeric_limits<T>::infinity();
  // One (batch, kv head) per task: its dK and dV are written by this task only.
#pragma omp parallel num_threads(threads)
  {
    std::vector<T> p(probs == nullptr ? N * k4 : 0), ds(N * k4), delta(kBlock);
    std::vector<int32_t> masked(kBlock * k4);
    const int32_t* rows[kBlock];
    bool live[kBlock];
#pragma omp for schedule(static)
    for (int64_t bk = 0; bk < B * Hk; ++bk) {
      const int64_t b = bk / Hk, hk = bk % Hk;
      const uint8_t* ok = key_ok == nullptr ? nullptr : key_ok + b * M;
      const T* kb = k + bk * M * d;
      const T* vb = v + bk * M * d;
      T* dkb = dk + bk * M * d;
      T* dvb = dv + bk * M * d;
      for (int64_t g = 0; g < G; ++g) {
        const int64_t bh = b * H + hk * G + g;
        const T* qh = q + bh * N * d;
        const T* oh = out + bh * N * d;
        const T* doh = dout + bh * N * d;
        const T* ph = probs == nullptr ? p.data() : probs + bh * N * k4;
        // Key-centric: dk[j] += sum ds * q, dv[j] += sum p * dout over the queries that see key j.
        auto key_grads = [&](int64_t j) {
          if (g == 0)
            for (int64_t c = 0; c < d; ++c) dkb[j * d + c] = dvb[j * d + c] = 0;
          add_weighted_rows<T, DC, true>(ds.data(), inv_pos, inv_q, inv_off[j], inv_off[j + 1], qh, d, dkb + j * d);
          add_weighted_rows<T, DC, true>(ph, inv_pos, inv_q, inv_off[j], inv_off[j + 1], doh, d, dvb + j * d);
        };
        // Keys whose queries (inv_q is increasing per key) are all below `done`.
        auto key_ready = [&](int64_t j, int64_t done) {
          return inv_off[j] == inv_off[j + 1] || inv_q[inv_off[j + 1] - 1] < done;
        };
        int64_t j_next = 0;
        // Query-centric, kBlock queries per step: probabilities p, score gradients ds and dq. After each block, the
        // keys in order whose queries are all done (for local patterns, while their p, ds, q and dout rows are
        // still in cache); the rest (e.g. sink keys, seen by every query) at the end.
        for (int64_t n0 = 0; n0 < N; n0 += kBlock) {
          const int64_t nb = N - n0 < kBlock ? N - n0 : kBlock;
          block_keys(idx, ok, n0, nb, k4, masked.data(), rows, live);
          for (int64_t i = 0; i < nb; ++i) {
            const int64_t n = n0 + i;
            T* pn = p.data() + n * k4;  // only when the probabilities are recomputed here
            T* dsn = ds.data() + n * k4;
            live[i] = live[i] && lse[bh * N + n] != neg_inf;
            if (!live[i]) {
              for (int64_t t = 0; t < k4; ++t) dsn[t] = 0;
              if (probs == nullptr)
                for (int64_t t = 0; t < k4; ++t) pn[t] = 0;
              continue;
            }
            if (probs == nullptr) {
              dots<T, DC>(qh + n * d, kb, rows[i], k4, d, scale, pn);
              add_bias(pn, bias, bias_idx, hk * G + g, n_bias, n, k4);
            }
            dots<T, DC>(doh + n * d, vb, rows[i], k4, d, T(1), dsn);
            // delta = rowsum(dout * out) - dlse (d lse / d s = p folds into delta)
            T dn = 0;
#pragma omp simd reduction(+ : dn)
            for (int64_t c = 0; c < d; ++c) dn += doh[n * d + c] * oh[n * d + c];
            delta[i] = dlse == nullptr ? dn : dn - dlse[bh * N + n];
          }
          for (int64_t i = 0; i < nb; ++i) {
            if (!live[i]) continue;
            const int64_t n = n0 + i;
            const int32_t* row = rows[i];
            if (probs == nullptr) exp_shifted<T>(p.data() + n * k4, row, k4, lse[bh * N + n]);
            const T* pn = ph + n * k4;
            T* dsn = ds.data() + n * k4;
            const T dn = delta[i];
            for (int64_t t = 0; t < k4; ++t) dsn[t] = row[t] < 0 ? T(0) : pn[t] * (dsn[t] - dn);
            if (dbias != nullptr) {  // d score = d bias; one [n_bias] row per (batch, head): no two tasks share it
              T* db = dbias + bh * n_bias;
              const int32_t* bi = bias_idx + n * k4;
              for (int64_t t = 0; t < k4; ++t) db[bi[t]] += dsn[t];
            }
            for (int64_t t = 0; t < k4; ++t) dsn[t] *= scale;
          }
          for (int64_t i = 0; i < nb; ++i) {
            const int64_t n = n0 + i;
            T* dqn = dq + (bh * N + n) * d;
            for (int64_t c = 0; c < d; ++c) dqn[c] = 0;
            if (live[i]) add_weighted_rows<T, DC>(ds.data() + n * k4, nullptr, rows[i], 0, k4, kb, d, dqn);
          }
          for (; j_next < M && key_ready(j_next, n0 + nb); ++j_next) key_grads(j_next);
        }
        for (; j_next < M; ++j_next) key_grads(j_next);
      }
    }
  }
}

template <typename F>
void by_dim(int64_t d, F&& f) {
  switch (d) {
    case 32: f(std::integral_constant<int, 32>{}); break;
    case 64: f(std::integral_constant<int, 64>{}); break;
    case 128: f(std::integral_constant<int, 128>{}); break;
    default: f(std::integral_constant<int, 0>{}); break;
  }
}

}  // namespace

#define ATTNZOO_GATHER(T, SUFFIX)                                                                                  \
  extern "C" void attnzoo_gather_forward_##SUFFIX(                                                               \
      const T* q, const T* k, const T* v, const int32_t* idx, const uint8_t* key_ok, const T* bias,                \
      const int32_t* bias_idx, int64_t n_bias, T* out, T* lse, T* probs, int64_t B, int64_t H, int64_t Hk,         \
      int64_t N, int64_t M, int64_t D, int64_t K4, double scale, int threads) {                                   \
    by_dim(D, [&](auto dc) {                                                                                       \
      forward<T, decltype(dc)::value>(q, k, v, idx, key_ok, bias, bias_idx, n_bias, out, lse, probs, B, H, Hk, N,  \
                                      M, D, K4, T(scale), threads);                                                \
    });                                                                                                            \
  }                                                                                                                \
  extern "C" void attnzoo_gather_backward_##SUFFIX(                                                              \
      const T* q, const T* k, const T* v, const int32_t* idx, const uint8_t* key_ok, const T* bias,                \
      const int32_t* bias_idx, int64_t n_bias, T* dbias, const int32_t* inv_off, const int32_t* inv_pos,           \
      const int32_t* inv_q, const T* lse, const T* probs, const T* out, const T* dout, const T* dlse, T* dq,       \
      T* dk, T* dv, int64_t B, int64_t H, int64_t Hk, int64_t N, int64_t M, int64_t D, int64_t K4, double scale,   \
      int threads) {                                                                                               \
    by_dim(D, [&](auto dc) {                                                                                       \
      backward<T, decltype(dc)::value>(q, k, v, idx, key_ok, bias, bias_idx, n_bias, dbias, inv_off, inv_pos,      \
                                       inv_q, lse, probs, out, dout, dlse, dq, dk, dv, B, H, Hk, N, M, D, K4,      \
                                       T(scale), threads);                                                         \
    });                                                                                                            \
  }

ATTNZOO_GATHER(float, f32)
ATTNZOO_GATHER(double, f64)
