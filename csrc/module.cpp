// The Python module losa_deploy._C. Importing it registers every torch.ops.losa.* op (each source
// file adds its own ops with TORCH_LIBRARY_FRAGMENT) and exposes a few build and CPU queries.
#include <torch/extension.h>

#include "cpu/cpu_features.h"

namespace {

pybind11::dict build_info() {
  pybind11::dict info;
#ifdef LOSA_WITH_CUDA
  info["cuda"] = true;
#else
  info["cuda"] = false;
#endif
#ifdef _OPENMP
  info["openmp"] = true;
#else
  info["openmp"] = false;
#endif
  info["compiler"] = __VERSION__;
  return info;
}

pybind11::dict cpu_features() {
  pybind11::dict out;
  for (const auto& kv : losa::cpu::detect_features()) out[pybind11::str(kv.first)] = kv.second;
  return out;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "losa-deploy compiled kernels (ops live under torch.ops.losa)";
  m.def("build_info", &build_info, "How this extension was built.");
  m.def("cpu_features", &cpu_features, "Instruction-set extensions this CPU supports.");
}
