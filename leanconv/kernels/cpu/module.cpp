// The one Python module of leanconv's C++ CPU kernels: binds what every method's source registered
// (leanconv_cpu::Register in kernels.h) when the extension is imported.
#include "kernels.h"

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  for (auto bind : leanconv_cpu::binders()) bind(m);
}
