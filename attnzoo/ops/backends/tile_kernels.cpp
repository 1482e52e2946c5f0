// attnzoo: CPU kernels for dense attention inside the tiles of a tile plan (Swin and MaxViT windows,
// neighbourhood and band tiles): each tile is a set of query tokens that all see one list of key tokens.
// Plain C ABI (loaded with ctypes; no Python or torch headers). Tensors are contiguous:
// q [B, H, N, D], k [B, Hk, M, D], v [B, Hk, M, Dv] (H a multiple of Hk: the H / Hk query heads of a key
// head share its tiles), q_idx [T, bq] and kv_idx [T, R] int32 token ids (-1: an empty slot), mask [T, bq, R]
// additive (0 / -inf; shared by every batch element and head) or null, key_ok [B, M] uint8 or null (key padding:
// 0 = the key is hidden from every query of that batch element), bias [H, n_bias] and bias_idx [T, bq, R]
// or null (an additive per-head bias read at an index of the pair, e.g. relative positions), out [B, H, N, Dv]
// and lse [B, H, N] (rows of queries in no tile are left as they are). The backward takes out, lse, dout, dlse
// [B, H, N] or null, writes dq for the queries of the tiles and adds dk, dv into zero-initialised buffers (a key
// may belong to several tiles) and, with a bias, its gradient into dbias [B, H, n_bias] (zero-initialised).
//
// Tokens are read and written in place through row pointers: no tiled copies of q, k, v, out or the gradients.
// Per tile, K (and for the backward V) are packed transposed into a small buffer; every product is one
// register-blocked kernel: six rows of the result by two vectors of columns (12 FMA chains), one broadcast of the
// left operand per row and step, the reduction loop unrolled by four. D and Dv must be multiples of 16 floats
// (8 doubles). OpenMP over (batch x key head, tile) pairs; in the backward, when a key may be in several tiles or
// a bias gradient is summed, over batch x key heads only, with the tiles of each in order.
#include "kernels_gemm.h"

#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

namespace {

using namespace attnzoo_kernels;

struct Sizes {
  int64_t batch, heads, kv_heads, n, m, d, dv, tiles, bq, r;
};

// Per thread: the tile's packed keys and rows, for one (batch, key head) at a time.
template <typename T>
struct TileWork {
  const Sizes& s;
  int64_t rp;  // R rounded up to the column panel
  std::vector<T> kt, vt, sc, dp, zero, sink, col;
  std::vector<const T*> kp, vp, ktp, vtp, qp, dop, op;
  std::vector<T*> scp, dpp, outp, dqp, dkp, dvp;
  std::vector<const T*> pcol, dscol;
  std::vector<int64_t> slot, tok;

  explicit TileWork(const Sizes& sz)
      : s(sz), rp(round_up(sz.r, 2 * Vec<T>::L)), kt(sz.d * rp), vt(sz.dv * rp), sc(sz.bq * rp), dp(sz.bq * rp),
        zero(sz.d > sz.dv ? sz.d : sz.dv), sink(zero.size()), col(sz.r), kp(sz.r), vp(sz.r), ktp(sz.d), vtp(sz.dv),
        qp(sz.bq), dop(sz.bq), op(sz.bq), scp(sz.bq), dpp(sz.bq), outp(sz.bq), dqp(sz.bq), dkp(sz.r), dvp(sz.r),
        pcol(rp), dscol(rp), slot(sz.bq), tok(sz.bq) {
    for (int64_t i = 0; i < s.d; ++i) ktp[i] = kt.data() + i * rp;
    for (int64_t i = 0; i < s.dv; ++i) vtp[i] = vt.data() + i * rp;
    for (int64_t i = 0; i < s.bq; ++i) scp[i] = sc.data() + i * rp, dpp[i] = dp.data() + i * rp;
    for (int64_t j = 0; j < rp; ++j) pcol[j] = sc.data() + j, dscol[j] = dp.data() + j;
  }

  // Key / value row pointers of tile t (empty slots read a zero row) and K^T (and V^T) packed, zero-padded.
  // With key padding (key_ok of this batch element), col[j] is 0 for a visible key and -inf for a hidden one.
  void load_keys(const int32_t* kv_idx, const T* kb, const T* vb, bool pack_v, const uint8_t* key_ok) {
    for (int64_t j = 0; j < s.r; ++j) {
      const int32_t id = kv_idx[j];
      kp[j] = id < 0 ? zero.data() : kb + id * s.d;
      vp[j] = id < 0 ? zero.data() : vb + id * s.dv;
      if (key_ok) col[j] = id >= 0 && key_ok[id] ? T(0) : -std::numeric_limits<T>::infinity();
    }
    pack(kp, s.d, kt);
    if (pack_v) pack(vp, s.dv, vt);
  }

