// Shared declarations of the masked temporal frame-pooling op.
//
// Schemas (csrc/frame_pool.cpp registers them in the `dtl_fast` namespace):
//   frame_pool(Tensor x, Tensor? lengths, str mode) -> (Tensor out, Tensor argmax)
//     x       [B, T, D] float32 / float64 / float16 / bfloat16, any strides
//     lengths [B] any integer dtype, on x's device or on the CPU, or None (all T frames)
//     out     [B, D], x's dtype; reduction over frames t < lengths[b] only
//     argmax  [B, D] int32 frame index of the first maximum (mode "max"; -1 for an
//             empty row), an empty int32 tensor for the other modes
//   frame_pool_backward(Tensor grad_out, Tensor? lengths, Tensor argmax, SymInt T,
//                       str mode) -> Tensor grad_x
//     grad_x  [B, T, D] contiguous, grad_out's dtype; every element written exactly once
//             (padded frames and empty rows get 0)
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Optional.h>
#include <c10/util/string_view.h>

#include <tuple>

namespace dtl_fast {

enum class PoolMode : int { Mean = 0, Max = 1, Sum = 2 };

// Parses "mean" / "max" / "sum"; anything else is a ValueError naming `mode`.
PoolMode parse_pool_mode(c10::string_view mode);

// Checks x (rank, dtype) and lengths (rank, size, integer dtype, device, every value in
// [0, T]) and returns lengths as a contiguous int64 tensor on x's device, or an undefined
// tensor when lengths is None. Bad input is a ValueError / RuntimeError naming the argument.
// Reading lengths that live on a GPU for the range check synchronises with that GPU;
// check_values=false skips the range check (for CUDA graph capture, where a synchronisation
// is illegal; the kernels clamp every length into [0, T] regardless).
at::Tensor checked_lengths(const at::Tensor& x, const c10::optional<at::Tensor>& lengths,
                           bool check_values = true);

// Checks grad_out / argmax / T for the backward op and returns lengths as checked_lengths
// does (against a [B, T, D] input); the range of lengths is re-checked only when they are on
// the CPU (no GPU synchronisation in the backward pass).
at::Tensor checked_backward_inputs(const at::Tensor& grad_out,
                                   const c10::optional<at::Tensor>& lengths,
                                   const at::Tensor& argmax, int64_t T, PoolMode mode);

// The instruction set the CPU forward kernel runs with: "avx2" or "baseline" (x86-64 SSE2 or
// another architecture). DTL_FAST_DISABLE_AVX2=1 forces "baseline".
const char* cpu_forward_isa();

std::tuple<at::Tensor, at::Tensor> frame_pool_cpu(const at::Tensor& x,
                                                  const c10::optional<at::Tensor>& lengths,
                                                  c10::string_view mode);
at::Tensor frame_pool_backward_cpu(const at::Tensor& grad_out,
                                   const c10::optional<at::Tensor>& lengths,
                                   const at::Tensor& argmax, int64_t T, c10::string_view mode);

}  // namespace dtl_fast
