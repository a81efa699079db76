// Masked temporal frame pooling, CUDA kernels. The contract (schemas, semantics, argument
// checks) is in ../frame_pool.h; the checks themselves run in ../frame_pool.cpp.
//
// The forward pass is a pure streaming read of x, so the design goal is DRAM bandwidth:
//   - each thread owns VEC adjacent features (one 16-byte load per frame) and keeps U frames
//     in flight, so a block of TX feature vectors x TY time lanes reads TY * U rows at once
//     (U = CudaLaunchConfig::fwd_unroll; one kernel is compiled per value); with
//     CudaLaunchConfig::fwd_pipeline = 1 the U are two software-pipelined rounds of U / 2, so
//     loads stay in flight while a round is folded; with fwd_pipeline = 2 the loads are cp.async
//     copies into a per-thread ring of shared memory (frame_pool_fwd_ring_kernel), so what is in
//     flight costs shared memory instead of registers;
//   - the TY lanes of a block are folded through shared memory;
//   - when B x (feature blocks) cannot fill the GPU, time is also split across blocks; each
//     split writes float/double partials (and int32 argmax) to a workspace that a small second
//     kernel folds. Nothing uses float atomics, so results are bitwise reproducible.
//   - "meanmax" keeps a running sum and a running max side by side: one read of x.
//   - every load of x carries an L2 policy chosen at run time (l2_load_policy): normal, or with
//     CudaLaunchConfig::fwd_l2_evict_first and an x larger than L2, evict-first, so frames read
//     once do not push out what others left in L2.
// The backward pass writes every element of grad_x exactly once with 16-byte stores; each
// thread owns a feature vector and walks down a run of frames, so grad_out, argmax and the
// length are read once per run instead of once per element.
//
// The block shape, the time split and the backward's run length come from the shape, the SM
// count (occupancy query) and CudaLaunchConfig (runtime constants a GPU sweep measures).
//
// Lengths on the GPU are never read by the host. Every kernel clamps each length into [0, T]
// (reads stay in bounds whatever is in memory) and, when a length was outside, stores 1 into a
// flag in mapped pinned host memory; check_device_errors() raises it (see frame_pool.h).
#include "../frame_pool.h"

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>
#include <ATen/cuda/CUDAContext.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGraphsC10Utils.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAFunctions.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <mutex>
#include <tuple>
#include <type_traits>

namespace dtl_fast {
namespace {

// Largest threads per block (CudaLaunchConfig::threads); shared memory is sized for it and
// __launch_bounds__ promises it.
constexpr int kMaxThreads = 256;
// Frames in flight per thread in the forward loop: 4 x 16 B per thread is enough
// memory-level parallelism to saturate HBM at full occupancy without costing registers.
// CudaLaunchConfig::fwd_unroll picks another U for the vector path, but the launch (occupancy,
// split quantum, time split) is always planned with this one, so every U computes the same
// partials in the same order.
constexpr int kUnrollVec = 4;
// The scalar path moves 2-8 B per load, so it needs more loads in flight for the same bytes.
constexpr int kUnrollScalar = 8;

// What a kernel computes: a running sum (mean / sum), a running max with its first frame
// (max), or both from the same loads (meanmax).
enum Kind : int { kSum = 0, kMax = 1, kMeanMax = 2 };

template <typename T, int N>
struct alignas(sizeof(T) * N) VecT {
  T v[N];
};

template <int BYTES>
struct RawWord;
template <>
struct RawWord<16> {
  using type = int4;
};
template <>
struct RawWord<8> {
  using type = long long;
};
template <>
struct RawWord<4> {
  using type = int;
};
template <>
struct RawWord<2> {
  using type = short;
};

// The L2 policy of the forward's loads (CudaLaunchConfig::fwd_l2_evict_first): evict-first
// marks each line the forward brings into L2 as the first to go, so its read-once frames
// recycle their own lines instead of pushing out (and writing back) what others left there,
// e.g. the dirty tail of x that the layer before wrote. Otherwise an explicit evict-normal
// policy: the priority a plain load gets, but carried by the load itself instead of the
// launch's default memory descriptor, so an access-policy window set on the stream most likely
// no longer applies to x (not documented either way; PyTorch sets none).
// ptxas folds both createpolicy into constants: the choice is one uniform select per kernel.
// An opaque 64-bit operand; unused before sm_80 (no cache hints there).
__device__ __forceinline__ uint64_t l2_load_policy(bool evict_first) {
  uint64_t first = 0, normal = 0;
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm("createpolicy.fractional.L2::evict_first.b64 %0, 1.0;\n" : "=l"(first));
  asm("createpolicy.fractional.L2::evict_normal.b64 %0, 1.0;\n" : "=l"(normal));
#endif
  return evict_first ? first : normal;
}

// Read-only-cache load (ld.global.nc, what __ldg emits) of one 2- to 16-byte word under the L2
// policy `pol`. volatile, so that the compiler neither hoists a guarded load of the tail above
// its guard nor drops or merges one; ptxas still schedules the loads as it did the __ldg ones
// (the hot loops' instruction counts moved by at most 2, bench/NOTES.md s25).
template <typename W>
__device__ __forceinline__ W ldg_hint(const W* p, uint64_t pol) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  W r;
  if constexpr (sizeof(W) == 16) {
    asm volatile("ld.global.nc.L2::cache_hint.v4.s32 {%0, %1, %2, %3}, [%4], %5;\n"
                 : "=r"(r.x), "=r"(r.y), "=r"(r.z), "=r"(r.w)
                 : "l"(p), "l"(pol));
  } else if constexpr (sizeof(W) == 8) {
    asm volatile("ld.global.nc.L2::cache_hint.s64 %0, [%1], %2;\n" : "=l"(r) : "l"(p), "l"(pol));
  } else if constexpr (sizeof(W) == 4) {
    asm volatile("ld.global.nc.L2::cache_hint.s32 %0, [%1], %2;\n" : "=r"(r) : "l"(p), "l"(pol));
  } else {
    static_assert(sizeof(W) == 2, "a 2-, 4-, 8- or 16-byte word");
    unsigned short h;
    asm volatile("ld.global.nc.L2::cache_hint.b16 %0, [%1], %2;\n" : "=h"(h) : "l"(p), "l"(pol));
    r = static_cast<W>(h);
  }
  return r;
#else
  (void)pol;
  return __ldg(p);
#endif
}

// Read-only-cache load of N adjacent elements as one word, under the L2 policy `pol`; a plain
// word type because there is no __ldg overload for c10::Half / c10::BFloat16 or structs of them.
template <typename T, int N>
__device__ __forceinline__ typename RawWord<sizeof(T) * N>::type load_raw(const T* p,
                                                                           uint64_t pol) {
  using W = typename RawWord<sizeof(T) * N>::type;
  return ldg_hint(reinterpret_cast<const W*>(p), pol);
}

template <typename T, int N, typename W>
__device__ __forceinline__ VecT<T, N> unpack(const W& w) {
  static_assert(sizeof(W) == sizeof(VecT<T, N>), "word and vector sizes differ");
  VecT<T, N> r;
  memcpy(&r, &w, sizeof(r));
  return r;
}

// An empty asm that takes every loaded word as an in/out operand, so each consumer depends on
// all U loads. Without it ptxas sinks each load next to its first use (seen in the sm_90 SASS
// of the half/sum kernel: load, convert, add, next load), leaving one load in flight per warp.
__device__ __forceinline__ void pin_loads(int4 (&w)[4]) {
  asm volatile(""
               : "+r"(w[0].x), "+r"(w[0].y), "+r"(w[0].z), "+r"(w[0].w), "+r"(w[1].x),
                 "+r"(w[1].y), "+r"(w[1].z), "+r"(w[1].w), "+r"(w[2].x), "+r"(w[2].y),
                 "+r"(w[2].z), "+r"(w[2].w), "+r"(w[3].x), "+r"(w[3].y), "+r"(w[3].z),
                 "+r"(w[3].w));
}
#define DTL_PIN_8(W, C)                                                                      \
  __device__ __forceinline__ void pin_loads(W (&w)[8]) {                                     \
    asm volatile("" : C(w[0]), C(w[1]), C(w[2]), C(w[3]), C(w[4]), C(w[5]), C(w[6]), C(w[7])); \
  }
DTL_PIN_8(short, "+h")
DTL_PIN_8(int, "+r")
DTL_PIN_8(long long, "+l")
#undef DTL_PIN_8
// The other unrolls of the vector path (CudaLaunchConfig::fwd_unroll), one asm statement per
// array as above. The asm orders the PTX only: in the max / meanmax kernels at U >= 8 ptxas
// still sinks some loads next to their use (tests/test_frame_pool_sass.py, bench/NOTES.md).
#define DTL_W4(i) "+r"(w[i].x), "+r"(w[i].y), "+r"(w[i].z), "+r"(w[i].w)
__device__ __forceinline__ void pin_loads(int4 (&w)[2]) {
  asm volatile("" : DTL_W4(0), DTL_W4(1));
}
__device__ __forceinline__ void pin_loads(int4 (&w)[8]) {
  asm volatile("" : DTL_W4(0), DTL_W4(1), DTL_W4(2), DTL_W4(3), DTL_W4(4), DTL_W4(5), DTL_W4(6),
               DTL_W4(7));
}
__device__ __forceinline__ void pin_loads(int4 (&w)[16]) {
  asm volatile("" : DTL_W4(0), DTL_W4(1), DTL_W4(2), DTL_W4(3), DTL_W4(4), DTL_W4(5), DTL_W4(6),
               DTL_W4(7), DTL_W4(8), DTL_W4(9), DTL_W4(10), DTL_W4(11), DTL_W4(12), DTL_W4(13),
               DTL_W4(14), DTL_W4(15));
}
#undef DTL_W4

template <typename acc_t>
__device__ __forceinline__ bool is_nan(acc_t v) {
  return v != v;
}

// Folds partial max (b_val at b_idx) into (a_val at a_idx). Partials may cover interleaved
// frame sets, so the winner is decided by an order, not by who came first: NaN above every
// number, larger value above smaller, and among equals the smaller frame index. That is the
// first maximal frame of the union, i.e. what a sequential scan with
// `v > acc || (isnan(v) && !isnan(acc))` finds. Index -1 marks an empty partial.
template <typename acc_t>
__device__ __forceinline__ void fold_max(acc_t& a_val, int32_t& a_idx, acc_t b_val,
                                         int32_t b_idx) {
  bool take;
  if (b_idx < 0) {
    take = false;
  } else if (a_idx < 0) {
    take = true;
  } else {
    const bool an = is_nan(a_val), bn = is_nan(b_val);
    if (an || bn) {
      take = bn && (!an || b_idx < a_idx);
    } else {
      take = b_val > a_val || (b_val == a_val && b_idx < a_idx);
    }
  }
  if (take) {
    a_val = b_val;
    a_idx = b_idx;
  }
}

// Sequential update with frame tk, scanned in increasing t within a lane: the first maximum
// wins and a NaN replaces any number but is never replaced (torch.amax propagates NaN).
template <int KIND, typename scalar_t, typename acc_t, int VEC>
__device__ __forceinline__ void accumulate(acc_t (&sum)[VEC], acc_t (&mx)[VEC],
                                           int32_t (&idx)[VEC], const VecT<scalar_t, VEC>& r,
                                           int32_t tk) {
#pragma unroll
  for (int j = 0; j < VEC; ++j) {
    const acc_t f = static_cast<acc_t>(r.v[j]);
    if constexpr (KIND != kMax) sum[j] += f;
    if constexpr (KIND != kSum) {
      const bool take = f > mx[j] || (is_nan(f) && !is_nan(mx[j]));
      mx[j] = take ? f : mx[j];
      idx[j] = take ? tk : idx[j];
    }
  }
}

// ---- the running max without its frame (a forward nobody differentiates) ---------------------
// With no argmax to write (with_argmax false: what frame_pool() asks when autograd records
// nothing), the hot loop needs the max's value only. accumulate spends a compare, two NaN tests
// and two selects per element on the first-max rule; here one NaN-propagating max per element
// does it (sm_80+: max.NaN.f32), and for 2-byte types one per *pair*, in their own format
// (max.NaN.bf16x2 / max.NaN.f16x2 on the loaded 32-bit words, no conversion: a maximum of
// bfloat16 values is one of them, so nothing is rounded). The value equals accumulate's first
// maximum, except that a NaN result is the canonical NaN, not the first NaN's payload, and a
// maximum of zeros may carry the other zero's sign (-0.0 == +0.0). The lane's frame index keeps
// start_lane's seed (its first frame, or -1 for none), so finish_row, the time split's workspace
// and the combine still tell an empty lane from a -inf one; with no argmax nothing else reads it.
__device__ __forceinline__ float max_nan(float a, float b) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  float d;
  asm("max.NaN.f32 %0, %1, %2;\n" : "=f"(d) : "f"(a), "f"(b));
  return d;
#else
  return b > a || is_nan(b) ? b : a;  // a NaN a stays: b > NaN is false
#endif
}

