// Masked temporal frame pooling: schemas, argument checks shared with the CUDA kernels, and
// the CPU kernels. The contract is in frame_pool.h.
#include "frame_pool.h"

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/EmptyTensor.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <c10/core/Allocator.h>
#include <c10/core/CPUAllocator.h>
#include <c10/core/ScalarType.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <limits>
#include <memory>
#include <mutex>
#include <string>
#include <utility>
#include <type_traits>
#include <vector>

#if defined(__SSE2__)
#include <emmintrin.h>
#endif

#ifdef __linux__
#include <dlfcn.h>
#include <sys/mman.h>
#endif
#if defined(__unix__)
#include <unistd.h>
#endif

namespace dtl_fast {

PoolMode parse_pool_mode(c10::string_view mode, const char* owner) {
  if (mode == "mean") return PoolMode::Mean;
  if (mode == "max") return PoolMode::Max;
  if (mode == "sum") return PoolMode::Sum;
  if (mode == "meanmax") return PoolMode::MeanMax;
  TORCH_CHECK_VALUE(false, owner, ": mode must be one of 'mean', 'max', 'sum', 'meanmax', got '",
                    std::string(mode.data(), mode.size()), "'");
}

namespace {

bool is_supported_float(at::ScalarType t) {
  return t == at::kFloat || t == at::kDouble || t == at::kHalf || t == at::kBFloat16;
}

// A dtype as Python spells it ("torch.int64", not ATen's "Long"), so that these messages read
// exactly as the fake kernels' (dtl_fast/ops/frame_pool.py), which print torch.dtype.
std::string torch_dtype(at::ScalarType t) {
  const auto names = c10::getDtypeNames(t);
  return "torch." + std::string(names.first.data(), names.first.size());
}

// Range check of lengths that live on the CPU (read in place, no device involved). `op` is
// the op whose argument they are, which its errors name.
void check_length_values(const at::Tensor& len64, int64_t T, const char* op) {
  if (len64.numel() == 0) return;
  const int64_t* p = len64.const_data_ptr<int64_t>();
  const int64_t lo = *std::min_element(p, p + len64.numel());
  const int64_t hi = *std::max_element(p, p + len64.numel());
  TORCH_CHECK_VALUE(lo >= 0 && hi <= T, op, ": every lengths[b] must lie in [0, T] = [0, ", T,
                    "], got values in [", lo, ", ", hi, "]");
}

// The dtype, shape and device errors read exactly as the fake kernel's (_check_lengths in
// dtl_fast/ops/frame_pool.py), which accepts the same dtypes (its _LENGTH_DTYPES).
at::Tensor checked_lengths_for(const c10::optional<at::Tensor>& lengths, int64_t B, int64_t T,
                               const at::Device& device, const char* op) {
  if (!lengths.has_value() || !lengths->defined()) return at::Tensor();
  const at::Tensor& len = *lengths;
  TORCH_CHECK_VALUE(at::isIntegralType(len.scalar_type(), /*includeBool=*/false), op,
                    ": lengths must be an integer tensor, got dtype ",
                    torch_dtype(len.scalar_type()));
  TORCH_CHECK_VALUE(len.dim() == 1 && len.size(0) == B, op,
                    ": lengths must have shape [B] = [", B, "], got ", len.sizes());
  TORCH_CHECK_VALUE(len.is_cpu() || len.device() == device, op,
                    ": lengths must be on the CPU or on the device of its input (", device,
                    "), got ", len.device());
  if (len.is_cpu() && len.scalar_type() == at::kUInt64 && len.numel() > 0) {
    // int64 is what the kernels count in: a value >= 2^63 would wrap to a negative one, and
    // the range error would then name a value the caller never passed.
    const at::Tensor lc = len.contiguous();
    const uint64_t* p = lc.const_data_ptr<uint64_t>();
    const uint64_t hi = *std::max_element(p, p + lc.numel());
    TORCH_CHECK_VALUE(hi <= static_cast<uint64_t>(std::numeric_limits<int64_t>::max()), op,
                      ": lengths must fit in int64, got ", hi);
  }
  at::Tensor len64 = len.to(at::kLong).contiguous();
  if (!len64.is_cpu()) return len64;  // range left to the kernels: clamp + error flag
  check_length_values(len64, T, op);
  if (device.is_cpu()) return len64;
  // A copy from pageable memory blocks the host until the GPU has drained its queue; from a
  // pinned buffer it is asynchronous (the caching host allocator keeps the buffer alive until
  // the copy has run). Always a fresh buffer of ours: lengths that are already pinned int64
  // (a DataLoader with pin_memory) would otherwise be read by the GPU after this call returns,
  // and a caller refilling them at once would pool with the next batch's lengths.
  at::Tensor staged = at::empty({B}, len64.options().pinned_memory(true));
  staged.copy_(len64);
  return staged.to(device, /*non_blocking=*/true);
}

void check_x(const at::Tensor& x, const char* name) {
  TORCH_CHECK_VALUE(x.dim() == 3, "frame_pool: ", name,
                    " must be a 3-D tensor [B, T, D], got shape ", x.sizes());
  TORCH_CHECK_VALUE(is_supported_float(x.scalar_type()), "frame_pool: ", name,
                    " must be float32, float64, float16 or bfloat16, got ",
                    torch_dtype(x.scalar_type()));
}

}  // namespace

// Frame indices (argmax, the CUDA kernels' frame counters) are int32; the margin keeps a
// counter that steps past the last frame (by at most unroll x time lanes = 8 x 256) from
// overflowing.
constexpr int64_t kMaxT = std::numeric_limits<int32_t>::max() - 4096;

at::Tensor checked_lengths(const at::Tensor& x, const c10::optional<at::Tensor>& lengths) {
  check_x(x, "x");
  TORCH_CHECK_VALUE(x.size(1) <= kMaxT,
                    "frame_pool: T must be <= 2^31 - 4097 (frame indices are int32), got ",
                    x.size(1));
  return checked_lengths_for(lengths, x.size(0), x.size(1), x.device(), "frame_pool");
}

at::Tensor checked_backward_inputs(const at::Tensor& grad_out,
                                   const c10::optional<at::Tensor>& lengths,
                                   const at::Tensor& argmax, int64_t T, PoolMode mode) {
  TORCH_CHECK_VALUE(grad_out.dim() == 2, "frame_pool_backward: grad_out must be [B, D], got ",
                    grad_out.sizes());
  // The grad_out dtype and argmax errors are worded as the fake kernel words them (one
  // message, whichever kernel meets the call).
  TORCH_CHECK_VALUE(is_supported_float(grad_out.scalar_type()),
                    "frame_pool_backward: grad_out must be float32, float64, float16 or "
                    "bfloat16, got ", torch_dtype(grad_out.scalar_type()));
  TORCH_CHECK_VALUE(T >= 0 && T <= kMaxT,
                    "frame_pool_backward: T must lie in [0, 2^31 - 4097], got ", T);
  TORCH_CHECK_VALUE(mode != PoolMode::MeanMax || grad_out.size(1) % 2 == 0,
                    "frame_pool_backward: grad_out of 'meanmax' must be [B, 2D], got width ",
                    grad_out.size(1));
  if (has_argmax(mode)) {
    const int64_t D = mode == PoolMode::MeanMax ? grad_out.size(1) / 2 : grad_out.size(1);
    TORCH_CHECK_VALUE(argmax.scalar_type() == at::kInt && argmax.dim() == 2 &&
                          argmax.size(0) == grad_out.size(0) && argmax.size(1) == D &&
                          argmax.device() == grad_out.device(),
                      "frame_pool_backward: argmax must be an int32 tensor [B, D] = [",
                      grad_out.size(0), ", ", D, "] on ", grad_out.device(), ", got ",
                      torch_dtype(argmax.scalar_type()), " ", argmax.sizes(), " on ",
                      argmax.device());
  }
  return checked_lengths_for(lengths, grad_out.size(0), T, grad_out.device(),
                             "frame_pool_backward");
}

namespace {
// Each field is atomic on its own; a sweep sets the whole configuration between calls.
std::atomic<int> g_threads{CudaLaunchConfig{}.threads};
std::atomic<int> g_max_tx{CudaLaunchConfig{}.max_tx};
std::atomic<int> g_split_waves{CudaLaunchConfig{}.split_waves};
std::atomic<int> g_split_phi_pct{CudaLaunchConfig{}.split_phi_pct};
std::atomic<int> g_bwd_frames{CudaLaunchConfig{}.bwd_frames};
std::atomic<int> g_bwd_waves{CudaLaunchConfig{}.bwd_waves};
std::atomic<int> g_fwd_unroll{CudaLaunchConfig{}.fwd_unroll};
std::atomic<int> g_fwd_pipeline{CudaLaunchConfig{}.fwd_pipeline};
std::atomic<int> g_fwd_l2_evict_first{CudaLaunchConfig{}.fwd_l2_evict_first};

bool is_pow2(int v) { return v > 0 && (v & (v - 1)) == 0; }
}  // namespace

int64_t span_bytes(c10::IntArrayRef sizes, c10::IntArrayRef strides, int64_t element_size) {
  TORCH_CHECK_VALUE(sizes.size() == strides.size(), "span_bytes: ", sizes.size(),
                    " sizes but ", strides.size(), " strides");
  TORCH_CHECK_VALUE(element_size > 0, "span_bytes: element_size must be > 0, got ",
                    element_size);
  for (const int64_t s : sizes) {
    TORCH_CHECK_VALUE(s >= 0, "span_bytes: sizes must be >= 0, got ", sizes);
  }
  for (const int64_t s : sizes) {
    if (s == 0) return 0;
  }
  int64_t numel = 1, span = 1;  // span: elements from the lowest address to the highest
  for (size_t d = 0; d < sizes.size(); ++d) {
    numel *= sizes[d];
    span += (sizes[d] - 1) * (strides[d] < 0 ? -strides[d] : strides[d]);
  }
  return std::min(numel, span) * element_size;
}

CudaLaunchConfig cuda_launch_config() {
  CudaLaunchConfig c;
  c.threads = g_threads.load(std::memory_order_relaxed);
  c.max_tx = g_max_tx.load(std::memory_order_relaxed);
  c.split_waves = g_split_waves.load(std::memory_order_relaxed);
  c.split_phi_pct = g_split_phi_pct.load(std::memory_order_relaxed);
  c.bwd_frames = g_bwd_frames.load(std::memory_order_relaxed);
  c.bwd_waves = g_bwd_waves.load(std::memory_order_relaxed);
  c.fwd_unroll = g_fwd_unroll.load(std::memory_order_relaxed);
  c.fwd_pipeline = g_fwd_pipeline.load(std::memory_order_relaxed);
  c.fwd_l2_evict_first = g_fwd_l2_evict_first.load(std::memory_order_relaxed);
  return c;
}

void set_cuda_launch_config(const CudaLaunchConfig& c) {
  // The kernels' shared memory and __launch_bounds__ are sized for 256 threads.
  TORCH_CHECK_VALUE(c.threads == 64 || c.threads == 128 || c.threads == 256,
                    "cuda launch config: threads must be 64, 128 or 256, got ", c.threads);
  TORCH_CHECK_VALUE(is_pow2(c.max_tx) && c.max_tx <= c.threads,
                    "cuda launch config: max_tx must be a power of two <= threads, got ",
                    c.max_tx);
  TORCH_CHECK_VALUE(c.split_waves >= 0 && c.split_waves <= 64,
                    "cuda launch config: split_waves must lie in [0, 64], got ", c.split_waves);
  TORCH_CHECK_VALUE(c.split_phi_pct >= 1 && c.split_phi_pct <= 100,
                    "cuda launch config: split_phi_pct must lie in [1, 100], got ",
                    c.split_phi_pct);
  TORCH_CHECK_VALUE(c.bwd_frames >= 1 && c.bwd_frames <= 1024,
                    "cuda launch config: bwd_frames must lie in [1, 1024], got ", c.bwd_frames);
  TORCH_CHECK_VALUE(c.bwd_waves >= 1 && c.bwd_waves <= 64,
                    "cuda launch config: bwd_waves must lie in [1, 64], got ", c.bwd_waves);
  // One forward kernel is compiled per value (csrc/cuda/frame_pool.cu, launch_forward).
  TORCH_CHECK_VALUE(c.fwd_unroll == 2 || c.fwd_unroll == 4 || c.fwd_unroll == 8 ||
                        c.fwd_unroll == 16,
                    "cuda launch config: fwd_unroll must be 2, 4, 8 or 16, got ", c.fwd_unroll);
  // Pipelined kernels are compiled for U = 8 and 16 only (two rounds of 4 or 8 loads), the ring
  // kernel for U = 4 only (stages of 4 frames), which keeps the growth of _C modest.
  TORCH_CHECK_VALUE(c.fwd_pipeline >= 0 && c.fwd_pipeline <= 2,
                    "cuda launch config: fwd_pipeline must be 0, 1 or 2, got ", c.fwd_pipeline);
  TORCH_CHECK_VALUE(c.fwd_pipeline != 1 || c.fwd_unroll == 8 || c.fwd_unroll == 16,
                    "cuda launch config: fwd_pipeline=1 needs fwd_unroll 8 or 16 (two rounds of "
                    "4 or 8 loads), got fwd_unroll=", c.fwd_unroll);
  TORCH_CHECK_VALUE(c.fwd_pipeline != 2 || c.fwd_unroll == 4,
                    "cuda launch config: fwd_pipeline=2 needs fwd_unroll 4 (a ring of stages of "
                    "4 frames), got fwd_unroll=", c.fwd_unroll);
  TORCH_CHECK_VALUE(c.fwd_l2_evict_first == 0 || c.fwd_l2_evict_first == 1,
                    "cuda launch config: fwd_l2_evict_first must be 0 or 1, got ",
                    c.fwd_l2_evict_first);
  g_threads.store(c.threads);
  g_max_tx.store(c.max_tx);
  g_split_waves.store(c.split_waves);
  g_split_phi_pct.store(c.split_phi_pct);
  g_bwd_frames.store(c.bwd_frames);
  g_bwd_waves.store(c.bwd_waves);
  g_fwd_unroll.store(c.fwd_unroll);
  g_fwd_pipeline.store(c.fwd_pipeline);
  g_fwd_l2_evict_first.store(c.fwd_l2_evict_first);
}

#ifndef DTL_FAST_WITH_CUDA
void check_device_errors(bool /*sync*/) {}  // no CUDA kernels, nothing can be recorded
bool cuda_kernels_run_on(int64_t /*device*/) { return false; }
#endif

namespace {

// Features handled by one task: the accumulators of a chunk stay in L1 while the task walks
// down the valid frames (3 x 4 KiB for float32), and B x chunks gives the threads enough
// independent tasks. 1024 rather than 512: at D = 1024 a task then reads whole 4 KiB rows, one
// sequential stream per frame (measured: forward -8 % at 64x64x1024, bench/NOTES.md).
constexpr int64_t kChunk = 1024;

inline int64_t clamped_length(const int64_t* len, int64_t b, int64_t T) {
  return len == nullptr ? T : std::min<int64_t>(std::max<int64_t>(len[b], 0), T);
}

// What one forward task needs: x with its strides, lengths, outputs.
template <typename scalar_t>
struct ForwardArgs {
  const scalar_t* xp;
  const int64_t* lp;  // nullptr: every clip has T frames
  scalar_t* op;
  int32_t* ap;  // argmax (max / meanmax with_argmax only; nullptr: values only)
  int64_t T, D, sB, sT, nchunk;
  int64_t out_w;  // row stride of out: D, or 2D for meanmax (mean, then max)
  PoolMode mode;
};

// Whether value v of a later frame replaces the running max m: the first maximum wins; a NaN
// replaces any number and is never replaced (torch.amax's rule). That is
// (v > m) | (isnan(v) & !isnan(m)), written with two compares instead of three ("not v <= m"
// holds for v > m and for a NaN on either side; "m == m" then excludes a NaN m). Measured in
// s28 (128x16x1024 float32, 1 thread, medians of 3 interleaved builds): max with argmax 0.281 ->
// 0.260 ms, without 0.137 -> 0.117 ms.
template <typename acc_t>
C10_ALWAYS_INLINE bool take_max(acc_t v, acc_t m) {
  return !(v <= m) & (m == m);
}

// hit ? a : b as a bit select. Written as a C++ conditional, GCC does not vectorise the loops
// below ("control flow in loop": with -ftrapping-math it will not if-convert a float select);
// as masks on the bits it does, for every element size.
template <typename T>
inline T pick(bool hit, T a, T b) {
  using U = std::conditional_t<sizeof(T) == 8, uint64_t,
                               std::conditional_t<sizeof(T) == 4, uint32_t, uint16_t>>;
  static_assert(sizeof(T) == sizeof(U), "pick: 2-, 4- or 8-byte element types");
  U ua, ub;
  std::memcpy(&ua, &a, sizeof(T));
  std::memcpy(&ub, &b, sizeof(T));
  const U mask = static_cast<U>(-static_cast<U>(hit));
  const U r = (ua & mask) | (ub & static_cast<U>(~mask));
  T out;
  std::memcpy(&out, &r, sizeof(T));
  return out;
}

// The earlier value m, or a later v that take_max says replaces it. As a binary operation on
// values in frame order it keeps the first maximum (NaN above every number, then by value, the
// first of equals: -0 and +0 included), so it is associative: any grouping of a run of frames
// gives the sequential scan's value bit for bit.
template <typename acc_t>
C10_ALWAYS_INLINE acc_t first_max(acc_t m, acc_t v) {
  return pick(take_max(v, m), v, m);
}

// mx[0:n] = first_max(mx, the four frames at r0, r0 + sT, r0 + 2 sT, r0 + 3 sT), as a tree: one
// load and store of the running max per four frames (the forward without argmax).
template <typename scalar_t, typename acc_t>
C10_ALWAYS_INLINE void fold_max_of_four(acc_t* mx, const scalar_t* r0, int64_t sT, int64_t n) {
  const scalar_t* r1 = r0 + sT;
  const scalar_t* r2 = r1 + sT;
  const scalar_t* r3 = r2 + sT;
  for (int64_t i = 0; i < n; ++i) {
    const acc_t m01 = first_max(static_cast<acc_t>(r0[i]), static_cast<acc_t>(r1[i]));
    const acc_t m23 = first_max(static_cast<acc_t>(r2[i]), static_cast<acc_t>(r3[i]));
    mx[i] = first_max(mx[i], first_max(m01, m23));
  }
}

// acc[0:n] += the four frames at r0, r0 + sT, r0 + 2 sT, r0 + 3 sT, added pairwise: the one
// grouping of sum_frames and of meanmax's sum, so that meanmax's mean equals mean's bit for bit.
template <typename scalar_t, typename acc_t>
C10_ALWAYS_INLINE void add_four_frames(acc_t* acc, const scalar_t* r0, int64_t sT, int64_t n) {
  const scalar_t* r1 = r0 + sT;
  const scalar_t* r2 = r1 + sT;
  const scalar_t* r3 = r2 + sT;
  for (int64_t i = 0; i < n; ++i) {
    acc[i] += (static_cast<acc_t>(r0[i]) + static_cast<acc_t>(r1[i])) +
              (static_cast<acc_t>(r2[i]) + static_cast<acc_t>(r3[i]));
  }
}

// acc[0:n] = the sum of frames [0, L) of the rows at base + t * sT, four frames per pass over
// the accumulators (a quarter of their loads and stores, four read streams at once), added
// pairwise within a group.
template <typename scalar_t, typename acc_t = at::opmath_type<scalar_t>>
C10_ALWAYS_INLINE void sum_frames(acc_t* acc, const scalar_t* base, int64_t sT, int64_t L,
                                  int64_t n) {
  std::fill(acc, acc + n, acc_t(0));
  int64_t t = 0;
  for (; t + 4 <= L; t += 4) add_four_frames(acc, base + t * sT, sT, n);
  for (; t < L; ++t) {
    const scalar_t* row = base + t * sT;
    for (int64_t i = 0; i < n; ++i) acc[i] += static_cast<acc_t>(row[i]);
  }
}

// Pools tasks [begin, end): task = (clip b, chunk of kChunk features). Always inlined into
// the per-ISA entry points below, so each gets its own vector code.
template <typename scalar_t>
C10_ALWAYS_INLINE void forward_tasks(const ForwardArgs<scalar_t>& a, int64_t begin, int64_t end) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t T = a.T, D = a.D, sB = a.sB, sT = a.sT, nchunk = a.nchunk;
  const PoolMode mode = a.mode;
  const scalar_t* xp = a.xp;
  const int64_t* lp = a.lp;
  scalar_t* op = a.op;
  int32_t* ap = a.ap;
  acc_t acc[kChunk];
  acc_t mx[kChunk];  // meanmax: the running max beside the running sum in acc
  int32_t idx[kChunk];
  for (int64_t task = begin; task < end; ++task) {
    const int64_t b = task / nchunk;
    const int64_t d0 = (task % nchunk) * kChunk;
    const int64_t n = std::min(kChunk, D - d0);
    const int64_t L = clamped_length(lp, b, T);
    const scalar_t* base = xp + b * sB + d0;
    scalar_t* dst = op + b * a.out_w + d0;
    if (mode == PoolMode::MeanMax) {
      // One read of each valid frame feeds both reductions.
      scalar_t* dmax = dst + D;
      int32_t* am = ap == nullptr ? nullptr : ap + b * D + d0;
      if (L == 0) {
        std::fill(dst, dst + n, scalar_t(0));
        std::fill(dmax, dmax + n, scalar_t(0));
        if (am != nullptr) std::fill(am, am + n, int32_t(-1));
        continue;
      }
      if (am == nullptr) {
        // Values only (no gradient will be recorded): the same sums, and the max of each group
        // of four frames as a tree (fold_max_of_four) folded into the running max: the first
        // maximum's value, bit for bit what the argmax path below keeps (a NaN sum's payload
        // aside: which NaN an addition returns is left open by IEEE).
        for (int64_t i = 0; i < n; ++i) mx[i] = static_cast<acc_t>(base[i]);
        std::fill(acc, acc + n, acc_t(0));
        int64_t t = 0;
        for (; t + 4 <= L; t += 4) {
          const scalar_t* r0 = base + t * sT;
          add_four_frames(acc, r0, sT, n);
          fold_max_of_four(mx, r0, sT, n);
        }
        for (; t < L; ++t) {
          const scalar_t* row = base + t * sT;
          for (int64_t i = 0; i < n; ++i) {
            const acc_t v = static_cast<acc_t>(row[i]);
            acc[i] += v;
            mx[i] = first_max(mx[i], v);
          }
        }
        const acc_t denom = static_cast<acc_t>(L);
        for (int64_t i = 0; i < n; ++i) {
          dst[i] = static_cast<scalar_t>(acc[i] / denom);
          dmax[i] = static_cast<scalar_t>(mx[i]);
        }
        continue;
      }
      // The sum is grouped exactly as in sum_frames (the mean path), so meanmax's mean equals
      // mean's bit for bit; each group's max scan follows on rows still in L1, so x is read
      // from memory once. The scan meets frame 0 again harmlessly (an equal value, or a NaN
      // over itself, is never taken).
      for (int64_t i = 0; i < n; ++i) mx[i] = static_cast<acc_t>(base[i]);
      std::fill(idx, idx + n, int32_t(0));
      std::fill(acc, acc + n, acc_t(0));
      int64_t t = 0;
      for (; t + 4 <= L; t += 4) {
        const scalar_t* r0 = base + t * sT;
        const int32_t ti = static_cast<int32_t>(t);
        add_four_frames(acc, r0, sT, n);
        // The max scan, one frame per pass as in the max path, over rows now in L1.
        for (int k = 0; k < 4; ++k) {
          const scalar_t* row = r0 + k * sT;
          for (int64_t i = 0; i < n; ++i) {
            const acc_t v = static_cast<acc_t>(row[i]);
            const acc_t m = mx[i];
            const bool take = take_max(v, m);
            mx[i] = take ? v : m;
            idx[i] = take ? ti + k : idx[i];
          }
        }
      }
      for (; t < L; ++t) {
        const scalar_t* row = base + t * sT;
        const int32_t ti = static_cast<int32_t>(t);
        for (int64_t i = 0; i < n; ++i) {
          const acc_t v = static_cast<acc_t>(row[i]);
          const acc_t m = mx[i];
          acc[i] += v;
          const bool take = take_max(v, m);
          mx[i] = take ? v : m;
          idx[i] = take ? ti : idx[i];
        }
      }
      const acc_t denom = static_cast<acc_t>(L);
      for (int64_t i = 0; i < n; ++i) {
        dst[i] = static_cast<scalar_t>(acc[i] / denom);
        dmax[i] = static_cast<scalar_t>(mx[i]);
        am[i] = idx[i];
      }
    } else if (mode == PoolMode::Max && L == 0) {
      std::fill(dst, dst + n, scalar_t(0));
      if (ap != nullptr) std::fill(ap + b * D + d0, ap + b * D + d0 + n, int32_t(-1));
    } else if (mode == PoolMode::Max && ap == nullptr) {
      // Values only (no gradient will be recorded): four frames per pass over the running max,
      // as a tree, which keeps the first maximum's value (first_max is associative), so the
      // result is the argmax path's bit for bit.
      for (int64_t i = 0; i < n; ++i) acc[i] = static_cast<acc_t>(base[i]);
      int64_t t = 1;
      for (; t + 4 <= L; t += 4) fold_max_of_four(acc, base + t * sT, sT, n);
      for (; t < L; ++t) {
        const scalar_t* row = base + t * sT;
        for (int64_t i = 0; i < n; ++i) acc[i] = first_max(acc[i], static_cast<acc_t>(row[i]));
      }
      for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<scalar_t>(acc[i]);
    } else if (mode == PoolMode::Max) {
      // Start from the first valid frame (not from -inf), so a clip whose frames are all
      // -inf still has a first maximum, as torch.max gives.
      for (int64_t i = 0; i < n; ++i) acc[i] = static_cast<acc_t>(base[i]);
      std::fill(idx, idx + n, int32_t(0));
      // One frame per pass: a four-frame chain of compare-and-select per feature was measured
      // 3-4x slower here (the select chain does not vectorise as well as the plain loop).
      for (int64_t t = 1; t < L; ++t) {
        const scalar_t* row = base + t * sT;
        const int32_t ti = static_cast<int32_t>(t);
        for (int64_t i = 0; i < n; ++i) {
          const acc_t v = static_cast<acc_t>(row[i]);
          const acc_t a = acc[i];
          const bool take = take_max(v, a);
          acc[i] = take ? v : a;
          idx[i] = take ? ti : idx[i];
        }
      }
      int32_t* am = ap + b * D + d0;
      for (int64_t i = 0; i < n; ++i) {
        dst[i] = static_cast<scalar_t>(acc[i]);
        am[i] = idx[i];
      }
    } else {
      sum_frames<scalar_t>(acc, base, sT, L, n);
      if (mode == PoolMode::Mean && L > 0) {
        const acc_t denom = static_cast<acc_t>(L);
        for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<scalar_t>(acc[i] / denom);
      } else {
        for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<scalar_t>(acc[i]);
      }
    }
  }
}

// Entry points per instruction set. The library is built for baseline x86-64 (SSE2) so it
// loads everywhere; on CPUs with AVX2 the same loops run with 32-byte vectors (measured here:
// max forward at [64, 64, 1024] float32 0.45 -> 0.27 ms). Chosen once, at run time.
#if defined(__x86_64__) && defined(__GNUC__)
#define DTL_FAST_HAVE_AVX2_PATH 1
template <typename scalar_t>
__attribute__((target("avx2,fma"))) void forward_tasks_avx2(const ForwardArgs<scalar_t>& a,
                                                            int64_t begin, int64_t end) {
  forward_tasks<scalar_t>(a, begin, end);
}

// DTL_FAST_DISABLE_AVX2=1 forces the baseline path (the tests run both).
bool use_avx2() {
  static const bool use = [] {
    const char* off = std::getenv("DTL_FAST_DISABLE_AVX2");
    if (off != nullptr && off[0] != '\0' && off[0] != '0') return false;
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  }();
  return use;
}
#endif

}  // namespace

