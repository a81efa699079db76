// The Python module dtl_fast._C. Importing it loads the shared library, whose static
// TORCH_LIBRARY blocks register torch.ops.dtl_fast.*; the module itself says what was built
// and carries the few host-side controls that are not tensor ops (the GPU length-error check,
// the CUDA launch constants a sweep sets).
#include <Python.h>

#include <c10/util/Exception.h>

#include <vector>

#include "frame_pool.h"

namespace {

// C++ exceptions must not cross into Python: ValueError stays ValueError.
template <typename F>
PyObject* translate(F&& f) {
  try {
    return f();
  } catch (const c10::ValueError& e) {
    PyErr_SetString(PyExc_ValueError, e.what_without_backtrace());
  } catch (const c10::Error& e) {
    PyErr_SetString(PyExc_RuntimeError, e.what_without_backtrace());
  } catch (const std::exception& e) {
    PyErr_SetString(PyExc_RuntimeError, e.what());
  }
  return nullptr;
}

PyObject* cpu_isa(PyObject*, PyObject*) {
  return PyUnicode_FromString(dtl_fast::cpu_forward_isa());
}

PyObject* cpu_grad_on_zero_pages(PyObject*, PyObject* arg) {
  const unsigned long long n = PyLong_AsUnsignedLongLong(arg);
  if (PyErr_Occurred()) return nullptr;
  return PyBool_FromLong(dtl_fast::cpu_grad_on_zero_pages(static_cast<size_t>(n)));
}

PyObject* cpu_grad_from_cache(PyObject*, PyObject* arg) {
  const unsigned long long n = PyLong_AsUnsignedLongLong(arg);
  if (PyErr_Occurred()) return nullptr;
  return translate([&]() -> PyObject* {
    return PyBool_FromLong(dtl_fast::cpu_grad_from_cache(static_cast<size_t>(n)));
  });
}

PyObject* cpu_grad_cache_info(PyObject*, PyObject*) {
  return translate([&]() -> PyObject* {
    const dtl_fast::CpuGradCacheStats st = dtl_fast::cpu_grad_cache_stats();
    return Py_BuildValue("(KKK)", static_cast<unsigned long long>(st.cached_bytes),
                         static_cast<unsigned long long>(st.blocks),
                         static_cast<unsigned long long>(st.cap_bytes));
  });
}

PyObject* cpu_nt_store_rule(PyObject*, PyObject*) {
  return translate([&]() -> PyObject* {
    const dtl_fast::CpuNtStoreRule r = dtl_fast::cpu_nt_store_rule();
    return Py_BuildValue("(KKs)", static_cast<unsigned long long>(r.min_bytes),
                         static_cast<unsigned long long>(r.llc_bytes), r.source);
  });
}

PyObject* cpu_grad_origins(PyObject*, PyObject*) {
  const dtl_fast::CpuGradOrigins o = dtl_fast::cpu_grad_origins();
  return Py_BuildValue("(sKKK)", o.last, static_cast<unsigned long long>(o.torch),
                       static_cast<unsigned long long>(o.mapped),
                       static_cast<unsigned long long>(o.cache));
}

PyObject* cpu_grad_cache_empty(PyObject*, PyObject*) {
  return translate([&]() -> PyObject* {
    return PyLong_FromUnsignedLongLong(dtl_fast::cpu_grad_cache_empty());
  });
}

// Lets other Python threads run while this one waits on the GPU (as torch.cuda.synchronize
// does); the GIL is taken back before an exception reaches translate().
struct GilReleased {
  PyThreadState* state = PyEval_SaveThread();
  ~GilReleased() { PyEval_RestoreThread(state); }
};

PyObject* check_errors(PyObject*, PyObject* args) {
  int sync = 1;
  if (!PyArg_ParseTuple(args, "|p", &sync)) return nullptr;
  return translate([&]() -> PyObject* {
    {
      const GilReleased released;
      dtl_fast::check_device_errors(sync != 0);
    }
    Py_RETURN_NONE;
  });
}

PyObject* cuda_kernels_run_on(PyObject*, PyObject* arg) {
  const long long device = PyLong_AsLongLong(arg);
  if (PyErr_Occurred()) return nullptr;
  return translate([&]() -> PyObject* {
    return PyBool_FromLong(dtl_fast::cuda_kernels_run_on(device));
  });
}

PyObject* config_tuple(const dtl_fast::CudaLaunchConfig& c) {
  return Py_BuildValue("(iiiiiiiii)", c.threads, c.max_tx, c.split_waves, c.split_phi_pct,
                       c.bwd_frames, c.bwd_waves, c.fwd_unroll, c.fwd_pipeline,
                       c.fwd_l2_evict_first);
}

// A Python sequence of ints as int64s (false with a Python error set otherwise).
bool int64_list(PyObject* seq, const char* what, std::vector<int64_t>& out) {
  const Py_ssize_t n = PySequence_Check(seq) ? PySequence_Size(seq) : -1;
  if (n < 0) {
    PyErr_Format(PyExc_TypeError, "%s must be a sequence of ints", what);
    return false;
  }
  out.clear();
  for (Py_ssize_t i = 0; i < n; ++i) {
    PyObject* item = PySequence_GetItem(seq, i);
    if (item == nullptr) return false;
    const long long v = PyLong_AsLongLong(item);
    Py_DECREF(item);
    if (v == -1 && PyErr_Occurred()) return false;
    out.push_back(static_cast<int64_t>(v));
  }
  return true;
}

PyObject* span_bytes(PyObject*, PyObject* args) {
  PyObject *sizes_obj, *strides_obj;
  long long element_size;
  if (!PyArg_ParseTuple(args, "OOL", &sizes_obj, &strides_obj, &element_size)) return nullptr;
  std::vector<int64_t> sizes, strides;
  if (!int64_list(sizes_obj, "sizes", sizes) || !int64_list(strides_obj, "strides", strides))
    return nullptr;
  return translate([&]() -> PyObject* {
    return PyLong_FromLongLong(dtl_fast::span_bytes(sizes, strides, element_size));
  });
}

PyObject* cuda_launch_config(PyObject*, PyObject*) {
  return config_tuple(dtl_fast::cuda_launch_config());
}

PyObject* set_cuda_launch_config(PyObject*, PyObject* args) {
  // fwd_unroll, fwd_pipeline and fwd_l2_evict_first are optional (their defaults when left
  // out): callers written for the six-, seven- or eight-field tuple keep working.
  dtl_fast::CudaLaunchConfig c;
  if (!PyArg_ParseTuple(args, "iiiiii|iii", &c.threads, &c.max_tx, &c.split_waves,
                        &c.split_phi_pct, &c.bwd_frames, &c.bwd_waves, &c.fwd_unroll,
                        &c.fwd_pipeline, &c.fwd_l2_evict_first))
    return nullptr;
  return translate([&]() -> PyObject* {
    const dtl_fast::CudaLaunchConfig old = dtl_fast::cuda_launch_config();
    dtl_fast::set_cuda_launch_config(c);
    return config_tuple(old);
  });
}

PyMethodDef dtl_fast_c_methods[] = {
    {"cpu_isa", cpu_isa, METH_NOARGS,
     "The instruction set of the CPU pooling kernel: 'avx2' or 'baseline'."},
    {"cpu_grad_on_zero_pages", cpu_grad_on_zero_pages, METH_O,
     "cpu_grad_on_zero_pages(nbytes) -> whether the CPU backward would put a gradient of "
     "nbytes on fresh zero pages of the op's own now (>= 32 MiB and not taken by the cache, "
     "Linux, glibc malloc, torch's default CPU allocator, DTL_FAST_DISABLE_ZERO_PAGES unset)."},
    {"cpu_grad_from_cache", cpu_grad_from_cache, METH_O,
     "cpu_grad_from_cache(nbytes) -> whether the CPU backward would take a gradient of nbytes "
     "from the op's cache of warm blocks now (nbytes >= 4 MiB, rounded to 2 MiB within "
     "DTL_FAST_CPU_GRAD_CACHE_MB, Linux, glibc malloc, torch's default CPU allocator)."},
    {"cpu_grad_cache_info", cpu_grad_cache_info, METH_NOARGS,
     "cpu_grad_cache_info() -> (cached_bytes, blocks, cap_bytes) of the CPU gradient cache "
     "(bytes and blocks of both pools; cap_bytes bounds each)."},
    {"cpu_nt_store_rule", cpu_nt_store_rule, METH_NOARGS,
     "cpu_nt_store_rule() -> (min_bytes, llc_bytes, source): the CPU backward writes with "
     "non-temporal stores the rows it stores one by one (max, meanmax) of a gradient of at "
     "least min_bytes, and the rows it writes in bulk (mean, sum, padding) of one of at least "
     "2 x min_bytes; min_bytes is DTL_FAST_CPU_NT_STORE_MIN_MB when set, else half the "
     "level-3 cache (llc_bytes, 0 when unknown), else 4 MiB; SIZE_MAX in a build without "
     "SSE2."},
    {"cpu_grad_cache_empty", cpu_grad_cache_empty, METH_NOARGS,
     "cpu_grad_cache_empty() -> bytes handed back to the system (every cached block)."},
    {"_cpu_grad_origins", cpu_grad_origins, METH_NOARGS,
     "_cpu_grad_origins() -> (last, torch, mapped, cache), internal: where this thread's "
     "latest CPU gradient of frame_pool's backward came from ('torch': torch's CPU allocator, "
     "'mapped': a fresh mapping of the op's own, 'cache': a warm block of its cache, 'none' "
     "before any), and how many came from each since the process started."},
    {"check_errors", check_errors, METH_VARARGS,
     "check_errors(sync=True): raise ValueError if a CUDA pooling kernel saw a length outside "
     "[0, T] since the last check (and clear the record); sync waits for the GPU first."},
    {"cuda_kernels_run_on", cuda_kernels_run_on, METH_O,
     "cuda_kernels_run_on(device_index) -> whether this build holds CUDA kernels GPU "
     "device_index can run (SASS for its architecture, or PTX the driver compiles); False "
     "without CUDA kernels. ValueError for an index outside [0, device count)."},
    {"span_bytes", span_bytes, METH_VARARGS,
     "span_bytes(sizes, strides, element_size) -> the bytes a tensor of these sizes and strides "
     "spans in memory (numel x element_size unless a stride repeats elements; 0 if empty): "
     "what the CUDA forward compares with the L2 for fwd_l2_evict_first. ValueError on "
     "mismatched lengths or a negative size."},
    {"cuda_launch_config", cuda_launch_config, METH_NOARGS,
     "(threads, max_tx, split_waves, split_phi_pct, bwd_frames, bwd_waves, fwd_unroll, "
     "fwd_pipeline, fwd_l2_evict_first) of the CUDA kernels."},
    {"set_cuda_launch_config", set_cuda_launch_config, METH_VARARGS,
     "set_cuda_launch_config(threads, max_tx, split_waves, split_phi_pct, bwd_frames, "
     "bwd_waves[, fwd_unroll=4[, fwd_pipeline=0[, fwd_l2_evict_first=0]]]) -> the previous "
     "tuple; ValueError names a bad field."},
    {nullptr, nullptr, 0, nullptr},
};

struct PyModuleDef dtl_fast_c_module = {
    PyModuleDef_HEAD_INIT,
    "_C",
    "dtl_fast C++/CUDA ops; importing this module registers torch.ops.dtl_fast.*",
    -1,
    dtl_fast_c_methods,
};

}  // namespace

PyMODINIT_FUNC PyInit__C(void) {
  PyObject* m = PyModule_Create(&dtl_fast_c_module);
  if (m == nullptr) return nullptr;
#ifdef DTL_FAST_WITH_CUDA
  const long with_cuda = 1;
#else
  const long with_cuda = 0;
#endif
  if (PyModule_AddIntConstant(m, "WITH_CUDA", with_cuda) != 0) {
    Py_DECREF(m);
    return nullptr;
  }
  return m;
}
