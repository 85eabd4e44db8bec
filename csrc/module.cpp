// The Python module object of fastpeft._C.  The extension has no Python-level functions: importing it runs the
// static TORCH_LIBRARY_FRAGMENT / TORCH_LIBRARY_IMPL registrations in ext.cpp, after which its ops live in
// torch.ops.fastpeft.*.  Plain CPython API, so no pybind11 / torch Python headers are compiled.
#include <Python.h>

extern "C" {
PyMODINIT_FUNC PyInit__C(void) {
  static struct PyModuleDef module_def = {
      PyModuleDef_HEAD_INIT,
      "_C",                                                             // m_name
      "fastpeft C++/CUDA ops, registered in torch.ops.fastpeft.*",      // m_doc
      -1,                                                               // m_size
      nullptr,                                                          // m_methods
      nullptr,                                                          // m_slots
      nullptr,                                                          // m_traverse
      nullptr,                                                          // m_clear
      nullptr,                                                          // m_free
  };
  return PyModule_Create(&module_def);
}
}