const char* cpu_forward_isa() {
#ifdef DTL_FAST_HAVE_AVX2_PATH
  if (use_avx2()) return "avx2";
#endif
  return "baseline";
}

namespace {

template <typename scalar_t>
void forward_tasks_baseline(const ForwardArgs<scalar_t>& a, int64_t begin, int64_t end) {
  forward_tasks<scalar_t>(a, begin, end);
}

template <typename scalar_t>
void forward_cpu_impl(const at::Tensor& x, const at::Tensor& len, PoolMode mode, at::Tensor& out,
                      at::Tensor& argmax) {
  const int64_t T = x.size(1), D = x.size(2);
  ForwardArgs<scalar_t> a{x.const_data_ptr<scalar_t>(),
                          len.defined() ? len.const_data_ptr<int64_t>() : nullptr,
                          out.mutable_data_ptr<scalar_t>(),
                          argmax.numel() > 0 ? argmax.mutable_data_ptr<int32_t>() : nullptr,
                          T,
                          D,
                          x.stride(0),
                          x.stride(1),
                          (D + kChunk - 1) / kChunk,
                          out_width(D, mode),
                          mode};
  void (*tasks)(const ForwardArgs<scalar_t>&, int64_t, int64_t) = forward_tasks_baseline<scalar_t>;
#ifdef DTL_FAST_HAVE_AVX2_PATH
  if (use_avx2()) tasks = forward_tasks_avx2<scalar_t>;
#endif
  // Aim for >= 32k elements per thread before going parallel.
  const int64_t grain = std::max<int64_t>(1, 32768 / std::max<int64_t>(1, T * std::min(D, kChunk)));
  at::parallel_for(0, x.size(0) * a.nchunk, grain,
                   [&](int64_t begin, int64_t end) { tasks(a, begin, end); });
}

// A fresh multi-megabyte output is backed by new zero pages, and faulting them in 4 KiB at a
// time costs more than writing them (seen here: 64 MB, 57 ms with 4 KiB pages, 12 ms with
// 2 MiB ones). Asking for transparent huge pages on the untouched buffer (what torch does
// under THP_MEM_ALLOC_ENABLE=1) is a hint the kernel may ignore; results do not depend on it.
void advise_huge_pages(const at::Tensor& t) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  constexpr uintptr_t kHuge = uintptr_t(2) << 20;
  const size_t nbytes = t.nbytes();
  if (nbytes < 4 * kHuge) return;
  const uintptr_t begin = reinterpret_cast<uintptr_t>(t.const_data_ptr());
  const uintptr_t first = (begin + kHuge - 1) & ~(kHuge - 1);
  const uintptr_t last = (begin + nbytes) & ~(kHuge - 1);
  if (last > first) madvise(reinterpret_cast<void*>(first), last - first, MADV_HUGEPAGE);
#endif
}

