// attnzoo: exp on GCC / Clang vector types, shared by the compiled CPU kernels (included by their sources).
#pragma once

namespace attnzoo_kernels {

// exp on float lanes V (with matching int32 lanes I): Cody-Waite reduction by ln 2 and a degree-7 polynomial
// (relative error ~1.2e-7 on [-87, 0]); inputs below -87.3 (and -inf) give exactly 0.
template <typename V, typename I>
inline V vexp(V x) {
  const I dead = x < -87.33654f;
  x = dead ? V{} - 87.33654f : x;
  const V fx = x * 1.44269504088896341f + 0.5f;
  I n = __builtin_convertvector(fx, I);
  V nf = __builtin_convertvector(n, V);
  n += (I)(nf > fx);  // floor
  nf = __builtin_convertvector(n, V);
  const V r = x - nf * 0.693359375f + nf * 2.12194440e-4f;
  V y = r * 1.9875691500e-4f + 1.3981999507e-3f;
  y = y * r + 8.3334519073e-3f;
  y = y * r + 4.1665795894e-2f;
  y = y * r + 1.6666665459e-1f;
  y = y * r + 5.0000001201e-1f;
  y = y * r * r + r + 1.0f;
  return (V)((I)(y * (V)((n + 127) << 23)) & ~dead);
}

}  // namespace attnzoo_kernels