// max.NaN of two packed pairs of a 2-byte type (element 2i in the low half, 2i + 1 in the high).
template <typename scalar_t>
__device__ __forceinline__ uint32_t max_nan_x2(uint32_t a, uint32_t b) {
  static_assert(sizeof(scalar_t) == 2, "pairs of a 2-byte type");
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  uint32_t d;
  if constexpr (std::is_same_v<scalar_t, c10::BFloat16>) {
    asm("max.NaN.bf16x2 %0, %1, %2;\n" : "=r"(d) : "r"(a), "r"(b));
  } else {
    asm("max.NaN.f16x2 %0, %1, %2;\n" : "=r"(d) : "r"(a), "r"(b));
  }
  return d;
#else
  uint32_t d = 0;
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    const auto half = [h](uint32_t w) {
      return static_cast<float>(scalar_t(static_cast<uint16_t>(w >> (16 * h)), scalar_t::from_bits()));
    };
    const float m = max_nan(half(a), half(b));  // exact: m is one of the two
    d |= static_cast<uint32_t>(scalar_t(m).x) << (16 * h);
  }
  return d;
#endif
}

// The value-only running max of one lane's VEC features: float32 one per element, 2-byte types
// VEC / 2 packed pairs; `store` hands the result to the index rule's accumulators (acc_t).
template <typename scalar_t, int VEC>
struct ValueMax {
  static_assert(std::is_same_v<scalar_t, float>, "float32 here; 2-byte types below");
  float m[VEC];
  __device__ __forceinline__ void start() {
#pragma unroll
    for (int j = 0; j < VEC; ++j) m[j] = -std::numeric_limits<float>::infinity();
  }
  template <typename W>
  __device__ __forceinline__ void fold(const W& w) {
    const VecT<float, VEC> r = unpack<float, VEC>(w);
#pragma unroll
    for (int j = 0; j < VEC; ++j) m[j] = max_nan(m[j], r.v[j]);
  }
  __device__ __forceinline__ void store(float (&mx)[VEC]) const {
#pragma unroll
    for (int j = 0; j < VEC; ++j) mx[j] = m[j];
  }
};

template <typename scalar_t, int VEC>
struct ValueMaxPairs {
  static_assert(sizeof(scalar_t) == 2 && VEC % 2 == 0, "packed pairs of a 2-byte type");
  // -inf in both halves: bfloat16 0xff80, float16 0xfc00
  static constexpr uint32_t kNegInf =
      std::is_same_v<scalar_t, c10::BFloat16> ? 0xff80ff80u : 0xfc00fc00u;
  uint32_t m[VEC / 2];
  __device__ __forceinline__ void start() {
#pragma unroll
    for (int i = 0; i < VEC / 2; ++i) m[i] = kNegInf;
  }
  template <typename W>
  __device__ __forceinline__ void fold(const W& w) {
    static_assert(sizeof(W) == 2 * VEC, "one word of VEC elements");
    uint32_t u[VEC / 2];
    memcpy(&u, &w, sizeof(u));
#pragma unroll
    for (int i = 0; i < VEC / 2; ++i) m[i] = max_nan_x2<scalar_t>(m[i], u[i]);
  }
  __device__ __forceinline__ void store(float (&mx)[VEC]) const {
#pragma unroll
    for (int i = 0; i < VEC / 2; ++i) {
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const auto bits = static_cast<uint16_t>(m[i] >> (16 * h));
        mx[2 * i + h] = static_cast<float>(scalar_t(bits, scalar_t::from_bits()));
      }
    }
  }
};
template <int VEC>
struct ValueMax<c10::BFloat16, VEC> : ValueMaxPairs<c10::BFloat16, VEC> {};
template <int VEC>
struct ValueMax<c10::Half, VEC> : ValueMaxPairs<c10::Half, VEC> {};

// The state a lane of the plain loop folds into besides sum / mx / idx: a ValueMax when the
// kernel keeps no frame index (IDX false, max / meanmax), else nothing.
struct NoValueMax {
  __device__ __forceinline__ void start() {}
};
template <int KIND, bool IDX, typename scalar_t, int VEC>
using LaneValueMax = std::conditional_t<!IDX && KIND != kSum, ValueMax<scalar_t, VEC>, NoValueMax>;

// Folds one loaded word without the frame index (IDX false): the sum through accumulate, the
// max through vm.
template <int KIND, typename scalar_t, typename acc_t, int VEC, typename VM, typename W>
__device__ __forceinline__ void fold_word_value(acc_t (&sum)[VEC], acc_t (&mx)[VEC],
                                                int32_t (&idx)[VEC], VM& vm, const W& w) {
  if constexpr (KIND == kMeanMax)
    accumulate<kSum, scalar_t, acc_t, VEC>(sum, mx, idx, unpack<scalar_t, VEC>(w), 0);
  vm.fold(w);
}

// One round of the vector loop: R loads, frames t, t + TY, ..., t + (R - 1) TY at q + k * step,
// into w[OFF, OFF + R). GUARD: a frame at or past t_hi is not read (its word stays 0), the
// predicate of the last round, so no out-of-range frame is ever touched.
template <int R, int OFF, bool GUARD, typename scalar_t, int VEC, typename W, int N>
__device__ __forceinline__ void load_round(W (&w)[N], const scalar_t* q, int64_t step, int32_t t,
                                           int32_t t_hi, int TY, uint64_t pol) {
  static_assert(OFF + R <= N, "round outside the buffer");
#pragma unroll
  for (int k = 0; k < R; ++k) {
    if constexpr (GUARD) {
      w[OFF + k] = {};
      if (t + k * TY < t_hi) w[OFF + k] = load_raw<scalar_t, VEC>(q + k * step, pol);
    } else {
      w[OFF + k] = load_raw<scalar_t, VEC>(q + k * step, pol);
    }
  }
}

// Folds the round in w[OFF, OFF + R) (frames t, t + TY, ...) in increasing frame order;
// GUARD stops at t_hi.
template <int KIND, int R, int OFF, bool GUARD, typename scalar_t, typename acc_t, int VEC,
          typename W, int N>
__device__ __forceinline__ void fold_round(acc_t (&sum)[VEC], acc_t (&mx)[VEC],
                                           int32_t (&idx)[VEC], const W (&w)[N], int32_t t,
                                           int32_t t_hi, int TY) {
#pragma unroll
  for (int k = 0; k < R; ++k) {
    if (GUARD && t + k * TY >= t_hi) break;
    accumulate<KIND, scalar_t, acc_t, VEC>(sum, mx, idx, unpack<scalar_t, VEC>(w[OFF + k]),
                                           t + k * TY);
  }
}

// The end of a pipelined lane: w[CUR, CUR + R) holds the issued, unfolded full round at t, and
// fewer than R frames follow it; they are prefetched into the other half with the predicate of
// the plain loop's last round before w[CUR, CUR + R) is folded.
template <int KIND, int R, int CUR, typename scalar_t, typename acc_t, int VEC, typename W, int N>
__device__ __forceinline__ void fold_pipelined_tail(acc_t (&sum)[VEC], acc_t (&mx)[VEC],
                                                    int32_t (&idx)[VEC], W (&w)[N],
                                                    const scalar_t* q, int64_t step, int32_t t,
                                                    int32_t t_hi, int TY, uint64_t pol) {
  constexpr int NEXT = R - CUR;
  const int32_t tn = t + R * TY;
  if (tn < t_hi) {
    load_round<R, NEXT, true, scalar_t, VEC>(w, q + R * step, step, tn, t_hi, TY, pol);
    pin_loads(w);
  }
  fold_round<KIND, R, CUR, false, scalar_t, acc_t, VEC>(sum, mx, idx, w, t, t_hi, TY);
  if (tn < t_hi) {
    fold_round<KIND, R, NEXT, true, scalar_t, acc_t, VEC>(sum, mx, idx, w, tn, t_hi, TY);
  }
}

