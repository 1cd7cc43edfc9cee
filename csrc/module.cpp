// The Python module `qlora_kernels._native`: importing it loads this library, whose static
// initialisers register the `torch.ops.qlora_kernels.*` operators (see dequant_cpu.cpp).
// It defines no Python functions itself, so it needs only Python.h (no pybind11).
#include <Python.h>

static PyModuleDef native_module = {
    PyModuleDef_HEAD_INIT,
    "_native",
    "Native CPU kernels of qlora-kernels; the operators live in torch.ops.qlora_kernels.",
    -1,
    nullptr,
};

PyMODINIT_FUNC PyInit__native(void) {
  return PyModule_Create(&native_module);
}
