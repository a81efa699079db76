// Shared declarations of the masked temporal frame-pooling op.
//
// Schemas (csrc/frame_pool.cpp registers them in the `dtl_fast` namespace):
//   frame_pool(Tensor x, Tensor? lengths, str mode, bool with_argmax=True)
//       -> (Tensor out, Tensor argmax)
//     x       [B, T, D] float32 / float64 / float16 / bfloat16, any strides
//     lengths [B] any integer dtype, on x's device or on the CPU, or None (all T frames)
//     mode    "mean" | "max" | "sum" | "meanmax" (mean and max from one read of x)
//     out     [B, D] ([B, 2D] for meanmax: mean, then max), x's dtype; reduction over
//             frames t < lengths[b] only
//     argmax  [B, D] int32 frame index of the first maximum (modes "max" and "meanmax"; -1
//             for an empty row), an empty int32 tensor for the other modes and when
//             with_argmax is false and no gradient is recorded
//     with_argmax  false: the caller needs no argmax (a forward whose result nobody
//             differentiates: the CPU kernel skips the index bookkeeping, which cost max about
//             twice sum's time; the CUDA default loop folds the max with one NaN-propagating
//             max instruction per element, per pair for float16 / bfloat16). Where autograd
//             records the call (grad mode on and x requiring grad), the Autograd kernel asks
//             for the argmax whatever this says, since the backward needs it; the fake kernel
//             follows the flag it is given. Values are the same either way: bit for bit on the
//             CPU; on CUDA NaN at the same places and equal numbers elsewhere, but a NaN there is
//             the canonical NaN and a zero maximum may carry the other zero's sign.
//   frame_pool_backward(Tensor grad_out, Tensor? lengths, Tensor argmax, SymInt T,
//                       str mode) -> Tensor grad_x
//     grad_x  [B, T, D] contiguous, grad_out's dtype; every element written exactly once
//             (padded frames and empty rows get 0)
//
// Autograd of both ops is registered in C++ (frame_pool_autograd.cpp); the backward op is
// itself differentiable (its adjoint is pooling / a gather at argmax), so double backward works.
//
// Lengths on the CPU are range-checked on the host. Lengths on a GPU are never read by the
// host (no synchronisation): the CUDA kernels clamp each length into [0, T] and record a bad
// one in a flag that dtl_fast.check_errors() (or a later CUDA call that finds it set) raises.
// Every call with lengths on a GPU checks them so, whatever its shape: one that has nothing to
// pool or write (D = 0, or the backward with T = 0) launches the length check alone.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Optional.h>
#include <c10/util/string_view.h>

#include <cstdint>
#include <tuple>

