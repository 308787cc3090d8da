// The per-tile arithmetic of the log-prob kernels, on fp32 buffers (see tile.h for loading).
//
// Reductions keep kLanes independent fp32 accumulators: the compiler maps them to vector
// registers without having to reassociate (it may not without -ffast-math), and the result of
// a tile depends only on the tile's data, never on the thread that ran it. The lanes are then
// added in a fixed order in double.
#pragma once

#include <cstdint>

#include "common.h"

namespace dancegrpo {

// sum_i (y_i - (a x_i + b v_i))^2 over one tile of n elements.
inline double tile_sum_sq_residual(const float* __restrict__ v, const float* __restrict__ x,
                                   const float* __restrict__ y, float a, float b, int64_t n) {
  float acc[kLanes] = {};
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) {
    for (int j = 0; j < kLanes; ++j) {
      const float r = y[i + j] - (a * x[i + j] + b * v[i + j]);
      acc[j] += r * r;
    }
  }
  for (int j = 0; i < n; ++i, ++j) {
    const float r = y[i] - (a * x[i] + b * v[i]);
    acc[j] += r * r;
  }
  double s = 0.0;
  for (int j = 0; j < kLanes; ++j) s += acc[j];
  return s;
}

// sum_i (u_i - w_i)^2 over one tile.
inline double tile_sum_sq_diff(const float* __restrict__ u, const float* __restrict__ w,
                               int64_t n) {
  float acc[kLanes] = {};
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) {
    for (int j = 0; j < kLanes; ++j) {
      const float d = u[i + j] - w[i + j];
      acc[j] += d * d;
    }
  }
  for (int j = 0; i < n; ++i, ++j) {
    const float d = u[i] - w[i];
    acc[j] += d * d;
  }
  double s = 0.0;
  for (int j = 0; j < kLanes; ++j) s += acc[j];
  return s;
}

// r_i = y_i - (a x_i + b v_i): the same expression, evaluated in the same order, as the
// forward's, so forward and backward see bit-identical residuals.
inline void tile_residual(const float* __restrict__ v, const float* __restrict__ x,
                          const float* __restrict__ y, float a, float b, int64_t n,
                          float* __restrict__ r) {
  for (int64_t i = 0; i < n; ++i) r[i] = y[i] - (a * x[i] + b * v[i]);
}

// out_i = c * r_i
inline void tile_scale(const float* __restrict__ r, float c, int64_t n, float* __restrict__ out) {
  for (int64_t i = 0; i < n; ++i) out[i] = c * r[i];
}

// out_i = c * r_i + m * (u_i - w_i)   (the model-output gradient with the KL term)
inline void tile_scale_plus_diff(const float* __restrict__ r, float c, const float* __restrict__ u,
                                 const float* __restrict__ w, float m, int64_t n,
                                 float* __restrict__ out) {
  for (int64_t i = 0; i < n; ++i) out[i] = c * r[i] + m * (u[i] - w[i]);
}

// Per-sample log-prob from the sum of squared residuals over its N elements:
//   mean reduction: -S / (2 std^2 N) - log std - log sqrt(2 pi)
//   sum reduction:  -S / (2 std^2)   - N (log std + log sqrt(2 pi))
double logprob_from_sum(double sum_sq, double std, int64_t n, bool sum);

}  // namespace dancegrpo