// A fresh gradient of at least this many bytes that the cache below does not take (larger
// than its bound, or the cache off) gets pages the op knows to be zero, mapped per call and
// unmapped when freed. 32 MiB is glibc's largest mmap threshold (DEFAULT_MMAP_THRESHOLD_MAX on
// 64-bit): with glibc's malloc behind torch's default CPU allocator, a block this large comes
// from a new mapping on every call, so allocating it here gives up no reuse of warm memory.
// Every block stays with torch's allocator when another malloc (tcmalloc, jemalloc: they cache
// large blocks) or another CPU allocator (c10::SetCPUAllocator) is in use.
constexpr size_t kZeroPagesMinBytes = size_t(32) << 20;
// A gradient of at least this many bytes whose size, rounded up to 2 MiB, fits the bound comes
// from a bounded cache of the op's own warm blocks. Below 32 MiB glibc serves such a block from
// its heap, but from chunks it rotates and pages it trims back to the system: measured at
// 16 MiB, 24-136 page faults per call, and forward+backward through autograd 7-14 % slower at
// 1 thread than from the cache (bench/NOTES.md, s21 and s22). From 32 MiB a fresh mapping per
// call costs the kernel's zeroing of every page (a fresh 64 MiB of huge pages: 6.6 ms on s21's
// AMD VM, 2 threads; a warm 64 MiB written in full: 1.7 ms on s34's Intel VM, whose 480 MiB L3
// holds it) and, suspected on a VM that reports free memory to its host, host faults on top.
// Measured on that Intel VM only: forward+backward mean at 256x32x2048 8.2 -> 4.5 ms from the
// cache (2 threads), and one measurement window of the fresh pages at 94 ms (bench/NOTES.md,
// s34); unmeasured where 64 MiB exceeds the last-level cache.
constexpr size_t kGradCacheMinBytes = size_t(4) << 20;
// The cache's default bound, per pool (grad_cache()): glibc's largest dynamic trim threshold
// (2 x DEFAULT_MMAP_THRESHOLD_MAX), as much freed memory as glibc's heap may keep on its own;
// the cache keeps it in addition to whatever glibc keeps.
constexpr size_t kGradCacheDefaultMiB = 64;
constexpr size_t kHugePage = size_t(2) << 20;

