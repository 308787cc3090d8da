// policy_loss_fwd / policy_loss_bwd: the clipped GRPO surrogate on per-sample log-probs.
//
// Math (per sample, lr = logp - old_logp, ratio = exp(lr), A = advantage):
//   per  = max(-A ratio, -A clamp(ratio, 1 - lo, 1 + hi)) + beta (exp(d) - d - 1),
//          d = ref_logp - logp (k3 KL estimator; only with ref_logp)
//   loss = mean(per) | sum(per) | per;  stats = [mean(ratio outside [1-lo, 1+hi]),
//          0.5 mean(lr^2), mean(ratio)]
//   d per / d logp = -A ratio, except 0 where the clamped branch wins with a flat clamp:
//          (ratio > 1 + hi and A > 0) or (ratio < 1 - lo and A < 0);
//          plus beta (1 - exp(d)).
// Ties follow PyTorch's autograd of torch.maximum (half to each branch) and clamp (slope 1 on
// the closed interval), which sum to -A ratio; so this is the gradient the reference gives.
//
// Shape: B values (one per sample): serial loops in double; nothing here is worth threads.
#include <algorithm>
#include <cmath>

#include "common.h"

namespace dancegrpo {

namespace {

bool has(const std::optional<at::Tensor>& t) { return t.has_value() && t->defined(); }

}  // namespace

std::tuple<at::Tensor, at::Tensor> policy_loss_fwd_cpu(
    const at::Tensor& logp_in, const at::Tensor& old_logp_in, const at::Tensor& adv_in,
    const std::optional<at::Tensor>& ref_logp_in, double clip_low, double clip_high, double beta,
    int64_t reduction) {
  check_policy_args("dancegrpo::policy_loss_fwd", logp_in, old_logp_in, adv_in, ref_logp_in,
                    clip_low, clip_high, beta, reduction);
  const at::Tensor logp = dense(logp_in), old_logp = dense(old_logp_in), adv = dense(adv_in);
  const std::optional<at::Tensor> ref_logp = dense(ref_logp_in);
  const int64_t batch = logp.size(0);
  const bool kl = has(ref_logp) && beta != 0.0;
  const float* pl = logp.data_ptr<float>();
  const float* po = old_logp.data_ptr<float>();
  const float* pa = adv.data_ptr<float>();
  const float* pr = kl ? ref_logp->data_ptr<float>() : nullptr;

  at::Tensor per = at::empty({batch}, logp.options());
  float* pp = per.data_ptr<float>();
  double total = 0.0, clipped = 0.0, sq = 0.0, ratio_sum = 0.0;
  for (int64_t s = 0; s < batch; ++s) {
    const double lr = static_cast<double>(pl[s]) - po[s];
    const double ratio = std::exp(lr);
    const double a = pa[s];
    const double bounded = std::min(std::max(ratio, 1.0 - clip_low), 1.0 + clip_high);
    double value = std::max(-a * ratio, -a * bounded);
    if (kl) {
      const double d = static_cast<double>(pr[s]) - pl[s];
      value += beta * (std::exp(d) - d - 1.0);
    }
    pp[s] = static_cast<float>(value);
    total += value;
    clipped += (ratio < 1.0 - clip_low || ratio > 1.0 + clip_high) ? 1.0 : 0.0;
    sq += lr * lr;
    ratio_sum += ratio;
  }
  const double nb = static_cast<double>(batch);
  at::Tensor stats = at::empty({3}, logp.options());
  float* pst = stats.data_ptr<float>();
  pst[0] = static_cast<float>(clipped / nb);
  pst[1] = static_cast<float>(0.5 * sq / nb);
  pst[2] = static_cast<float>(ratio_sum / nb);
  if (reduction == 2) return {per, stats};
  at::Tensor loss = at::empty({}, logp.options());
  *loss.data_ptr<float>() = static_cast<float>(reduction == 0 ? total / nb : total);
  return {loss, stats};
}

at::Tensor policy_loss_bwd_cpu(const at::Tensor& g_loss_in, const at::Tensor& logp_in,
                               const at::Tensor& old_logp_in, const at::Tensor& adv_in,
                               const std::optional<at::Tensor>& ref_logp_in, double clip_low,
                               double clip_high, double beta, int64_t reduction) {
  check_policy_args("dancegrpo::policy_loss_bwd", logp_in, old_logp_in, adv_in, ref_logp_in,
                    clip_low, clip_high, beta, reduction);
  check_policy_grad(g_loss_in, logp_in, reduction);
  const at::Tensor logp = dense(logp_in), old_logp = dense(old_logp_in), adv = dense(adv_in);
  const at::Tensor g_loss = dense(g_loss_in);
  const std::optional<at::Tensor> ref_logp = dense(ref_logp_in);
  const int64_t batch = logp.size(0);
  const bool kl = has(ref_logp) && beta != 0.0;
  const float* pl = logp.data_ptr<float>();
  const float* po = old_logp.data_ptr<float>();
  const float* pa = adv.data_ptr<float>();
  const float* pr = kl ? ref_logp->data_ptr<float>() : nullptr;
  const float* pg = g_loss.data_ptr<float>();

  at::Tensor grad = at::empty({batch}, logp.options());
  float* out = grad.data_ptr<float>();
  const double scale = reduction == 0 ? 1.0 / static_cast<double>(batch) : 1.0;
  for (int64_t s = 0; s < batch; ++s) {
    const double g = (reduction == 2 ? pg[s] : pg[0]) * scale;
    const double ratio = std::exp(static_cast<double>(pl[s]) - po[s]);
    const double a = pa[s];
    const bool flat = (ratio > 1.0 + clip_high && a > 0) || (ratio < 1.0 - clip_low && a < 0);
    double d_per = flat ? 0.0 : -a * ratio;
    if (kl) d_per += beta * (1.0 - std::exp(static_cast<double>(pr[s]) - pl[s]));
    out[s] = static_cast<float>(g * d_per);
  }
  return grad;
}

}  // namespace dancegrpo
