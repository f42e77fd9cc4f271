// The Python module fusedact._C: loading it registers the ops; it also tells what the binary
// was built with and lets tests pick the CPU instruction set.
#include <pybind11/pybind11.h>
#include <c10/util/Exception.h>
#include <torch/version.h>

#include "cpu/cpu_isa.h"


namespace py = pybind11;

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
    available.append("baseline");
    if (fusedact::cpu_supports_avx2()) available.append("avx2");
    d["cpu_isa_available"] = available;
    return d;
  });
  m.def("set_cpu_isa", [](const std::string& name) {
    TORCH_CHECK(name == "avx2" || name == "baseline",
                "set_cpu_isa: name must be 'avx2' or 'baseline', got '", name, "'");
    const auto isa = name == "avx2" ? fusedact::CpuIsa::Avx2 : fusedact::CpuIsa::Baseline;
    TORCH_CHECK(fusedact::set_cpu_isa(isa), "set_cpu_isa: this CPU cannot run ", name);
  });
  m.def("cpu_isa", [] { return fusedact::cpu_isa_name(fusedact::cpu_isa()); });
}