inline size_t round_to_huge(size_t n) { return (n + kHugePage - 1) & ~(kHugePage - 1); }

// A size setting read from the environment once per process: a whole number of MiB in
// [0, 1048576]. `set` is false when the variable is unset or empty; `bad` holds the raw value
// when it is not a whole number in range (each user raises a ValueError naming the variable).
struct MibSetting {
  bool set = false;
  size_t bytes = 0;
  std::string bad;
};

MibSetting read_mib_setting(const char* name) {
  MibSetting s;
  const char* raw = std::getenv(name);
  if (raw == nullptr || raw[0] == '\0') return s;
  char* end = nullptr;
  errno = 0;
  const unsigned long long mib = std::strtoull(raw, &end, 10);
  if (raw[0] < '0' || raw[0] > '9' || *end != '\0' || errno != 0 || mib > (1ull << 20)) {
    s.bad = raw;
    return s;
  }
  s.set = true;
  s.bytes = static_cast<size_t>(mib) << 20;
  return s;
}

// The cache's bound, from DTL_FAST_CPU_GRAD_CACHE_MB (whole MiB, 0 turns the cache off;
// default kGradCacheDefaultMiB), read once per process.
const MibSetting& grad_cache_setting() {
  static const MibSetting setting = [] {
    MibSetting s = read_mib_setting("DTL_FAST_CPU_GRAD_CACHE_MB");
    if (!s.set && s.bad.empty()) s.bytes = kGradCacheDefaultMiB << 20;
    return s;
  }();
  return setting;
}

