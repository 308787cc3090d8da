// Moving one tile of a big tensor between its storage dtype and an fp32 buffer.
//
// The kernels are written once, on fp32 buffers; each input may independently be
// fp32/bf16/fp16 (typically a bf16 model output beside fp32 latents), so instead of
// instantiating every dtype combination we convert a tile at a time: the dtype switch runs once
// per tile, and the conversion loops below are branch-free so the compiler vectorises them.
// fp32 inputs are not copied at all (the kernel reads them in place).
// Conversions round to nearest even, exactly as Tensor.to(dtype) does, so a value stored here
// equals what PyTorch would have stored.
#pragma once

#include <ATen/ATen.h>
#include <c10/util/Half.h>

#include "common.h"

#include <cstdint>
#include <cstring>

namespace dancegrpo {

// A big tensor seen as raw storage plus dtype (checked once, before the parallel loop).
struct Src {
  const void* ptr = nullptr;
  at::ScalarType dtype = at::kFloat;
  Src() = default;
  explicit Src(const at::Tensor& t) : ptr(t.data_ptr()), dtype(t.scalar_type()) {}
};

struct Dst {
  void* ptr = nullptr;
  at::ScalarType dtype = at::kFloat;
  Dst() = default;
  explicit Dst(const at::Tensor& t) : ptr(t.data_ptr()), dtype(t.scalar_type()) {}
};

inline float bf16_bits_to_float(uint16_t h) {
  const uint32_t u = static_cast<uint32_t>(h) << 16;
  float f;
  std::memcpy(&f, &u, sizeof(f));
  return f;
}

inline uint16_t float_to_bf16_bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof(u));
  // Round to nearest, ties to even; NaN stays a (quiet) NaN instead of rounding to inf.
  const uint32_t rounded = (u + UINT32_C(0x7FFF) + ((u >> 16) & 1u)) >> 16;
  return f != f ? static_cast<uint16_t>(0x7FC0) : static_cast<uint16_t>(rounded);
}

// Returns a pointer to n fp32 values of `s` starting at element `off`: the storage itself for
// fp32, else `buf` (at least n floats) filled by conversion.
inline const float* load_tile(const Src& s, int64_t off, int64_t n, float* __restrict__ buf) {
  switch (s.dtype) {
    case at::kFloat:
      return static_cast<const float*>(s.ptr) + off;
    case at::kBFloat16: {
      const uint16_t* __restrict__ p = static_cast<const uint16_t*>(s.ptr) + off;
      for (int64_t i = 0; i < n; ++i) buf[i] = bf16_bits_to_float(p[i]);
      return buf;
    }
    case at::kHalf: {
      const uint16_t* __restrict__ p = static_cast<const uint16_t*>(s.ptr) + off;
      for (int64_t i = 0; i < n; ++i) buf[i] = c10::detail::fp16_ieee_to_fp32_value(p[i]);
      return buf;
    }
    default:
      TORCH_CHECK(false, "dancegrpo: unsupported dtype ", s.dtype, " (checked earlier; a bug)");
  }
}

// Writes n fp32 values to `d` at element `off`, rounding to d's dtype.
inline void store_tile(const Dst& d, int64_t off, int64_t n, const float* __restrict__ src) {
  switch (d.dtype) {
    case at::kFloat: {
      float* __restrict__ p = static_cast<float*>(d.ptr) + off;
      for (int64_t i = 0; i < n; ++i) p[i] = src[i];
      return;
    }
    case at::kBFloat16: {
      uint16_t* __restrict__ p = static_cast<uint16_t*>(d.ptr) + off;
      if (mut() == 6) { for (int64_t i = 0; i < n; ++i) { uint32_t u; std::memcpy(&u, &src[i], 4); p[i] = u >> 16; } } else for (int64_t i = 0; i < n; ++i) p[i] = float_to_bf16_bits(src[i]);
      return;
    }
    case at::kHalf: {
      uint16_t* __restrict__ p = static_cast<uint16_t*>(d.ptr) + off;
      for (int64_t i = 0; i < n; ++i) p[i] = c10::detail::fp16_ieee_from_fp32_value(src[i]);
      return;
    }
    default:
      TORCH_CHECK(false, "dancegrpo: unsupported dtype ", d.dtype, " (checked earlier; a bug)");
  }
}

// Where a kernel writes a tile of output `d`: the storage itself for fp32, else `buf`, which
// flush_tile() then rounds into the storage. Saves a copy for fp32 outputs.
inline float* out_tile(const Dst& d, int64_t off, float* buf) {
  return d.dtype == at::kFloat ? static_cast<float*>(d.ptr) + off : buf;
}

inline void flush_tile(const Dst& d, int64_t off, int64_t n, const float* buf) {
  if (d.dtype != at::kFloat) store_tile(d, off, n, buf);
}

// Tiles of one sample of n elements: the last one may be short.
inline int64_t tiles_per_sample(int64_t n) { return (n + kTile - 1) / kTile; }

}  // namespace dancegrpo
