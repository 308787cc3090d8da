// logprob_fwd / logprob_bwd: the Gaussian log-prob of one sampler step and its gradient.
//
// Math (per sample s with N elements, mean = a x + b v, r = y - mean):
//   logp_s = mean_i [ -r_i^2 / (2 std^2) - log std - log sqrt(2 pi) ]   (sum_i with sum=true)
//          = -S_s / (2 std^2 N) - log std - log sqrt(2 pi),   S_s = sum_i r_i^2
//   msd_s  = mean_i (v_i - v_ref_i)^2                          (only with v_ref)
//   backward, k = 1 / (std^2 N) (1 / std^2 with sum=true):
//   gv = g_logp b k r + g_msd 2 (v - v_ref) / N,  gx = g_logp a k r,  gy = -g_logp k r
//
// Shape: the ops are memory-bound (a few flops per element loaded), so the forward reads each
// input once and the backward once more, with no full-size temporary. Work is split into
// (sample, tile) jobs of kTile elements, run in parallel with OpenMP; each job converts its
// tile to fp32 buffers (tile.h), computes in fp32 (kLanes fp32 accumulators, added in double)
// and writes one partial sum into a (B, tiles) buffer of doubles. The partials of a sample are
// added in tile order in double afterwards, so the result is bit-identical from run to run and
// for any thread count. Offsets are 64-bit throughout (a sample or a tensor may exceed 2^31
// elements).
#include <omp.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "common.h"
#include "cpu/tile.h"
#include "cpu/tile_math.h"