  // dst = the rows transposed, a column panel of stride rp, zero columns from R to rp (pack_columns).
  void pack(const std::vector<const T*>& rows, int64_t width, std::vector<T>& dst) {
    pack_columns(rows.data(), s.r, width, rp, T(1), dst.data());
  }

  // The real query slots of tile t: count, with slot[] and token[] filled.
  int64_t load_queries(const int32_t* q_idx) {
    int64_t cnt = 0;
    for (int64_t i = 0; i < s.bq; ++i)
      if (q_idx[i] >= 0) slot[cnt] = i, tok[cnt++] = q_idx[i];
    return cnt;
  }

  // Scores of the cnt query rows qp[] into sc (scale, mask, bias; padded columns -inf), then probabilities:
  // exp(x - lse) with lse given (backward), or normalised with lse written (forward, lse_out != null). Rows
  // without a key: 0.
  void probabilities(int64_t cnt, const T* mask_t, const T* pad, const T* bias_h, const int32_t* bidx_t, T scale,
                     const T* lse_in, T* lse_out) {
    typedef typename Vec<T>::V V;
    constexpr int L = Vec<T>::L;
    gemm<T, false>(qp.data(), 1, ktp.data(), s.d, rp, scp.data(), cnt);
    const T ninf = -std::numeric_limits<T>::infinity();
    const int64_t body = s.r / L * L;
    for (int64_t i = 0; i < cnt; ++i) {
      T* row = scp[i];
      const T* mk = mask_t ? mask_t + slot[i] * s.r : nullptr;
      for (int64_t j = 0; j < body; j += L) {
        V* x = reinterpret_cast<V*>(row + j);
        *x *= scale;
        if (mk) *x += *reinterpret_cast<const V*>(mk + j);
        if (pad) *x += *reinterpret_cast<const V*>(pad + j);
      }
      for (int64_t j = body; j < s.r; ++j) row[j] = row[j] * scale + (mk ? mk[j] : T(0)) + (pad ? pad[j] : T(0));
      if (bias_h) {
        const int32_t* bi = bidx_t + slot[i] * s.r;
        for (int64_t j = 0; j < s.r; ++j) row[j] += bias_h[bi[j]];
      }
      for (int64_t j = s.r; j < rp; ++j) row[j] = ninf;
      const T mx = row_max(row, rp);
      const T shift = lse_out ? mx : lse_in[i];
      if (shift == ninf) {
        for (int64_t j = 0; j < rp; ++j) row[j] = T(0);
        if (lse_out) lse_out[i] = ninf;
        continue;
      }
      const T total = exp_row(row, rp, shift);
      if (lse_out) {
        const V inv = Vec<T>::splat(T(1) / total);
        for (int64_t j = 0; j < rp; j += L) *reinterpret_cast<V*>(row + j) *= inv;
        lse_out[i] = mx + std::log(total);
      }
    }
  }
};

// The inputs of one call, shared by the per-tile steps.
template <typename T>
struct Call {
  const T *q, *k, *v;
  const int32_t *q_idx, *kv_idx;
  const T* mask;
  const uint8_t* key_ok;  // [B, M] or null
  const T* bias;  // [H, n_bias] or null
  const int32_t* bias_idx;  // [T, bq, R]
  int64_t n_bias;
  const Sizes& s;
  T scale;

  const T* bias_row(int64_t h) const { return bias ? bias + h * n_bias : nullptr; }
  const int32_t* bias_tile(int64_t t) const { return bias ? bias_idx + t * s.bq * s.r : nullptr; }
  const T* mask_tile(int64_t t) const { return mask ? mask + t * s.bq * s.r : nullptr; }
  const uint8_t* keys_of(int64_t b) const { return key_ok ? key_ok + b * s.m : nullptr; }
};

// Tile t of batch x key head bh loaded into w: its query slots, key rows, packed K^T (and with pack_v V^T) and
// key padding. cnt = 0: the tile has no query.
template <typename T>
struct TileStart {
  int64_t g, b, hk, cnt;
  const T* pad;  // the key padding columns, or null

