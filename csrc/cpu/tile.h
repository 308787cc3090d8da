// Moving one tile of a big tensor between its storage dtype and an fp32 buffer.
//
// The kernels are written once, on fp32 buffers; each input may independently be
// fp32/bf16/fp16 (typically a bf16 model output beside fp32 latents), so instead of
// instantiating every dtype combination we convert a tile at a time: the dtype switch runs once
// per tile, and the conversion loops below are branch-free so the compiler vectorises them.
// fp32 inputs are not copied at all (the kernel reads them in place).
// Conversions round to nearest even, exactly as Tensor.to(dtype) does, so a value stored here
// equals what PyTorch would have stored (test_native.py checks every fp16 value and a dense sweep
// of fp32 values against torch). They are written as bit operations and masks, without branches,
// because the generic ones in c10 (branchy, or F16C-only) keep GCC from vectorising the loops.
#pragma once

#include <ATen/ATen.h>

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

inline uint32_t float_bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof(u));
  return u;
}

inline float bits_float(uint32_t u) {
  float f;
  std::memcpy(&f, &u, sizeof(f));
  return f;
}

// All-ones when cond, else zero: selects written as masks so the loops stay branch-free.
inline uint32_t mask_if(bool cond) { return 0u - static_cast<uint32_t>(cond); }

inline float bf16_bits_to_float(uint16_t h) { return bits_float(static_cast<uint32_t>(h) << 16); }

inline uint16_t float_to_bf16_bits(float f) {
  const uint32_t u = float_bits(f);
  // Round to nearest, ties to even; NaN stays a (quiet) NaN instead of rounding to inf.
  const uint32_t rounded = (u + UINT32_C(0x7FFF) + ((u >> 16) & 1u)) >> 16;
  const uint32_t nan = mask_if((u & UINT32_C(0x7FFFFFFF)) > UINT32_C(0x7F800000));
  return static_cast<uint16_t>((nan & UINT32_C(0x7FC0)) | (~nan & rounded));
}

inline float fp16_bits_to_float(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  const uint32_t exp = (h >> 10) & 0x1Fu;
  const uint32_t mant = h & 0x3FFu;
  // Normal numbers: rebias the exponent (15 -> 127) and widen the mantissa (10 -> 23 bits).
  const uint32_t normal = ((exp + 112u) << 23) | (mant << 13);
  // Inf and NaN keep an all-ones exponent (and the NaN payload).
  const uint32_t special = UINT32_C(0x7F800000) | (mant << 13);
  // Zero and subnormals are mant * 2^-24, exact in fp32.
  const uint32_t tiny = float_bits(static_cast<float>(static_cast<int32_t>(mant)) * 0x1p-24f);
  const uint32_t is_special = mask_if(exp == 0x1Fu), is_tiny = mask_if(exp == 0u);
  const uint32_t bits = (is_special & special) | (is_tiny & tiny) | (~(is_special | is_tiny) & normal);
  return bits_float(bits | sign);
}

inline uint16_t float_to_fp16_bits(float f) {
  const uint32_t u = float_bits(f);
  const uint32_t sign = (u >> 16) & 0x8000u;
  const uint32_t a = u & UINT32_C(0x7FFFFFFF);
  // |f| >= 2^-14 (fp16 normal range): rebias the exponent (127 -> 15), round the mantissa from
  // 23 to 10 bits to nearest even (a carry moves into the exponent, as it should), saturate to inf.
  const uint32_t r = a - (UINT32_C(112) << 23);
  uint32_t normal = (r + UINT32_C(0xFFF) + ((r >> 13) & 1u)) >> 13;
  normal = normal < 0x7C00u ? normal : 0x7C00u;
  // |f| < 2^-14: the result is round(|f| * 2^24) (a subnormal, or the smallest normal after
  // rounding up). Adding 0.5, whose fp32 ulp is 2^-24, makes the FPU do that rounding (to even).
  const uint32_t tiny = float_bits(bits_float(a) + 0.5f) - float_bits(0.5f);
  const uint32_t is_nan = mask_if(a > UINT32_C(0x7F800000));
  const uint32_t is_tiny = mask_if(a < UINT32_C(0x38800000));
  const uint32_t bits = (is_nan & 0x7E00u) | (~is_nan & ((is_tiny & tiny) | (~is_tiny & normal)));
  return static_cast<uint16_t>(sign | bits);
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
      for (int64_t i = 0; i < n; ++i) buf[i] = fp16_bits_to_float(p[i]);
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
      for (int64_t i = 0; i < n; ++i) p[i] = float_to_bf16_bits(src[i]);
      return;
    }
    case at::kHalf: {
      uint16_t* __restrict__ p = static_cast<uint16_t*>(d.ptr) + off;
      for (int64_t i = 0; i < n; ++i) p[i] = float_to_fp16_bits(src[i]);
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