// The bound in bytes; a bad setting is a ValueError naming the variable, raised by every CPU
// backward (new_grad_x asks first).
size_t grad_cache_cap() {
  const MibSetting& s = grad_cache_setting();
  TORCH_CHECK_VALUE(s.bad.empty(),
                    "DTL_FAST_CPU_GRAD_CACHE_MB must be a whole number of MiB in [0, 1048576] "
                    "(0 turns the CPU gradient cache off), got '", s.bad, "'");
  return s.bytes;
}

// Where each CPU gradient came from (cpu_grad_origins): this thread's latest, and counts per
// process. One relaxed increment per allocation of grad_x, next to an mmap or a malloc.
enum class GradOrigin : int { None = 0, Torch = 1, Mapped = 2, Cache = 3 };
thread_local GradOrigin t_last_origin = GradOrigin::None;
std::atomic<uint64_t> g_origin_counts[4];

void note_origin(GradOrigin o) noexcept {
  t_last_origin = o;
  g_origin_counts[static_cast<int>(o)].fetch_add(1, std::memory_order_relaxed);
}

#if defined(__linux__)
#define DTL_FAST_HAVE_ZERO_PAGES 1

// One mapping of the op's own: `bytes` is a multiple of 2 MiB, `ptr` is 2 MiB-aligned.
struct GradBlock {
  void* ptr;
  size_t bytes;
  bool fresh;      // mapped by this allocation: every page still reads as zero
  bool cacheable;  // asked for as a cacheable size (cacheable() below): goes back to the cache
  GradBlock* older = nullptr;  // links while in the cache (no allocation in a deleter)
  GradBlock* newer = nullptr;
};