  TileStart(const Call<T>& c, TileWork<T>& w, int64_t bh, int64_t t, bool pack_v)
      : g(c.s.heads / c.s.kv_heads), b(bh / c.s.kv_heads), hk(bh % c.s.kv_heads), cnt(0), pad(nullptr) {
    const Sizes& s = c.s;
    cnt = w.load_queries(c.q_idx + t * s.bq);
    if (cnt == 0) return;
    w.load_keys(c.kv_idx + t * s.r, c.k + bh * s.m * s.d, c.v + bh * s.m * s.dv, pack_v, c.keys_of(b));
    pad = c.key_ok ? w.col.data() : nullptr;
  }
};

// Forward of tile t for batch x key head bh (every query head of the group).
template <typename T>
void forward_tile(const Call<T>& c, TileWork<T>& w, std::vector<T>& lse_row, int64_t bh, int64_t t, T* out, T* lse) {
  const Sizes& s = c.s;
  const TileStart<T> ts(c, w, bh, t, false);
  const int64_t g = ts.g, b = ts.b, hk = ts.hk, cnt = ts.cnt;
  const T* pad = ts.pad;
  if (cnt == 0) return;
  for (int64_t gi = 0; gi < g; ++gi) {
    const int64_t row0 = (b * s.heads + hk * g + gi) * s.n;
    for (int64_t i = 0; i < cnt; ++i) {
      w.qp[i] = c.q + (row0 + w.tok[i]) * s.d;
      w.outp[i] = out + (row0 + w.tok[i]) * s.dv;
    }
    const int64_t h = hk * g + gi;
    w.probabilities(cnt, c.mask_tile(t), pad, c.bias_row(h), c.bias_tile(t), c.scale, nullptr, lse_row.data());
    gemm<T, false>(w.scp.data(), 1, w.vp.data(), s.r, s.dv, w.outp.data(), cnt);
    for (int64_t i = 0; i < cnt; ++i) lse[row0 + w.tok[i]] = lse_row[i];
  }
}

// Backward of tile t for batch x key head bh: writes dq of its queries, adds into dk, dv of its keys.
template <typename T>
void backward_tile(const Call<T>& c, TileWork<T>& w, std::vector<T>& lse_row, int64_t bh, int64_t t, const T* out,
                   const T* lse, const T* dout, const T* dlse, T* dq, T* dk, T* dv, T* dbias) {
  const Sizes& s = c.s;
  const TileStart<T> ts(c, w, bh, t, true);
  const int64_t g = ts.g, b = ts.b, hk = ts.hk, cnt = ts.cnt;
  const T* pad = ts.pad;
  if (cnt == 0) return;
  for (int64_t j = 0; j < s.r; ++j) {
    const int32_t id = c.kv_idx[t * s.r + j];
    w.dkp[j] = id < 0 ? w.sink.data() : dk + (bh * s.m + id) * s.d;
    w.dvp[j] = id < 0 ? w.sink.data() : dv + (bh * s.m + id) * s.dv;
  }
  for (int64_t gi = 0; gi < g; ++gi) {
    const int64_t row0 = (b * s.heads + hk * g + gi) * s.n;
    for (int64_t i = 0; i < cnt; ++i) {
      const int64_t at = row0 + w.tok[i];
      w.qp[i] = c.q + at * s.d;
      w.dop[i] = dout + at * s.dv;
      w.op[i] = out + at * s.dv;
      w.dqp[i] = dq + at * s.d;
      lse_row[i] = lse[at];
    }
    const int64_t h = hk * g + gi;
    w.probabilities(cnt, c.mask_tile(t), pad, c.bias_row(h), c.bias_tile(t), c.scale, lse_row.data(), nullptr);
    T* db = dbias ? dbias + (b * s.heads + h) * c.n_bias : nullptr;
    // dP = dO V^T, then dX = P * (dP - delta) for the logits (delta = rowsum(dO * O) - dlse: the bias's gradient)
    // and dS = scale * dX for the products.
    gemm<T, false>(w.dop.data(), 1, w.vtp.data(), s.dv, w.rp, w.dpp.data(), cnt);
    for (int64_t i = 0; i < cnt; ++i) {
      T delta = 0;
      const T* o = w.op[i];
      const T* d_o = w.dop[i];
#pragma omp simd reduction(+ : delta)
      for (int64_t col = 0; col < s.dv; ++col) delta += o[col] * d_o[col];
      if (dlse) delta -= dlse[row0 + w.tok[i]];
      const T* p = w.scp[i];
      T* ds = w.dpp[i];
#pragma omp simd
      for (int64_t j = 0; j < w.rp; ++j) ds[j] = p[j] * (ds[j] - delta);
      if (db) {
        const int32_t* bi = c.bias_tile(t) + w.slot[i] * s.r;
        for (int64_t j = 0; j < s.r; ++j) db[bi[j]] += ds[j];
      }
#pragma omp simd
      for (int64_t j = 0; j < w.rp; ++j) ds[j] *= c.scale;
    }
    gemm<T, false>(w.dpp.data(), 1, w.kp.data(), s.r, s.d, w.dqp.data(), cnt);
    // dV += P^T dO and dK += dS^T Q: the left operands are columns of P and dS (stride rp).
    gemm<T, true>(w.pcol.data(), w.rp, w.dop.data(), cnt, s.dv, w.dvp.data(), s.r);
    gemm<T, true>(w.dscol.data(), w.rp, w.qp.data(), cnt, s.d, w.dkp.data(), s.r);
  }
}

// Query tiles never share a query, so the forward runs every (batch x key head, tile) pair in parallel.
template <typename T>
void forward(const Call<T>& c, T* out, T* lse, int threads) {
  const Sizes& s = c.s;
  const int64_t pairs = s.batch * s.kv_heads * s.tiles;
#pragma omp parallel num_threads(threads)
  {
    TileWork<T> w(s);
    std::vector<T> lse_row(s.bq);
#pragma omp for schedule(static)
    for (int64_t i = 0; i < pairs; ++i) forward_tile(c, w, lse_row, i / s.tiles, i % s.tiles, out, lse);
  }
}

// Tiles that share a key add into the same dk, dv rows, and every tile of a head into its dbias: in parallel over
// pairs only when no key is in two tiles (keys_disjoint) and there is no bias, else over batch x key heads with the
// tiles of each in order.
template <typename T>
void backward(const Call<T>& c, const T* out, const T* lse, const T* dout, const T* dlse, T* dq, T* dk, T* dv,
              T* dbias, bool keys_disjoint, int threads) {
  const Sizes& s = c.s;
  const int64_t bhk = s.batch * s.kv_heads;
#pragma omp parallel num_threads(threads)
  {
    TileWork<T> w(s);
    std::vector<T> lse_row(s.bq);
    if (keys_disjoint && !dbias) {
#pragma omp for schedule(static)
      for (int64_t i = 0; i < bhk * s.tiles; ++i)
        backward_tile(c, w, lse_row, i / s.tiles, i % s.tiles, out, lse, dout, dlse, dq, dk, dv, dbias);
    } else {
#pragma omp for schedule(static)
      for (int64_t bh = 0; bh < bhk; ++bh)
        for (int64_t t = 0; t < s.tiles; ++t)
          backward_tile(c, w, lse_row, bh, t, out, lse, dout, dlse, dq, dk, dv, dbias);
    }
  }
}

Sizes sizes(int64_t b, int64_t h, int64_t hk, int64_t n, int64_t m, int64_t d, int64_t dv, int64_t t, int64_t bq,
            int64_t r) {
  return Sizes{b, h, hk, n, m, d, dv, t, bq, r};
}

}  // namespace