// The vector loop of one lane, software-pipelined (CudaLaunchConfig::fwd_pipeline = 1): U
// words held as two rounds of R = U / 2, and round k + 1 is issued before round k is folded,
// so R loads stay in flight through every fold (the plain loop issues U, waits, folds, and has
// nothing in flight while it folds). pin_loads over both halves after each issue makes the
// fold of one half depend, in the PTX, on the loads of the other. The lane folds frames
// t, t + TY, ... < t_hi in increasing order, exactly as the plain loop does: only the load
// schedule differs, so the result is bit-identical. Rounds alternate between the halves
// w[0, R) and w[R, 2R) with the roles fixed in the code (two rounds per trip, and a tail for
// each half): a register array indexed at run time would live in local memory, and a copy of
// one half into the other at the loop's exit was hoisted by the compiler into every trip,
// where it waited for the loads just issued (seen in the sm_90 SASS).
template <int KIND, int U, typename scalar_t, typename acc_t, int VEC>
__device__ __forceinline__ void fold_lane_pipelined(acc_t (&sum)[VEC], acc_t (&mx)[VEC],
                                                    int32_t (&idx)[VEC], const scalar_t* q,
                                                    int64_t step, int32_t t, int32_t t_hi,
                                                    int TY, uint64_t pol) {
  constexpr int R = U / 2;
  static_assert(U % 2 == 0, "two rounds of U / 2");
  using W = typename RawWord<sizeof(scalar_t) * VEC>::type;
  const int32_t round = R * TY;
  const int64_t qstep = R * step;
  if (t + (R - 1) * TY >= t_hi) {  // less than one full round: the predicated round alone
    if (t < t_hi) {
      W a[R];
      load_round<R, 0, true, scalar_t, VEC>(a, q, step, t, t_hi, TY, pol);
      pin_loads(a);
      fold_round<KIND, R, 0, true, scalar_t, acc_t, VEC>(sum, mx, idx, a, t, t_hi, TY);
    }
    return;
  }
  W w[U];
  load_round<R, 0, false, scalar_t, VEC>(w, q, step, t, t_hi, TY, pol);
  // At the top of each trip w[0, R) holds the issued, unfolded full round at t; a trip folds
  // two rounds while the one after each is in flight.
  for (;;) {
    if (t + (2 * R - 1) * TY >= t_hi) {  // the next round is not full
      fold_pipelined_tail<KIND, R, 0>(sum, mx, idx, w, q, step, t, t_hi, TY, pol);
      return;
    }
    load_round<R, R, false, scalar_t, VEC>(w, q + qstep, step, t + round, t_hi, TY, pol);
    pin_loads(w);
    fold_round<KIND, R, 0, false, scalar_t, acc_t, VEC>(sum, mx, idx, w, t, t_hi, TY);
    t += round;
    q += qstep;
    if (t + (2 * R - 1) * TY >= t_hi) {
      fold_pipelined_tail<KIND, R, R>(sum, mx, idx, w, q, step, t, t_hi, TY, pol);
      return;
    }
    load_round<R, 0, false, scalar_t, VEC>(w, q + qstep, step, t + round, t_hi, TY, pol);
    pin_loads(w);
    fold_round<KIND, R, R, false, scalar_t, acc_t, VEC>(sum, mx, idx, w, t, t_hi, TY);
    t += round;
    q += qstep;
  }
}

// ---- cp.async: 16-byte copies from global into shared memory (the ring forward) ----------------
// sm_80 and later; an older target (TORCH_CUDA_ARCH_LIST) gets a synchronous copy with the same
// meaning, and the host never picks the ring on such a device anyway. .cg caches in L2 only: the
// frames are read once.
// The destination is a shared-space address (__cvta_generic_to_shared of the generic one,
// computed once by the caller: on sm_90 each conversion re-reads the CTA id).
// `pol`: the L2 policy of the copy's global read (l2_load_policy).
__device__ __forceinline__ void cp_async_16(uint32_t smem_dst, const void* gmem_src, uint64_t pol) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile("cp.async.cg.shared.global.L2::cache_hint [%0], [%1], 16, %2;\n" ::"r"(smem_dst),
               "l"(gmem_src), "l"(pol)
               : "memory");
#else
  (void)pol;
  const int4 w = __ldg(static_cast<const int4*>(gmem_src));
  asm volatile("st.shared.v4.b32 [%0], {%1, %2, %3, %4};\n" ::"r"(smem_dst), "r"(w.x), "r"(w.y),
               "r"(w.z), "r"(w.w)
               : "memory");
#endif
}
__device__ __forceinline__ void cp_async_commit() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile("cp.async.commit_group;\n" ::: "memory");
#endif
}
// Returns once at most N of this thread's committed groups are still in flight; the copies of
// the others are then visible to this thread (and only to it).
template <int N>
__device__ __forceinline__ void cp_async_wait() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
#endif
}

// A 16-byte read of shared memory at a shared-space address. volatile with a memory clobber,
// so it stays after the cp_async_wait that makes the bytes visible.
__device__ __forceinline__ int4 ld_shared_16(uint32_t addr) {
  int4 v;
  asm volatile("ld.shared.v4.b32 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
               : "r"(addr)
               : "memory");
  return v;
}

// The clip's length clamped into [0, T]. A length outside is recorded in *err (one thread per
// block reports, so a bad batch costs a few host-memory stores, and a good one none).
__device__ __forceinline__ int64_t clamped_length(const int64_t* __restrict__ lens, int64_t b,
                                                  int64_t T, int* err, bool reporter) {
  const int64_t L = lens == nullptr ? T : lens[b];
  if (L < 0 || L > T) {
    if (reporter) *reinterpret_cast<volatile int*>(err) = 1;
    return L < 0 ? 0 : T;
  }
  return L;
}

// Writes element d (< D) of row b: the mean / sum / max, or both for meanmax (out is [B, 2D]),
// and the max's frame unless argmax is null (a forward nobody differentiates: with_argmax false).
template <int KIND, typename scalar_t, typename acc_t>
__device__ __forceinline__ void write_result(scalar_t* __restrict__ out,
                                             int32_t* __restrict__ argmax, int64_t b, int64_t d,
                                             int64_t D, acc_t sum, acc_t mx, int32_t idx,
                                             int64_t L, bool mean) {
  if constexpr (KIND == kSum) {
    out[b * D + d] = static_cast<scalar_t>(mean && L > 0 ? sum / static_cast<acc_t>(L) : sum);
  } else if constexpr (KIND == kMax) {
    out[b * D + d] = static_cast<scalar_t>(idx < 0 ? acc_t(0) : mx);
    if (argmax != nullptr) argmax[b * D + d] = idx;
  } else {
    out[b * 2 * D + d] = static_cast<scalar_t>(L > 0 ? sum / static_cast<acc_t>(L) : sum);
    out[b * 2 * D + D + d] = static_cast<scalar_t>(idx < 0 ? acc_t(0) : mx);
    if (argmax != nullptr) argmax[b * D + d] = idx;
  }
}

// A lane's accumulators before its first frame: sum 0, max -inf, and the max's frame seeded with
// the lane's first frame (-1 when the lane has none), which lets the hot loop use the plain
// sequential rule: a first frame of -inf is never "taken" yet is still the first max.
template <typename acc_t, int VEC>
__device__ __forceinline__ void start_lane(acc_t (&sum)[VEC], acc_t (&mx)[VEC],
                                           int32_t (&idx)[VEC], int32_t first) {
#pragma unroll
  for (int j = 0; j < VEC; ++j) {
    sum[j] = acc_t(0);
    mx[j] = -std::numeric_limits<acc_t>::infinity();
    idx[j] = first;
  }
}

// The end of one row (or one time split of it): the TY lanes of the block folded through shared
// memory, a tree with [j][tid] so consecutive threads use consecutive banks, then lane 0 writes
// the result (S == 1) or the split's partial (workspace slot s). Every thread of the block calls
// it (it synchronises the block when TY > 1).
template <int KIND, typename scalar_t, typename acc_t, int VEC, typename SumBuf, typename MaxBuf,
          typename IdxBuf>
__device__ __forceinline__ void finish_row(acc_t (&sum)[VEC], acc_t (&mx)[VEC],
                                           int32_t (&idx)[VEC], SumBuf& s_sum, MaxBuf& s_max,
                                           IdxBuf& s_idx, int tid, int TX, int TY, int ty,
                                           bool active, int64_t v, int64_t b, int64_t s,
                                           int64_t S, int64_t B, int64_t D, int64_t L, bool mean,
                                           scalar_t* __restrict__ out,
                                           int32_t* __restrict__ argmax,
                                           acc_t* __restrict__ ws_sum, acc_t* __restrict__ ws_max,
                                           int32_t* __restrict__ ws_idx) {
  constexpr bool HAS_SUM = KIND != kMax;
  constexpr bool HAS_MAX = KIND != kSum;
  if (TY > 1) {
    // Tree fold of the TY lanes; [j][tid] keeps consecutive threads on consecutive banks.
#pragma unroll
    for (int j = 0; j < VEC; ++j) {
      if constexpr (HAS_SUM) s_sum[j][tid] = sum[j];
      if constexpr (HAS_MAX) {
        s_max[j][tid] = mx[j];
        s_idx[j][tid] = idx[j];
      }
    }
    __syncthreads();
    for (int h = TY / 2; h > 0; h >>= 1) {
      if (ty < h) {
        const int other = tid + h * TX;
#pragma unroll
        for (int j = 0; j < VEC; ++j) {
          if constexpr (HAS_SUM) {
            sum[j] += s_sum[j][other];
            s_sum[j][tid] = sum[j];
          }
          if constexpr (HAS_MAX) {
            fold_max(mx[j], idx[j], s_max[j][other], s_idx[j][other]);
            s_max[j][tid] = mx[j];
            s_idx[j][tid] = idx[j];
          }
        }
      }
      // Also separates this row's last reads from the next row's first writes.
      __syncthreads();
    }
  }

  if (ty == 0 && active) {
    const int64_t d0 = v * VEC;
    if (S == 1) {
#pragma unroll
      for (int j = 0; j < VEC; ++j)
        write_result<KIND, scalar_t, acc_t>(out, argmax, b, d0 + j, D, sum[j], mx[j], idx[j],
                                            L, mean);
    } else {
      const int64_t o = (s * B + b) * D + d0;
#pragma unroll
      for (int j = 0; j < VEC; ++j) {
        if constexpr (HAS_SUM) ws_sum[o + j] = sum[j];
        if constexpr (HAS_MAX) {
          ws_max[o + j] = mx[j];
          ws_idx[o + j] = idx[j];
        }
      }
    }
  }
}

// blockIdx.x = s * X + xb picks the time split s and feature block xb; blockIdx.y strides
// over rows b (a grid's y extent is capped at 65535). Thread (tx, ty) owns feature vector
// xb * TX + tx and frames t_lo + ty + k * TY of the split. With S == 1 the result goes
// straight to out/argmax, otherwise to workspace slot s (ws_sum / ws_max / ws_idx, each
// [S, B, D]). The block decomposition uses 32-bit division: a 64-bit one is a called
// subroutine whose register saves put a stack frame on the kernel.
// Blocks per SM the forward's launch bounds promise: 4 (64 registers per thread), except the
// meanmax kernel on 2-byte types (VEC 8), whose 3 x 8 accumulators next to 4 x 16 B loads in
// flight spilled 16 bytes at 64 registers on sm_80: 3 blocks (80 registers) still keep
// 768 threads x 64 B = 48 KB of loads in flight per SM. The longer unrolls of the vector path
// hold U x 4 registers of loaded words: U = 8 gets 3 blocks (80 registers; meanmax on 2-byte
// types 2), U = 16 gets 2 (128 registers), i.e. 64-128 KB of loads per SM if all U are issued
// before the first wait (none spills; what ptxas issues is in bench/NOTES.md).
template <int KIND, int VEC, int U>
constexpr int kFwdMinBlocks = VEC == 1 || U <= 4 ? (KIND == kMeanMax && VEC >= 8 ? 3 : 4)
                              : U <= 8          ? (KIND == kMeanMax && VEC >= 8 ? 2 : 3)
                                                : 2;

