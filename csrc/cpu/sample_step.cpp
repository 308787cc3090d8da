// sample_step: the rollout step and the log-prob of what it stored, in one pass.
//
// Math (per sample, mean = a x + b v):
//   y = mean + std * noise, stored in x's dtype (rounded to nearest even, as Tensor.to does)
//   logp = mean_i [ -(y_stored_i - mean_i)^2 / (2 std^2) ] - log std - log sqrt(2 pi)
// The log-prob is of the *stored* y, so that step_logprob on the returned latents reproduces
// it exactly in the ratio of the first update, which must be exactly 1.
//
// Shape: as logprob_fwd (logprob.cpp): (sample, tile) jobs in parallel, fp32 tile buffers,
// per-tile partial sums added in a fixed order in double. Each tile of y is written, then read
// back from the output (still in cache) to get exactly the stored values.
#include <omp.h>

#include <algorithm>
#include <vector>

#include "common.h"
#include "cpu/tile.h"
#include "cpu/tile_math.h"

namespace dancegrpo {

namespace {

constexpr int64_t kParallelMin = 1 << 16;

// mean_i = a x_i + b v_i;  y_i = mean_i + std * noise_i
inline void tile_step(const float* __restrict__ v, const float* __restrict__ x,
                      const float* __restrict__ noise, float a, float b, float sd, int64_t n,
                      float* __restrict__ mean, float* __restrict__ y) {
  for (int64_t i = 0; i < n; ++i) {
    const float m = a * x[i] + b * v[i];
    mean[i] = m;
    y[i] = m + sd * noise[i];
  }
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> sample_step_cpu(
    const at::Tensor& v_in, const at::Tensor& x_in, const at::Tensor& noise_in, const at::Tensor& a_in,
    const at::Tensor& b_in, const at::Tensor& std_in, bool sum) {
  check_logprob_args("dancegrpo::sample_step", "noise", v_in, x_in, noise_in, std::nullopt, a_in,
                     b_in, std_in);
  const at::Tensor v = dense(v_in), x = dense(x_in), noise = dense(noise_in);
  const at::Tensor a = dense(a_in), b = dense(b_in), std = dense(std_in);
  const int64_t batch = v.size(0);
  const int64_t n = v.numel() / batch;
  const int64_t tiles = tiles_per_sample(n);
  const int64_t jobs = batch * tiles;

  at::Tensor y = at::empty(x.sizes(), x.options());
  std::vector<double> part_r2(jobs);
  const Src sv(v), sx(x), sn(noise), sy_in(y);
  const Dst dy(y);
  const float* pa = a.data_ptr<float>();
  const float* pb = b.data_ptr<float>();
  const float* ps = std.data_ptr<float>();

#pragma omp parallel for schedule(static) if (jobs > 1 && v.numel() >= kParallelMin)
  for (int64_t job = 0; job < jobs; ++job) {
    const int64_t s = job / tiles;
    const int64_t start = (job % tiles) * kTile;
    const int64_t len = std::min(kTile, n - start);
    const int64_t off = s * n + start;
    alignas(64) float bv[kTile], bx[kTile], bn[kTile], bm[kTile], by[kTile];
    const float* tv = load_tile(sv, off, len, bv);
    const float* tx = load_tile(sx, off, len, bx);
    const float* tn = load_tile(sn, off, len, bn);
    float* o = out_tile(dy, off, by);
    tile_step(tv, tx, tn, pa[s], pb[s], ps[s], len, bm, o);
    flush_tile(dy, off, len, o);
    // The stored y, as fp32: the output itself for fp32, else re-read after rounding (bx and
    // bn are free again, so bn holds it).
    const float* ty = load_tile(sy_in, off, len, bn);
    part_r2[job] = tile_sum_sq_diff(ty, bm, len);
  }

  at::Tensor logp = at::empty({batch}, a.options());
  float* pl = logp.data_ptr<float>();
  for (int64_t s = 0; s < batch; ++s) {
    double r2 = 0.0;
    for (int64_t t = 0; t < tiles; ++t) r2 += part_r2[s * tiles + t];
    pl[s] = static_cast<float>(logprob_from_sum(r2, ps[s], n, sum));
  }
  return {y, logp};
}

}  // namespace dancegrpo