// A block of round_to_huge(n) bytes on a 2 MiB boundary, advised for transparent huge pages:
// torch's 64-byte-aligned blocks cost up to 2 x 512 small-page faults at their ends (~0.8 ms
// per 64 MiB measured here). Throws OutOfMemoryError.
GradBlock* map_block(size_t n) {
  if (n > std::numeric_limits<size_t>::max() - 2 * kHugePage) {
    c10::profiledCPUMemoryReporter().OutOfMemory(n);
    TORCH_CHECK_WITH(OutOfMemoryError, false, "frame_pool: cannot allocate ", n, " bytes");
  }
  const size_t bytes = round_to_huge(n);
  auto block = std::make_unique<GradBlock>();  // before mmap: nothing to unmap if it throws
  // Map one huge page more than needed and cut the slack away on both sides, so the block
  // starts on a 2 MiB boundary.
  void* raw = mmap(nullptr, bytes + kHugePage, PROT_READ | PROT_WRITE,
                   MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  if (raw == MAP_FAILED) {
    const int err = errno;
    c10::profiledCPUMemoryReporter().OutOfMemory(n);
    TORCH_CHECK_WITH(OutOfMemoryError, false,
                     "frame_pool: not enough memory: you tried to allocate ", n, " bytes (",
                     std::strerror(err), ")");
  }
  const uintptr_t start = reinterpret_cast<uintptr_t>(raw);
  const uintptr_t begin = (start + kHugePage - 1) & ~(kHugePage - 1);
  if (begin > start) munmap(raw, begin - start);
  const uintptr_t end = start + bytes + kHugePage;
  if (end > begin + bytes) munmap(reinterpret_cast<void*>(begin + bytes), end - begin - bytes);
  void* ptr = reinterpret_cast<void*>(begin);
#if defined(MADV_HUGEPAGE)
  madvise(ptr, bytes, MADV_HUGEPAGE);  // a hint; results do not depend on it
#endif
  block->ptr = ptr;
  block->bytes = bytes;
  block->fresh = true;
  block->cacheable = false;
  return block.release();
}

void unmap_block(GradBlock* block) {
  munmap(block->ptr, block->bytes);
  delete block;
}

// Freed gradient blocks asked for at kGradCacheMinBytes and above (within the bound), kept
// mapped for the next gradient of the same rounded size, at most grad_cache_cap() bytes in one
// pool (grad_cache() keeps two; the oldest go back to the system first). The most recently
// freed block is handed out first, so a loop that frees a gradient before it asks for the next
// keeps reusing one block per size and the others age out. An intrusive list: put() runs in
// a tensor's deleter, which must not throw, so it allocates nothing. Blocks are unmapped
// outside the lock. Never destroyed (see grad_cache()), so a tensor freed during interpreter
// teardown still finds it.
// Fork: a child inherits the cached blocks (copy-on-write) and the lock's state; a fork while
// another thread is inside a CPU backward's allocation or free would leave the child's lock
// held, the same hazard as forking during any other multithreaded torch work.
class GradBlockCache {
 public:
  GradBlock* take(size_t bytes) {
    std::lock_guard<std::mutex> lock(mu_);
    for (GradBlock* b = newest_; b != nullptr; b = b->older) {
      if (b->bytes != bytes) continue;
      unlink(b);
      b->fresh = false;
      return b;
    }
    return nullptr;
  }
  void put(GradBlock* block, size_t cap) noexcept {
    GradBlock* evicted = nullptr;  // a chain through `newer`
    {
      std::lock_guard<std::mutex> lock(mu_);
      if (block->bytes > cap) {
        block->newer = nullptr;
        evicted = block;
      } else {
        while (cached_ + block->bytes > cap) {
          GradBlock* old = oldest_;
          unlink(old);
          old->newer = evicted;
          evicted = old;
        }
        block->older = newest_;
        block->newer = nullptr;
        if (newest_ != nullptr) newest_->newer = block;
        newest_ = block;
        if (oldest_ == nullptr) oldest_ = block;
        cached_ += block->bytes;
        ++blocks_;
      }
    }
    while (evicted != nullptr) {
      GradBlock* next = evicted->newer;
      unmap_block(evicted);
      evicted = next;
    }
  }
  // Unmaps every cached block; returns the bytes handed back.
  size_t empty() {
    GradBlock* all = nullptr;
    size_t bytes = 0;
    {
      std::lock_guard<std::mutex> lock(mu_);
      all = newest_;
      bytes = cached_;
      newest_ = oldest_ = nullptr;
      cached_ = 0;
      blocks_ = 0;
    }
    while (all != nullptr) {
      GradBlock* next = all->older;
      unmap_block(all);
      all = next;
    }
    return bytes;
  }
  std::pair<size_t, size_t> stats() {
    std::lock_guard<std::mutex> lock(mu_);
    return {cached_, blocks_};
  }

 private:
  void unlink(GradBlock* b) {  // with mu_ held
    if (b->older != nullptr) b->older->newer = b->newer; else oldest_ = b->newer;
    if (b->newer != nullptr) b->newer->older = b->older; else newest_ = b->older;
    b->older = b->newer = nullptr;
    cached_ -= b->bytes;
    --blocks_;
  }

  std::mutex mu_;
  GradBlock* newest_ = nullptr;
  GradBlock* oldest_ = nullptr;
  size_t cached_ = 0;
  size_t blocks_ = 0;
};

// Two pools, each with the whole bound: blocks below kZeroPagesMinBytes (the cache of s22) and
// blocks of kZeroPagesMinBytes and more (cached since s34). One pool would let a block as
// large as the bound evict the small ones: a step with a 16 MiB and a 64 MiB gradient under
// the 64 MiB bound would then miss one or both every step, where before s34 the 16 MiB one
// hit (review s34). Apart, the small pool behaves exactly as before s34, the large one keeps
// the large gradients of a loop, and the process keeps at most twice the bound.
GradBlockCache& grad_cache(size_t bytes) {
  static auto* small = new GradBlockCache();  // leaked on purpose: outlive every tensor
  static auto* large = new GradBlockCache();
  return bytes >= kZeroPagesMinBytes ? *large : *small;
}

bool cacheable(size_t n, size_t cap) {
  return n >= kGradCacheMinBytes && n <= cap && round_to_huge(n) <= cap;
}

void free_grad_block(void* ctx) {
  auto* block = static_cast<GradBlock*>(ctx);
  // torch's own CPU allocator reports through this reporter: one running total, and a free of
  // a block allocated before profiling began is dropped, not counted as a negative allocation.
  // A block kept in the cache is reported freed: it holds no tensor (as torch's CUDA caching
  // allocator reports "allocated", not "reserved", memory).
  c10::profiledCPUMemoryReporter().Delete(block->ptr);
  // A deleter must not throw: a bad setting (raised by every backward) caches nothing.
  const MibSetting& setting = grad_cache_setting();
  const size_t cap = setting.bad.empty() ? setting.bytes : 0;
  if (block->cacheable && block->bytes <= cap) {
    grad_cache(block->bytes).put(block, cap);
  } else {
    unmap_block(block);
  }
}

// The allocator of the op's gradients: blocks from the cache when their size is cacheable and
// one of that rounded size is free, else fresh mappings. A fresh block's pages read as zero
// until written, which lets the backward skip the rows that are zero (padding frames; for max,
// the features of other frames). Freed blocks go back to the cache when cacheable, else to
// the system at once (as glibc's own mappings do at >= 32 MiB). A tensor made on it is a
// regular resizable CPU tensor (resize_ grows it through this allocator; clone and
// share_memory_ copy it to memory of their own).
struct GradPagesAllocator final : c10::Allocator {
  c10::DataPtr allocate(size_t n) override {
    const c10::Device cpu(c10::kCPU);
    if (n == 0) return {nullptr, nullptr, &free_grad_block, cpu};
    GradBlock* block = nullptr;
    const bool to_cache = cacheable(n, grad_cache_cap());
    if (to_cache) block = grad_cache(round_to_huge(n)).take(round_to_huge(n));
    if (block == nullptr) {
      block = map_block(n);
      block->cacheable = to_cache;
    }
    note_origin(block->fresh ? GradOrigin::Mapped : GradOrigin::Cache);
    // The reporter gets the block's size (rounded up to 2 MiB): what the mapping holds.
    c10::profiledCPUMemoryReporter().New(block->ptr, block->bytes);
    return {block->ptr, block, &free_grad_block, cpu};
  }
  c10::DeleterFnPtr raw_deleter() const override { return nullptr; }  // the context is not ptr
  void copy_data(void* dest, const void* src, std::size_t count) const override {
    default_copy_data(dest, src, count);
  }
};

// Whether malloc is glibc's (not a preloaded tcmalloc / jemalloc): the symbol this library
// links against is looked up once.
bool malloc_is_glibc() {
  static const bool glibc = [] {
    Dl_info info;
    void* (*m)(size_t) = &std::malloc;
    if (dladdr(reinterpret_cast<void*>(m), &info) == 0 || info.dli_fname == nullptr)
      return false;
    return std::strstr(info.dli_fname, "libc.so") != nullptr;
  }();
  return glibc;
}

bool own_pages_allowed() {
  return malloc_is_glibc() && c10::GetCPUAllocator() == c10::GetDefaultCPUAllocator();
}

// DTL_FAST_DISABLE_ZERO_PAGES=1 keeps every gradient of >= 32 MiB that the cache does not take
// on torch's allocator (for A/B timing).
bool zero_pages_enabled() {
  static const bool on = [] {
    const char* off = std::getenv("DTL_FAST_DISABLE_ZERO_PAGES");
    return off == nullptr || off[0] == '\0' || off[0] == '0';
  }();
  return on && own_pages_allowed();
}
#endif

// grad_x of shape [B, T, D]: from the op's own allocator when it is large enough (above), else
// from torch's. `zeroed` says whether its pages are known to be zero, so the kernel knows
// whether it must write the zeros.
at::Tensor new_grad_x(const at::Tensor& g, int64_t T, int64_t D, bool& zeroed) {
  const int64_t B = g.size(0);
  zeroed = false;
  const size_t nbytes = static_cast<size_t>(B) * static_cast<size_t>(T) *
                        static_cast<size_t>(D) * g.element_size();
  const bool from_cache = cpu_grad_from_cache(nbytes);  // first: raises on a bad setting
  if (from_cache || cpu_grad_on_zero_pages(nbytes)) {
#ifdef DTL_FAST_HAVE_ZERO_PAGES
    static auto* allocator = new GradPagesAllocator();  // leaked: outlives every tensor
    at::Tensor gx = at::detail::empty_generic({B, T, D}, allocator,
                                              c10::DispatchKeySet(c10::DispatchKey::CPU),
                                              g.scalar_type(), c10::nullopt);
    zeroed = static_cast<const GradBlock*>(gx.storage().data_ptr().get_context())->fresh;
    return gx;
#endif
  }
  at::Tensor gx = at::empty({B, T, D}, g.options());
  note_origin(GradOrigin::Torch);
  if (gx.numel() > 0) advise_huge_pages(gx);
  return gx;
}

// How the backward writes grad_x. Non-temporal stores skip the read-for-ownership of every
// line and leave the cached input alone, but send every line to memory; a gradient that fits in
// the last-level cache beside the input the forward read is better written into the cache,
// where the next call's gradient (the same warm block, from the cache above) overwrites lines
// that never went to memory and the next layer's backward reads it. Measured on a 32 MiB L3
// (bench/NOTES.md, s23; forward + backward, 50 % valid frames), by how the rows are written:
// - row by row from a small buffer (max / meanmax frames, which differ per frame): ordinary
//   stores pay a read-for-ownership per line; non-temporal stores are 14 % faster at 16 MiB,
//   so rows stream from half the last-level cache (`min_bytes`);
// - in bulk through glibc (mean / sum frames: the clip's row, copied by doubling memcpy;
//   padding frames: one memset per run). glibc picks the CPU's way for large blocks (`rep
//   movsb` / `rep stosb` here, whole lines written without reading them): 7 % / 25 % faster
//   than non-temporal rows at 16 MiB (1 / 2 threads), even at 24 MiB, 8 % slower at 64 MiB;
//   so bulk writes stream from the whole last-level cache (2 x min_bytes).
constexpr size_t kStreamingFallbackBytes = size_t(4) << 20;  // where no cache size is known

// The size in bytes of the level-3 (or higher) data cache CPU 0 reports, 0 when unknown (a
// report of L1 / L2 only, as some hypervisors give, counts as unknown: it would put the
// threshold below the old 4 MiB). sysfs first: it gives what a VM's vCPUs share (32 MiB where
// cpuid, and so sysconf and glibc, report the host's 384 MiB); sysconf where sysfs says
// nothing. It is one cache: threads spread over several CCXs or sockets have more.
size_t last_level_cache_bytes() {
  static const size_t bytes = [] {
    size_t best = 0;
    int best_level = 0;
#ifdef __linux__
    for (int i = 0; i < 16; ++i) {
      const std::string dir = "/sys/devices/system/cpu/cpu0/cache/index" + std::to_string(i) + "/";
      std::ifstream level_f(dir + "level"), type_f(dir + "type"), size_f(dir + "size");
      if (!level_f || !type_f || !size_f) continue;
      int level = 0;
      std::string type, size;
      if (!(level_f >> level) || !(type_f >> type) || !(size_f >> size)) continue;
      if (level < 3 || type == "Instruction" || size.empty()) continue;
      char* end = nullptr;
      errno = 0;
      unsigned long long v = std::strtoull(size.c_str(), &end, 10);
      if (errno != 0 || end == size.c_str() || v > (1ull << 30)) continue;
      if (*end == 'K') v <<= 10;
      else if (*end == 'M') v <<= 20;
      else if (*end == 'G') v <<= 30;
      else if (*end != '\0') continue;  // a suffix this does not know: not a size
      if (level > best_level || (level == best_level && v > best)) {
        best_level = level;
        best = static_cast<size_t>(v);
      }
    }
#endif
#if defined(_SC_LEVEL3_CACHE_SIZE)
    if (best == 0) {
      const long l3 = sysconf(_SC_LEVEL3_CACHE_SIZE);
      best = l3 > 0 ? static_cast<size_t>(l3) : 0;
    }
#endif
    return best;
  }();
  return bytes;
}

// DTL_FAST_CPU_NT_STORE_MIN_MB (whole MiB; 0 streams every gradient), read once per process.
const MibSetting& nt_store_setting() {
  static const MibSetting setting = read_mib_setting("DTL_FAST_CPU_NT_STORE_MIN_MB");
  return setting;
}

// One row of grad_x from a small buffer (in L1). Streamed: non-temporal stores. Otherwise
// ordinary 16-byte (SSE2) stores, not memcpy: glibc's memcpy takes `rep movsb` for rows above
// 2 KiB, measured 1.5x slower than vector stores for single 4 KiB rows here (bench/NOTES.md,
// s23).
inline void copy_row(char* dst, const char* src, size_t n, bool stream) {
#if defined(__SSE2__)
  const size_t head = std::min(n, (16 - reinterpret_cast<uintptr_t>(dst) % 16) % 16);
  std::memcpy(dst, src, head);
  size_t i = head;
  if (stream) {
    for (; i + 16 <= n; i += 16)
      _mm_stream_si128(reinterpret_cast<__m128i*>(dst + i),
                       _mm_loadu_si128(reinterpret_cast<const __m128i*>(src + i)));
  } else {
    for (; i + 16 <= n; i += 16)
      _mm_store_si128(reinterpret_cast<__m128i*>(dst + i),
                      _mm_loadu_si128(reinterpret_cast<const __m128i*>(src + i)));
  }
  std::memcpy(dst + i, src + i, n - i);
#else
  (void)stream;
  std::memcpy(dst, src, n);
#endif
}

// `n_rows` rows at dst, each a copy of `src_row` (dst's first row, already written from it).
// In bulk: doubling memcpy of what is written so far, which is in the cache. Streamed: row by
// row from src_row (in L1), never from dst, whose lines the non-temporal stores sent to memory.
inline void replicate_row(char* dst, const char* src_row, size_t row_bytes, int64_t n_rows,
                          bool stream) {
  if (stream) {
    for (int64_t k = 1; k < n_rows; ++k)
      copy_row(dst + static_cast<size_t>(k) * row_bytes, src_row, row_bytes, true);
    return;
  }
  int64_t have = 1;
  while (have < n_rows) {
    const int64_t n = std::min(have, n_rows - have);
    std::memcpy(dst + static_cast<size_t>(have) * row_bytes, dst,
                static_cast<size_t>(n) * row_bytes);
    have += n;
  }
}

// Zeros of padding frames, `n` bytes in one run. In bulk: one memset. Streamed: non-temporal.
inline void zero_rows(char* dst, size_t n, bool stream) {
#if defined(__SSE2__)
  if (stream) {
    const size_t head = std::min(n, (16 - reinterpret_cast<uintptr_t>(dst) % 16) % 16);
    std::memset(dst, 0, head);
    size_t i = head;
    const __m128i zero = _mm_setzero_si128();
    for (; i + 16 <= n; i += 16) _mm_stream_si128(reinterpret_cast<__m128i*>(dst + i), zero);
    std::memset(dst + i, 0, n - i);
    return;
  }
#endif
  (void)stream;
  std::memset(dst, 0, n);
}

inline void stream_fence(bool stream) {
#if defined(__SSE2__)
  if (stream) _mm_sfence();  // make the non-temporal stores visible before the op returns
#endif
}

// A dense row of the max gradient: g on the features whose argmax is frame t, zero elsewhere.
// Branch-free, so at -O3 it is an int compare and a blend per vector, in L1.
template <typename scalar_t>
void select_max_row(scalar_t* __restrict o, const int32_t* __restrict am,
                    const scalar_t* __restrict g, int32_t t, int64_t D) {
  for (int64_t i = 0; i < D; ++i) o[i] = pick(am[i] == t, g[i], scalar_t(0));
}

// meanmax: the clip's mean gradient (rounded) everywhere, and mean + max gradient (added in
// acc_t, rounded once) on the features whose argmax is frame t.
template <typename scalar_t, typename acc_t>
void select_meanmax_row(scalar_t* __restrict o, const int32_t* __restrict am,
                        const scalar_t* __restrict g, const acc_t* __restrict mean,
                        const scalar_t* __restrict mean_rounded, int32_t t, int64_t D) {
  for (int64_t i = 0; i < D; ++i)
    o[i] = pick(am[i] == t, static_cast<scalar_t>(mean[i] + static_cast<acc_t>(g[i])),
                mean_rounded[i]);
}

template <typename scalar_t>
void backward_cpu_impl(const at::Tensor& g, const at::Tensor& len, const at::Tensor& argmax,
                       PoolMode mode, at::Tensor& gx, bool zeroed, bool stream_rows,
                       bool stream_bulk) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t B = gx.size(0), T = gx.size(1), D = gx.size(2);
  const int64_t gw = g.size(1);  // D, or 2D for meanmax: [mean part | max part]
  const scalar_t* gp = g.const_data_ptr<scalar_t>();
  const int64_t* lp = len.defined() ? len.const_data_ptr<int64_t>() : nullptr;
  const bool with_max = has_argmax(mode);
  const bool with_mean = mode != PoolMode::Max;  // mean, sum, meanmax: a dense row per clip
  const int32_t* ap = with_max ? argmax.const_data_ptr<int32_t>() : nullptr;
  scalar_t* out = gx.mutable_data_ptr<scalar_t>();
  const int64_t grain = std::max<int64_t>(1, 32768 / std::max<int64_t>(1, D));
  const size_t row_bytes = static_cast<size_t>(D) * sizeof(scalar_t);

  // One task per (b, t) row of grad_x: every element is written exactly once. A row is built
  // in a small buffer and then stored in one pass. For mean / sum the buffer holds the clip's
  // gradient row, the same for all its valid frames. For max it is zero but for the features
  // whose argmax is this frame, selected by a vectorised compare of the argmax row (meanmax:
  // the mean row, plus the max gradient there). Only max on zero pages with long clips, where
  // a frame holds few argmax features, buckets the features by argmax once per clip and
  // scatters them (bench/NOTES.md, s21: the buckets' read-modify-write chains cost ~3 ns per
  // feature, more than the compare, wherever the row is stored whole anyway).
  at::parallel_for(0, B * T, grain, [&](int64_t begin, int64_t end) {
    std::vector<scalar_t> row(D, scalar_t(0));
    std::vector<acc_t> mean_row;  // meanmax: the unrounded mean gradient of the clip
    // max: the features whose argmax is frame t are feature[first[t] : first[t + 1]]; sized
    // only for a clip that takes the buckets, by its L (not T: a task of a long-T, small-D
    // gradient would otherwise zero 16 T bytes it never reads, per thread)
    std::vector<int64_t> first, fill_at, feature;
    if (mode == PoolMode::MeanMax) mean_row.resize(D);
    std::vector<scalar_t> selected(with_max ? D : 0);  // the max / meanmax row being stored
    int64_t row_of = -1;  // the clip `row` / the buckets were built for
    bool buckets = false;  // this clip's frames are scattered from buckets
    for (int64_t r = begin; r < end; ++r) {
      const int64_t b = r / T, t = r % T;
      const int64_t L = clamped_length(lp, b, T);
      char* dst = reinterpret_cast<char*>(out + r * D);
      const scalar_t* src = gp + b * gw;
      const scalar_t* src_max = mode == PoolMode::MeanMax ? src + D : src;
      if (t >= L) {
        // the clip's padding frames from t on, up to the end of this task
        const int64_t last = std::min(end, b * T + T);
        if (!zeroed) zero_rows(dst, static_cast<size_t>(last - r) * row_bytes, stream_bulk);
        r = last - 1;
        continue;
      }
      if (row_of != b) {
        // A frame of an L-frame clip holds D / L argmax features on average: scatter them
        // where that is below one per 4 cache lines (the rule below, per frame).
        buckets = zeroed && !with_mean && D <= L * static_cast<int64_t>(row_bytes / 256);
        if (buckets) {
          const int32_t* am = ap + b * D;
          first.assign(static_cast<size_t>(L) + 1, int64_t(0));
          fill_at.resize(static_cast<size_t>(L));
          feature.resize(static_cast<size_t>(D));
          for (int64_t i = 0; i < D; ++i)
            if (am[i] >= 0 && am[i] < L) ++first[am[i] + 1];
          for (int64_t k = 0; k < L; ++k) first[k + 1] += first[k];
          std::copy(first.begin(), first.end() - 1, fill_at.begin());
          for (int64_t i = 0; i < D; ++i)
            if (am[i] >= 0 && am[i] < L) feature[fill_at[am[i]]++] = i;
        }
        if (mode == PoolMode::Mean || mode == PoolMode::MeanMax) {
          const acc_t denom = static_cast<acc_t>(L);
          for (int64_t i = 0; i < D; ++i) {
            const acc_t v = static_cast<acc_t>(src[i]) / denom;
            row[i] = static_cast<scalar_t>(v);
            if (mode == PoolMode::MeanMax) mean_row[i] = v;
          }
        } else if (mode == PoolMode::Sum) {
          std::copy(src, src + D, row.begin());
        }
        row_of = b;
      }
      if (!with_max) {
        // mean / sum: the clip's valid frames from t on, up to the end of this task, all
        // hold this row
        const int64_t last = std::min(end, b * T + L);
        const char* src_row = reinterpret_cast<const char*>(row.data());
        copy_row(dst, src_row, row_bytes, stream_bulk);
        replicate_row(dst, src_row, row_bytes, last - r, stream_bulk);
        r = last - 1;
        continue;
      }
      if (!buckets) {
        const int32_t* am = ap + b * D;
        if (with_mean)
          select_meanmax_row<scalar_t, acc_t>(selected.data(), am, src_max, mean_row.data(),
                                              row.data(), static_cast<int32_t>(t), D);
        else
          select_max_row<scalar_t>(selected.data(), am, src_max, static_cast<int32_t>(t), D);
        copy_row(dst, reinterpret_cast<const char*>(selected.data()), row_bytes, stream_rows);
        continue;
      }
      // max on zero pages: a frame that is the argmax of few features gets only those stores.
      // Each scattered store costs its cache line twice (read for ownership, write back) where
      // the streamed row costs every line once, so scattering pays below ~1 feature in 4 lines
      // (measured at 256x32x2048, ~128 features per 8 KiB row: scattering was slower).
      if (static_cast<size_t>(first[t + 1] - first[t]) * 256 <= row_bytes) {
        scalar_t* out_row = out + r * D;
        for (int64_t k = first[t]; k < first[t + 1]; ++k) out_row[feature[k]] = src_max[feature[k]];
        continue;
      }
      for (int64_t k = first[t]; k < first[t + 1]; ++k) row[feature[k]] = src_max[feature[k]];
      copy_row(dst, reinterpret_cast<const char*>(row.data()), row_bytes, stream_rows);
      for (int64_t k = first[t]; k < first[t + 1]; ++k) row[feature[k]] = scalar_t(0);
    }
    stream_fence(stream_rows || stream_bulk);
  });
}

}  // namespace