// PIPE (CudaLaunchConfig::fwd_pipeline, vector path, U = 8 or 16): the same U words per thread,
// as two software-pipelined rounds of U / 2 (fold_lane_pipelined), under the same launch bounds.
// IDX false (max / meanmax with no argmax wanted; the plain loop only): the max is folded
// without its frame index (ValueMax), the same values.
template <typename scalar_t, typename acc_t, int VEC, int U, int KIND, bool PIPE, bool IDX = true>
__global__ void __launch_bounds__(kMaxThreads, (kFwdMinBlocks<KIND, VEC, U>))
    frame_pool_fwd_kernel(const scalar_t* __restrict__ x, const int64_t* __restrict__ lens,
                          int* err, scalar_t* __restrict__ out, int32_t* __restrict__ argmax,
                          acc_t* __restrict__ ws_sum, acc_t* __restrict__ ws_max,
                          int32_t* __restrict__ ws_idx, int64_t B, int64_t T, int64_t D,
                          int64_t sB, int64_t sT, int64_t chunk, int64_t S, uint32_t X,
                          bool mean, bool evict_first) {
  constexpr bool HAS_SUM = KIND != kMax;
  constexpr bool HAS_MAX = KIND != kSum;
  static_assert(IDX || (!PIPE && VEC * sizeof(scalar_t) == 16 && !std::is_same_v<scalar_t, double>),
                "the index-free fold: plain loop, 16-byte words, float32 / float16 / bfloat16");
  __shared__ acc_t s_sum[HAS_SUM ? VEC : 1][HAS_SUM ? kMaxThreads : 1];
  __shared__ acc_t s_max[HAS_MAX ? VEC : 1][HAS_MAX ? kMaxThreads : 1];
  __shared__ int32_t s_idx[HAS_MAX ? VEC : 1][HAS_MAX ? kMaxThreads : 1];

  const int TX = blockDim.x, TY = blockDim.y;
  const int tx = threadIdx.x, ty = threadIdx.y;
  const int tid = ty * TX + tx;
  const int64_t DV = D / VEC;
  const uint32_t xb = blockIdx.x % X;
  const int64_t s = blockIdx.x / X;
  const int64_t v = static_cast<int64_t>(xb) * TX + tx;
  const bool active = v < DV;
  const uint64_t pol = l2_load_policy(evict_first);

  for (int64_t b = blockIdx.y; b < B; b += gridDim.y) {
    const int64_t L = clamped_length(lens, b, T, err, tid == 0);
    // Frame counters in int32 (T <= 2^31 - 4097, checked on the host, so t + U * TY, at most
    // t + 16 x 256, cannot overflow): as int64 the meanmax bf16 kernel spilled 16 bytes on
    // sm_80 at 64 registers.
    const int32_t t_lo = static_cast<int32_t>(s * chunk);
    const int32_t t_hi = static_cast<int32_t>(std::min<int64_t>(s * chunk + chunk, L));
    const int32_t t_first = t_lo + ty;

    acc_t sum[VEC], mx[VEC];
    int32_t idx[VEC];
    start_lane(sum, mx, idx, active && t_first < t_hi ? t_first : int32_t(-1));

    if constexpr (PIPE) {
      if (active) {
        const scalar_t* q = x + b * sB + v * VEC + static_cast<int64_t>(t_first) * sT;
        fold_lane_pipelined<KIND, U, scalar_t, acc_t, VEC>(sum, mx, idx, q,
                                                           static_cast<int64_t>(TY) * sT,
                                                           t_first, t_hi, TY, pol);
      }
    } else if (active) {
      const int64_t step = static_cast<int64_t>(TY) * sT;
      int32_t t = t_first;
      const scalar_t* q = x + b * sB + v * VEC + static_cast<int64_t>(t) * sT;
      LaneValueMax<KIND, IDX, scalar_t, VEC> vm;
      vm.start();
      // Unguarded body: all U loads are issued before any is consumed.
      for (; t + (U - 1) * TY < t_hi; t += U * TY) {
        typename RawWord<sizeof(scalar_t) * VEC>::type w[U];
#pragma unroll
        for (int k = 0; k < U; ++k) w[k] = load_raw<scalar_t, VEC>(q + k * step, pol);
        pin_loads(w);
        q += U * step;
#pragma unroll
        for (int k = 0; k < U; ++k) {
          if constexpr (IDX) {
            accumulate<KIND, scalar_t, acc_t, VEC>(sum, mx, idx, unpack<scalar_t, VEC>(w[k]),
                                                   t + k * TY);
          } else {
            fold_word_value<KIND, scalar_t, acc_t, VEC>(sum, mx, idx, vm, w[k]);
          }
        }
      }
      // Fewer than U frames are left: one predicated round keeps them in flight together
      // rather than paying a full memory latency per frame.
      if (t < t_hi) {
        typename RawWord<sizeof(scalar_t) * VEC>::type w[U];
#pragma unroll
        for (int k = 0; k < U; ++k) {
          w[k] = {};
          if (t + k * TY < t_hi) w[k] = load_raw<scalar_t, VEC>(q + k * step, pol);
        }
        pin_loads(w);
#pragma unroll
        for (int k = 0; k < U; ++k) {
          if (t + k * TY >= t_hi) break;
          if constexpr (IDX) {
            accumulate<KIND, scalar_t, acc_t, VEC>(sum, mx, idx, unpack<scalar_t, VEC>(w[k]),
                                                   t + k * TY);
          } else {
            fold_word_value<KIND, scalar_t, acc_t, VEC>(sum, mx, idx, vm, w[k]);
          }
        }
      }
      if constexpr (!IDX && HAS_MAX) vm.store(mx);
    }

    finish_row<KIND, scalar_t, acc_t, VEC>(sum, mx, idx, s_sum, s_max, s_idx, tid, TX, TY, ty,
                                           active, v, b, s, S, B, D, L, mean, out, argmax, ws_sum,
                                           ws_max, ws_idx);
  }
}

// ---- the ring forward (CudaLaunchConfig::fwd_pipeline = 2) ----------------------------------
// Stages in each thread's ring; a stage is the U = kUnrollVec frames the plain loop loads in one
// round, so 3 stages (12 frames, 192 B per thread) stay in flight while one is folded.
constexpr int kRingStages = 4;
// The ring's frame counters run up to t_hi + kRingStages x U x TY (exclusive); the host's
// T <= 2^31 - 4097 keeps that in int32.
static_assert(kRingStages * kUnrollVec * kMaxThreads <= 4096, "ring frame counters overflow");

// The fold buffers of finish_row, laid over the start of the ring once every lane is done with it.
template <int KIND, typename acc_t, int VEC>
struct RingFoldBuffers {
  static constexpr bool HAS_SUM = KIND != kMax;
  static constexpr bool HAS_MAX = KIND != kSum;
  using Sum = acc_t[HAS_SUM ? VEC : 1][HAS_SUM ? kMaxThreads : 1];
  using Max = acc_t[HAS_MAX ? VEC : 1][HAS_MAX ? kMaxThreads : 1];
  using Idx = int32_t[HAS_MAX ? VEC : 1][HAS_MAX ? kMaxThreads : 1];
  static constexpr size_t kBytes = sizeof(Sum) + sizeof(Max) + sizeof(Idx);
};

// Dynamic shared memory of the ring kernel for a block of `threads`: the ring, or the fold
// buffers if they are larger (small blocks of the 2-byte meanmax kernel).
template <int KIND, typename acc_t, int VEC>
constexpr size_t ring_smem_bytes(int threads) {
  const size_t ring = static_cast<size_t>(kRingStages) * kUnrollVec * threads * 16;
  return std::max(ring, RingFoldBuffers<KIND, acc_t, VEC>::kBytes);
}

// The forward with loads through shared memory: the same block, frames and fold order as
// frame_pool_fwd_kernel<..., kUnrollVec, KIND, false> (so the same bits), but each round of U
// frames is a stage of cp.async copies into the thread's own ring of kRingStages stages in
// dynamic shared memory, issued kRingStages - 1 stages ahead of the fold. A copy in flight holds
// shared memory, not registers. Slot (g, k) of thread tid is ring[(g * U + k) * threads + tid]:
// a warp's 32 copies and 32 reads of one slot are 512 contiguous bytes. A thread only reads
// slots it copied itself, after cp.async.wait_group, so the loop has no block barrier; one
// barrier before finish_row lets the fold buffers reuse the ring. 2- and 4-byte types, 16-byte
// words (VEC = 16 / sizeof(scalar_t)).
// Blocks per SM the ring kernel's launch bounds promise: its 64 KB ring (256 threads) leaves
// room for 3 on sm_90 (2 on sm_80), so 3 x 256 threads may hold up to 80 registers each.
constexpr int kRingMinBlocks = 3;

