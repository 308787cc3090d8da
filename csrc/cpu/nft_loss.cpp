// nft_loss_fwd / nft_loss_bwd: DiffusionNFT's loss on forward-noised samples.
//
// Math (per sample with N elements; v the trained velocity, o the old policy's, g the target):
//   d+ = (1 - beta) o + beta v - g,   d- = (1 + beta) o - beta v - g   (implicit policies)
//   e+- = s d+-,  s = t (adaptive: the x0-prediction error) or 1
//   w+- = max(mean|e+-|, eps) (adaptive, held constant) or 1
//   L+- = mean(e+-^2) / w+-;   per = (r L+ + (1 - r) L-) / beta
//   parts = [L+, L-, w+, w-, mean((v - o)^2)]
//   backward: d per / d v = 2 s^2 / N (r d+ / w+ - (1 - r) d- / w-)   (beta cancels)
//
// Shape: memory-bound like logprob.cpp, and split the same way: (sample, tile) jobs run with
// OpenMP, each converting its tile to fp32 buffers (tile.h) and writing five partial sums
// (kLanes fp32 accumulators each, added in double) to a (jobs, 5) buffer; a sample's partials
// are added in tile order afterwards, so results do not depend on the thread count. The
// backward is one elementwise pass that recomputes d+- from the inputs (nothing of size N is
// saved) with the weights taken from the forward's parts.
#include <omp.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "common.h"
#include "cpu/tile.h"

