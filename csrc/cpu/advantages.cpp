// group_advantages: group-normalised advantages (docs/math.md), B = P groups of G samples.
//
// Math, per reward column k (or on the weighted sum r = sum_k w_k r_k with aggregate_reward):
//   valid_s   = all rewards of s finite (drop_nonfinite), else true; invalid rewards count as 0
//   mean_g    = sum_{s in g, valid} r_s / max(n_g, 1)
//   c_s       = (r_s - mean_g) if valid and the group's valid rewards are not all equal, else 0
//   std_mode 0 (group):  A_s = c_s / (sqrt(sum_g c^2 / max(n_g - u, 1)) + eps)
//   std_mode 1 (global): A_s = c_s / (sqrt(sum_all valid (r - mean_all)^2 / max(n - u, 1)) + eps)
//   std_mode 2 (none):   A_s = c_s
//   (u = 1 for the unbiased estimate, else 0); then A = sum_k w_k A_k, clamped to
//   [-clip, clip] when clip >= 0, and 0 for invalid samples.
// A constant group is detected by comparing its valid rewards (max == min), not by a variance
// test, so it gives exactly 0 and never NaN whatever eps is.
//
// Shape: B * K values, a few hundred at most: a plain serial loop, all in double (the inputs
// are fp32, so this matches the float64 reference to a rounding of the output). Not worth
// threads or vectors.
#include <algorithm>
#include <cmath>
#include <vector>

#include "common.h"

namespace dancegrpo {

at::Tensor group_advantages_cpu(const at::Tensor& rewards_in, const at::Tensor& weights_in,
                                int64_t group_size, int64_t std_mode, bool unbiased, double eps,
                                double clip, bool aggregate_reward, bool drop_nonfinite) {
  check_advantage_args(rewards_in, weights_in, group_size, std_mode, eps, clip);
  const at::Tensor rewards = dense(rewards_in), weights = dense(weights_in);
  const int64_t batch = rewards.size(0);
  const int64_t k_in = rewards.size(1);
  const int64_t groups = batch / group_size;
  const float* pr = rewards.data_ptr<float>();
  const float* pw = weights.data_ptr<float>();

  std::vector<char> valid(batch, 1);
  if (drop_nonfinite) {
    for (int64_t s = 0; s < batch; ++s)
      for (int64_t k = 0; k < k_in; ++k)
        if (!std::isfinite(pr[s * k_in + k])) valid[s] = 0;
  }

  // Columns to normalise (B, K) in double, invalid entries zeroed.
  const int64_t kk = aggregate_reward ? 1 : k_in;
  std::vector<double> r(batch * kk), w(kk);
  for (int64_t s = 0; s < batch; ++s) {
    if (aggregate_reward) {
      double acc = 0.0;
      for (int64_t k = 0; k < k_in; ++k) acc += (valid[s] ? pr[s * k_in + k] : 0.0) * pw[k];
      r[s] = acc;
    } else {
      for (int64_t k = 0; k < k_in; ++k) r[s * kk + k] = valid[s] ? pr[s * k_in + k] : 0.0;
    }
  }
  for (int64_t k = 0; k < kk; ++k) w[k] = aggregate_reward ? 1.0 : pw[k];

  int64_t n_valid = 0;
  for (int64_t s = 0; s < batch; ++s) n_valid += valid[s];
  const double u = unbiased ? 1.0 : 0.0;

  std::vector<double> adv(batch, 0.0), centred(batch);
  for (int64_t k = 0; k < kk; ++k) {
    double global_scale = 1.0;
    if (std_mode == 1) {  // batch-wide std of the valid rewards of this column
      double m = 0.0, ss = 0.0;
      for (int64_t s = 0; s < batch; ++s) m += valid[s] ? r[s * kk + k] : 0.0;
      m /= std::max<double>(static_cast<double>(n_valid), 1.0);
      for (int64_t s = 0; s < batch; ++s) {
        const double d = valid[s] ? r[s * kk + k] - m : 0.0;
        ss += d * d;
      }
      global_scale = std::sqrt(ss / std::max(static_cast<double>(n_valid) - u, 1.0)) + eps;
    }
    for (int64_t g = 0; g < groups; ++g) {
      const int64_t s0 = g * group_size, s1 = s0 + group_size;
      int64_t n = 0;
      double sum = 0.0, hi = -INFINITY, lo = INFINITY;
      bool nan = false;
      for (int64_t s = s0; s < s1; ++s) {
        if (!valid[s]) continue;
        const double v = r[s * kk + k];
        ++n;
        sum += v;
        nan = nan || std::isnan(v);
        hi = std::max(hi, v);
        lo = std::min(lo, v);
      }
      // Also true for a group with no valid sample, and (as the reference's NaN-propagating
      // max/min give) for a group holding a NaN that was not dropped.
      const bool constant = !(hi > lo) || nan;
      const double mean = sum / std::max<double>(static_cast<double>(n), 1.0);
      double ss = 0.0;
      for (int64_t s = s0; s < s1; ++s) {
        centred[s] = (valid[s] && !constant) ? r[s * kk + k] - mean : 0.0;
        ss += centred[s] * centred[s];
      }
      double scale = 1.0;
      if (std_mode == 0) {
        scale = std::sqrt(ss / std::max(static_cast<double>(n) - u, 1.0)) + eps;
      } else if (std_mode == 1) {
        scale = global_scale;
      }
      for (int64_t s = s0; s < s1; ++s) adv[s] += (centred[s] / scale) * w[k];
    }
  }

  at::Tensor out = at::empty({batch}, rewards.options());
  float* po = out.data_ptr<float>();
  for (int64_t s = 0; s < batch; ++s) {
    double value = adv[s];
    if (clip >= 0) value = std::min(std::max(value, -clip), clip);
    po[s] = valid[s] ? static_cast<float>(value) : 0.0f;
  }
  return out;
}

}  // namespace dancegrpo