template <typename scalar_t, typename acc_t, int VEC, int KIND>
__global__ void __launch_bounds__(kMaxThreads, kRingMinBlocks)
    frame_pool_fwd_ring_kernel(const scalar_t* __restrict__ x, const int64_t* __restrict__ lens,
                               int* err, scalar_t* __restrict__ out,
                               int32_t* __restrict__ argmax, acc_t* __restrict__ ws_sum,
                               acc_t* __restrict__ ws_max, int32_t* __restrict__ ws_idx,
                               int64_t B, int64_t T, int64_t D, int64_t sB, int64_t sT,
                               int64_t chunk, int64_t S, uint32_t X, bool mean,
                               bool evict_first) {
  constexpr int U = kUnrollVec;
  constexpr int NS = kRingStages;
  using W = typename RawWord<sizeof(scalar_t) * VEC>::type;
  static_assert(sizeof(W) == 16, "the ring moves 16-byte words");
  using Fold = RingFoldBuffers<KIND, acc_t, VEC>;
  extern __shared__ int4 ring[];
  auto& s_sum = *reinterpret_cast<typename Fold::Sum*>(ring);
  auto& s_max = *reinterpret_cast<typename Fold::Max*>(reinterpret_cast<char*>(ring) +
                                                       sizeof(typename Fold::Sum));
  auto& s_idx = *reinterpret_cast<typename Fold::Idx*>(
      reinterpret_cast<char*>(ring) + sizeof(typename Fold::Sum) + sizeof(typename Fold::Max));

  // Block and thread placement as in frame_pool_fwd_kernel.
  const int TX = blockDim.x, TY = blockDim.y;
  const int ty = threadIdx.y;
  const int tid = ty * TX + threadIdx.x;
  const int threads = TX * TY;
  const int64_t s = blockIdx.x / X;
  const int64_t v = static_cast<int64_t>(blockIdx.x % X) * TX + threadIdx.x;
  const bool active = v < D / VEC;
  // This thread's slots as shared-space addresses (converted once: on sm_90 each conversion
  // of a generic pointer re-reads the CTA id): frame k of a stage is `stride` bytes after
  // frame k - 1, stage g + 1 `stage_bytes` after stage g, and the last stage wraps to `first`.
  const uint32_t first = static_cast<uint32_t>(__cvta_generic_to_shared(ring + tid));
  const uint32_t stride = static_cast<uint32_t>(threads) * 16;
  const uint32_t stage_bytes = U * stride;
  const uint32_t end = first + NS * stage_bytes;
  const uint64_t pol = l2_load_policy(evict_first);

  for (int64_t b = blockIdx.y; b < B; b += gridDim.y) {
    const int64_t L = clamped_length(lens, b, T, err, tid == 0);
    // int32 frame counters as in frame_pool_fwd_kernel (see kRingStages for their range).
    const int32_t t_hi = static_cast<int32_t>(std::min<int64_t>(s * chunk + chunk, L));
    const int32_t t_first = static_cast<int32_t>(s * chunk) + ty;

    acc_t sum[VEC], mx[VEC];
    int32_t idx[VEC];
    start_lane(sum, mx, idx, active && t_first < t_hi ? t_first : int32_t(-1));

    if (active) {
      const int64_t step = static_cast<int64_t>(TY) * sT;
      const int32_t stage_frames = U * TY;
      // The next stage to copy: its first frame, address and slot. A frame at or past t_hi is
      // never copied (its slot keeps stale bytes that the fold never reads), and every stage
      // commits a group, empty or not, so "at most NS - 1 groups in flight" always means "the
      // stage about to be folded is done".
      int32_t t_copy = t_first;
      const scalar_t* q = x + b * sB + v * VEC + static_cast<int64_t>(t_first) * sT;
      uint32_t copy_at = first;  // the slot of the next stage to copy
      const auto copy_stage = [&]() {
#pragma unroll
        for (int k = 0; k < U; ++k) {
          if (t_copy + k * TY < t_hi) cp_async_16(copy_at + k * stride, q + k * step, pol);
        }
        cp_async_commit();
        t_copy += stage_frames;
        q += U * step;
        copy_at = copy_at + stage_bytes == end ? first : copy_at + stage_bytes;
      };
#pragma unroll
      for (int g = 0; g < NS - 1; ++g) copy_stage();
      uint32_t fold_at = first;  // the slot of the next stage to fold
      for (int32_t t = t_first; t < t_hi; t += stage_frames) {
        // Into the slot folded in the previous trip: its reads were consumed by that fold.
        copy_stage();
        cp_async_wait<NS - 1>();
        if (t + (U - 1) * TY < t_hi) {
          // A full stage: its U reads issue back to back, then fold in frame order.
          W w[U];
#pragma unroll
          for (int k = 0; k < U; ++k) w[k] = ld_shared_16(fold_at + k * stride);
#pragma unroll
          for (int k = 0; k < U; ++k)
            accumulate<KIND, scalar_t, acc_t, VEC>(sum, mx, idx, unpack<scalar_t, VEC>(w[k]),
                                                   t + k * TY);
        } else {
#pragma unroll
          for (int k = 0; k < U; ++k) {
            if (t + k * TY >= t_hi) break;
            const W w = ld_shared_16(fold_at + k * stride);
            accumulate<KIND, scalar_t, acc_t, VEC>(sum, mx, idx, unpack<scalar_t, VEC>(w),
                                                   t + k * TY);
          }
        }
        fold_at = fold_at + stage_bytes == end ? first : fold_at + stage_bytes;
      }
      // The stages copied past t_hi were empty, so nothing is in flight; said for the reader.
      cp_async_wait<0>();
    }
    // Every lane is done with its ring before finish_row's buffers overwrite it.
    if (TY > 1) __syncthreads();
    finish_row<KIND, scalar_t, acc_t, VEC>(sum, mx, idx, s_sum, s_max, s_idx, tid, TX, TY, ty,
                                           active, v, b, s, S, B, D, L, mean, out, argmax, ws_sum,
                                           ws_max, ws_idx);
  }
}

// Folds the S split partials of each (b, d). Thread (tx, ty) folds splits ty, ty + TY, ... of
// element e = group * TX + tx, then the TY lanes are folded through shared memory. fold_max is
// order-independent, so interleaving the splits keeps the first-max rule.
template <typename scalar_t, typename acc_t, int KIND>
__global__ void __launch_bounds__(kMaxThreads)
    frame_pool_combine_kernel(const acc_t* __restrict__ ws_sum, const acc_t* __restrict__ ws_max,
                              const int32_t* __restrict__ ws_idx,
                              const int64_t* __restrict__ lens, scalar_t* __restrict__ out,
                              int32_t* __restrict__ argmax, int64_t B, int64_t T, int64_t D,
                              int64_t S, bool mean) {
  constexpr bool HAS_SUM = KIND != kMax;
  constexpr bool HAS_MAX = KIND != kSum;
  __shared__ acc_t s_sum[HAS_SUM ? kMaxThreads : 1];
  __shared__ acc_t s_max[HAS_MAX ? kMaxThreads : 1];
  __shared__ int32_t s_idx[HAS_MAX ? kMaxThreads : 1];

  const int TX = blockDim.x, TY = blockDim.y;
  const int tx = threadIdx.x, ty = threadIdx.y;
  const int tid = ty * TX + tx;
  const int64_t n = B * D;
  const int64_t groups = (n + TX - 1) / TX;

  for (int64_t g = blockIdx.x; g < groups; g += gridDim.x) {
    const int64_t e = g * TX + tx;
    const bool active = e < n;
    acc_t sum = acc_t(0);
    acc_t mx = -std::numeric_limits<acc_t>::infinity();
    int32_t idx = -1;
    if (active) {
      for (int64_t s = ty; s < S; s += TY) {
        const int64_t o = s * n + e;
        if constexpr (HAS_SUM) sum += ws_sum[o];
        if constexpr (HAS_MAX) fold_max(mx, idx, ws_max[o], ws_idx[o]);
      }
    }
    if (TY > 1) {
      if constexpr (HAS_SUM) s_sum[tid] = sum;
      if constexpr (HAS_MAX) {
        s_max[tid] = mx;
        s_idx[tid] = idx;
      }
      __syncthreads();
      for (int h = TY / 2; h > 0; h >>= 1) {
        if (ty < h) {
          const int other = tid + h * TX;
          if constexpr (HAS_SUM) {
            sum += s_sum[other];
            s_sum[tid] = sum;
          }
          if constexpr (HAS_MAX) {
            fold_max(mx, idx, s_max[other], s_idx[other]);
            s_max[tid] = mx;
            s_idx[tid] = idx;
          }
        }
        __syncthreads();
      }
    }
    if (ty == 0 && active) {
      const int64_t b = e / D;
      // The forward kernel already reported a bad length; here it is only clamped.
      const int64_t raw = lens == nullptr ? T : lens[b];
      const int64_t L = raw < 0 ? 0 : (raw > T ? T : raw);
      write_result<KIND, scalar_t, acc_t>(out, argmax, b, e - b * D, D, sum, mx, idx, L, mean);
    }
  }
}

// Block (s * X + xb, b) is laid out as in the forward kernel; thread (tx, ty) writes feature
// vector xb * TX + tx of frames s * chunk + ty + k * TY. The blocks tile [B, T, D / VEC]
// exactly, so every element of grad_x is written once. Gradient of mean/sum: g on frames
// [0, L), zero after; of max: g on frame argmax only (-1 for an empty row matches no frame);
// of meanmax: both, added in acc_t and rounded once. grad_out is [B, D] ([B, 2D] for
// meanmax: the mean part, then the max part).
template <typename scalar_t, typename acc_t, int VEC, int KIND>
__global__ void __launch_bounds__(kMaxThreads, 4)
    frame_pool_bwd_kernel(const scalar_t* __restrict__ grad_out,
                          const int64_t* __restrict__ lens, int* err,
                          const int32_t* __restrict__ argmax, scalar_t* __restrict__ grad_x,
                          int64_t B, int64_t T, int64_t D, int64_t chunk, uint32_t X,
                          bool mean) {
  const int TX = blockDim.x, TY = blockDim.y;
  const int tx = threadIdx.x, ty = threadIdx.y;
  const int64_t DV = D / VEC;
  const uint32_t xb = blockIdx.x % X;
  const int64_t s = blockIdx.x / X;
  const int64_t v = static_cast<int64_t>(xb) * TX + tx;
  if (v >= DV) return;  // no block-wide synchronisation in this kernel
  const int64_t GW = KIND == kMeanMax ? 2 * D : D;

  for (int64_t b = blockIdx.y; b < B; b += gridDim.y) {
    const int64_t L = clamped_length(lens, b, T, err, tx == 0 && ty == 0);
    const int64_t d0 = v * VEC;
    const int64_t t_hi = std::min((s + 1) * chunk, T);

    VecT<scalar_t, VEC> g_dense;  // mean / sum part, rounded: every valid frame
    VecT<scalar_t, VEC> g_peak;   // max part (+ mean part for meanmax): the argmax frame
    int32_t am[VEC];
    // Scalar loads: grad_out / argmax are made contiguous, not necessarily 16-byte aligned,
    // and are read once per run of frames.
#pragma unroll
    for (int j = 0; j < VEC; ++j) {
      acc_t dense = acc_t(0);
      if constexpr (KIND != kMax) {
        const acc_t g = static_cast<acc_t>(grad_out[b * GW + d0 + j]);
        // Divide in acc_t and round once, as the eager mean does.
        dense = mean || KIND == kMeanMax ? (L > 0 ? g / static_cast<acc_t>(L) : acc_t(0)) : g;
      }
      g_dense.v[j] = static_cast<scalar_t>(dense);
      am[j] = -1;
      if constexpr (KIND != kSum) {
        const acc_t gm = static_cast<acc_t>(grad_out[b * GW + (KIND == kMeanMax ? D : 0) + d0 + j]);
        g_peak.v[j] = static_cast<scalar_t>(dense + gm);
        const int32_t a = argmax[b * D + d0 + j];
        am[j] = a < L ? a : -1;  // padded frames always get 0, as on the CPU
      }
    }
    VecT<scalar_t, VEC> zero;
#pragma unroll
    for (int j = 0; j < VEC; ++j) zero.v[j] = scalar_t(0);

    // Frame indices fit in int32 (checked on the host), and comparing them as such keeps the
    // meanmax bf16 kernel within 64 registers (as int64 it spilled 8 bytes on sm_90).
    const int32_t t_end = static_cast<int32_t>(t_hi);
    const int32_t len = static_cast<int32_t>(L);
    int32_t t = static_cast<int32_t>(s * chunk) + ty;
    scalar_t* dst = grad_x + (b * T + t) * D + d0;
    const int64_t step = static_cast<int64_t>(TY) * D;
    if constexpr (KIND == kSum) {
      for (; t < t_end; t += TY, dst += step)
        *reinterpret_cast<VecT<scalar_t, VEC>*>(dst) = t < len ? g_dense : zero;
    } else {
      for (; t < t_end; t += TY, dst += step) {
        // Selected per element: a reference to one of two local vectors would put them on the
        // stack (seen in the sm_90 SASS of the bf16 / double meanmax kernels).
        const bool dense = KIND == kMeanMax && t < len;
        VecT<scalar_t, VEC> r;
#pragma unroll
        for (int j = 0; j < VEC; ++j)
          r.v[j] = t == am[j] ? g_peak.v[j] : (dense ? g_dense.v[j] : zero.v[j]);
        *reinterpret_cast<VecT<scalar_t, VEC>*>(dst) = r;
      }
    }
  }
}

