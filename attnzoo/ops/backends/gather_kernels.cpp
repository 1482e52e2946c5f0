// attnzoo: CPU kernels for attention over a fixed key list per query (neighbourhood patterns).
// Plain C ABI (loaded with ctypes; no Python or torch headers). Tensors are contiguous:
// q [B, H, N, D], k and v [B, Hk, M, D], idx [N, K4] int32 key index per query (-1: none; K4 % 4 == 0),
// out [B, H, N, D], lse [B, H, N]; the backward takes delta = rowsum(dout * out) - dlse and writes
// dq, dk, dv, which the caller zero-fills.
#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

namespace {

template <typename T, int DC>
inline void dot4(const T* __restrict a, const T* __restrict b0, const T* __restrict b1, const T* __restrict b2,
                 const T* __restrict b3, int64_t d_rt, T* __restrict out) {
  const int64_t d = DC > 0 ? DC : d_rt;
  T s0 = 0, s1 = 0, s2 = 0, s3 = 0;
#pragma omp simd reduction(+ : s0, s1, s2, s3)
  for (int64_t i = 0; i < d; ++i) {
    const T x = a[i];
    s0 += x * b0[i];
    s1 += x * b1[i];
    s2 += x * b2[i];
    s3 += x * b3[i];
  }
  out[0] = s0;
  out[1] = s1;
  out[2] = s2;
  out[3] = s3;
}

// s[t] = scale * <a, rows[idx[t]]> (-inf where idx[t] < 0), four keys at a time.
template <typename T, int DC>
inline void scores(const T* a, const T* rows, const int32_t* idx, int64_t k4, int64_t d_rt, T scale, T* s) {
  const int64_t d = DC > 0 ? DC : d_rt;
  for (int64_t t = 0; t < k4; t += 4) {
    const T* p[4];
    for (int u = 0; u < 4; ++u) p[u] = rows + (idx[t + u] < 0 ? 0 : idx[t + u]) * d;
    dot4<T, DC>(a, p[0], p[1], p[2], p[3], d, s + t);
    for (int u = 0; u < 4; ++u)
      s[t + u] = idx[t + u] < 0 ? -std::numeric_limits<T>::infinity() : s[t + u] * scale;
  }
}

template <typename T, int DC>
void forward(const T* q, const T* k, const T* v, const int32_t* idx, T* out, T* lse, int64_t B, int64_t H,
             int64_t Hk, int64_t N, int64_t M, int64_t d_rt, int64_t k4, T scale, int threads) {
  const int64_t G = H / Hk;
  const int64_t d = DC > 0 ? DC : d_rt;
  const T neg_inf = -std::numeric_limits<T>::infinity();
#pragma omp parallel num_threads(threads)
  {
    std::vector<T> s(k4), acc(d);
#pragma omp for schedule(static)
    for (int64_t bh = 0; bh < B * H; ++bh) {
      const int64_t bk = (bh / H) * Hk + (bh % H) / G;
      const T* kb = k + bk * M * d;
      const T* vb = v + bk * M * d;
      for (int64_t n = 0; n < N; ++n) {
        const int32_t* row = idx + n * k4;
        scores<T, DC>(q + (bh * N + n) * d, kb, row, k4, d, scale, s.data());
        T m = neg_inf;
        for (int64_t t = 0; t < k4; ++t) m = s[t] > m ? s[t] : m;
        T* o = out + (bh * N + n) * d;
        if (m == neg_inf) {
          for (int64_t i = 0; i < d; ++i) o[i] = 0;
          lse[bh * N + n] = neg_inf;
          continue;
        }
        T l = 0;
        for (int64_t t = 0; t < k4; ++t) {
          s[t] = row[t] < 0 ? T(0) : std::exp(s[t] - m);
          l += s[t];
        }
        T* __restrict a = acc.data();
        for (int64_t i = 0; i < d; ++i) a[i] = 0;
        for (int64_t t = 0; t < k4; ++t) {
          if (row[t] < 0) continue;
          const T p = s[t];
          const T* __restrict vj = vb + row[t] * d;
#pragma omp simd
          for (int64_t i = 0; i < d; ++i) a[i] += p * vj[i];
        }
        const T inv = T(1) / l;
        for (int64_t i = 0; i < d; ++i) o[i] = a[i] * inv;
        lse[bh * N + n] = m + std::log(l);
      }
    }
  }
}

template <typename T, int DC>
void backward(const T* q, const T* k, const T* v, const int32_t* idx, const T* lse, const T* delta, const T* dout,
              T* dq, T* dk, T* dv, int64_t B, int64_t H, int64_t Hk, int64_t N, int64_t M, int64_t d_rt,
              int64_t k4, T scale, int threads) {
  const int64_t G = H / Hk;
  const int64_t d = DC > 0 ? DC : d_rt;
  const T neg_inf = -std::numeric_limits<T>::infinity();
  // One (batch, kv head) per task: its dK and dV are written by this task only.
#pragma omp parallel num_threads(threads)
  {
    std::vector<T> s(k4), dp(k4), acc(d);
#pragma omp for schedule(static)
    for (int64_t bk = 0; bk < B * Hk; ++bk) {
      const int64_t b = bk / Hk, hk = bk % Hk;
      const T* kb = k + bk * M * d;
      const T* vb = v + bk * M * d;
      T* dkb = dk + bk * M * d;
      T* dvb = dv + bk * M * d;
      for (int64_t g = 0; g < G; ++g) {
        const int64_t bh = b * H + hk * G + g;
        for (int64_t n = 0; n < N; ++n) {
          const T ln = lse[bh * N + n];
          if (ln == neg_inf) continue;
          const int32_t* row = idx + n * k4;
          const T* __restrict qn = q + (bh * N + n) * d;
          const T* __restrict don = dout + (bh * N + n) * d;
          const T dn = delta[bh * N + n];
          scores<T, DC>(qn, kb, row, k4, d, scale, s.data());
          scores<T, DC>(don, vb, row, k4, d, T(1), dp.data());
          T* __restrict a = acc.data();
          for (int64_t i = 0; i < d; ++i) a[i] = 0;
          for (int64_t t = 0; t < k4; ++t) {
            const int32_t j = row[t];
            if (j < 0) continue;
            const T p = std::exp(s[t] - ln);
            const T ds = p * (dp[t] - dn) * scale;
            const T* __restrict kj = kb + j * d;
            T* __restrict dkj = dkb + j * d;
            T* __restrict dvj = dvb + j * d;
#pragma omp simd
            for (int64_t i = 0; i < d; ++i) {
              a[i] += ds * kj[i];
              dkj[i] += ds * qn[i];
              dvj[i] += p * don[i];
            }
          }
          T* dqn = dq + (bh * N + n) * d;
          for (int64_t i = 0; i < d; ++i) dqn[i] += a[i];
        }
      }
    }
  }
}

template <typename T, typename F>
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
  extern "C" void attnzoo_gather_forward_##SUFFIX(const T* q, const T* k, const T* v, const int32_t* idx, T* out,  \
                                                  T* lse, int64_t B, int64_t H, int64_t Hk, int64_t N, int64_t M,  \
                                                  int64_t D, int64_t K4, double scale, int threads) {              \
    by_dim<T>(D, [&](auto dc) {                                                                                    \
      forward<T, decltype(dc)::value>(q, k, v, idx, out, lse, B, H, Hk, N, M, D, K4, T(scale), threads);          \
    });                                                                                                            \
  }                                                                                                                \
  extern "C" void attnzoo_gather_backward_##SUFFIX(const T* q, const T* k, const T* v, const int32_t* idx,         \
                                                   const T* lse, const T* delta, const T* dout, T* dq, T* dk,      \
                                                   T* dv, int64_t B, int64_t H, int64_t Hk, int64_t N, int64_t M,  \
                                                   int64_t D, int64_t K4, double scale, int threads) {             \
    by_dim<T>(D, [&](auto dc) {                                                                                    \
      backward<T, decltype(dc)::value>(q, k, v, idx, lse, delta, dout, dq, dk, dv, B, H, Hk, N, M, D, K4,          \
                                       T(scale), threads);                                                         \
    });                                                                                                            \
  }

ATTNZOO_GATHER(float, f32)
ATTNZOO_GATHER(double, f64)
