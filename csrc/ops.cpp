// The op schemas of torch.ops.dancegrpo.*, their CPU and Meta kernels, and the Python module.
//
// Schemas are the contract documented in dancegrpo/ops/compiled.py, shared with the Triton
// backend; autograd is attached from Python (compiled.register_autograd) so both compiled
// backends use one backward formula. There are no CUDA kernels here: on GPUs the Triton
// backend runs.
#include <omp.h>
#include <torch/extension.h>
#include <torch/library.h>

#include "common.h"

TORCH_LIBRARY(dancegrpo, m) {
  m.def(
      "logprob_fwd(Tensor v, Tensor x, Tensor y, Tensor? v_ref, Tensor a, Tensor b, Tensor std, "
      "bool sum) -> (Tensor logp, Tensor msd)");
  m.def(
      "logprob_bwd(Tensor g_logp, Tensor? g_msd, Tensor v, Tensor x, Tensor y, Tensor? v_ref, "
      "Tensor a, Tensor b, Tensor std, bool sum, bool need_v, bool need_x, bool need_y) "
      "-> (Tensor gv, Tensor gx, Tensor gy)");
  m.def(
      "sample_step(Tensor v, Tensor x, Tensor noise, Tensor a, Tensor b, Tensor std, bool sum) "
      "-> (Tensor y, Tensor logp)");
  m.def(
      "group_advantages(Tensor rewards, Tensor weights, int group_size, int std_mode, "
      "bool unbiased, float eps, float clip, bool aggregate_reward, bool drop_nonfinite) -> Tensor");
  m.def(
      "policy_loss_fwd(Tensor logp, Tensor old_logp, Tensor adv, Tensor? ref_logp, "
      "float clip_low, float clip_high, float beta, int reduction) -> (Tensor loss, Tensor stats)");
  m.def(
      "policy_loss_bwd(Tensor g_loss, Tensor logp, Tensor old_logp, Tensor adv, Tensor? ref_logp, "
      "float clip_low, float clip_high, float beta, int reduction) -> Tensor");
  m.def(
      "nft_loss_fwd(Tensor v, Tensor v_old, Tensor target, Tensor r, Tensor t, float beta, "
      "float eps, bool adaptive) -> (Tensor per, Tensor parts)");
  m.def(
      "nft_loss_bwd(Tensor g_per, Tensor v, Tensor v_old, Tensor target, Tensor r, Tensor t, "
      "Tensor parts, float beta, bool adaptive) -> Tensor");
}

TORCH_LIBRARY_IMPL(dancegrpo, CPU, m) {
  m.impl("logprob_fwd", &dancegrpo::logprob_fwd_cpu);
  m.impl("logprob_bwd", &dancegrpo::logprob_bwd_cpu);
  m.impl("sample_step", &dancegrpo::sample_step_cpu);
  m.impl("group_advantages", &dancegrpo::group_advantages_cpu);
  m.impl("policy_loss_fwd", &dancegrpo::policy_loss_fwd_cpu);
  m.impl("policy_loss_bwd", &dancegrpo::policy_loss_bwd_cpu);
  m.impl("nft_loss_fwd", &dancegrpo::nft_loss_fwd_cpu);
  m.impl("nft_loss_bwd", &dancegrpo::nft_loss_bwd_cpu);
}

TORCH_LIBRARY_IMPL(dancegrpo, Meta, m) {
  m.impl("logprob_fwd", &dancegrpo::logprob_fwd_meta);
  m.impl("logprob_bwd", &dancegrpo::logprob_bwd_meta);
  m.impl("sample_step", &dancegrpo::sample_step_meta);
  m.impl("group_advantages", &dancegrpo::group_advantages_meta);
  m.impl("policy_loss_fwd", &dancegrpo::policy_loss_fwd_meta);
  m.impl("policy_loss_bwd", &dancegrpo::policy_loss_bwd_meta);
  m.impl("nft_loss_fwd", &dancegrpo::nft_loss_fwd_meta);
  m.impl("nft_loss_bwd", &dancegrpo::nft_loss_bwd_meta);
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "dancegrpo compiled kernels; importing this module registers torch.ops.dancegrpo.*";
  m.def(
      "cuda_built",
      []() {
#ifdef DANCEGRPO_WITH_CUDA
        return true;
#else
        return false;
#endif
      },
      "Whether the extension was compiled with its CUDA kernels (-DDANCEGRPO_WITH_CUDA).");
  m.def(
      "omp_max_threads", []() { return omp_get_max_threads(); },
      "Threads an OpenMP parallel region of the CPU kernels would use now (follows "
      "torch.set_num_threads).");
}