// The length check alone, for the calls whose pooling launches nothing (D = 0; the backward
// with T = 0, whose lengths must all be 0): each length outside [0, T] is recorded in the flag
// exactly as the pooling kernels record it, so whether a bad GPU length is reported does not
// depend on T or D being 0.
__global__ void __launch_bounds__(kMaxThreads)
    frame_pool_lengths_kernel(const int64_t* __restrict__ lens, int* err, int64_t B, int64_t T) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t b = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; b < B;
       b += stride)
    (void)clamped_length(lens, b, T, err, true);
}

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

int pow2_at_least(int64_t n, int cap) {
  int p = 1;
  while (p < cap && p < n) p <<= 1;
  return p;
}

struct BlockShape {
  int tx;  // feature vectors per block
  int ty;  // time lanes per block
};

// Up to max_tx feature vectors across (a warp reads 32 x 16 B contiguous per frame at 32),
// the rest of the threads along time. A short T gives its unused time lanes back to features.
BlockShape pick_block_shape(int64_t DV, int64_t T, int threads, int max_tx) {
  const int tx_need = pow2_at_least(DV, threads);
  int tx = std::min(max_tx, tx_need);
  int ty = threads / tx;
  const int ty_need = pow2_at_least(T, threads);
  if (ty_need < ty) {
    ty = ty_need;
    tx = std::min(threads / ty, tx_need);
  }
  return {tx, ty};
}

// Blocks the whole GPU holds at once. Blocks per SM depend only on (kernel, device, block
// size), so the occupancy query runs once per combination, not on every call.
template <auto Kernel>
int64_t resident_blocks(int threads) {
  constexpr int kMaxDevices = 64;
  constexpr int kBlockSizes = 9;  // powers of two 1 ... kMaxThreads
  static std::atomic<int> cache[kMaxDevices][kBlockSizes];  // 0: not queried yet
  const int dev = c10::cuda::current_device();
  const int size_class = __builtin_ctz(static_cast<unsigned>(threads));
  const bool cached = dev < kMaxDevices && size_class < kBlockSizes;
  int per_sm = cached ? cache[dev][size_class].load(std::memory_order_relaxed) : 0;
  if (per_sm == 0) {
    C10_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, Kernel, threads, 0));
    per_sm = std::max(per_sm, 1);
    if (cached) cache[dev][size_class].store(per_sm, std::memory_order_relaxed);
  }
  const int64_t sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  return static_cast<int64_t>(per_sm) * sms;
}

// Number of time splits for the forward pass. Model: blocks run in waves of `slots`; a full
// wave of block work w takes w, a partial wave holding a fraction f of the slots takes
// (f + phi) / (1 + phi) of a full one (memory latency, not bandwidth, bounds a thin wave;
// phi = split_phi_pct / 100 is the fraction of resident blocks that saturates HBM). Splitting
// costs the workspace round trip (relative to the bytes of x) and a second launch. No split
// once B x feature blocks fills split_waves waves.
int64_t pick_time_splits(int64_t base_blocks, int64_t slots, int64_t max_splits,
                         double ws_bytes_per_split, double x_bytes_per_element,
                         const CudaLaunchConfig& cfg) {
  if (max_splits <= 1 || base_blocks >= cfg.split_waves * slots) return 1;
  const double phi = cfg.split_phi_pct / 100.0;
  constexpr double kLaunchCost = 0.02;
  const auto cost = [&](int64_t s) {
    const double waves = static_cast<double>(s) * base_blocks / slots;
    const double full = std::floor(waves);
    const double frac = waves - full;
    const double time = (full + (frac > 0 ? (frac + phi) / (1 + phi) : 0.0)) / s;
    const double overhead =
        s == 1 ? 1.0 : 1.0 + kLaunchCost + 2.0 * s * ws_bytes_per_split / x_bytes_per_element;
    return time * overhead;
  };
  // The cost dips just below whole numbers of waves, so past the small counts only those are
  // tried: a scan of every count up to 8 waves would cost microseconds of host time per call
  // when B * D is tiny.
  constexpr int64_t kSmall = 16;
  int64_t cand[kSmall + 9];
  int n = 0;
  for (int64_t s = 2; s <= std::min(max_splits, kSmall); ++s) cand[n++] = s;
  for (int64_t k = 1; k <= 8; ++k) {
    const int64_t s = k * slots / base_blocks;
    if (s > kSmall && s < max_splits) cand[n++] = s;
  }
  if (max_splits > kSmall) cand[n++] = max_splits;
  std::sort(cand, cand + n);
  int64_t best = 1;
  double best_cost = cost(1);
  for (int i = 0; i < n; ++i) {
    const int64_t s = cand[i];
    const double c = cost(s);
    // Ask for a clear gain: more splits only add traffic the model does not see.
    if (c < 0.98 * best_cost) {
      best = s;
      best_cost = c;
    }
  }
  return best;
}

// ---- the length-error flag ------------------------------------------------------------------
// One int in mapped, portable pinned host memory: kernels on any device store 1 into it (a
// store over the bus, only when a length is bad); the host reads it without a copy or a
// synchronisation. Devices that launched a pooling kernel are remembered so that
// check_device_errors(sync=true) waits for exactly those.
std::once_flag g_flag_once;
std::atomic<int*> g_flag_host{nullptr};
std::atomic<uint64_t> g_used_devices{0};

int* error_flag_for_current_device() {
  std::call_once(g_flag_once, [] {
    // cudaHostAlloc is an "unsafe" call during CUDA graph capture in the default (global)
    // mode, which would invalidate the capture of a process's very first pooling call;
    // relaxed mode allows it (nothing of it is captured).
    const c10::cuda::CUDAStreamCaptureModeGuard relaxed(cudaStreamCaptureModeRelaxed);
    void* p = nullptr;
    C10_CUDA_CHECK(cudaHostAlloc(&p, sizeof(int), cudaHostAllocMapped | cudaHostAllocPortable));
    *static_cast<volatile int*>(p) = 0;
    g_flag_host.store(static_cast<int*>(p), std::memory_order_release);
  });
  const int dev = c10::cuda::current_device();
  if (dev < 64) g_used_devices.fetch_or(uint64_t(1) << dev, std::memory_order_relaxed);
  // With unified addressing the device pointer equals the host pointer; asked once per
  // device all the same, as the CUDA documentation prescribes for mapped memory.
  static std::atomic<int*> dev_ptrs[64];
  int* dev_ptr = dev < 64 ? dev_ptrs[dev].load(std::memory_order_relaxed) : nullptr;
  if (dev_ptr == nullptr) {
    const c10::cuda::CUDAStreamCaptureModeGuard relaxed(cudaStreamCaptureModeRelaxed);
    C10_CUDA_CHECK(cudaHostGetDevicePointer(reinterpret_cast<void**>(&dev_ptr),
                                            g_flag_host.load(std::memory_order_acquire), 0));
    if (dev < 64) dev_ptrs[dev].store(dev_ptr, std::memory_order_relaxed);
  }
  return dev_ptr;
}

// An empty kernel: the library's fatbinary holds an image of it for a device exactly when it
// holds one of every kernel here (all are built for the same TORCH_CUDA_ARCH_LIST).
__global__ void image_probe_kernel() {}

// Whether this build's kernels run on `device`: SASS for its architecture, or PTX of an
// older one the driver can compile. Asked once per device (cudaFuncGetAttributes loads the
// module, no launch).
bool kernels_run_on(int device) {
  static std::atomic<int8_t> known[64];  // 0: not asked yet, 1: yes, 2: no
  int8_t k = device < 64 ? known[device].load(std::memory_order_relaxed) : 0;
  if (k == 0) {
    const c10::cuda::CUDAGuard guard(static_cast<c10::DeviceIndex>(device));
    // the first call may come inside CUDA graph capture, where loading a module is "unsafe"
    const c10::cuda::CUDAStreamCaptureModeGuard relaxed(cudaStreamCaptureModeRelaxed);
    cudaFuncAttributes attr;
    const cudaError_t e = cudaFuncGetAttributes(&attr, image_probe_kernel);
    // no image for this architecture, or PTX the driver cannot compile (too new for it, JIT
    // disabled by CUDA_DISABLE_PTX_JIT, no JIT compiler)
    if (e == cudaErrorInvalidDeviceFunction || e == cudaErrorNoKernelImageForDevice ||
        e == cudaErrorInvalidPtx || e == cudaErrorUnsupportedPtxVersion ||
        e == cudaErrorJitCompilerNotFound || e == cudaErrorJitCompilationDisabled) {
      (void)cudaGetLastError();  // not sticky: clear it, so no later check reports it
      k = 2;
    } else {
      C10_CUDA_CHECK(e);
      k = 1;
    }
    if (device < 64) known[device].store(k, std::memory_order_relaxed);
  }
  return k == 1;
}

// RuntimeError naming the GPU and the fix, for a GPU this build has no kernel for (a
// "no kernel image is available" from the launch would not say what to do).
void check_kernels_run_here(const char* op) {
  const int dev = c10::cuda::current_device();
  if (kernels_run_on(dev)) return;
  const cudaDeviceProp* prop = at::cuda::getCurrentDeviceProperties();
  TORCH_CHECK(false, op, " (CUDA kernel): dtl_fast._C holds no kernel this GPU can run (cuda:",
              dev, ", ", prop->name, ", compute capability ", prop->major, ".", prop->minor,
              "): it was built for the architectures of TORCH_CUDA_ARCH_LIST at build time "
              "(default \"8.0;9.0+PTX\"). Rebuild for it (TORCH_CUDA_ARCH_LIST=\"", prop->major,
              ".", prop->minor, "\" pip install --no-build-isolation --force-reinstall . "
              "in the source tree), or pass backend=\"reference\"; backend=\"auto\" runs the reference there");
}

// Raises the kernel's dynamic shared memory limit to `bytes` (needed above 48 KB), once per
// device.
template <auto Kernel>
void allow_dynamic_smem(size_t bytes) {
  static std::atomic<uint64_t> done{0};
  const int dev = c10::cuda::current_device();
  const uint64_t bit = dev < 64 ? uint64_t(1) << dev : 0;
  if (bit != 0 && (done.load(std::memory_order_relaxed) & bit) != 0) return;
  C10_CUDA_CHECK(cudaFuncSetAttribute(Kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                      static_cast<int>(bytes)));
  if (bit != 0) done.fetch_or(bit, std::memory_order_relaxed);
}