bool cpu_grad_on_zero_pages(size_t nbytes) {
#ifdef DTL_FAST_HAVE_ZERO_PAGES
  // A size the cache takes is the cache's (new_grad_x asks it first); a bad cache setting,
  // which every backward raises, caches nothing here.
  const MibSetting& s = grad_cache_setting();
  const bool cached = cacheable(nbytes, s.bad.empty() ? s.bytes : 0) && own_pages_allowed();
  return nbytes >= kZeroPagesMinBytes && zero_pages_enabled() && !cached;
#else
  (void)nbytes;
  return false;
#endif
}

bool cpu_grad_from_cache(size_t nbytes) {
  const size_t cap = grad_cache_cap();  // a bad setting raises on every platform
#ifdef DTL_FAST_HAVE_ZERO_PAGES
  return cacheable(nbytes, cap) && own_pages_allowed();
#else
  (void)nbytes;
  (void)cap;
  return false;
#endif
}

CpuGradCacheStats cpu_grad_cache_stats() {
  CpuGradCacheStats st;
  st.cap_bytes = grad_cache_cap();
#ifdef DTL_FAST_HAVE_ZERO_PAGES
  for (const size_t pool : {size_t(0), kZeroPagesMinBytes}) {
    const auto cached = grad_cache(pool).stats();
    st.cached_bytes += cached.first;
    st.blocks += cached.second;
  }
#endif
  return st;
}

