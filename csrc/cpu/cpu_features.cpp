#include "cpu_features.h"

#include <cstdlib>

#include "../checks.h"

namespace rag_engine {

const char* isa_name(Isa isa) {
  switch (isa) {
    case Isa::kScalar: return "scalar";
    case Isa::kAvx2: return "avx2";
    case Isa::kAvx512: return "avx512";
  }
  return "unknown";
}

// Probed once: every op call asks for its default path.
const std::vector<Isa>& supported_isas() {
  static const std::vector<Isa> isas = [] {
    std::vector<Isa> out{Isa::kScalar};
#if defined(__x86_64__) || defined(_M_X64)
    __builtin_cpu_init();
    const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
                      __builtin_cpu_supports("f16c");
    if (avx2) out.push_back(Isa::kAvx2);
    if (avx2 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
        __builtin_cpu_supports("avx512vl"))
      out.push_back(Isa::kAvx512);
#endif
    return out;
  }();
  return isas;
}

static bool is_supported(Isa isa) {
  for (Isa s : supported_isas())
    if (s == isa) return true;
  return false;
}

Isa parse_isa(const char* op, const std::string& name) {
  if (name.empty() || name == "auto") return default_isa();
  for (Isa cand : {Isa::kScalar, Isa::kAvx2, Isa::kAvx512}) {
    if (name == isa_name(cand)) {
      RAG_CHECK(op, is_supported(cand), "ISA path '", name, "' is not supported by this CPU");
      return cand;
    }
  }
  RAG_CHECK(op, false, "unknown ISA path '", name, "' (expected one of scalar, avx2, avx512, auto)");
  return Isa::kScalar;
}

Isa default_isa() {
  const char* env = std::getenv("RAG_ENGINE_ISA");
  if (env != nullptr && *env != '\0' && std::string(env) != "auto") return parse_isa("RAG_ENGINE_ISA", env);
  return supported_isas().back();
}

}  // namespace rag_engine
