// The Python module fusedact._C: loading it registers the ops; it also tells what the binary
// was built with, lets tests pick the CPU instruction set, and holds the functional API's
// fast path to the ops (_C.fast, fast_path.cpp).
#include <pybind11/pybind11.h>
#include <c10/util/Exception.h>
#include <torch/version.h>

#include "cpu/cpu_isa.h"

namespace py = pybind11;

namespace fusedact {
void register_fast_path(py::module& m);  // fast_path.cpp: _C.fast
}

PYBIND11_MODULE(_C, m) {
  m.def("build_info", [] {
    py::dict d;
    d["torch_version"] = TORCH_VERSION;
#ifdef FUSEDACT_WITH_CUDA
    d["cuda"] = true;
#else
    d["cuda"] = false;
#endif
    d["cpu_isa"] = fusedact::cpu_isa_name(fusedact::cpu_isa());
    py::list available;
    for (auto isa : fusedact::cpu_isas_available()) available.append(fusedact::cpu_isa_name(isa));
    d["cpu_isa_available"] = available;
    return d;
  });
  m.def("set_cpu_isa", [](const std::string& name) {
    fusedact::CpuIsa isa;
    TORCH_CHECK(fusedact::cpu_isa_from_name(name, isa),
                "set_cpu_isa: name must be 'avx512', 'avx2' or 'baseline', got '", name, "'");
    TORCH_CHECK(fusedact::set_cpu_isa(isa), "set_cpu_isa: this CPU cannot run ", name);
  });
  m.def("cpu_isa", [] { return fusedact::cpu_isa_name(fusedact::cpu_isa()); });
  m.def("set_cpu_stores", [](const std::string& name) {
    fusedact::CpuStores mode;
    TORCH_CHECK(fusedact::cpu_stores_from_name(name, mode),
                "set_cpu_stores: name must be 'auto', 'streaming' or 'cached', got '", name, "'");
    fusedact::set_cpu_stores(mode);
  });
  m.def("cpu_stores", [] { return fusedact::cpu_stores_name(fusedact::cpu_stores()); });
  // For tests of the Auto rule: whether the pages it asks about are in memory.
  m.def("cpu_pages_in", [](uintptr_t address, int64_t bytes) {
    return fusedact::cpu_pages_in(reinterpret_cast<const void*>(address), bytes);
  });
  fusedact::register_fast_path(m);
}
