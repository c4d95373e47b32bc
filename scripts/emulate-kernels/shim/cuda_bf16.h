// CUDA's names the kernels use, over the HIP CPU runtime: the bf16 type
// (round to nearest even, as __float2bfloat16), warp shuffles within 32
// lanes (HIP-CPU's warps are 64 wide; `width` 32 splits them as CUDA's),
// and the integer min/max CUDA provides on the device.
#pragma once
#include <hip/hip_runtime.h>
#include <cmath>
#include <cstdint>
#include <cstring>
struct __nv_bfloat16 { uint16_t bits; };
inline float __bfloat162float(__nv_bfloat16 h) { uint32_t u = uint32_t(h.bits) << 16; float f; std::memcpy(&f, &u, 4); return f; }
inline __nv_bfloat16 __float2bfloat16(float f) { uint32_t u; std::memcpy(&u, &f, 4); u += 0x7fff + ((u >> 16) & 1); return __nv_bfloat16{uint16_t(u >> 16)}; }
#define __shfl_xor_sync(mask, v, o) __shfl_xor(v, o, 32)
using std::max;
using std::min;