namespace dancegrpo {

namespace {

constexpr int64_t kParallelMin = 1 << 16;
constexpr int kSums = 5;  // sum e+^2, sum |e+|, sum e-^2, sum |e-|, sum (v - o)^2

// The five sums over one tile; lanes as in tile_math.h, so the tile's result is thread-independent.
void tile_nft_sums(const float* __restrict__ v, const float* __restrict__ o, const float* __restrict__ g,
                   float cp, float cn, float beta, float s, int64_t n, double* out) {
  float a[kSums][kLanes] = {};
  auto body = [&](int64_t i, int j) {
    const float ep = s * ((cp * o[i] + beta * v[i]) - g[i]);
    const float en = s * ((cn * o[i] - beta * v[i]) - g[i]);
    const float dv = v[i] - o[i];
    a[0][j] += ep * ep;
    a[1][j] += std::fabs(ep);
    a[2][j] += en * en;
    a[3][j] += std::fabs(en);
    a[4][j] += dv * dv;
  };
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) {
    for (int j = 0; j < kLanes; ++j) body(i + j, j);
  }
  for (int j = 0; i < n; ++i, ++j) body(i, j);
  for (int k = 0; k < kSums; ++k) {
    double t = 0.0;
    for (int j = 0; j < kLanes; ++j) t += a[k][j];
    out[k] = t;
  }
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> nft_loss_fwd_cpu(const at::Tensor& v_in, const at::Tensor& o_in,
                                                    const at::Tensor& g_in, const at::Tensor& r_in,
                                                    const at::Tensor& t_in, double beta, double eps,
                                                    bool adaptive) {
  check_nft_args("dancegrpo::nft_loss_fwd", v_in, o_in, g_in, r_in, t_in, beta, eps);
  const at::Tensor v = dense(v_in), o = dense(o_in), g = dense(g_in), r = dense(r_in), t = dense(t_in);
  const int64_t batch = v.size(0);
  const int64_t n = v.numel() / batch;
  const int64_t tiles = tiles_per_sample(n);
  const int64_t jobs = batch * tiles;
  std::vector<double> part(jobs * kSums);
  const Src sv(v), so(o), sg(g);
  const float* pt = t.data_ptr<float>();
  const float fb = static_cast<float>(beta);
  const float cp = static_cast<float>(1.0 - beta), cn = static_cast<float>(1.0 + beta);

#pragma omp parallel for schedule(static) if (jobs > 1 && v.numel() >= kParallelMin)
  for (int64_t job = 0; job < jobs; ++job) {
    const int64_t s = job / tiles;
    const int64_t start = (job % tiles) * kTile;
    const int64_t len = std::min(kTile, n - start);
    const int64_t off = s * n + start;
    alignas(64) float bv[kTile], bo[kTile], bg[kTile];
    tile_nft_sums(load_tile(sv, off, len, bv), load_tile(so, off, len, bo), load_tile(sg, off, len, bg), cp, cn,
                  fb, adaptive ? pt[s] : 1.0f, len, &part[job * kSums]);
  }

  at::Tensor per = at::empty({batch}, r.options());
  at::Tensor parts = at::empty({batch, kSums}, r.options());
  float* pp = per.data_ptr<float>();
  float* pq = parts.data_ptr<float>();
  const float* pr = r.data_ptr<float>();
  const double nn = static_cast<double>(n);
  for (int64_t s = 0; s < batch; ++s) {
    double sum[kSums] = {};
    for (int64_t k = 0; k < tiles; ++k)
      for (int c = 0; c < kSums; ++c) sum[c] += part[(s * tiles + k) * kSums + c];
    const double wp = adaptive ? std::max(sum[1] / nn, eps) : 1.0;
    const double wn = adaptive ? std::max(sum[3] / nn, eps) : 1.0;
    const double lp = sum[0] / nn / wp, ln = sum[2] / nn / wn;
    pp[s] = static_cast<float>((pr[s] * lp + (1.0 - pr[s]) * ln) / beta);
    float* row = pq + s * kSums;
    row[0] = static_cast<float>(lp);
    row[1] = static_cast<float>(ln);
    row[2] = static_cast<float>(wp);
    row[3] = static_cast<float>(wn);
    row[4] = static_cast<float>(sum[4] / nn);
  }
  return {per, parts};
}

at::Tensor nft_loss_bwd_cpu(const at::Tensor& gper_in, const at::Tensor& v_in, const at::Tensor& o_in,
                            const at::Tensor& g_in, const at::Tensor& r_in, const at::Tensor& t_in,
                            const at::Tensor& parts_in, double beta, bool adaptive) {
  check_nft_args("dancegrpo::nft_loss_bwd", v_in, o_in, g_in, r_in, t_in, beta, 1.0);
  check_nft_grads(gper_in, parts_in, v_in);
  const at::Tensor v = dense(v_in), o = dense(o_in), g = dense(g_in), r = dense(r_in), t = dense(t_in);
  const at::Tensor gper = dense(gper_in), parts = dense(parts_in);
  const int64_t batch = v.size(0);
  const int64_t n = v.numel() / batch;
  const int64_t tiles = tiles_per_sample(n);
  const int64_t jobs = batch * tiles;
  // Per-sample factors in double, rounded once: gv = kp d+ - kn d-.
  std::vector<float> kp(batch), kn(batch), sc(batch);
  const float* pg = gper.data_ptr<float>();
  const float* pr = r.data_ptr<float>();
  const float* pt = t.data_ptr<float>();
  const float* pq = parts.data_ptr<float>();
  for (int64_t s = 0; s < batch; ++s) {
    const double sv = adaptive ? pt[s] : 1.0;
    const double c = 2.0 * pg[s] * sv * sv / static_cast<double>(n);
    kp[s] = static_cast<float>(c * pr[s] / pq[s * 5 + 2]);
    kn[s] = static_cast<float>(c * (1.0 - pr[s]) / pq[s * 5 + 3]);
  }
  at::Tensor gv = at::empty(v.sizes(), v.options());
  const Src sv(v), so(o), sg(g);
  const Dst dv(gv);
  const float fb = static_cast<float>(beta);
  const float cp = static_cast<float>(1.0 - beta), cn = static_cast<float>(1.0 + beta);

#pragma omp parallel for schedule(static) if (jobs > 1 && v.numel() >= kParallelMin)
  for (int64_t job = 0; job < jobs; ++job) {
    const int64_t s = job / tiles;
    const int64_t start = (job % tiles) * kTile;
    const int64_t len = std::min(kTile, n - start);
    const int64_t off = s * n + start;
    alignas(64) float bv[kTile], bo[kTile], bg[kTile], bout[kTile];
    const float* tv = load_tile(sv, off, len, bv);
    const float* to = load_tile(so, off, len, bo);
    const float* tg = load_tile(sg, off, len, bg);
    float* out = out_tile(dv, off, bout);
    const float a = kp[s], b = kn[s];
    for (int64_t i = 0; i < len; ++i) {
      const float dp = (cp * to[i] + fb * tv[i]) - tg[i];
      const float dn = (cn * to[i] - fb * tv[i]) - tg[i];
      out[i] = a * dp - b * dn;
    }
    flush_tile(dv, off, len, out);
  }
  return gv;
}

}  // namespace dancegrpo