namespace dtl_fast {

enum class PoolMode : int { Mean = 0, Max = 1, Sum = 2, MeanMax = 3 };

inline bool has_argmax(PoolMode m) { return m == PoolMode::Max || m == PoolMode::MeanMax; }

// Parses "mean" / "max" / "sum" / "meanmax"; anything else is a ValueError naming `mode`, in
// the fake kernels' words, with `owner` (the op) first.
PoolMode parse_pool_mode(c10::string_view mode, const char* owner = "frame_pool");

// Checks x (rank, dtype) and lengths (rank, size, integer dtype, device) and returns lengths
// as a contiguous int64 tensor on x's device, or an undefined tensor when lengths is None.
// Lengths on the CPU are also range-checked here (every value in [0, T]); lengths on a GPU
// are left to the kernels (clamp + error flag, see above). CPU lengths for a CUDA x go through
// a pinned buffer and a non-blocking copy, so no call synchronises the host with the GPU.
// Bad input is a ValueError naming the argument.
at::Tensor checked_lengths(const at::Tensor& x, const c10::optional<at::Tensor>& lengths);

// Checks grad_out / argmax / T for the backward op and returns lengths as checked_lengths
// does (against a [B, T, D] input, D = grad_out's width, halved for meanmax).
at::Tensor checked_backward_inputs(const at::Tensor& grad_out,
                                   const c10::optional<at::Tensor>& lengths,
                                   const at::Tensor& argmax, int64_t T, PoolMode mode);

// The instruction set the CPU forward kernel runs with: "avx2" or "baseline" (x86-64 SSE2 or
// another architecture). DTL_FAST_DISABLE_AVX2=1 forces "baseline".
const char* cpu_forward_isa();

// Whether the CPU backward would put a gradient of `nbytes` on fresh zero pages of the op's own,
// mapped for the call and unmapped when freed: nbytes >= 32 MiB and not taken by the cache
// below (larger than its bound, or the cache off), on Linux, with glibc's malloc behind torch's
// default CPU allocator, and DTL_FAST_DISABLE_ZERO_PAGES unset or "0" (frame_pool.cpp explains
// the rule).
bool cpu_grad_on_zero_pages(size_t nbytes);

// Whether the CPU backward would take a gradient of `nbytes` from the op's cache of warm
// blocks now: nbytes >= 4 MiB, its size rounded up to 2 MiB within the cache's bound
// (DTL_FAST_CPU_GRAD_CACHE_MB, default 64; 0 turns the cache off), on Linux, with glibc's
// malloc behind torch's default CPU allocator. A bad DTL_FAST_CPU_GRAD_CACHE_MB is a
// ValueError naming it (here and in every CPU backward).
bool cpu_grad_from_cache(size_t nbytes);

struct CpuGradCacheStats {
  size_t cached_bytes = 0;  // freed gradient blocks kept mapped for reuse
  size_t blocks = 0;
  size_t cap_bytes = 0;     // the bound of each of the two pools (below / from 32 MiB)
};
CpuGradCacheStats cpu_grad_cache_stats();
// Hands every cached block back to the system; returns the bytes released.
size_t cpu_grad_cache_empty();

// Where CPU gradients came from (internal: what the tests ask instead of guessing from a data
// pointer's alignment, which torch's own allocator can share, e.g. page-aligned blocks under
// THP_MEM_ALLOC_ENABLE=1). `last` is this thread's latest gradient allocation: "torch" (torch's
// CPU allocator), "mapped" (a fresh mapping of the op's own: zero pages), "cache" (a warm block
// of the op's cache), or "none" before any; the op's allocator also serves a resize_ of a
// gradient it made. The counts are per process, since it started.
struct CpuGradOrigins {
  const char* last = "none";
  uint64_t torch = 0;
  uint64_t mapped = 0;
  uint64_t cache = 0;
};
CpuGradOrigins cpu_grad_origins();

// Which gradients the CPU backward writes with non-temporal stores: rows it stores one by one
// (max, meanmax) from min_bytes, rows it writes in bulk with memcpy / memset (mean and sum
// frames, padding) from 2 x min_bytes. min_bytes is DTL_FAST_CPU_NT_STORE_MIN_MB when set (0
// streams every gradient, 1048576 none), else half the level-3 cache CPU 0 reports (llc_bytes:
// sysfs, else sysconf; an L1 / L2-only report counts as unknown), else 4 MiB. A build without
// SSE2 has no non-temporal stores: min_bytes is SIZE_MAX there. A bad
// DTL_FAST_CPU_NT_STORE_MIN_MB is a ValueError naming it (here and in every CPU backward).
struct CpuNtStoreRule {
  size_t min_bytes = 0;
  size_t llc_bytes = 0;  // 0: unknown
  const char* source = "";
};
CpuNtStoreRule cpu_nt_store_rule();

// Width of `out` for a [B, T, D] input: D, or 2D for meanmax.
inline int64_t out_width(int64_t D, PoolMode m) { return m == PoolMode::MeanMax ? 2 * D : D; }

// Launch constants of the CUDA kernels, read at every launch so that a sweep on a GPU
// (bench/sweep_frame_pool.py, through dtl_fast._C.set_cuda_launch_config) can measure them
// without a rebuild. The defaults are the values the sweep is meant to confirm or replace.
struct CudaLaunchConfig {
  int threads = 256;        // threads per block, forward and backward: 64, 128 or 256
  int max_tx = 32;          // feature vectors (16 B each) across a block; the rest go along time
  int split_waves = 4;      // the forward splits time only while B x feature blocks < this many
                            // waves of resident blocks
  int split_phi_pct = 25;   // % of the resident blocks that saturates memory (split model)
  int bwd_frames = 16;      // longest run of frames one backward thread writes
  int bwd_waves = 4;        // waves of blocks the backward aims for (a short tail)
  int fwd_unroll = 4;       // frames in flight per thread in the forward's 16-byte-vector loop:
                            // 2, 4, 8 or 16 (the scalar path for unaligned inputs keeps 8).
                            // Only the loads in flight change: the block shape and the time
                            // split are the same for every value, so results are bit-identical
                            // (with an argmax; without one, U = 4 folds the max without the
                            // frame index and other values keep it: equal values, see
                            // with_argmax above for NaN bits and the sign of a zero max)
  int fwd_pipeline = 0;     // 1: the same U words as two software-pipelined rounds of U / 2
                            // (round k + 1 issued before round k is folded), so loads stay in
                            // flight during the fold; needs fwd_unroll 8 or 16. 2: cp.async
                            // copies into a per-thread ring of 4 stages of U frames in shared
                            // memory, 3 stages ahead of the fold; needs fwd_unroll 4 and compute
                            // capability 8.0 (else the plain loop). float64 and the scalar path
                            // run the plain loop. 0: issue U, wait, fold.
                            // Bit-identical too (same frames, same order per lane; the same
                            // caveat without an argmax as for fwd_unroll)
  int fwd_l2_evict_first = 0;  // 1: the forward's loads of an x larger than the device's L2 are
                               // marked evict-first in L2 (sm_80+), so its read-once frames
                               // recycle their own lines instead of evicting (and writing back)
                               // what others left there. 0: an explicit evict-normal policy
                               // (a plain load's priority; see l2_load_policy). Bit-identical
};
CudaLaunchConfig cuda_launch_config();
// Bytes a tensor of these sizes and strides spans in memory: numel x element_size when no two
// elements share an address, less when a dimension repeats them (stride 0, a broadcast); 0 when
// empty. The forward compares x's with the device's L2 (fwd_l2_evict_first). ValueError if the
// lengths differ or a size is negative.
int64_t span_bytes(c10::IntArrayRef sizes, c10::IntArrayRef strides, int64_t element_size);
// Validates every field (ValueError naming it) before replacing the configuration.
void set_cuda_launch_config(const CudaLaunchConfig& cfg);

// Raises (ValueError naming lengths) if a CUDA kernel has recorded a length outside [0, T]
// since the last call, and clears the record. sync=true first waits for every kernel already
// queued on every device that ran one; sync=false only reads what has landed so far (no
// synchronisation). A no-op in a build without CUDA kernels.
void check_device_errors(bool sync);
// Whether this build holds CUDA kernels that run on GPU `device` (an index in [0, device count),
// else ValueError): SASS for its architecture or PTX the driver can compile for it. False in a
// build without CUDA kernels. The ops raise RuntimeError naming the GPU where it is false.
bool cuda_kernels_run_on(int64_t device);

std::tuple<at::Tensor, at::Tensor> frame_pool_cpu(const at::Tensor& x,
                                                  const c10::optional<at::Tensor>& lengths,
                                                  c10::string_view mode, bool with_argmax);
at::Tensor frame_pool_backward_cpu(const at::Tensor& grad_out,
                                   const c10::optional<at::Tensor>& lengths,
                                   const at::Tensor& argmax, int64_t T, c10::string_view mode);

}  // namespace dtl_fast
