// attnzoo: CPU kernels for block-routed attention (MoBA-style routings): every query attends the union of the
// key blocks routed to it. Plain C ABI (loaded with ctypes; no Python or torch headers).
//
// The pairs come as *units* of one batch x head g: queries (indices i in [0, N), ascending) and the keys they all
// see. Block mode (key_pos null): unit u is key block unit_kb[u] (positions kb * block_k .., the last block ragged
// when M is not a multiple of block_k) with the queries routed to it. List mode: unit u's keys are the positions
// key_pos[key_start[u] .. key_start[u + 1]) (ascending; e.g. the list a block of queries shares) and block_k is
// the most keys of a unit. A causal unit (unit_causal[u]) hides from query i, at position p = i + M - N, the keys
// after p: in block mode a query's own block. The units of g are units[g_start[g] .. g_start[g + 1]), unit u
// holds queries q_pos[unit_start[u] .. unit_start[u + 1]).
//
// Tensors are [B, H, L, D] addressed as rows: entry (b, h, i) is the D (or Dv) contiguous values at
// base + (b * cb + h * ch + i * cm) * D, with the three row coefficients per tensor in coef[3 * t]
// (t: 0 q, 1 k, 2 v, 3 out and lse, 4 dout, 5 dq, 6 dk, 7 dv). Rows are read and written in place, in any
// layout (head splits of a projection's [B, L, H*D] memory, views of a longer cache buffer): nothing is gathered
// or copied whole.
//
// The forward runs the units of g in order with an online softmax per query (running max and sum, the output
// rows rescaled when the max grows) and writes out and lse (log-sum-exp of the scaled scores; -inf and a zero row
// for a query that sees no key). The backward recomputes the probabilities from lse and adds into dq, dk and dv.
// Per unit, scale * K^T (and for the backward V^T) are packed once and the key (value) rows copied together;
// queries go in strips of STRIP rows, copied together (the products then read cached rows) while the rows of the
// next strip are prefetched, and a causal strip computes only the keys up to its last query (the upper half of the
// own block is skipped). OpenMP over batch x heads: every row a thread writes belongs to its own g. D and Dv must
// be multiples of 16 floats (8 doubles).
#include "kernels_gemm.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <initializer_list>
#include <limits>
#include <vector>

namespace {

using namespace attnzoo_kernels;

constexpr int64_t STRIP = 64;  // query rows per strip

struct Plan {
  int64_t batch, heads, n, m, d, dv, block_k;
  const int64_t *coef, *g_start, *unit_kb, *unit_start, *q_pos;
  const uint8_t* unit_causal;
  const int64_t *key_start, *key_pos;  // list mode (null: block mode)
};

template <typename T>
struct Rows {
  T* base;
  int64_t cb, ch, cm, width;
  Rows(T* p, const int64_t* c, int64_t w) : base(p), cb(c ? c[0] : 0), ch(c ? c[1] : 0), cm(c ? c[2] : 0),
                                            width(w) {}
  int64_t index(int64_t b, int64_t h, int64_t i) const { return b * cb + h * ch + i * cm; }
  T* row(int64_t b, int64_t h, int64_t i) const { return base + index(b, h, i) * width; }
};

// Per thread: one unit's packed keys, one strip's scores, and the row pointers of both.
template <typename T>
struct Work {
  const Plan& p;
  int64_t rp;  // block_k rounded up to the column panel: the stride of kt, vt, sc, dp
  // Packed copies: kt = scale * K^T and vt = V^T (stride rp); kc, vc the key and value rows of the unit, qc, dc
  // the query and output-gradient rows of a strip, dkc, dvc the unit's key gradients (all contiguous rows: rows
  // read in place sit a whole token apart and would share a few cache sets).
  std::vector<T> kt, vt, sc, dp, kc, vc, qc, dc, dkc, dvc;
  std::vector<const T*> kp, vp, ktp, vtp, qp, dop, op, pcol, dscol, kcp, vcp, qcp, dcp;
  std::vector<T*> scp, dpp, outp, dqp, dkcp, dvcp;
  std::vector<int64_t> lim;  // per strip row: how many of the unit's keys it sees (a prefix)

