// attnzoo: register-blocked products and exp rows on GCC / Clang vector types, shared by the compiled CPU
// kernels (included by their sources): row-pointer operands, so rows are read where they are.
#pragma once

#include <cmath>
#include <cstdint>
#include <limits>

#include "kernels_exp.h"

namespace attnzoo_kernels {

template <typename T> struct Vec;
template <> struct Vec<float> {
  typedef float V __attribute__((vector_size(32), aligned(4), __may_alias__));
  typedef int32_t I __attribute__((vector_size(32), aligned(4), __may_alias__));
  static constexpr int L = 8;
  static V splat(float x) { return V{x, x, x, x, x, x, x, x}; }
};
template <> struct Vec<double> {
  typedef double V __attribute__((vector_size(32), aligned(8), __may_alias__));
  static constexpr int L = 4;
  static V splat(double x) { return V{x, x, x, x}; }
};

// c[r][n, n + 2L) (+)= sum_{k < kdim} a[r][k * astep] * b[k][n, n + 2L) for r < MR.
template <typename T, int MR, bool kAdd>
inline void micro(const T* const* a, int64_t astep, const T* const* b, int64_t kdim, int64_t n, T* const* c) {
  typedef typename Vec<T>::V V;
  constexpr int L = Vec<T>::L;
  const T* ar[MR];
#pragma GCC unroll 6
  for (int r = 0; r < MR; ++r) ar[r] = a[r];
  V acc0[MR], acc1[MR];
#pragma GCC unroll 6
  for (int r = 0; r < MR; ++r) acc0[r] = acc1[r] = V{};
#pragma GCC unroll 4
  for (int64_t kk = 0; kk < kdim; ++kk) {
    const T* bk = b[kk] + n;
    const V b0 = *reinterpret_cast<const V*>(bk), b1 = *reinterpret_cast<const V*>(bk + L);
    const int64_t off = kk * astep;
#pragma GCC unroll 6
    for (int r = 0; r < MR; ++r) {
      const V x = Vec<T>::splat(ar[r][off]);
      acc0[r] += x * b0;
      acc1[r] += x * b1;
    }
  }
#pragma GCC unroll 6
  for (int r = 0; r < MR; ++r) {
    V* cr = reinterpret_cast<V*>(c[r] + n);
    if (kAdd) {
      cr[0] += acc0[r];
      cr[1] += acc1[r];
    } else {
      cr[0] = acc0[r];
      cr[1] = acc1[r];
    }
  }
}

// C (m rows, row pointers c) (+)= A (row pointers a, element k at a[r][k * astep]) x B (kdim row pointers b,
// ncols columns, a multiple of 2L).
template <typename T, bool kAdd>
void gemm(const T* const* a, int64_t astep, const T* const* b, int64_t kdim, int64_t ncols, T* const* c, int64_t m) {
  constexpr int W = 2 * Vec<T>::L;
  int64_t r = 0;
  for (; r + 6 <= m; r += 6)
    for (int64_t n = 0; n < ncols; n += W) micro<T, 6, kAdd>(a + r, astep, b, kdim, n, c + r);
  const int64_t left = m - r;
  for (int64_t n = 0; n < ncols && left > 0; n += W) {
    switch (left) {
      case 5: micro<T, 5, kAdd>(a + r, astep, b, kdim, n, c + r); break;
      case 4: micro<T, 4, kAdd>(a + r, astep, b, kdim, n, c + r); break;
      case 3: micro<T, 3, kAdd>(a + r, astep, b, kdim, n, c + r); break;
      case 2: micro<T, 2, kAdd>(a + r, astep, b, kdim, n, c + r); break;
      default: micro<T, 1, kAdd>(a + r, astep, b, kdim, n, c + r); break;
    }
  }
}

// p[j] <- exp(p[j] - shift) for j < width (a multiple of 8); returns the sum.
inline float exp_row(float* p, int64_t width, float shift) {
  typedef Vec<float>::V V;
  V total{};
  for (int64_t j = 0; j < width; j += 8) {
    V* pj = reinterpret_cast<V*>(p + j);
    *pj = attnzoo_kernels::vexp<V, Vec<float>::I>(*pj - shift);
    total += *pj;
  }
  return ((total[0] + total[1]) + (total[2] + total[3])) + ((total[4] + total[5]) + (total[6] + total[7]));
}

inline double exp_row(double* p, int64_t width, double shift) {
  double total = 0;
  for (int64_t j = 0; j < width; ++j) {
    p[j] = std::exp(p[j] - shift);
    total += p[j];
  }
  return total;
}

inline int64_t round_up(int64_t x, int64_t to) { return (x + to - 1) / to * to; }

// The largest of p[0 .. width) (width a multiple of Vec<T>::L).
template <typename T>
inline T row_max(const T* p, int64_t width) {
  typedef typename Vec<T>::V V;
  constexpr int L = Vec<T>::L;
  V vmax = Vec<T>::splat(-std::numeric_limits<T>::infinity());
  for (int64_t j = 0; j < width; j += L) {
    const V x = *reinterpret_cast<const V*>(p + j);
    vmax = vmax > x ? vmax : x;
  }
  T mx = vmax[0];
  for (int c = 1; c < L; ++c) mx = vmax[c] > mx ? vmax[c] : mx;
  return mx;
}

// Column panel: dst[i * ld + j] = mul * rows[j][i] for j < count, i < width; zero columns from count to the next
// multiple of two vectors. Blocks of 16 rows: each write fills a run of one output row while the 16 source rows
// stay cached.
template <typename T>
void pack_columns(const T* const* rows, int64_t count, int64_t width, int64_t ld, T mul, T* dst) {
  constexpr int64_t JB = 16;
  const int64_t end = round_up(count, 2 * Vec<T>::L);
  for (int64_t j0 = 0; j0 < end; j0 += JB) {
    const T* src[JB];
    const int64_t nj = count - j0 < JB ? (count > j0 ? count - j0 : 0) : JB;
    for (int64_t j = 0; j < nj; ++j) src[j] = rows[j0 + j];
    for (int64_t i = 0; i < width; ++i) {
      T* o = dst + i * ld + j0;
      for (int64_t j = 0; j < nj; ++j) o[j] = mul * src[j][i];
      for (int64_t j = nj; j < JB && j0 + j < end; ++j) o[j] = T(0);
    }
  }
}

}  // namespace attnzoo_kernels