namespace dancegrpo {

double logprob_from_sum(double sum_sq, double std, int64_t n, bool sum) {
  const double log_norm = std::log(std) + kLogSqrt2Pi;
  if (sum) return -sum_sq / (2.0 * std * std) - static_cast<double>(n) * log_norm;
  return -sum_sq / (2.0 * std * std * static_cast<double>(n)) - log_norm;
}

namespace {

// Below this many elements a parallel region costs more than it saves.
constexpr int64_t kParallelMin = 1 << 16;

bool has(const std::optional<at::Tensor>& t) { return t.has_value() && t->defined(); }

}  // namespace

std::tuple<at::Tensor, at::Tensor> logprob_fwd_cpu(
    const at::Tensor& v_in, const at::Tensor& x_in, const at::Tensor& y_in,
    const std::optional<at::Tensor>& v_ref_in, const at::Tensor& a_in, const at::Tensor& b_in,
    const at::Tensor& std_in, bool sum) {
  check_logprob_args("dancegrpo::logprob_fwd", "y", v_in, x_in, y_in, v_ref_in, a_in, b_in, std_in);
  const at::Tensor v = dense(v_in), x = dense(x_in), y = dense(y_in);
  const at::Tensor a = dense(a_in), b = dense(b_in), std = dense(std_in);
  const std::optional<at::Tensor> v_ref = dense(v_ref_in);
  const bool with_ref = has(v_ref);
  const int64_t batch = v.size(0);
  const int64_t n = v.numel() / batch;
  const int64_t tiles = tiles_per_sample(n);
  const int64_t jobs = batch * tiles;

  std::vector<double> part_r2(jobs), part_d2(with_ref ? jobs : 0);
  const Src sv(v), sx(x), sy(y), sr = with_ref ? Src(*v_ref) : Src();
  const float* pa = a.data_ptr<float>();
  const float* pb = b.data_ptr<float>();

#pragma omp parallel for schedule(static) if (jobs > 1 && v.numel() >= kParallelMin)
  for (int64_t job = 0; job < jobs; ++job) {
    const int64_t s = job / tiles;
    const int64_t start = (job % tiles) * kTile;
    const int64_t len = std::min(kTile, n - start);
    const int64_t off = s * n + start;
    alignas(64) float bv[kTile], bx[kTile], by[kTile], br[kTile];
    const float* tv = load_tile(sv, off, len, bv);
    const float* tx = load_tile(sx, off, len, bx);
    const float* ty = load_tile(sy, off, len, by);
    part_r2[job] = tile_sum_sq_residual(tv, tx, ty, pa[s], pb[s], len);
    if (with_ref) part_d2[job] = tile_sum_sq_diff(tv, load_tile(sr, off, len, br), len);
  }

  at::Tensor logp = at::empty({batch}, a.options());
  at::Tensor msd = at::empty({with_ref ? batch : 0}, a.options());
  float* pl = logp.data_ptr<float>();
  float* pm = msd.data_ptr<float>();
  const float* ps = std.data_ptr<float>();
  for (int64_t s = 0; s < batch; ++s) {
    double r2 = 0.0, d2 = 0.0;
    for (int64_t t = 0; t < tiles; ++t) r2 += part_r2[s * tiles + t];
    pl[s] = static_cast<float>(logprob_from_sum(r2, ps[s], n, sum));
    if (with_ref) {
      for (int64_t t = 0; t < tiles; ++t) d2 += part_d2[s * tiles + t];
      pm[s] = static_cast<float>(d2 / static_cast<double>(n));
    }
  }
  return {logp, msd};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> logprob_bwd_cpu(
    const at::Tensor& g_logp_in, const std::optional<at::Tensor>& g_msd_in, const at::Tensor& v_in,
    const at::Tensor& x_in, const at::Tensor& y_in, const std::optional<at::Tensor>& v_ref_in,
    const at::Tensor& a_in, const at::Tensor& b_in, const at::Tensor& std_in, bool sum, bool need_v,
    bool need_x, bool need_y) {
  check_logprob_args("dancegrpo::logprob_bwd", "y", v_in, x_in, y_in, v_ref_in, a_in, b_in, std_in);
  check_logprob_grads(g_logp_in, g_msd_in, v_ref_in, v_in);
  const at::Tensor v = dense(v_in), x = dense(x_in), y = dense(y_in);
  const at::Tensor a = dense(a_in), b = dense(b_in), std = dense(std_in), g_logp = dense(g_logp_in);
  const std::optional<at::Tensor> v_ref = dense(v_ref_in), g_msd = dense(g_msd_in);
  const int64_t batch = v.size(0);
  const int64_t n = v.numel() / batch;
  const int64_t tiles = tiles_per_sample(n);
  const int64_t jobs = batch * tiles;
  // The KL term only reaches gv, and only when the caller passed its upstream gradient.
  const bool with_msd = need_v && has(g_msd) && has(v_ref);

  at::Tensor gv = at::empty(need_v ? v.sizes() : at::IntArrayRef{0}, v.options());
  at::Tensor gx = at::empty(need_x ? x.sizes() : at::IntArrayRef{0}, x.options());
  at::Tensor gy = at::empty(need_y ? y.sizes() : at::IntArrayRef{0}, y.options());
  if (!need_v && !need_x && !need_y) return {gv, gx, gy};

  // Per-sample scale factors, in double then rounded once to fp32.
  std::vector<float> cv(batch), cx(batch), cy(batch), cm(batch, 0.0f);
  const float* pg = g_logp.data_ptr<float>();
  const float* pa = a.data_ptr<float>();
  const float* pb = b.data_ptr<float>();
  const float* ps = std.data_ptr<float>();
  const float* pgm = with_msd ? g_msd->data_ptr<float>() : nullptr;
  for (int64_t s = 0; s < batch; ++s) {
    const double sd = ps[s];
    const double k = sum ? 1.0 / (sd * sd) : 1.0 / (sd * sd * static_cast<double>(n));
    const double g = pg[s];
    cv[s] = static_cast<float>(g * pb[s] * k);
    cx[s] = static_cast<float>(g * pa[s] * k);
    cy[s] = static_cast<float>(-g * k);
    if (with_msd) cm[s] = static_cast<float>(2.0 * pgm[s] / static_cast<double>(n));
  }

  const Src sv(v), sx(x), sy(y), sr = with_msd ? Src(*v_ref) : Src();
  const Dst dv = need_v ? Dst(gv) : Dst(), dx = need_x ? Dst(gx) : Dst(),
            dy = need_y ? Dst(gy) : Dst();

#pragma omp parallel for schedule(static) if (jobs > 1 && v.numel() >= kParallelMin)
  for (int64_t job = 0; job < jobs; ++job) {
    const int64_t s = job / tiles;
    const int64_t start = (job % tiles) * kTile;
    const int64_t len = std::min(kTile, n - start);
    const int64_t off = s * n + start;
    alignas(64) float bv[kTile], bx[kTile], by[kTile], br[kTile], bo[kTile];
    const float* tv = load_tile(sv, off, len, bv);
    const float* tx = load_tile(sx, off, len, bx);
    const float* ty = load_tile(sy, off, len, by);
    tile_residual(tv, tx, ty, pa[s], pb[s], len, br);
    // Each requested gradient: computed into its storage (fp32) or a buffer, then rounded.
    // The input buffers are no longer needed, so bx doubles as the v_ref buffer.
    if (need_v) {
      float* o = out_tile(dv, off, bo);
      if (with_msd) {
        tile_scale_plus_diff(br, cv[s], tv, load_tile(sr, off, len, bx), cm[s], len, o);
      } else {
        tile_scale(br, cv[s], len, o);
      }
      flush_tile(dv, off, len, o);
    }
    if (need_x) {
      float* o = out_tile(dx, off, bo);
      tile_scale(br, cx[s], len, o);
      flush_tile(dx, off, len, o);
    }
    if (need_y) {
      float* o = out_tile(dy, off, bo);
      tile_scale(br, cy[s], len, o);
      flush_tile(dy, off, len, o);
    }
  }
  return {gv, gx, gy};
}

}  // namespace dancegrpo