  explicit Work(const Plan& plan)
      : p(plan), rp(round_up(plan.block_k, 2 * Vec<T>::L)), kt(plan.d * rp), vt(plan.dv * rp), sc(STRIP * rp),
        dp(STRIP * rp), kc(plan.block_k * plan.d), vc(plan.block_k * plan.dv), qc(STRIP * plan.d),
        dc(STRIP * plan.dv), dkc(plan.block_k * plan.d), dvc(plan.block_k * plan.dv), kp(plan.block_k),
        vp(plan.block_k), ktp(plan.d), vtp(plan.dv), qp(STRIP), dop(STRIP), op(STRIP), pcol(rp), dscol(rp),
        kcp(plan.block_k), vcp(plan.block_k), qcp(STRIP), dcp(STRIP), scp(STRIP), dpp(STRIP), outp(STRIP),
        dqp(STRIP), dkcp(plan.block_k), dvcp(plan.block_k), lim(STRIP) {
    for (int64_t i = 0; i < p.d; ++i) ktp[i] = kt.data() + i * rp;
    for (int64_t i = 0; i < p.dv; ++i) vtp[i] = vt.data() + i * rp;
    for (int64_t i = 0; i < STRIP; ++i) {
      scp[i] = sc.data() + i * rp, dpp[i] = dp.data() + i * rp;
      qcp[i] = qc.data() + i * p.d, dcp[i] = dc.data() + i * p.dv;
    }
    for (int64_t j = 0; j < rp; ++j) pcol[j] = sc.data() + j, dscol[j] = dp.data() + j;
    for (int64_t j = 0; j < p.block_k; ++j) {
      kcp[j] = kc.data() + j * p.d, vcp[j] = vc.data() + j * p.dv;
      dkcp[j] = dkc.data() + j * p.d, dvcp[j] = dvc.data() + j * p.dv;
    }
  }

  // dst = mul * the rows transposed, a column panel of stride rp (pack_columns).
  void pack_t(const std::vector<const T*>& rows, int64_t klen, int64_t width, T mul, std::vector<T>& dst) {
    pack_columns(rows.data(), klen, width, rp, mul, dst.data());
  }

  // dst row j = rows[j] (width values) for j < count.
  static void copy_rows(const std::vector<const T*>& rows, int64_t count, int64_t width, std::vector<T>& dst) {
    for (int64_t j = 0; j < count; ++j) {
      const T* src = rows[j];
      T* out = dst.data() + j * width;
      for (int64_t i = 0; i < width; ++i) out[i] = src[i];
    }
  }

