// Argument checks shared by the CPU and Meta kernels (and, later, the CUDA ones).
//
// The Python layer (dancegrpo/ops/validate.py) already checks the public API; these guard the
// raw torch.ops.dancegrpo.* ops, which users and torch.compile can call directly. Sizes are
// compared as SymInts so the same code runs on symbolic shapes inside the Meta kernels.
#include "common.h"

#include <cmath>

namespace dancegrpo {

bool is_latent_dtype(at::ScalarType t) {
  return t == at::kFloat || t == at::kBFloat16 || t == at::kHalf;
}

void check_latent(const char* op, const char* name, const at::Tensor& t, const at::Tensor& like,
                  const char* like_name) {
  TORCH_CHECK_VALUE(t.defined(), op, ": ", name, " is an undefined tensor");
  TORCH_CHECK_TYPE(is_latent_dtype(t.scalar_type()), op, ": ", name,
                   " must be float32, bfloat16 or float16, got ", t.scalar_type());
  if (&t == &like) {
    TORCH_CHECK_VALUE(t.dim() >= 1, op, ": ", name, " must have a batch dimension (B, ...), got a 0-d tensor");
    TORCH_CHECK_VALUE(t.sym_size(0) >= 1, op, ": ", name, " has an empty batch (B = 0)");
    TORCH_CHECK_VALUE(t.sym_numel() >= 1, op, ": ", name, " has empty samples (shape ", t.sym_sizes(), ")");
  } else {
    TORCH_CHECK_VALUE(t.sym_sizes() == like.sym_sizes(), op, ": ", name, " has shape ", t.sym_sizes(),
                      " but ", like_name, " has shape ", like.sym_sizes(), "; expected the same shape");
    TORCH_CHECK_VALUE(t.device() == like.device(), op, ": ", name, " is on ", t.device(), " but ",
                      like_name, " is on ", like.device());
  }
}

void check_per_sample(const char* op, const char* name, const at::Tensor& t,
                      const c10::SymInt& batch, const at::Tensor& like) {
  TORCH_CHECK_VALUE(t.defined(), op, ": ", name, " is an undefined tensor");
  TORCH_CHECK_TYPE(t.scalar_type() == at::kFloat, op, ": ", name,
                   " must be a float32 per-sample tensor of shape (B,), got ", t.scalar_type());
  TORCH_CHECK_VALUE(t.dim() == 1 && t.sym_size(0) == batch, op, ": ", name, " must have shape (",
                    batch, ",), got ", t.sym_sizes());
  TORCH_CHECK_VALUE(t.device() == like.device(), op, ": ", name, " is on ", t.device(),
                    ", expected ", like.device());
}

void check_logprob_args(const char* op, const char* y_name, const at::Tensor& v,
                        const at::Tensor& x, const at::Tensor& y,
                        const std::optional<at::Tensor>& v_ref, const at::Tensor& a,
                        const at::Tensor& b, const at::Tensor& std) {
  check_latent(op, "v", v, v, "v");
  check_latent(op, "x", x, v, "v");
  check_latent(op, y_name, y, v, "v");
  if (v_ref.has_value() && v_ref->defined()) {
    check_latent(op, "v_ref", *v_ref, v, "v");
  }
  const c10::SymInt batch = v.sym_size(0);
  check_per_sample(op, "a", a, batch, v);
  check_per_sample(op, "b", b, batch, v);
  check_per_sample(op, "std", std, batch, v);
}

void check_logprob_grads(const at::Tensor& g_logp, const std::optional<at::Tensor>& g_msd,
                         const std::optional<at::Tensor>& v_ref, const at::Tensor& v) {
  const char* op = "dancegrpo::logprob_bwd";
  const c10::SymInt batch = v.sym_size(0);
  check_per_sample(op, "g_logp", g_logp, batch, v);
  const bool has_ref = v_ref.has_value() && v_ref->defined();
  if (g_msd.has_value() && g_msd->defined()) {
    TORCH_CHECK_VALUE(has_ref, op, ": g_msd was given but v_ref is None (msd needs v_ref)");
    check_per_sample(op, "g_msd", *g_msd, batch, v);
  }
}

void check_advantage_args(const at::Tensor& rewards, const at::Tensor& weights,
                          int64_t group_size, int64_t std_mode, double eps, double clip) {
  const char* op = "dancegrpo::group_advantages";
  TORCH_CHECK_TYPE(rewards.scalar_type() == at::kFloat, op, ": rewards must be float32, got ",
                   rewards.scalar_type());
  TORCH_CHECK_VALUE(rewards.dim() == 2, op, ": rewards must have shape (B, K), got ", rewards.sym_sizes());
  TORCH_CHECK_VALUE(rewards.sym_size(0) >= 1 && rewards.sym_size(1) >= 1, op,
                    ": rewards is empty (shape ", rewards.sym_sizes(), ")");
  TORCH_CHECK_TYPE(weights.scalar_type() == at::kFloat, op, ": weights must be float32, got ",
                   weights.scalar_type());
  TORCH_CHECK_VALUE(weights.dim() == 1 && weights.sym_size(0) == rewards.sym_size(1), op,
                    ": weights must have shape (K,) = (", rewards.sym_size(1), ",), got ", weights.sym_sizes());
  TORCH_CHECK_VALUE(weights.device() == rewards.device(), op, ": weights is on ", weights.device(),
                    " but rewards is on ", rewards.device());
  TORCH_CHECK_VALUE(group_size >= 1, op, ": group_size must be >= 1, got ", group_size);
  TORCH_CHECK_VALUE(rewards.sym_size(0) % group_size == 0, op, ": group_size=", group_size,
                    " does not divide the batch B=", rewards.sym_size(0));
  TORCH_CHECK_VALUE(std_mode >= 0 && std_mode <= 2, op,
                    ": std_mode must be 0 (group), 1 (global) or 2 (none), got ", std_mode);
  TORCH_CHECK_VALUE(std::isfinite(eps) && eps >= 0, op, ": eps must be finite and >= 0, got ", eps);
  TORCH_CHECK_VALUE(!std::isnan(clip), op, ": clip must be > 0, or < 0 for no clipping, got nan");
}

void check_policy_args(const char* op, const at::Tensor& logp, const at::Tensor& old_logp,
                       const at::Tensor& adv, const std::optional<at::Tensor>& ref_logp,
                       double clip_low, double clip_high, double beta, int64_t reduction) {
  TORCH_CHECK_VALUE(logp.defined() && logp.dim() == 1, op, ": logp must have shape (B,), got ",
                    logp.defined() ? logp.sym_sizes() : c10::SymIntArrayRef{});
  const c10::SymInt batch = logp.sym_size(0);
  TORCH_CHECK_VALUE(batch >= 1, op, ": logp is empty (B = 0)");
  check_per_sample(op, "logp", logp, batch, logp);
  check_per_sample(op, "old_logp", old_logp, batch, logp);
  check_per_sample(op, "adv", adv, batch, logp);
  if (ref_logp.has_value() && ref_logp->defined()) {
    check_per_sample(op, "ref_logp", *ref_logp, batch, logp);
  }
  TORCH_CHECK_VALUE(std::isfinite(clip_low) && clip_low >= 0 && clip_low < 1, op,
                    ": clip_low must lie in [0, 1), got ", clip_low);
  TORCH_CHECK_VALUE(std::isfinite(clip_high) && clip_high >= 0, op,
                    ": clip_high must be finite and >= 0, got ", clip_high);
  TORCH_CHECK_VALUE(std::isfinite(beta) && beta >= 0, op, ": beta must be finite and >= 0, got ", beta);
  TORCH_CHECK_VALUE(reduction >= 0 && reduction <= 2, op,
                    ": reduction must be 0 (mean), 1 (sum) or 2 (none), got ", reduction);
}

void check_policy_grad(const at::Tensor& g_loss, const at::Tensor& logp, int64_t reduction) {
  const char* op = "dancegrpo::policy_loss_bwd";
  TORCH_CHECK_VALUE(g_loss.defined(), op, ": g_loss is an undefined tensor");
  TORCH_CHECK_TYPE(g_loss.scalar_type() == at::kFloat, op, ": g_loss must be float32, got ",
                   g_loss.scalar_type());
  if (reduction == 2) {
    check_per_sample(op, "g_loss", g_loss, logp.sym_size(0), logp);
  } else {
    TORCH_CHECK_VALUE(g_loss.dim() == 0, op, ": g_loss must be 0-d for reduction mean/sum, got shape ",
                      g_loss.sym_sizes());
    TORCH_CHECK_VALUE(g_loss.device() == logp.device(), op, ": g_loss is on ", g_loss.device(),
                      ", expected ", logp.device());
  }
}

void check_nft_args(const char* op, const at::Tensor& v, const at::Tensor& v_old,
                    const at::Tensor& target, const at::Tensor& r, const at::Tensor& t, double beta,
                    double eps) {
  check_latent(op, "v", v, v, "v");
  check_latent(op, "v_old", v_old, v, "v");
  check_latent(op, "target", target, v, "v");
  const c10::SymInt batch = v.sym_size(0);
  check_per_sample(op, "r", r, batch, v);
  check_per_sample(op, "t", t, batch, v);
  TORCH_CHECK_VALUE(std::isfinite(beta) && beta > 0, op, ": beta must be finite and > 0, got ", beta);
  TORCH_CHECK_VALUE(std::isfinite(eps) && eps > 0, op, ": eps must be finite and > 0, got ", eps);
}

void check_nft_grads(const at::Tensor& g_per, const at::Tensor& parts, const at::Tensor& v) {
  const char* op = "dancegrpo::nft_loss_bwd";
  const c10::SymInt batch = v.sym_size(0);
  check_per_sample(op, "g_per", g_per, batch, v);
  TORCH_CHECK_TYPE(parts.scalar_type() == at::kFloat, op, ": parts must be float32, got ", parts.scalar_type());
  TORCH_CHECK_VALUE(parts.dim() == 2 && parts.sym_size(0) == batch && parts.sym_size(1) == 5, op,
                    ": parts must have shape (", batch, ", 5), got ", parts.sym_sizes());
  TORCH_CHECK_VALUE(parts.device() == v.device(), op, ": parts is on ", parts.device(), ", expected ", v.device());
}

}  // namespace dancegrpo
