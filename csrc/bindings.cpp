// rag_engine._C: one thin function per op. Arrays come in through the buffer
// protocol (numpy, or torch CPU tensors via numpy views: no copies), are
// checked here, and the GIL is released while the kernel runs.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cmath>
#include <limits>
#include <string>

#include "checks.h"
#include "cpu/cpu_features.h"
#include "cpu/fusion_softmax.h"
#include "cpu/rag_token_marg.h"
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
    throw py::type_error(cat_message(op, name, " must be ", expected_dtype, ", got ",
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

// --- fusion_softmax / fusion_softmax_gather -------------------------------

// Document storage from the array's own dtype (bf16 travels as uint16 bits).
DType doc_dtype(const char* op, const char* name, const py::array& a, bool allow_int8) {
  const char kind = a.dtype().kind();
  const py::ssize_t size = a.itemsize();
  if (kind == 'f' && size == 4) return DType::kF32;
  if (kind == 'u' && size == 2) return DType::kBF16;
  if (kind == 'f' && size == 2) return DType::kF16;
  if (allow_int8 && kind == 'i' && size == 1) return DType::kI8;
  throw py::type_error(cat_message(op, name, " must be float32, bfloat16 (uint16 bits) or float16",
                                   allow_int8 ? " or int8" : "", ", got ",
                                   std::string(py::str(a.dtype()))));
}

// h_in [B, D] float32 and the document rows (rank `ndim`, a storage dtype, contiguous).
FusionSoftmaxArgs fusion_args(const char* op, const py::array& h_in, const char* name,
                              const py::array& rows, int ndim, bool allow_int8) {
  check_array(op, "h_in", h_in, 2, 'f', 4, "float32");
  FusionSoftmaxArgs args;
  args.dtype = doc_dtype(op, name, rows, allow_int8);
  RAG_CHECK(op, rows.ndim() == ndim, name, " must be ", ndim, "-D, got ", rows.ndim(), "-D");
  RAG_CHECK(op, c_contiguous(rows), name, " must be C-contiguous");
  args.b = h_in.shape(0);
  args.d = h_in.shape(1);
  args.docs = rows.data();
  return args;
}

// Checks what both entry points share, runs the kernel, builds the outputs.
py::tuple run_fusion(const char* op, FusionSoftmaxArgs& args, const py::array& h_in,
                     const py::object& w_obj, const py::object& mask_obj, bool return_scores,
                     int threads, const std::string& isa) {
  const int64_t b = args.b, k = args.k, d = args.d;
  RAG_CHECK(op, k > 0, "K must be > 0 (at least one document slot per row), got K=", k);
  RAG_CHECK(op, d > 0, "D must be > 0");
  py::array w_arr, mask_arr;
  if (!w_obj.is_none()) {
    w_arr = py::reinterpret_borrow<py::array>(w_obj);
    check_array(op, "W_a", w_arr, 2, 'f', 4, "float32");
    RAG_CHECK(op, w_arr.shape(0) == d && w_arr.shape(1) == d, "W_a must be [D, D] = [", d, ", ", d,
              "], got [", w_arr.shape(0), ", ", w_arr.shape(1), "]");
    args.w = static_cast<const float*>(w_arr.data());
  }
  if (!mask_obj.is_none()) {
    mask_arr = py::reinterpret_borrow<py::array>(mask_obj);
    check_array(op, "mask", mask_arr, 2, 'b', 1, "bool");
    RAG_CHECK(op, mask_arr.shape(0) == b && mask_arr.shape(1) == k, "mask must be [B, K] = [", b,
              ", ", k, "], got [", mask_arr.shape(0), ", ", mask_arr.shape(1), "]");
    args.mask = static_cast<const uint8_t*>(mask_arr.data());
  }
  py::array_t<float> alpha({b, k}), h_aug({b, d});
  py::object scores = py::none();
  args.h_in = static_cast<const float*>(h_in.data());
  args.alpha = alpha.mutable_data();
  args.h_aug = h_aug.mutable_data();
  if (return_scores) {
    py::array_t<float> s({b, k});
    args.scores = s.mutable_data();
    scores = s;
  }
  args.threads = threads;
  args.isa = parse_isa(op, isa);
  int64_t bad = -1;
  if (b > 0) {
    py::gil_scoped_release release;
    bad = fusion_softmax_cpu(args);
  }
  RAG_CHECK(op, bad < 0, "document (b=", bad / k, ", k=", bad % k,
            ") gives a non-finite score (NaN/Inf in h_in, W_a or the document, or float32 overflow)");
  return py::make_tuple(alpha, h_aug, scores);
}

py::tuple fusion_softmax(const py::array& h_in, const py::array& docs, const py::object& w,
                         const py::object& mask, bool return_scores, int threads,
                         const std::string& isa) {
  constexpr const char* op = "fusion_softmax";
  FusionSoftmaxArgs args = fusion_args(op, h_in, "docs", docs, 3, false);
  args.k = docs.shape(1);
  RAG_CHECK(op, docs.shape(0) == args.b && docs.shape(2) == args.d, "docs must be [B, K, D] with B=",
            args.b, " and D=", args.d, " (from h_in), got [", docs.shape(0), ", ", docs.shape(1), ", ",
            docs.shape(2), "]");
  return run_fusion(op, args, h_in, w, mask, return_scores, threads, isa);
}

py::tuple fusion_softmax_gather(const py::array& h_in, const py::array& corpus,
                                const py::object& scales_obj, const py::array& ids,
                                const py::object& w, const py::object& mask, bool return_scores,
                                int threads, const std::string& isa) {
  constexpr const char* op = "fusion_softmax_gather";
  check_array(op, "ids", ids, 2, 'i', 8, "int64");
  FusionSoftmaxArgs args = fusion_args(op, h_in, "corpus", corpus, 2, true);
  args.k = ids.shape(1);
  const int64_t n = corpus.shape(0);
  RAG_CHECK(op, corpus.shape(1) == args.d, "corpus has D=", corpus.shape(1), " but h_in has D=", args.d);
  RAG_CHECK(op, ids.shape(0) == args.b, "ids must be [B, K] with B=", args.b, ", got ", ids.shape(0), " rows");
  py::array scales_arr;
  if (args.dtype == DType::kI8) {
    RAG_CHECK(op, !scales_obj.is_none(), "an int8 corpus needs per-row float32 scales");
    scales_arr = py::reinterpret_borrow<py::array>(scales_obj);
    check_array(op, "scales", scales_arr, 1, 'f', 4, "float32");
    RAG_CHECK(op, scales_arr.shape(0) == n, "scales has ", scales_arr.shape(0), " rows, corpus has ", n);
    args.scales = static_cast<const float*>(scales_arr.data());
  } else {
    RAG_CHECK(op, scales_obj.is_none(), "scales are only used with an int8 corpus");
  }
  args.ids = static_cast<const int64_t*>(ids.data());
  for (int64_t i = 0; i < args.b * args.k; ++i)
    RAG_CHECK(op, args.ids[i] >= -1 && args.ids[i] < n, "ids must lie in [0, N=", n,
              ") or be -1 (empty slot), got ", args.ids[i], " at (b=", i / args.k, ", k=", i % args.k, ")");
  return run_fusion(op, args, h_in, w, mask, return_scores, threads, isa);
}

// --- rag_token_marg / rag_token_sample ------------------------------------

RagTokenMargArgs marg_args(const char* op, const py::array& log_alpha, const py::array& logits,
                           int threads, const std::string& isa) {
  check_array(op, "log_alpha", log_alpha, 2, 'f', 4, "float32");
  check_array(op, "logits", logits, 3, 'f', 4, "float32");
  RagTokenMargArgs a;
  a.b = logits.shape(0);
  a.k = logits.shape(1);
  a.v = logits.shape(2);
  RAG_CHECK(op, a.k > 0, "K must be > 0 (at least one document per row), got K=", a.k);
  RAG_CHECK(op, a.v > 0, "V must be > 0, got V=", a.v);
  RAG_CHECK(op, log_alpha.shape(0) == a.b && log_alpha.shape(1) == a.k, "log_alpha must be [B, K] = [",
            a.b, ", ", a.k, "] (from logits), got [", log_alpha.shape(0), ", ", log_alpha.shape(1), "]");
  a.log_alpha = static_cast<const float*>(log_alpha.data());
  for (int64_t r = 0; r < a.b; ++r) {
    bool any = false;
    for (int64_t i = 0; i < a.k; ++i) {
      const float x = a.log_alpha[r * a.k + i];
      RAG_CHECK(op, !std::isnan(x) && x != std::numeric_limits<float>::infinity(),
                "log_alpha must be finite or -inf with a finite entry per row, got ", x, " at (b=", r,
                ", k=", i, ")");
      any = any || std::isfinite(x);
    }
    RAG_CHECK(op, any, "log_alpha must be finite or -inf with a finite entry per row, but row ", r,
              " is -inf everywhere (no document has weight)");
  }
  a.logits = static_cast<const float*>(logits.data());
  a.threads = threads;
  a.isa = parse_isa(op, isa);
  return a;
}

void check_marg_result(const char* op, int64_t bad, int64_t k) {
  RAG_CHECK(op, bad < 0, "logits row (b=", bad / k, ", k=", bad % k,
            ") contains NaN or +Inf, or has no finite value");
}

py::array_t<float> rag_token_marg(const py::array& log_alpha, const py::array& logits,
                                  double temperature, int threads, const std::string& isa) {
  constexpr const char* op = "rag_token_marg";
  RAG_CHECK(op, std::isfinite(temperature) && temperature > 0, "temperature must be > 0, got ",
            temperature, " (greedy decoding is rag_token_sample with temperature 0)");
  RagTokenMargArgs a = marg_args(op, log_alpha, logits, threads, isa);
  a.inv_temperature = static_cast<float>(1.0 / temperature);
  py::array_t<float> out({a.b, a.v});
  a.out = out.mutable_data();
  int64_t bad = -1;
  if (a.b > 0) {
    py::gil_scoped_release release;
    bad = rag_token_marg_cpu(a);
  }
  check_marg_result(op, bad, a.k);
  return out;
}

py::tuple rag_token_sample(const py::array& log_alpha, const py::array& logits, double temperature,
                           int64_t top_k, double top_p, double min_p, const py::array& uniforms,
                           int threads, const std::string& isa) {
  constexpr const char* op = "rag_token_sample";
  RAG_CHECK(op, std::isfinite(temperature) && temperature >= 0, "temperature must be >= 0, got ", temperature);
  RAG_CHECK(op, top_k >= -1, "top_k must be >= -1 (0 or -1: off), got ", top_k);
  RAG_CHECK(op, top_p > 0 && top_p <= 1, "top_p must be in (0, 1], got ", top_p);
  RAG_CHECK(op, min_p >= 0 && min_p <= 1, "min_p must be in [0, 1], got ", min_p);
  RagTokenMargArgs a = marg_args(op, log_alpha, logits, threads, isa);
  check_array(op, "uniforms", uniforms, 1, 'f', 8, "float64");
  RAG_CHECK(op, uniforms.shape(0) == a.b, "uniforms must have B=", a.b, " entries, got ", uniforms.shape(0));
  RagTokenSampleArgs s;
  // Greedy (0) below 1e-5 as vLLM and the generator (dividing by less overflows), decided in
  // double: every T in [1e-5f, 1e-5) rounds to 1e-5f as a float.
  s.temperature = temperature < 1e-5 ? 0.0f : static_cast<float>(temperature);
  s.top_k = top_k;
  s.top_p = top_p;
  s.min_p = min_p;
  s.uniforms = static_cast<const double*>(uniforms.data());
  for (int64_t r = 0; r < a.b; ++r)
    RAG_CHECK(op, s.uniforms[r] >= 0 && s.uniforms[r] < 1, "uniforms must lie in [0, 1), got ", s.uniforms[r]);
  py::array_t<float> marg({a.b, a.v}), logprobs(a.b);
  py::array_t<int64_t> tokens(a.b);
  a.out = marg.mutable_data();
  s.tokens = tokens.mutable_data();
  s.logprobs = logprobs.mutable_data();
  int64_t bad = -1;
  if (a.b > 0) {
    py::gil_scoped_release release;
    bad = rag_token_sample_cpu(a, s);
  }
  check_marg_result(op, bad, a.k);
  return py::make_tuple(tokens, logprobs);
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
  m.def("fusion_softmax", &fusion_softmax, py::arg("h_in"), py::arg("docs"), py::arg("W_a"),
        py::arg("mask"), py::arg("return_scores") = false, py::arg("threads") = 0, py::arg("isa") = "",
        "Bilinear attention fusion. h_in [B, D] float32, docs [B, K, D] (float32 | uint16 bf16 bits | "
        "float16), W_a [D, D] float32 or None (identity), mask [B, K] bool or None (False = padded). "
        "Returns (alpha [B, K], h_aug [B, D], scores [B, K] or None), all float32; masked slots get "
        "alpha 0 and score -inf, an all-masked row alpha 0 and h_aug 0.");
  m.def("fusion_softmax_gather", &fusion_softmax_gather, py::arg("h_in"), py::arg("corpus"),
        py::arg("scales"), py::arg("ids"), py::arg("W_a"), py::arg("mask"),
        py::arg("return_scores") = false, py::arg("threads") = 0, py::arg("isa") = "",
        "fusion_softmax reading the documents straight from corpus [N, D] (float32 | uint16 bf16 bits | "
        "float16 | int8 with scales [N] float32) at ids [B, K] int64 (-1 = empty slot).");
  m.def("rag_token_marg", &rag_token_marg, py::arg("log_alpha"), py::arg("logits"),
        py::arg("temperature") = 1.0, py::arg("threads") = 0, py::arg("isa") = "",
        "log p [B, V] = logsumexp_i(log_alpha[:, i] + log_softmax(logits[:, i] / T)); "
        "log_alpha [B, K], logits [B, K, V], float32.");
  m.def("rag_token_sample", &rag_token_sample, py::arg("log_alpha"), py::arg("logits"),
        py::arg("temperature"), py::arg("top_k"), py::arg("top_p"), py::arg("min_p"),
        py::arg("uniforms"), py::arg("threads") = 0, py::arg("isa") = "",
        "One token per row from the temperature-1 marginal: temperature (0 = greedy), top_k, top_p, "
        "min_p, then the inverse CDF in token order at uniforms[b] (float64 [B]). Returns "
        "(tokens [B] int64, logprobs [B] float32: marginal log-prob of the token).");
  m.def("supported_isas", &isa_list, "ISA paths this CPU can run, weakest first.");
  m.def("default_isa", []() { return std::string(isa_name(default_isa())); },
        "ISA path used when none is forced (RAG_ENGINE_ISA or the best supported).");
}
