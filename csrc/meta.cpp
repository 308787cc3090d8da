// Meta kernels: output shapes and dtypes only, for FakeTensor, torch.compile and opcheck.
// Outputs are contiguous whatever the inputs' strides, as the CPU kernels' (common.h, layout).
//
// They run the same argument checks as the CPU kernels so tracing fails with the same message
// as eager, and they build shapes from sym_sizes() so dynamic shapes trace without
// specialising (the checks' size comparisons become guards).
#include "common.h"

namespace dancegrpo {

namespace {

bool has(const std::optional<at::Tensor>& t) { return t.has_value() && t->defined(); }

// A (batch,) fp32 tensor on `like`'s device.
at::Tensor per_sample_out(const c10::SymInt& batch, const at::Tensor& like) {
  return at::empty_symint({batch}, like.options().dtype(at::kFloat));
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> logprob_fwd_meta(
    const at::Tensor& v, const at::Tensor& x, const at::Tensor& y,
    const std::optional<at::Tensor>& v_ref, const at::Tensor& a, const at::Tensor& b,
    const at::Tensor& std, bool sum) {
  check_logprob_args("dancegrpo::logprob_fwd", "y", v, x, y, v_ref, a, b, std);
  const c10::SymInt batch = v.sym_size(0);
  at::Tensor logp = per_sample_out(batch, a);
  at::Tensor msd = has(v_ref) ? per_sample_out(batch, a) : at::empty({0}, a.options());
  return {logp, msd};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> logprob_bwd_meta(
    const at::Tensor& g_logp, const std::optional<at::Tensor>& g_msd, const at::Tensor& v,
    const at::Tensor& x, const at::Tensor& y, const std::optional<at::Tensor>& v_ref,
    const at::Tensor& a, const at::Tensor& b, const at::Tensor& std, bool sum, bool need_v,
    bool need_x, bool need_y) {
  check_logprob_args("dancegrpo::logprob_bwd", "y", v, x, y, v_ref, a, b, std);
  check_logprob_grads(g_logp, g_msd, v_ref, v);
  auto grad = [](bool need, const at::Tensor& t) {
    return need ? at::empty_symint(t.sym_sizes(), t.options()) : at::empty({0}, t.options());
  };
  return {grad(need_v, v), grad(need_x, x), grad(need_y, y)};
}

std::tuple<at::Tensor, at::Tensor> sample_step_meta(
    const at::Tensor& v, const at::Tensor& x, const at::Tensor& noise, const at::Tensor& a,
    const at::Tensor& b, const at::Tensor& std, bool sum) {
  check_logprob_args("dancegrpo::sample_step", "noise", v, x, noise, std::nullopt, a, b, std);
  return {at::empty_symint(x.sym_sizes(), x.options()), per_sample_out(v.sym_size(0), a)};
}

at::Tensor group_advantages_meta(const at::Tensor& rewards, const at::Tensor& weights,
                                 int64_t group_size, int64_t std_mode, bool unbiased, double eps,
                                 double clip, bool aggregate_reward, bool drop_nonfinite) {
  check_advantage_args(rewards, weights, group_size, std_mode, eps, clip);
  return per_sample_out(rewards.sym_size(0), rewards);
}

std::tuple<at::Tensor, at::Tensor> policy_loss_fwd_meta(
    const at::Tensor& logp, const at::Tensor& old_logp, const at::Tensor& adv,
    const std::optional<at::Tensor>& ref_logp, double clip_low, double clip_high, double beta,
    int64_t reduction) {
  check_policy_args("dancegrpo::policy_loss_fwd", logp, old_logp, adv, ref_logp, clip_low,
                    clip_high, beta, reduction);
  at::Tensor loss = reduction == 2 ? per_sample_out(logp.sym_size(0), logp)
                                   : at::empty({}, logp.options());
  return {loss, at::empty({3}, logp.options())};
}

at::Tensor policy_loss_bwd_meta(const at::Tensor& g_loss, const at::Tensor& logp,
                                const at::Tensor& old_logp, const at::Tensor& adv,
                                const std::optional<at::Tensor>& ref_logp, double clip_low,
                                double clip_high, double beta, int64_t reduction) {
  check_policy_args("dancegrpo::policy_loss_bwd", logp, old_logp, adv, ref_logp, clip_low,
                    clip_high, beta, reduction);
  check_policy_grad(g_loss, logp, reduction);
  return per_sample_out(logp.sym_size(0), logp);
}

std::tuple<at::Tensor, at::Tensor> nft_loss_fwd_meta(const at::Tensor& v, const at::Tensor& v_old,
                                                     const at::Tensor& target, const at::Tensor& r,
                                                     const at::Tensor& t, double beta, double eps,
                                                     bool adaptive) {
  check_nft_args("dancegrpo::nft_loss_fwd", v, v_old, target, r, t, beta, eps);
  const c10::SymInt batch = v.sym_size(0);
  return {per_sample_out(batch, r), at::empty_symint({batch, 5}, r.options().dtype(at::kFloat))};
}

at::Tensor nft_loss_bwd_meta(const at::Tensor& g_per, const at::Tensor& v, const at::Tensor& v_old,
                             const at::Tensor& target, const at::Tensor& r, const at::Tensor& t,
                             const at::Tensor& parts, double beta, bool adaptive) {
  check_nft_args("dancegrpo::nft_loss_bwd", v, v_old, target, r, t, beta, 1.0);
  check_nft_grads(g_per, parts, v);
  return at::empty_symint(v.sym_sizes(), v.options());
}

}  // namespace dancegrpo
