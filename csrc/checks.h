// Argument checks at the extension boundary.
//
// RAG_CHECK(op, cond, msg) throws std::invalid_argument (a Python ValueError
// through pybind11) whose text starts with the op's name, so a bad call says
// which function refused it and why. RAG_CHECK_TYPE does the same with
// pybind11::type_error (a Python TypeError) for wrong dtypes.
#pragma once

#include <sstream>
#include <stdexcept>
#include <string>

namespace rag_engine {

template <class... Args>
std::string cat_message(const char* op, Args&&... parts) {
  std::ostringstream os;
  os << op << ": ";
  (os << ... << parts);
  return os.str();
}

}  // namespace rag_engine

#define RAG_CHECK(op, cond, ...)                                              \
  do {                                                                        \
    if (!(cond)) throw std::invalid_argument(::rag_engine::cat_message(op, __VA_ARGS__)); \
  } while (0)