CpuGradOrigins cpu_grad_origins() {
  CpuGradOrigins o;
  static constexpr const char* kNames[] = {"none", "torch", "mapped", "cache"};
  o.last = kNames[static_cast<int>(t_last_origin)];
  o.torch = g_origin_counts[static_cast<int>(GradOrigin::Torch)].load(std::memory_order_relaxed);
  o.mapped = g_origin_counts[static_cast<int>(GradOrigin::Mapped)].load(std::memory_order_relaxed);
  o.cache = g_origin_counts[static_cast<int>(GradOrigin::Cache)].load(std::memory_order_relaxed);
  return o;
}

size_t cpu_grad_cache_empty() {
#ifdef DTL_FAST_HAVE_ZERO_PAGES
  return grad_cache(0).empty() + grad_cache(kZeroPagesMinBytes).empty();
#else
  return 0;
#endif
}

CpuNtStoreRule cpu_nt_store_rule() {
  CpuNtStoreRule r;
  r.llc_bytes = last_level_cache_bytes();
  const MibSetting& s = nt_store_setting();
  TORCH_CHECK_VALUE(s.bad.empty(),
                    "DTL_FAST_CPU_NT_STORE_MIN_MB must be a whole number of MiB in [0, 1048576] "
                    "(0 streams every gradient), got '", s.bad, "'");
#if !defined(__SSE2__)
  // no non-temporal stores in this build: nothing streams (the bulk rows keep their memcpy)
  r.min_bytes = std::numeric_limits<size_t>::max();
  r.source = "never (no non-temporal stores in this build)";
#else
  if (s.set) {
    r.min_bytes = s.bytes;
    r.source = "DTL_FAST_CPU_NT_STORE_MIN_MB";
  } else if (r.llc_bytes > 0) {
    r.min_bytes = r.llc_bytes / 2;
    r.source = "half the last-level cache";
  } else {
    r.min_bytes = kStreamingFallbackBytes;
    r.source = "default (cache size unknown)";
  }
#endif
  return r;
}

std::tuple<at::Tensor, at::Tensor> frame_pool_cpu(const at::Tensor& x_in,
                                                  const c10::optional<at::Tensor>& lengths,
                                                  c10::string_view mode_str, bool with_argmax) {
  const PoolMode mode = parse_pool_mode(mode_str);
  const at::Tensor len = checked_lengths(x_in, lengths);
  TORCH_CHECK_VALUE(x_in.is_cpu(), "frame_pool (CPU kernel): x must be a CPU tensor, got ",
                    x_in.device());
  // The kernel walks features with unit stride; any other layout is copied once.
  const at::Tensor x = x_in.stride(2) == 1 ? x_in : x_in.contiguous();
  const int64_t B = x.size(0), D = x.size(2);
  at::Tensor out = at::empty({B, out_width(D, mode)}, x.options());
  at::Tensor argmax = has_argmax(mode) && with_argmax
                          ? at::empty({B, D}, x.options().dtype(at::kInt))
                          : at::empty({0}, x.options().dtype(at::kInt));
  if (out.numel() == 0) return {out, argmax};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "frame_pool_cpu",
                                  [&] { forward_cpu_impl<scalar_t>(x, len, mode, out, argmax); });
  return {out, argmax};
}

at::Tensor frame_pool_backward_cpu(const at::Tensor& grad_out,
                                   const c10::optional<at::Tensor>& lengths,
                                   const at::Tensor& argmax, int64_t T, c10::string_view mode_str) {
  const PoolMode mode = parse_pool_mode(mode_str, "frame_pool_backward");
  const at::Tensor len = checked_backward_inputs(grad_out, lengths, argmax, T, mode);
  TORCH_CHECK_VALUE(grad_out.is_cpu(),
                    "frame_pool_backward (CPU kernel): grad_out must be a CPU tensor, got ",
                    grad_out.device());
  const at::Tensor g = grad_out.contiguous();
  const at::Tensor am = has_argmax(mode) ? argmax.contiguous() : argmax;
  const int64_t D = mode == PoolMode::MeanMax ? g.size(1) / 2 : g.size(1);
  const size_t nbytes = static_cast<size_t>(g.size(0)) * static_cast<size_t>(T) *
                        static_cast<size_t>(D) * g.element_size();
  const size_t nt_min = cpu_nt_store_rule().min_bytes;  // first: raises on a bad setting
  const bool stream_rows = nbytes >= nt_min;
  const bool stream_bulk = nbytes / 2 >= nt_min;  // from the whole last-level cache
  bool zeroed = false;
  at::Tensor gx = new_grad_x(g, T, D, zeroed);
  if (gx.numel() == 0) return gx;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, g.scalar_type(),
                                  "frame_pool_backward_cpu",
                                  [&] {
                                    backward_cpu_impl<scalar_t>(g, len, am, mode, gx, zeroed,
                                                                stream_rows, stream_bulk);
                                  });
  return gx;
}

}  // namespace dtl_fast

TORCH_LIBRARY(dtl_fast, m) {
  m.def("frame_pool(Tensor x, Tensor? lengths, str mode, bool with_argmax=True) -> "
        "(Tensor, Tensor)",
        {at::Tag::pt2_compliant_tag});
  m.def(
      "frame_pool_backward(Tensor grad_out, Tensor? lengths, Tensor argmax, SymInt T, str mode) "
      "-> Tensor",
      {at::Tag::pt2_compliant_tag});
}

TORCH_LIBRARY_IMPL(dtl_fast, CPU, m) {
  m.impl("frame_pool", &dtl_fast::frame_pool_cpu);
  m.impl("frame_pool_backward", &dtl_fast::frame_pool_backward_cpu);
}