template <typename scalar_t, typename acc_t>
struct ForwardLaunch {
  void (*kernel)(const scalar_t*, const int64_t*, int*, scalar_t*, int32_t*, acc_t*, acc_t*,
                 int32_t*, int64_t, int64_t, int64_t, int64_t, int64_t, int64_t, int64_t,
                 uint32_t, bool, bool);
  size_t smem;  // dynamic shared memory per block
};

// The forward kernel with U = cfg.fwd_unroll frames in flight per thread, software-pipelined
// when cfg.fwd_pipeline is 1 (U = 8 or 16, validated in set_cuda_launch_config), through a ring
// of shared memory when it is 2 (U = 4; on devices of compute capability 8.0 or later that let
// a block opt in to the ring's shared memory, else the plain U = 4 kernel); the scalar path
// has one kernel. Only the loop's grouping and schedule of
// loads differ between them: each lane still folds frames t_first, t_first + TY, ... in
// increasing order. float64 has no pipelined or ring kernels and runs the plain one of the same
// U: its meanmax U = 8 pipelined kernel spilled 16 bytes at its 80 registers on sm_80, ptxas
// scheduled it like the plain loop on sm_90, and float64 is not a bandwidth target.
// with_index false (max / meanmax with a null argmax): the default loop (U = kUnrollVec, no
// pipeline; also what fwd_pipeline = 2 falls back to where the ring cannot run) folds the max
// without its frame index (frame_pool_fwd_kernel's IDX), on the vector path of float32 /
// float16 / bfloat16; every other kernel keeps the index and writes none.
template <typename scalar_t, typename acc_t, int VEC, int KIND>
ForwardLaunch<scalar_t, acc_t> forward_kernel_for(int fwd_unroll, int fwd_pipeline, int threads,
                                                  bool with_index) {
  if constexpr (VEC == 1) {
    return {frame_pool_fwd_kernel<scalar_t, acc_t, VEC, kUnrollScalar, KIND, false>, 0};
  } else {
    if constexpr (!std::is_same_v<scalar_t, double>) {
      if (fwd_pipeline == 2) {
        constexpr auto ring = frame_pool_fwd_ring_kernel<scalar_t, acc_t, VEC, KIND>;
        const size_t most = ring_smem_bytes<KIND, acc_t, VEC>(kMaxThreads);
        const cudaDeviceProp* prop = at::cuda::getCurrentDeviceProperties();
        if (prop->major >= 8 && prop->sharedMemPerBlockOptin >= most) {
          allow_dynamic_smem<ring>(most);
          return {ring, ring_smem_bytes<KIND, acc_t, VEC>(threads)};
        }
      } else if (fwd_pipeline == 1) {
        return {fwd_unroll == 16 ? frame_pool_fwd_kernel<scalar_t, acc_t, VEC, 16, KIND, true>
                                 : frame_pool_fwd_kernel<scalar_t, acc_t, VEC, 8, KIND, true>,
                0};
      }
    }
    switch (fwd_unroll) {
      case 2:
        return {frame_pool_fwd_kernel<scalar_t, acc_t, VEC, 2, KIND, false>, 0};
      case 8:
        return {frame_pool_fwd_kernel<scalar_t, acc_t, VEC, 8, KIND, false>, 0};
      case 16:
        return {frame_pool_fwd_kernel<scalar_t, acc_t, VEC, 16, KIND, false>, 0};
      default:
        if constexpr (KIND != kSum && !std::is_same_v<scalar_t, double>) {
          if (!with_index)
            return {frame_pool_fwd_kernel<scalar_t, acc_t, VEC, kUnrollVec, KIND, false, false>, 0};
        }
        return {frame_pool_fwd_kernel<scalar_t, acc_t, VEC, kUnrollVec, KIND, false>, 0};
    }
  }
}

