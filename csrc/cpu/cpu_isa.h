// Which instruction set the CPU loops run with: the best the CPU can run, chosen at load
// time (or FUSEDACT_CPU_ISA=baseline|avx2|avx512, as ATEN_CPU_CAPABILITY does for ATen),
// changeable for testing every path (fusedact._C.set_cpu_isa).
#pragma once

#include <string>
#include <vector>

namespace fusedact {

enum class CpuIsa { Baseline, Avx2, Avx512 };

CpuIsa cpu_isa();
bool cpu_supports(CpuIsa isa);
// Returns false (and changes nothing) when the CPU cannot run `isa`.
bool set_cpu_isa(CpuIsa isa);
std::string cpu_isa_name(CpuIsa isa);
// Parses "baseline", "avx2" or "avx512"; false for any other name.
bool cpu_isa_from_name(const std::string& name, CpuIsa& isa);
// The instruction sets this CPU can run, from the least to the best.
std::vector<CpuIsa> cpu_isas_available();

}  // namespace fusedact