#define ATTNZOO_TILE_ABI(T, SUFFIX)                                                                               \
  extern "C" void attnzoo_tile_forward_##SUFFIX(                                                                  \
      const T* q, const T* k, const T* v, const int32_t* q_idx, const int32_t* kv_idx, const T* mask,             \
      const uint8_t* key_ok, const T* bias, const int32_t* bias_idx, int64_t n_bias, T* out, T* lse, int64_t b,   \
      int64_t h, int64_t hk, int64_t n, int64_t m, int64_t d, int64_t dv, int64_t t, int64_t bq, int64_t r,       \
      double scale, int threads) {                                                                                \
    const Sizes s = sizes(b, h, hk, n, m, d, dv, t, bq, r);                                                       \
    const Call<T> c{q, k, v, q_idx, kv_idx, mask, key_ok, bias, bias_idx, n_bias, s, T(scale)};                   \
    forward<T>(c, out, lse, threads);                                                                             \
  }                                                                                                               \
  extern "C" void attnzoo_tile_backward_##SUFFIX(                                                                 \
      const T* q, const T* k, const T* v, const int32_t* q_idx, const int32_t* kv_idx, const T* mask,             \
      const uint8_t* key_ok, const T* bias, const int32_t* bias_idx, int64_t n_bias, const T* out, const T* lse,  \
      const T* dout, const T* dlse, T* dq, T* dk, T* dv, T* dbias, int64_t b, int64_t h, int64_t hk, int64_t n,   \
      int64_t m, int64_t d, int64_t dvs, int64_t t, int64_t bq, int64_t r, double scale, int keys_disjoint,       \
      int threads) {                                                                                              \
    const Sizes s = sizes(b, h, hk, n, m, d, dvs, t, bq, r);                                                      \
    const Call<T> c{q, k, v, q_idx, kv_idx, mask, key_ok, bias, bias_idx, n_bias, s, T(scale)};                   \
    backward<T>(c, out, lse, dout, dlse, dq, dk, dv, dbias, keys_disjoint != 0, threads);                         \
  }

ATTNZOO_TILE_ABI(float, f32)
ATTNZOO_TILE_ABI(double, f64)
