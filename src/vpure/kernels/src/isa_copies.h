// Compile one kernel implementation file once per instruction set, without making the
// whole module require it (a wheel must load on any x86-64):
//
//   #define VPURE_ISA_IMPL "block_match_impl.inc"
//   #include "isa_copies.h"      // -> namespaces base:: (baseline) and, on x86, avx2::
//
// Inside the .inc, VPURE_NS names the copy's namespace and VPURE_AVX2 is 1 in the AVX2
// copy (GCC does not define __AVX2__ under `#pragma GCC target`). Callers pick avx2:: at
// run time with vpure::cpu_has_avx2(), guarded by #ifdef VPURE_X86. No include guard: the
// header is meant to be included once per implementation file.
#ifndef VPURE_ISA_IMPL
#error "define VPURE_ISA_IMPL before including isa_copies.h"
#endif

#define VPURE_NS base
#define VPURE_AVX2 0
#include VPURE_ISA_IMPL
#undef VPURE_AVX2
#undef VPURE_NS

#ifdef VPURE_X86
#pragma GCC push_options
#pragma GCC target("avx2")
#define VPURE_NS avx2
#define VPURE_AVX2 1
#include VPURE_ISA_IMPL
#undef VPURE_AVX2
#undef VPURE_NS
#pragma GCC pop_options
#endif

#undef VPURE_ISA_IMPL
