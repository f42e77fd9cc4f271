// Which instruction set the CPU loops run with: chosen at load time from the CPU,
// changeable for testing both paths (fusedact._C.set_cpu_isa).
#pragma once

#include <string>

namespace fusedact {

enum class CpuIsa { Baseline, Avx2 };

CpuIsa cpu_isa();
bool cpu_supports_avx2();
// Returns false (and changes nothing) when the CPU cannot run `isa`.
bool set_cpu_isa(CpuIsa isa);
std::string cpu_isa_name(CpuIsa isa);

}  // namespace fusedact
