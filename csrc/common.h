// Shared by every dancegrpo kernel: constants, input checks, and the kernel declarations that
// ops.cpp registers with the dispatcher.
//
// Checks raise c10::ValueError / c10::TypeError (Python ValueError / TypeError) with the op and
// argument named, so a caller that bypasses the Python layer still gets a clear message.
// They compare sizes through sym_sizes() so the Meta kernels can run the same checks on
// symbolic shapes under torch.compile (each comparison then becomes a guard).
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <tuple>

namespace dancegrpo {

// Elements per tile. A kernel keeps up to five fp32 tile buffers on its stack (80 KiB, in L2;
// fp32 inputs are read in place instead); tiles are the unit of parallel work and of the
// fixed-order partial sums (see logprob.cpp), so changing this changes results in the last bits.
constexpr int64_t kTile = 4096;
// Independent accumulators per tile: lets the compiler keep a reduction in vector registers
// without reassociating floats on its own (which it may not do without -ffast-math).
constexpr int kLanes = 16;
// 0.5 * log(2 pi)
constexpr double kLogSqrt2Pi = 0.918938533204672741780329736406;

// ---- checks (checks.cpp) ------------------------------------------------------------------

bool is_latent_dtype(at::ScalarType t);

// A big per-sample tensor (B, ...): fp32/bf16/fp16, any strides, same shape and device as
// `like` (pass like == t for the first one, which must have B >= 1 and non-empty samples).
void check_latent(const char* op, const char* name, const at::Tensor& t,
                  const at::Tensor& like, const char* like_name);

// A per-sample vector: fp32, shape (batch,), any strides, on `like`'s device.
void check_per_sample(const char* op, const char* name, const at::Tensor& t,
                      const c10::SymInt& batch, const at::Tensor& like);

// ---- layout ------------------------------------------------------------------------------
//
// The ops accept inputs of any strides: a model output may be a permuted view, latents may be
// slices, and inductor may hand a backward op a saved tensor in a layout of its own choosing (it
// only enforces a custom op's eager strides in forward graphs). The kernels index dense
// row-major storage, so a strided input is copied once on entry (no copy when it is already
// contiguous). Every output is contiguous, which is what the Meta kernels report.
inline at::Tensor dense(const at::Tensor& t) { return t.contiguous(); }
inline std::optional<at::Tensor> dense(const std::optional<at::Tensor>& t) {
  if (t.has_value() && t->defined()) return t->contiguous();
  return t;
}

// ---- CPU kernels (cpu/*.cpp) ------------------------------------------------------------

std::tuple<at::Tensor, at::Tensor> logprob_fwd_cpu(
    const at::Tensor& v, const at::Tensor& x, const at::Tensor& y,
    const std::optional<at::Tensor>& v_ref, const at::Tensor& a, const at::Tensor& b,
    const at::Tensor& std, bool sum);

std::tuple<at::Tensor, at::Tensor, at::Tensor> logprob_bwd_cpu(
    const at::Tensor& g_logp, const std::optional<at::Tensor>& g_msd, const at::Tensor& v,
    const at::Tensor& x, const at::Tensor& y, const std::optional<at::Tensor>& v_ref,
    const at::Tensor& a, const at::Tensor& b, const at::Tensor& std, bool sum, bool need_v,
    bool need_x, bool need_y);

std::tuple<at::Tensor, at::Tensor> sample_step_cpu(
    const at::Tensor& v, const at::Tensor& x, const at::Tensor& noise, const at::Tensor& a,
    const at::Tensor& b, const at::Tensor& std, bool sum);

at::Tensor group_advantages_cpu(const at::Tensor& rewards, const at::Tensor& weights,
                                int64_t group_size, int64_t std_mode, bool unbiased, double eps,
                                double clip, bool aggregate_reward, bool drop_nonfinite);

std::tuple<at::Tensor, at::Tensor> policy_loss_fwd_cpu(
    const at::Tensor& logp, const at::Tensor& old_logp, const at::Tensor& adv,
    const std::optional<at::Tensor>& ref_logp, double clip_low, double clip_high, double beta,
    int64_t reduction);

at::Tensor policy_loss_bwd_cpu(const at::Tensor& g_loss, const at::Tensor& logp,
                               const at::Tensor& old_logp, const at::Tensor& adv,
                               const std::optional<at::Tensor>& ref_logp, double clip_low,
                               double clip_high, double beta, int64_t reduction);

std::tuple<at::Tensor, at::Tensor> nft_loss_fwd_cpu(const at::Tensor& v, const at::Tensor& v_old,
                                                    const at::Tensor& target, const at::Tensor& r,
                                                    const at::Tensor& t, double beta, double eps,
                                                    bool adaptive);

at::Tensor nft_loss_bwd_cpu(const at::Tensor& g_per, const at::Tensor& v, const at::Tensor& v_old,
                            const at::Tensor& target, const at::Tensor& r, const at::Tensor& t,
                            const at::Tensor& parts, double beta, bool adaptive);

// ---- Meta kernels (meta.cpp): shapes and dtypes only, for FakeTensor / torch.compile ------

std::tuple<at::Tensor, at::Tensor> logprob_fwd_meta(
    const at::Tensor& v, const at::Tensor& x, const at::Tensor& y,
    const std::optional<at::Tensor>& v_ref, const at::Tensor& a, const at::Tensor& b,
    const at::Tensor& std, bool sum);

std::tuple<at::Tensor, at::Tensor, at::Tensor> logprob_bwd_meta(
    const at::Tensor& g_logp, const std::optional<at::Tensor>& g_msd, const at::Tensor& v,
    const at::Tensor& x, const at::Tensor& y, const std::optional<at::Tensor>& v_ref,
    const at::Tensor& a, const at::Tensor& b, const at::Tensor& std, bool sum, bool need_v,
    bool need_x, bool need_y);

std::tuple<at::Tensor, at::Tensor> sample_step_meta(
    const at::Tensor& v, const at::Tensor& x, const at::Tensor& noise, const at::Tensor& a,
    const at::Tensor& b, const at::Tensor& std, bool sum);

at::Tensor group_advantages_meta(const at::Tensor& rewards, const at::Tensor& weights,
                                 int64_t group_size, int64_t std_mode, bool unbiased, double eps,
                                 double clip, bool aggregate_reward, bool drop_nonfinite);

std::tuple<at::Tensor, at::Tensor> policy_loss_fwd_meta(
    const at::Tensor& logp, const at::Tensor& old_logp, const at::Tensor& adv,
    const std::optional<at::Tensor>& ref_logp, double clip_low, double clip_high, double beta,
    int64_t reduction);

at::Tensor policy_loss_bwd_meta(const at::Tensor& g_loss, const at::Tensor& logp,
                                const at::Tensor& old_logp, const at::Tensor& adv,
                                const std::optional<at::Tensor>& ref_logp, double clip_low,
                                double clip_high, double beta, int64_t reduction);

std::tuple<at::Tensor, at::Tensor> nft_loss_fwd_meta(const at::Tensor& v, const at::Tensor& v_old,
                                                     const at::Tensor& target, const at::Tensor& r,
                                                     const at::Tensor& t, double beta, double eps,
                                                     bool adaptive);

at::Tensor nft_loss_bwd_meta(const at::Tensor& g_per, const at::Tensor& v, const at::Tensor& v_old,
                             const at::Tensor& target, const at::Tensor& r, const at::Tensor& t,
                             const at::Tensor& parts, double beta, bool adaptive);

// ---- argument checks shared by the CPU and Meta kernels (checks.cpp) ----------------------

// logprob_fwd / logprob_bwd / sample_step (y is the noise for sample_step).
void check_logprob_args(const char* op, const char* y_name, const at::Tensor& v,
                        const at::Tensor& x, const at::Tensor& y,
                        const std::optional<at::Tensor>& v_ref, const at::Tensor& a,
                        const at::Tensor& b, const at::Tensor& std);
// logprob_bwd's upstream gradients.
void check_logprob_grads(const at::Tensor& g_logp, const std::optional<at::Tensor>& g_msd,
                         const std::optional<at::Tensor>& v_ref, const at::Tensor& v);
void check_advantage_args(const at::Tensor& rewards, const at::Tensor& weights,
                          int64_t group_size, int64_t std_mode, double eps, double clip);
void check_policy_args(const char* op, const at::Tensor& logp, const at::Tensor& old_logp,
                       const at::Tensor& adv, const std::optional<at::Tensor>& ref_logp,
                       double clip_low, double clip_high, double beta, int64_t reduction);
// policy_loss_bwd's upstream gradient: () for mean/sum, (B,) for none.
void check_policy_grad(const at::Tensor& g_loss, const at::Tensor& logp, int64_t reduction);
// nft_loss_fwd / nft_loss_bwd: v, v_old, target alike (B, ...); r, t fp32 (B,); beta > 0, eps > 0.
void check_nft_args(const char* op, const at::Tensor& v, const at::Tensor& v_old,
                    const at::Tensor& target, const at::Tensor& r, const at::Tensor& t, double beta,
                    double eps);
// nft_loss_bwd's upstream gradient g_per (B,) and the forward's parts (B, 5).
void check_nft_grads(const at::Tensor& g_per, const at::Tensor& parts, const at::Tensor& v);

}  // namespace dancegrpo