template <typename scalar_t, int VEC, int KIND>
void launch_forward(const at::Tensor& x, const at::Tensor& len, at::Tensor& out,
                    at::Tensor& argmax, bool mean, int* err) {
  using acc_t = at::opmath_type<scalar_t>;
  constexpr bool HAS_SUM = KIND != kMax;
  constexpr bool HAS_MAX = KIND != kSum;
  // The launch is planned with the default unroll's kernel whatever cfg.fwd_unroll and
  // cfg.fwd_pipeline say: its occupancy and quantum fix the time split, so the split (and the
  // result) is the same for every unroll, the pipelined loop and the ring.
  constexpr int U = VEC == 1 ? kUnrollScalar : kUnrollVec;
  const CudaLaunchConfig cfg = cuda_launch_config();
  const int64_t B = x.size(0), T = x.size(1), D = x.size(2);
  const int64_t DV = D / VEC;
  const BlockShape bs = pick_block_shape(DV, T, cfg.threads, cfg.max_tx);
  const int threads = bs.tx * bs.ty;
  const int64_t X = ceil_div(DV, bs.tx);
  const int64_t base = B * X;

  constexpr auto plan_kernel = frame_pool_fwd_kernel<scalar_t, acc_t, VEC, U, KIND, false>;
  const int64_t slots = resident_blocks<plan_kernel>(threads);
  // Every lane gets at least two unrolled iterations per split.
  const int64_t min_frames = 2 * static_cast<int64_t>(bs.ty) * U;
  const int64_t max_splits = std::min<int64_t>(T / min_frames, 4096);
  const double ws_bytes = (HAS_SUM ? sizeof(acc_t) : 0) + (HAS_MAX ? sizeof(acc_t) + 4 : 0);
  int64_t S = pick_time_splits(base, slots, max_splits, ws_bytes,
                               static_cast<double>(T) * sizeof(scalar_t), cfg);
  // Split boundaries on whole unrolled iterations; rounding may merge the last splits.
  const int64_t quantum = static_cast<int64_t>(bs.ty) * U;
  const int64_t chunk = std::max<int64_t>(1, ceil_div(ceil_div(T, S), quantum)) * quantum;
  S = std::max<int64_t>(1, ceil_div(T, chunk));

  // X * S stays far below 2^31: S > 1 only when B * X is below a few waves of blocks.
  TORCH_INTERNAL_ASSERT(X * S <= std::numeric_limits<int32_t>::max());
  const dim3 grid(static_cast<unsigned>(X * S),
                  static_cast<unsigned>(std::min<int64_t>(B, 65535)));
  const dim3 block(bs.tx, bs.ty);
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const int64_t* lens = len.defined() ? len.const_data_ptr<int64_t>() : nullptr;
  scalar_t* out_p = out.mutable_data_ptr<scalar_t>();
  int32_t* am_p = HAS_MAX && argmax.numel() > 0 ? argmax.mutable_data_ptr<int32_t>() : nullptr;
  const ForwardLaunch<scalar_t, acc_t> fwd =
      forward_kernel_for<scalar_t, acc_t, VEC, KIND>(cfg.fwd_unroll, cfg.fwd_pipeline, threads,
                                                     am_p != nullptr);
  // Loads marked evict-first only when x cannot stay in L2 anyway: a smaller x may still be
  // there for whatever reads it next, and evict-first lines would go before anything else.
  // x's size in memory is the span its strides reach (at most numel): a broadcast x (stride 0)
  // re-reads the same frames, which should keep hitting in L2.
  const bool evict_first =
      cfg.fwd_l2_evict_first != 0 &&
      span_bytes(x.sizes(), x.strides(), x.element_size()) >
          static_cast<int64_t>(at::cuda::getCurrentDeviceProperties()->l2CacheSize);

  if (S == 1) {
    fwd.kernel<<<grid, block, fwd.smem, stream>>>(
        x.const_data_ptr<scalar_t>(), lens, err, out_p, am_p, nullptr, nullptr, nullptr, B, T, D,
        x.stride(0), x.stride(1), chunk, S, static_cast<uint32_t>(X), mean, evict_first);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    return;
  }

  const auto acc_dtype = c10::CppTypeToScalarType<acc_t>::value;
  at::Tensor ws_sum = HAS_SUM ? at::empty({S, B, D}, x.options().dtype(acc_dtype)) : at::Tensor();
  at::Tensor ws_max = HAS_MAX ? at::empty({S, B, D}, x.options().dtype(acc_dtype)) : at::Tensor();
  at::Tensor ws_idx = HAS_MAX ? at::empty({S, B, D}, x.options().dtype(at::kInt)) : at::Tensor();
  acc_t* ws_sum_p = HAS_SUM ? ws_sum.mutable_data_ptr<acc_t>() : nullptr;
  acc_t* ws_max_p = HAS_MAX ? ws_max.mutable_data_ptr<acc_t>() : nullptr;
  int32_t* ws_idx_p = HAS_MAX ? ws_idx.mutable_data_ptr<int32_t>() : nullptr;
  fwd.kernel<<<grid, block, fwd.smem, stream>>>(
      x.const_data_ptr<scalar_t>(), lens, err, nullptr, nullptr, ws_sum_p, ws_max_p, ws_idx_p, B,
      T, D, x.stride(0), x.stride(1), chunk, S, static_cast<uint32_t>(X), mean, evict_first);
  C10_CUDA_KERNEL_LAUNCH_CHECK();

  const int cty = pow2_at_least(S, 32);
  const int ctx = kMaxThreads / cty;
  const int64_t groups = ceil_div(B * D, ctx);
  const int64_t cgrid = std::min<int64_t>(groups, std::numeric_limits<int32_t>::max());
  frame_pool_combine_kernel<scalar_t, acc_t, KIND>
      <<<static_cast<unsigned>(cgrid), dim3(ctx, cty), 0, stream>>>(
          ws_sum_p, ws_max_p, ws_idx_p, lens, out_p, am_p, B, T, D, S, mean);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename scalar_t, int VEC, int KIND>
void launch_backward(const at::Tensor& g, const at::Tensor& len, const at::Tensor& argmax,
                     at::Tensor& gx, bool mean, int* err) {
  using acc_t = at::opmath_type<scalar_t>;
  const CudaLaunchConfig cfg = cuda_launch_config();
  const int64_t B = gx.size(0), T = gx.size(1), D = gx.size(2);
  const int64_t DV = D / VEC;
  const BlockShape bs = pick_block_shape(DV, T, cfg.threads, cfg.max_tx);
  const int threads = bs.tx * bs.ty;
  const int64_t X = ceil_div(DV, bs.tx);
  const int64_t base = B * X;

  constexpr auto kernel = frame_pool_bwd_kernel<scalar_t, acc_t, VEC, KIND>;
  const int64_t slots = resident_blocks<kernel>(threads);
  // Splitting time is free here (no partials), so aim for several waves: a short tail.
  const int64_t want_splits = ceil_div(cfg.bwd_waves * slots, base);
  const int64_t frames_per_lane = std::min<int64_t>(
      cfg.bwd_frames, ceil_div(ceil_div(T, bs.ty), want_splits));
  int64_t chunk = std::max<int64_t>(1, frames_per_lane) * bs.ty;
  // Longer runs per thread keep the grid's x extent (X * S) under 2^31 for any size.
  while (chunk < T && X * ceil_div(T, chunk) > std::numeric_limits<int32_t>::max()) chunk *= 2;
  const int64_t S = ceil_div(T, chunk);
  TORCH_INTERNAL_ASSERT(X * S <= std::numeric_limits<int32_t>::max());

  const dim3 grid(static_cast<unsigned>(X * S),
                  static_cast<unsigned>(std::min<int64_t>(B, 65535)));
  kernel<<<grid, dim3(bs.tx, bs.ty), 0, at::cuda::getCurrentCUDAStream()>>>(
      g.const_data_ptr<scalar_t>(), len.defined() ? len.const_data_ptr<int64_t>() : nullptr,
      err, KIND != kSum ? argmax.const_data_ptr<int32_t>() : nullptr,
      gx.mutable_data_ptr<scalar_t>(), B, T, D, chunk, static_cast<uint32_t>(X), mean);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// Launches frame_pool_lengths_kernel on the current stream: one thread per clip (one block
// for up to 256 clips), at most 1024 blocks striding over the rest.
void launch_length_check(const at::Tensor& len, int64_t T, int* err) {
  const int64_t B = len.numel();
  if (B == 0) return;
  const int64_t blocks = std::min<int64_t>(ceil_div(B, kMaxThreads), 1024);
  frame_pool_lengths_kernel<<<static_cast<unsigned>(blocks), kMaxThreads, 0,
                              at::cuda::getCurrentCUDAStream()>>>(len.const_data_ptr<int64_t>(),
                                                                  err, B, T);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// Whether lengths live on the GPU (the kernels check them; CPU lengths were checked on the
// host by checked_lengths).
bool lengths_on_gpu(const c10::optional<at::Tensor>& lengths) {
  return lengths.has_value() && lengths->defined() && lengths->is_cuda();
}

// 16-byte loads need an aligned base and every row start on a VEC boundary. Strides of size-1
// dimensions are never multiplied by a nonzero index, so they do not matter.
bool can_vectorize(const at::Tensor& x, int vec) {
  const int64_t D = x.size(2);
  if (D % vec != 0) return false;
  if (reinterpret_cast<uintptr_t>(x.const_data_ptr()) % 16 != 0) return false;
  if (x.size(0) > 1 && x.stride(0) % vec != 0) return false;
  if (x.size(1) > 1 && x.stride(1) % vec != 0) return false;
  return true;
}

int kind_of(PoolMode m) {
  return m == PoolMode::Max ? kMax : (m == PoolMode::MeanMax ? kMeanMax : kSum);
}

template <typename scalar_t, int KIND>
void forward_for_kind(const at::Tensor& x, const at::Tensor& len, at::Tensor& out,
                      at::Tensor& argmax, bool mean, int* err) {
  constexpr int kVec = 16 / sizeof(scalar_t);
  if (can_vectorize(x, kVec)) {
    launch_forward<scalar_t, kVec, KIND>(x, len, out, argmax, mean, err);
  } else {
    launch_forward<scalar_t, 1, KIND>(x, len, out, argmax, mean, err);
  }
}

template <typename scalar_t>
void forward_for_dtype(const at::Tensor& x, const at::Tensor& len, at::Tensor& out,
                       at::Tensor& argmax, PoolMode m, int* err) {
  const bool mean = m == PoolMode::Mean;
  switch (kind_of(m)) {
    case kMax:
      forward_for_kind<scalar_t, kMax>(x, len, out, argmax, mean, err);
      break;
    case kMeanMax:
      forward_for_kind<scalar_t, kMeanMax>(x, len, out, argmax, mean, err);
      break;
    default:
      forward_for_kind<scalar_t, kSum>(x, len, out, argmax, mean, err);
  }
}

template <typename scalar_t, int KIND>
void backward_for_kind(const at::Tensor& g, const at::Tensor& len, const at::Tensor& argmax,
                       at::Tensor& gx, bool mean, int* err) {
  // gx is freshly allocated (aligned, contiguous), so only D decides whether rows stay on
  // 16-byte boundaries.
  constexpr int kVec = 16 / sizeof(scalar_t);
  if (gx.size(2) % kVec == 0) {
    launch_backward<scalar_t, kVec, KIND>(g, len, argmax, gx, mean, err);
  } else {
    launch_backward<scalar_t, 1, KIND>(g, len, argmax, gx, mean, err);
  }
}

template <typename scalar_t>
void backward_for_dtype(const at::Tensor& g, const at::Tensor& len, const at::Tensor& argmax,
                        at::Tensor& gx, PoolMode m, int* err) {
  const bool mean = m == PoolMode::Mean;
  switch (kind_of(m)) {
    case kMax:
      backward_for_kind<scalar_t, kMax>(g, len, argmax, gx, mean, err);
      break;
    case kMeanMax:
      backward_for_kind<scalar_t, kMeanMax>(g, len, argmax, gx, mean, err);
      break;
    default:
      backward_for_kind<scalar_t, kSum>(g, len, argmax, gx, mean, err);
  }
}

}  // namespace

void check_device_errors(bool sync) {
  int* flag = g_flag_host.load(std::memory_order_acquire);
  if (flag == nullptr) return;  // no pooling kernel has run: nothing recorded
  if (sync) {
    const uint64_t used = g_used_devices.load(std::memory_order_relaxed);
    for (int dev = 0; dev < 64; ++dev) {
      if (used & (uint64_t(1) << dev)) {
        const c10::cuda::CUDAGuard guard(static_cast<c10::DeviceIndex>(dev));
        C10_CUDA_CHECK(cudaDeviceSynchronize());
      }
    }
  }
  // Read and clear in one atomic exchange: a kernel's store landing between a separate read
  // and clear would be lost (its call pooled over clamped lengths and nobody would be told).
  if (__atomic_exchange_n(flag, 0, __ATOMIC_ACQ_REL) != 0) {
    TORCH_CHECK_VALUE(false,
                      "frame_pool: lengths on the GPU held a value outside [0, T] in an earlier "
                      "call (that call pooled over the lengths clamped into [0, T]); every "
                      "lengths[b] must lie in [0, T]");
  }
}

bool cuda_kernels_run_on(int64_t device) {
  TORCH_CHECK_VALUE(device >= 0 && device < c10::cuda::device_count(),
                    "cuda_kernels_run_on: device must be in [0, ", int(c10::cuda::device_count()),
                    "), got ", device);
  return kernels_run_on(static_cast<int>(device));
}

std::tuple<at::Tensor, at::Tensor> frame_pool_cuda(const at::Tensor& x,
                                                   const c10::optional<at::Tensor>& lengths,
                                                   c10::string_view mode, bool with_argmax) {
  PoolMode m = parse_pool_mode(mode);
  TORCH_CHECK_VALUE(x.is_cuda(), "frame_pool (CUDA kernel): x must be a CUDA tensor, got ",
                    x.device());
  // A bad length an earlier kernel has already reported is raised now (no waiting).
  check_device_errors(/*sync=*/false);
  const at::cuda::OptionalCUDAGuard guard(device_of(x));
  check_kernels_run_here("frame_pool");
  at::Tensor len = checked_lengths(x, lengths);

  const int64_t B = x.size(0), T = x.size(1), D = x.size(2);
  at::Tensor out = at::empty({B, out_width(D, m)}, x.options());
  // with_argmax = false: no argmax tensor, and the kernels get a null argmax and write no
  // index (4 bytes per output element fewer; the split's workspace still keeps the indices its
  // combine needs for the first-max rule); the contract's empty argmax is returned.
  at::Tensor argmax = has_argmax(m) && with_argmax ? at::empty({B, D}, x.options().dtype(at::kInt))
                                                   : at::empty({0}, x.options().dtype(at::kInt));
  // T == 0 still launches: the kernel writes the zeros (argmax -1) of empty rows and reports
  // any nonzero GPU length. D == 0 has nothing to pool, but GPU lengths are still checked (a
  // small launch, only for such calls), as on every other shape.
  if (B == 0) return {out, argmax};
  if (D == 0) {
    if (lengths_on_gpu(lengths)) launch_length_check(len, T, error_flag_for_current_device());
    return {out, argmax};
  }

  // The kernels need unit feature stride (a size-1 feature dim has no stride to speak of);
  // other layouts that have it (slices, [T, B, D] transposed to [B, T, D]) are read in place
  // through their strides, and only the rest is copied.
  const at::Tensor xs = (x.stride(2) == 1 || D == 1) ? x : x.contiguous();
  int* err = error_flag_for_current_device();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, xs.scalar_type(), "frame_pool_cuda",
                                  [&] { forward_for_dtype<scalar_t>(xs, len, out, argmax, m, err); });
  return {out, argmax};
}

at::Tensor frame_pool_backward_cuda(const at::Tensor& grad_out,
                                    const c10::optional<at::Tensor>& lengths,
                                    const at::Tensor& argmax, int64_t T, c10::string_view mode) {
  PoolMode m = parse_pool_mode(mode, "frame_pool_backward");
  TORCH_CHECK_VALUE(grad_out.is_cuda(),
                    "frame_pool_backward (CUDA kernel): grad_out must be a CUDA tensor, got ",
                    grad_out.device());
  // As in the forward: a bad length an earlier kernel has already reported is raised now, so a
  // training step learns of its forward's bad lengths in its backward, not a step later.
  check_device_errors(/*sync=*/false);
  at::Tensor len = checked_backward_inputs(grad_out, lengths, argmax, T, m);
  const at::cuda::OptionalCUDAGuard guard(device_of(grad_out));
  check_kernels_run_here("frame_pool_backward");

  const at::Tensor g = grad_out.contiguous();
  const at::Tensor am = has_argmax(m) ? argmax.contiguous() : argmax;
  const int64_t B = g.size(0), D = m == PoolMode::MeanMax ? g.size(1) / 2 : g.size(1);
  at::Tensor gx = at::empty({B, T, D}, g.options());
  if (B == 0) return gx;
  if (D == 0 || T == 0) {
    // nothing to write, but GPU lengths are still checked (with T == 0 every one must be 0),
    // as the forward checks them: a small launch, only for such calls
    if (lengths_on_gpu(lengths)) launch_length_check(len, T, error_flag_for_current_device());
    return gx;
  }

  int* err = error_flag_for_current_device();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, g.scalar_type(),
                                  "frame_pool_backward_cuda",
                                  [&] { backward_for_dtype<scalar_t>(g, len, am, gx, m, err); });
  return gx;
}

}  // namespace dtl_fast

TORCH_LIBRARY_IMPL(dtl_fast, CUDA, m) {
  m.impl("frame_pool", &dtl_fast::frame_pool_cuda);
  m.impl("frame_pool_backward", &dtl_fast::frame_pool_backward_cuda);
}
