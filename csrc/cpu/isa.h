// The instruction sets of the CPU loops: the target attributes each loop is compiled for,
// the run-time pick among them (FUSEDACT_CPU_ISA, set_cpu_isa) and run_chunk, which calls
// a loop's copy for the pick. Included by activations_cpu.cpp alone: it defines cpu_isa.h's
// instruction-set functions.
#pragma once

#include <atomic>
#include <cstdlib>
#include <string>
#include <type_traits>
#include <vector>

#include "cpu_isa.h"

namespace fusedact {

// ---- instruction set

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define FUSEDACT_X86_PATHS 1
// F16C (every AVX2 CPU has it): float16 <-> float, 8 at a time, as ATen's Vectorized<Half>.
#define FUSEDACT_TARGET_AVX2 __attribute__((target("avx2,fma,f16c")))
// AVX-512 with the 512-bit vectors (F for the arithmetic, BW for 16-bit lanes, DQ and VL
// for the conversions and masked tails): the ISA of ATen's own AVX512 kernels.
#define FUSEDACT_TARGET_AVX512 \
  __attribute__((target("avx512f,avx512bw,avx512dq,avx512vl,avx2,fma,f16c,prefer-vector-width=512")))
#endif

bool cpu_supports(CpuIsa isa) {
  switch (isa) {
    case CpuIsa::Baseline: return true;
#ifdef FUSEDACT_X86_PATHS
    case CpuIsa::Avx2: {
      static const bool has = [] {
        __builtin_cpu_init();
        return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
      }();
      return has;
    }
    case CpuIsa::Avx512: {
      // __builtin_cpu_supports also checks that the OS saves the 512-bit state.
      static const bool has = [] {
        __builtin_cpu_init();
        return cpu_supports(CpuIsa::Avx2) && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
               __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512vl");
      }();
      return has;
    }
#endif
    default: return false;
  }
}

std::vector<CpuIsa> cpu_isas_available() {
  std::vector<CpuIsa> out;
  for (CpuIsa isa : {CpuIsa::Baseline, CpuIsa::Avx2, CpuIsa::Avx512})
    if (cpu_supports(isa)) out.push_back(isa);
  return out;
}

std::string cpu_isa_name(CpuIsa isa) {
  switch (isa) {
    case CpuIsa::Avx2: return "avx2";
    case CpuIsa::Avx512: return "avx512";
    default: return "baseline";
  }
}

bool cpu_isa_from_name(const std::string& name, CpuIsa& isa) {
  for (CpuIsa candidate : {CpuIsa::Baseline, CpuIsa::Avx2, CpuIsa::Avx512})
    if (name == cpu_isa_name(candidate)) {
      isa = candidate;
      return true;
    }
  return false;
}

namespace {
// The best the CPU runs, unless FUSEDACT_CPU_ISA names one it can run (a name it cannot
// run, or an unknown one, is ignored: the library must load everywhere).
CpuIsa initial_isa() {
  CpuIsa isa = cpu_isas_available().back();
  if (const char* env = std::getenv("FUSEDACT_CPU_ISA")) {
    CpuIsa wanted;
    if (cpu_isa_from_name(env, wanted) && cpu_supports(wanted)) isa = wanted;
  }
  return isa;
}

std::atomic<int>& isa_slot() {
  static std::atomic<int> slot{static_cast<int>(initial_isa())};
  return slot;
}
}  // namespace

CpuIsa cpu_isa() { return static_cast<CpuIsa>(isa_slot().load(std::memory_order_relaxed)); }

bool set_cpu_isa(CpuIsa isa) {
  if (!cpu_supports(isa)) return false;
  isa_slot().store(static_cast<int>(isa));
  return true;
}

namespace {

#define FUSEDACT_ALWAYS_INLINE inline __attribute__((always_inline))
// For the per-element lambdas: GCC left some uninlined (the float16 loops of swish, SiLU
// and mish), and an uninlined one is compiled for the default target, without the
// caller's vector instructions.
#define FUSEDACT_LAMBDA_INLINE __attribute__((always_inline))

// Kernel::run<kVector> is always inlined into these, so its loops are compiled for each
// target; nothing from ATen is inlined there. kVector is the target's vector width in
// bytes (64 AVX-512, 32 AVX2, 0 baseline); nonzero, it says that the target has AVX2
// (the streaming stores' intrinsics), which AVX-512 includes.
#ifdef FUSEDACT_X86_PATHS
template <typename Kernel, typename... Args>
FUSEDACT_TARGET_AVX512 void run_avx512(Args... args) {
  Kernel::template run<64>(args...);
}
template <typename Kernel, typename... Args>
FUSEDACT_TARGET_AVX2 void run_avx2(Args... args) {
  Kernel::template run<32>(args...);
}
// A kernel's AVX2 copy with GCC's first instruction scheduler (off by default on x86),
// register pressure minded: it interleaves the independent vectors of a long dependency
// chain, which the core's scheduler then overlaps. Only for kernels that declare
// kScheduled (loops.h): it slowed others. Measurements: benchmarks/NOTES.md, "The
// backward's vectors interleaved".
#if defined(__GNUC__) && !defined(__clang__)
#define FUSEDACT_SCHEDULED __attribute__((optimize("schedule-insns", "sched-pressure")))
#else
#define FUSEDACT_SCHEDULED
#endif
template <typename Kernel, typename... Args>
FUSEDACT_TARGET_AVX2 FUSEDACT_SCHEDULED void run_avx2_scheduled(Args... args) {
  Kernel::template run<32>(args...);
}
#endif
// Whether Kernel asks for run_avx2_scheduled: its kScheduled, false where it has none.
template <class Kernel, class = void>
struct Scheduled : std::false_type {};
template <class Kernel>
struct Scheduled<Kernel, std::void_t<decltype(Kernel::kScheduled)>> : std::bool_constant<Kernel::kScheduled> {};

template <typename Kernel, typename... Args>
void run_baseline(Args... args) {
  Kernel::template run<0>(args...);
}
template <typename Kernel, typename... Args>
void run_chunk(Args... args) {
#ifdef FUSEDACT_X86_PATHS
  switch (cpu_isa()) {
    case CpuIsa::Avx512: return run_avx512<Kernel>(args...);
    case CpuIsa::Avx2:
      if constexpr (Scheduled<Kernel>::value) return run_avx2_scheduled<Kernel>(args...);
      return run_avx2<Kernel>(args...);
    default: break;
  }
#endif
  run_baseline<Kernel>(args...);
}

}  // namespace
}  // namespace fusedact
