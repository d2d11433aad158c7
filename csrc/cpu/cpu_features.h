// Run-time CPU feature detection and the ISA paths the kernels can take.
//
// One build runs on any x86-64: each kernel is compiled once per ISA level in
// its own translation unit (scalar, AVX2+FMA+F16C, AVX-512F/BW/VL) and the
// path is picked at run time from cpuid. RAG_ENGINE_ISA=scalar|avx2|avx512
// (or the op's `isa` argument) forces a path, so tests cover every path the
// machine can run.
#pragma once

#include <string>
#include <vector>

namespace rag_engine {

enum class Isa : int { kScalar = 0, kAvx2 = 1, kAvx512 = 2 };

// Names in increasing order of capability: "scalar", "avx2", "avx512".
const char* isa_name(Isa isa);

// Every ISA path this CPU can run, weakest first (always includes scalar).
const std::vector<Isa>& supported_isas();

// Best supported path, or the one named by RAG_ENGINE_ISA.
Isa default_isa();

// Parses a name ("" or "auto" -> default_isa()); throws std::invalid_argument
// naming `op` if the name is unknown or the CPU cannot run that path.
Isa parse_isa(const char* op, const std::string& name);

}  // namespace rag_engine