  // Scaled scores (kt holds scale * K^T) of the cnt strip rows q[] over the first nk keys into sc (columns from
  // nk, or from a row's lim, to the panel end: -inf). Returns the panel width computed.
  int64_t scores(const T* const* q, int64_t cnt, int64_t nk) {
    const int64_t nkp = round_up(nk, 2 * Vec<T>::L);
    gemm<T, false>(q, 1, ktp.data(), p.d, nkp, scp.data(), cnt);
    const T ninf = -std::numeric_limits<T>::infinity();
    for (int64_t r = 0; r < cnt; ++r) {
      T* row = scp[r];
      const int64_t limit = lim[r] < nk ? lim[r] : nk;
      for (int64_t j = limit; j < nkp; ++j) row[j] = ninf;
    }
    return nkp;
  }
};

inline bool is_causal(const Plan& p, int64_t u) { return p.unit_causal && p.unit_causal[u]; }

// Start loading the rows of the strip after the one at s0 (queries of the same batch x head, up to q_end): they are
// a whole token apart in memory, so the hardware would fetch them only when first read.
template <typename T>
inline void prefetch_next(const Plan& p, int64_t s0, int64_t q_end, int64_t b, int64_t h,
                          std::initializer_list<const Rows<const T>*> tensors) {
  constexpr int64_t LINE = 64 / sizeof(T);
  const int64_t a = s0 + STRIP, z = a + STRIP < q_end ? a + STRIP : q_end;
  for (int64_t s = a; s < z; ++s)
    for (const Rows<const T>* t : tensors) {
      const T* row = t->row(b, h, p.q_pos[s]);
      for (int64_t c = 0; c < t->width; c += LINE) __builtin_prefetch(row + c);
    }
}

// The number of keys of unit u, and the position of its j-th key.
inline int64_t unit_keys(const Plan& p, int64_t u) {
  if (p.key_pos) return p.key_start[u + 1] - p.key_start[u];
  const int64_t k0 = p.unit_kb[u] * p.block_k;
  return p.m - k0 < p.block_k ? p.m - k0 : p.block_k;
}

inline int64_t key_position(const Plan& p, int64_t u, int64_t j) {
  return p.key_pos ? p.key_pos[p.key_start[u] + j] : p.unit_kb[u] * p.block_k + j;
}

// Key rows of unit u (into kp, vp); returns their number.
template <typename T>
int64_t load_keys(const Plan& p, Work<T>& w, const Rows<const T>& k, const Rows<const T>& v, int64_t b, int64_t h,
                  int64_t u) {
  const int64_t klen = unit_keys(p, u);
  for (int64_t j = 0; j < klen; ++j) {
    const int64_t at = key_position(p, u, j);
    w.kp[j] = k.row(b, h, at), w.vp[j] = v.row(b, h, at);
  }
  return klen;
}

// How many of the unit's klen keys each strip row sees (lim: all, or under causality those at or before its
// position, a prefix of the ascending keys), and how many the strip needs: its last row's count, the queries being
// ascending.
inline int64_t strip_keys(const Plan& p, int64_t u, const int64_t* qs, int64_t cnt, int64_t klen,
                          std::vector<int64_t>& lim) {
  if (!is_causal(p, u)) {
    for (int64_t r = 0; r < cnt; ++r) lim[r] = klen;
    return klen;
  }
  const int64_t shift = p.m - p.n;
  if (p.key_pos) {
    const int64_t* keys = p.key_pos + p.key_start[u];
    for (int64_t r = 0; r < cnt; ++r) lim[r] = std::upper_bound(keys, keys + klen, qs[r] + shift) - keys;
  } else {
    const int64_t k0 = p.unit_kb[u] * p.block_k;
    for (int64_t r = 0; r < cnt; ++r) {
      const int64_t seen = qs[r] + shift - k0 + 1;
      lim[r] = seen < 0 ? 0 : (seen < klen ? seen : klen);
    }
  }
  return lim[cnt - 1];
}

template <typename T>
void forward_group(const Plan& p, Work<T>& w, std::vector<T>& mrow, std::vector<T>& lrow, int64_t g, const T* q,
                   const T* k, const T* v, T* out, T* lse, T scale) {
  const int64_t b = g / p.heads, h = g % p.heads;
  const Rows<const T> qr(q, p.coef, p.d), kr(k, p.coef + 3, p.d), vr(v, p.coef + 6, p.dv);
  const Rows<T> orow(out, p.coef + 9, p.dv);
  const Rows<const T> ocrow(out, p.coef + 9, p.dv);
  const int64_t q_end = p.unit_start[p.g_start[g + 1]];
  const T ninf = -std::numeric_limits<T>::infinity();
  for (int64_t i = 0; i < p.n; ++i) {
    T* o = orow.row(b, h, i);
    for (int64_t c = 0; c < p.dv; ++c) o[c] = T(0);
    mrow[i] = ninf;
    lrow[i] = T(0);
  }
  for (int64_t u = p.g_start[g]; u < p.g_start[g + 1]; ++u) {
    const int64_t klen = load_keys(p, w, kr, vr, b, h, u);
    w.pack_t(w.kp, klen, p.d, scale, w.kt);
    Work<T>::copy_rows(w.vp, klen, p.dv, w.vc);
    for (int64_t s0 = p.unit_start[u]; s0 < p.unit_start[u + 1]; s0 += STRIP) {
      const int64_t cnt = p.unit_start[u + 1] - s0 < STRIP ? p.unit_start[u + 1] - s0 : STRIP;
      const int64_t* qs = p.q_pos + s0;
      for (int64_t r = 0; r < cnt; ++r) w.qp[r] = qr.row(b, h, qs[r]), w.outp[r] = orow.row(b, h, qs[r]);
      prefetch_next<T>(p, s0, q_end, b, h, {&qr, &ocrow});
      const int64_t kc = strip_keys(p, u, qs, cnt, klen, w.lim);
      if (kc == 0) continue;  // the strip sees none of the unit's keys
      Work<T>::copy_rows(w.qp, cnt, p.d, w.qc);  // one streaming pass: the product then reads cached rows
      const int64_t kcp = w.scores(w.qcp.data(), cnt, kc);
      for (int64_t r = 0; r < cnt; ++r) {
        T* row = w.scp[r];
        const T mx = row_max(row, kcp);
        const int64_t i = qs[r];
        const T m_old = mrow[i], m_new = mx > m_old ? mx : m_old;
        if (m_new == ninf) {
          for (int64_t j = 0; j < kcp; ++j) row[j] = T(0);
          continue;
        }
        const T total = exp_row(row, kcp, m_new);
        const T alpha = std::exp(m_old - m_new);
        lrow[i] = lrow[i] * alpha + total;
        mrow[i] = m_new;
        if (alpha != T(1)) {
          T* o = w.outp[r];
          for (int64_t c = 0; c < p.dv; ++c) o[c] *= alpha;
        }
      }
      gemm<T, true>(w.scp.data(), 1, w.vcp.data(), kc, p.dv, w.outp.data(), cnt);
    }
  }
  for (int64_t i = 0; i < p.n; ++i) {
    const int64_t at = orow.index(b, h, i);
    if (lrow[i] > T(0)) {
      const T inv = T(1) / lrow[i];
      T* o = out + at * p.dv;
      for (int64_t c = 0; c < p.dv; ++c) o[c] *= inv;
      lse[at] = mrow[i] + std::log(lrow[i]);
    } else {
      lse[at] = ninf;
    }
  }
}

template <typename T>
void backward_group(const Plan& p, Work<T>& w, int64_t g, const T* q, const T* k, const T* v, const T* out,
                    const T* lse, const T* dout, T* dq, T* dk, T* dv, T scale) {
  const int64_t b = g / p.heads, h = g % p.heads;
  const Rows<const T> qr(q, p.coef, p.d), kr(k, p.coef + 3, p.d), vr(v, p.coef + 6, p.dv);
  const Rows<const T> orow(out, p.coef + 9, p.dv), dorow(dout, p.coef + 12, p.dv);
  const Rows<T> dqr(dq, p.coef + 15, p.d), dkr(dk, p.coef + 18, p.d), dvr(dv, p.coef + 21, p.dv);
  const Rows<const T> dqcr(dq, p.coef + 15, p.d);
  const int64_t q_end = p.unit_start[p.g_start[g + 1]];
  const T ninf = -std::numeric_limits<T>::infinity();
  for (int64_t i = 0; i < p.n; ++i) {
    T* r = dqr.row(b, h, i);
    for (int64_t c = 0; c < p.d; ++c) r[c] = T(0);
  }
  for (int64_t j = 0; j < p.m; ++j) {
    T* rk = dkr.row(b, h, j);
    T* rv = dvr.row(b, h, j);
    for (int64_t c = 0; c < p.d; ++c) rk[c] = T(0);
    for (int64_t c = 0; c < p.dv; ++c) rv[c] = T(0);
  }
  std::vector<T> delta(STRIP), lse_r(STRIP);
  for (int64_t u = p.g_start[g]; u < p.g_start[g + 1]; ++u) {
    const int64_t klen = load_keys(p, w, kr, vr, b, h, u);
    w.pack_t(w.kp, klen, p.d, scale, w.kt);
    w.pack_t(w.vp, klen, p.dv, T(1), w.vt);
    Work<T>::copy_rows(w.kp, klen, p.d, w.kc);
    for (int64_t j = 0; j < klen * p.d; ++j) w.dkc[j] = T(0);
    for (int64_t j = 0; j < klen * p.dv; ++j) w.dvc[j] = T(0);
    for (int64_t s0 = p.unit_start[u]; s0 < p.unit_start[u + 1]; s0 += STRIP) {
      const int64_t cnt = p.unit_start[u + 1] - s0 < STRIP ? p.unit_start[u + 1] - s0 : STRIP;
      const int64_t* qs = p.q_pos + s0;
      for (int64_t r = 0; r < cnt; ++r) {
        const int64_t i = qs[r];
        w.qp[r] = qr.row(b, h, i);
        w.dop[r] = dorow.row(b, h, i);
        w.op[r] = orow.row(b, h, i);
        w.dqp[r] = dqr.row(b, h, i);
        lse_r[r] = lse[orow.index(b, h, i)];
        T dl = 0;
        const T* o = w.op[r];
        const T* d_o = w.dop[r];
#pragma omp simd reduction(+ : dl)
        for (int64_t c = 0; c < p.dv; ++c) dl += o[c] * d_o[c];
        delta[r] = dl;
      }
      prefetch_next<T>(p, s0, q_end, b, h, {&qr, &dorow, &orow, &dqcr});
      Work<T>::copy_rows(w.qp, cnt, p.d, w.qc);
      Work<T>::copy_rows(w.dop, cnt, p.dv, w.dc);
      const int64_t kc = strip_keys(p, u, qs, cnt, klen, w.lim);
      if (kc == 0) continue;
      const int64_t kcp = w.scores(w.qcp.data(), cnt, kc);
      for (int64_t r = 0; r < cnt; ++r) {
        T* row = w.scp[r];
        if (lse_r[r] == ninf) {
          for (int64_t j = 0; j < kcp; ++j) row[j] = T(0);
        } else {
          exp_row(row, kcp, lse_r[r]);
        }
      }
      // dP = dO V^T; dS = scale * P * (dP - delta); dq += dS K, dV += P^T dO, dK += dS^T Q.
      gemm<T, false>(w.dcp.data(), 1, w.vtp.data(), p.dv, kcp, w.dpp.data(), cnt);
      for (int64_t r = 0; r < cnt; ++r) {
        const T* pr = w.scp[r];
        T* ds = w.dpp[r];
        const T dl = delta[r];
#pragma omp simd
        for (int64_t j = 0; j < kcp; ++j) ds[j] = scale * pr[j] * (ds[j] - dl);
      }
      gemm<T, true>(w.dpp.data(), 1, w.kcp.data(), kc, p.d, w.dqp.data(), cnt);
      gemm<T, true>(w.pcol.data(), w.rp, w.dcp.data(), cnt, p.dv, w.dvcp.data(), kc);
      gemm<T, true>(w.dscol.data(), w.rp, w.qcp.data(), cnt, p.d, w.dkcp.data(), kc);
    }
    for (int64_t j = 0; j < klen; ++j) {
      const int64_t at = key_position(p, u, j);
      T* rk = dkr.row(b, h, at);
      T* rv = dvr.row(b, h, at);
      const T* ak = w.dkcp[j];
      const T* av = w.dvcp[j];
      for (int64_t c = 0; c < p.d; ++c) rk[c] += ak[c];
      for (int64_t c = 0; c < p.dv; ++c) rv[c] += av[c];
    }
  }
}

template <typename T>
void forward(const Plan& p, const T* q, const T* k, const T* v, T* out, T* lse, T scale, int threads) {
  const int64_t groups = p.batch * p.heads;
#pragma omp parallel num_threads(threads)
  {
    Work<T> w(p);
    std::vector<T> mrow(p.n), lrow(p.n);
#pragma omp for schedule(dynamic, 1)
    for (int64_t g = 0; g < groups; ++g) forward_group(p, w, mrow, lrow, g, q, k, v, out, lse, scale);
  }
}

template <typename T>
void backward(const Plan& p, const T* q, const T* k, const T* v, const T* out, const T* lse, const T* dout, T* dq,
              T* dk, T* dv, T scale, int threads) {
  const int64_t groups = p.batch * p.heads;
#pragma omp parallel num_threads(threads)
  {
    Work<T> w(p);
#pragma omp for schedule(dynamic, 1)
    for (int64_t g = 0; g < groups; ++g) backward_group(p, w, g, q, k, v, out, lse, dout, dq, dk, dv, scale);
  }
}

}  // namespace

