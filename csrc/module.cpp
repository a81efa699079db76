// The Python module dtl_fast._C. Importing it loads the shared library, whose static
// TORCH_LIBRARY blocks register torch.ops.dtl_fast.*; the module itself only says what was
// built.
#include <Python.h>

namespace dtl_fast {
const char* cpu_forward_isa();  // csrc/frame_pool.cpp
}

static PyObject* cpu_isa(PyObject*, PyObject*) {
  return PyUnicode_FromString(dtl_fast::cpu_forward_isa());
}

static PyMethodDef dtl_fast_c_methods[] = {
    {"cpu_isa", cpu_isa, METH_NOARGS,
     "The instruction set of the CPU pooling kernel: 'avx2' or 'baseline'."},
    {nullptr, nullptr, 0, nullptr},
};

static struct PyModuleDef dtl_fast_c_module = {
    PyModuleDef_HEAD_INIT,
    "_C",
    "dtl_fast C++/CUDA ops; importing this module registers torch.ops.dtl_fast.*",
    -1,
    dtl_fast_c_methods,
};

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
