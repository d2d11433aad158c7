// rag_engine._C: one thin function per op. Arrays come in through the buffer
// protocol (numpy, or torch CPU tensors via numpy views: no copies), are
// checked here, and the GIL is released while the kernel runs.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <string>

#include "checks.h"
#include "cpu/cpu_features.h"
#include "cpu/topk_ip.h"

namespace py = pybind11;
using namespace rag_engine;

namespace {

bool c_contiguous(const py::array& a) {
  return (a.flags() & py::array::c_style) != 0;
}

void check_array(const char* op, const char* name, const py::array& a, int ndim, char kind,
                 py::ssize_t itemsize, const char* expected_dtype) {
  if (a.dtype().kind() != kind || a.itemsize() != itemsize)
    throw py::type_error(cat_message(op, name, " must have dtype ", expected_dtype, ", got ",
                                     std::string(py::str(a.dtype()))));
  RAG_CHECK(op, a.ndim() == ndim, name, " must be ", ndim, "-D, got ", a.ndim(), "-D");
  RAG_CHECK(op, c_contiguous(a), name, " must be C-contiguous");
}

DType parse_dtype(const std::string& s) {
  if (s == "fp32") return DType::kF32;
  if (s == "bf16") return DType::kBF16;
  if (s == "fp16") return DType::kF16;
  if (s == "int8") return DType::kI8;
  throw py::type_error(cat_message("topk_ip", "unknown corpus dtype '", s,
                                   "' (expected fp32, bf16, fp16 or int8)"));
}

py::tuple topk_ip(const py::array& queries, const py::array& corpus, const std::string& dtype_name,
                  const py::object& scales_obj, int64_t k, const py::object& allow_obj,
                  int threads, const std::string& isa_name_arg) {
  constexpr const char* op = "topk_ip";
  const DType dtype = parse_dtype(dtype_name);
  check_array(op, "queries", queries, 2, 'f', 4, "float32");
  switch (dtype) {
    case DType::kF32: check_array(op, "corpus", corpus, 2, 'f', 4, "float32"); break;
    case DType::kBF16: check_array(op, "corpus", corpus, 2, 'u', 2, "uint16 (bfloat16 bits)"); break;
    case DType::kF16: check_array(op, "corpus", corpus, 2, 'f', 2, "float16"); break;
    case DType::kI8: check_array(op, "corpus", corpus, 2, 'i', 1, "int8"); break;
  }
  const int64_t nq = queries.shape(0), d = queries.shape(1), n = corpus.shape(0);
  RAG_CHECK(op, corpus.shape(1) == d, "corpus has D=", corpus.shape(1), " but queries have D=", d);
  RAG_CHECK(op, d > 0, "D must be > 0");
  RAG_CHECK(op, n > 0, "corpus is empty (N=0)");
  RAG_CHECK(op, k > 0, "k must be > 0, got ", k);

  const float* scales = nullptr;
  py::array scales_arr;
  if (dtype == DType::kI8) {
    RAG_CHECK(op, !scales_obj.is_none(), "int8 corpus needs per-row float32 scales");
    scales_arr = py::reinterpret_borrow<py::array>(scales_obj);
    check_array(op, "scales", scales_arr, 1, 'f', 4, "float32");
    RAG_CHECK(op, scales_arr.shape(0) == n, "scales has ", scales_arr.shape(0), " rows, corpus has ", n);
    scales = static_cast<const float*>(scales_arr.data());
  } else {
    RAG_CHECK(op, scales_obj.is_none(), "scales are only used with an int8 corpus");
  }

  const uint8_t* allow = nullptr;
  py::array allow_arr;
  if (!allow_obj.is_none()) {
    allow_arr = py::reinterpret_borrow<py::array>(allow_obj);
    check_array(op, "ids_filter bitmap", allow_arr, 1, 'u', 1, "uint8");
    RAG_CHECK(op, allow_arr.shape(0) == (n + 7) / 8, "ids_filter bitmap must have ceil(N/8)=",
              (n + 7) / 8, " bytes, got ", allow_arr.shape(0));
    allow = static_cast<const uint8_t*>(allow_arr.data());
  }

  const int64_t kout = std::min(k, n);
  py::array_t<float> out_scores({nq, kout});
  py::array_t<int64_t> out_ids({nq, kout});

  TopkIpArgs args;
  args.queries = static_cast<const float*>(queries.data());
  args.nq = nq;
  args.d = d;
  args.corpus = corpus.data();
  args.dtype = dtype;
  args.scales = scales;
  args.n = n;
  args.k = k;
  args.allow = allow;
  args.threads = threads;
  args.isa = parse_isa(op, isa_name_arg);
  args.out_scores = out_scores.mutable_data();
  args.out_ids = out_ids.mutable_data();

  int64_t bad = -1;
  if (nq > 0) {
    py::gil_scoped_release release;
    bad = topk_ip_cpu(args);
  }
  RAG_CHECK(op, bad < 0, "corpus row ", bad,
            " gives a non-finite score (NaN/Inf in the corpus, or float32 overflow)");
  return py::make_tuple(out_scores, out_ids);
}

std::vector<std::string> isa_list() {
  std::vector<std::string> out;
  for (Isa i : supported_isas()) out.emplace_back(isa_name(i));
  return out;
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "rag-engine CPU kernels";
  m.def("topk_ip", &topk_ip, py::arg("queries"), py::arg("corpus"), py::arg("dtype"),
        py::arg("scales"), py::arg("k"), py::arg("allow"), py::arg("threads") = 0,
        py::arg("isa") = "",
        "Fused inner-product top-K. queries [Q, D] float32, corpus [N, D] of dtype "
        "(fp32 float32 | bf16 uint16 bits | fp16 float16 | int8 int8 with scales [N] float32), "
        "allow: optional uint8 bitmap of ceil(N/8) bytes (bit i LSB-first = row i allowed). "
        "Returns (scores [Q, min(k, N)] float32, ids int64), score-descending, ties by lower id; "
        "rows left unfilled by the filter get score -inf and id -1.");
  m.def("supported_isas", &isa_list, "ISA paths this CPU can run, weakest first.");
  m.def("default_isa", []() { return std::string(isa_name(default_isa())); },
        "ISA path used when none is forced (RAG_ENGINE_ISA or the best supported).");
}