#define ATTNZOO_ROUTED_ABI(T, SUFFIX)                                                                            \
  extern "C" void attnzoo_routed_forward_##SUFFIX(                                                               \
      const T* q, const T* k, const T* v, T* out, T* lse, const int64_t* coef, const int64_t* g_start,           \
      const int64_t* unit_kb, const uint8_t* unit_causal, const int64_t* unit_start, const int64_t* q_pos,       \
      const int64_t* key_start, const int64_t* key_pos, int64_t b, int64_t h, int64_t n, int64_t m, int64_t d,   \
      int64_t dv, int64_t block_k, double scale, int threads) {                                                  \
    const Plan p{b, h, n, m, d, dv, block_k, coef, g_start, unit_kb, unit_start, q_pos, unit_causal, key_start,  \
                 key_pos};                                                                                       \
    forward<T>(p, q, k, v, out, lse, T(scale), threads);                                                         \
  }                                                                                                              \
  extern "C" void attnzoo_routed_backward_##SUFFIX(                                                              \
      const T* q, const T* k, const T* v, const T* out, const T* lse, const T* dout, T* dq, T* dk, T* dv,        \
      const int64_t* coef, const int64_t* g_start, const int64_t* unit_kb, const uint8_t* unit_causal,           \
      const int64_t* unit_start, const int64_t* q_pos, const int64_t* key_start, const int64_t* key_pos,         \
      int64_t b, int64_t h, int64_t n, int64_t m, int64_t d, int64_t dvs, int64_t block_k, double scale,         \
      int threads) {                                                                                             \
    const Plan p{b, h, n, m, d, dvs, block_k, coef, g_start, unit_kb, unit_start, q_pos, unit_causal, key_start, \
                 key_pos};                                                                                       \
    backward<T>(p, q, k, v, out, lse, dout, dq, dk, dv, T(scale), threads);                                      \
  }

ATTNZOO_ROUTED_ABI(float, f32)
ATTNZOO_ROUTED_ABI(double, f64)
