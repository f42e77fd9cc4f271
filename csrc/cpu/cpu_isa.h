// Which instruction set the CPU loops run with: the best the CPU can run, chosen at load
// time (or FUSEDACT_CPU_ISA=baseline|avx2|avx512, as ATEN_CPU_CAPABILITY does for ATen),
// changeable for testing every path (fusedact._C.set_cpu_isa).
#pragma once

#include <cstdint>
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

// How the CPU loops write their outputs: Auto takes non-temporal (streaming) stores for
// large outputs whose pages are in memory (stores.h says when); Streaming and
// Cached always or never take them, for testing both paths at any size
// (FUSEDACT_CPU_STORES=auto|streaming|cached at load time, fusedact._C.set_cpu_stores).
enum class CpuStores { Auto, Streaming, Cached };

CpuStores cpu_stores();
void set_cpu_stores(CpuStores mode);
std::string cpu_stores_name(CpuStores mode);
// Parses "auto", "streaming" or "cached"; false for any other name.
bool cpu_stores_from_name(const std::string& name, CpuStores& mode);
// Whether the pages Auto asks about (the middle and the last of `bytes` at p) are in memory.
bool cpu_pages_in(const void* p, int64_t bytes);

}  // namespace fusedact
