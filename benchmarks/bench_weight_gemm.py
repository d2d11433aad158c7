"""How ONNX Runtime's CPU weight GEMMs scale with the batch (rows M), per weight format.

    python benchmarks/bench_weight_gemm.py [--threads 2] [--layers 30] [--k 576] [--n 3072]

One graph of `layers` independent [M, K] x [K, N] products (the shape of SmolLM2-135M's
fused gate/up projection), timed at M = 1, 4 and 8 for: fp32 MatMul and our MatMulF32Panels,
MatMulNBits with 8-bit weights in blocks of 64 and 32 and our MatMulInt8Block (blocks of 64,
the same weights), and 4-bit weights in blocks of 32 with MatMulNBits and our MatMulInt4Block
(accuracy_level 4, as the generator exports them; the weights come from
rag_engine.generator.quant). A decode step at
batch B runs its weight GEMMs at M = B, so the ratio t(M=8) / t(M=1) bounds what batch 8 can
gain over batch 1 (8 / ratio, before attention and the other ops). Writes JSON.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import clean_blas_env, write_json  # noqa: E402

# (name, bits, block, op): ONNX Runtime's MatMul / MatMulNBits, or rag_engine's own op ("ours")
FORMATS = [("fp32", 0, 0, "ort"), ("fp32 MatMulF32Panels", 0, 0, "ours"), ("int8", 8, 64, "ort"),
           ("int8 MatMulInt8Block", 8, 64, "ours"), ("int8", 8, 32, "ort"), ("int4", 4, 32, "ort"),
           ("int4 MatMulInt4Block", 4, 32, "ours")]
ROWS = (1, 4, 8)


def build_session(bits: int, block: int, op: str, layers: int, k: int, n: int, threads: int, rng):
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    from rag_engine.generator import ortops
    from rag_engine.generator.quant import (
        pack_f32_panels,
        pack_int4_vnni,
        pack_int8_vnni,
        quantize_blockwise,
    )

    nodes, inits = [], []
    for layer in range(layers):
        w = (rng.standard_normal((k, n)) * 0.05).astype(np.float32)
        if op == "ours":
            packed = {8: pack_int8_vnni, 4: pack_int4_vnni}[bits](w, block) if bits else (pack_f32_panels(w),)
            names = [f"{part}{layer}" for part in "ws"[:len(packed)]]
            inits += [numpy_helper.from_array(a, name) for a, name in zip(packed, names, strict=True)]
            kind, attrs = (f"MatMulInt{bits}Block", dict(block_size=block)) if bits else ("MatMulF32Panels", {})
            nodes.append(helper.make_node(kind, ["x", *names], [f"y{layer}"], domain=ortops.DOMAIN, K=k, N=n,
                                          **attrs))
        elif bits:
            packed, scales = quantize_blockwise(w, bits, block)
            inits += [numpy_helper.from_array(packed, f"w{layer}"), numpy_helper.from_array(scales, f"s{layer}")]
            nodes.append(helper.make_node("MatMulNBits", ["x", f"w{layer}", f"s{layer}"], [f"y{layer}"],
                                          domain="com.microsoft", K=k, N=n, bits=bits, block_size=block,
                                          accuracy_level=4))
        else:
            inits.append(numpy_helper.from_array(w, f"w{layer}"))
            nodes.append(helper.make_node("MatMul", ["x", f"w{layer}"], [f"y{layer}"]))
    graph = helper.make_graph(
        nodes, "weight_gemms", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["M", k])],
        [helper.make_tensor_value_info(f"y{layer}", TensorProto.FLOAT, ["M", n]) for layer in range(layers)], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1),
                                                    helper.make_opsetid(ortops.DOMAIN, 1)])
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    if op == "ours":
        ortops.register(options)
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def median_ms(session, x: np.ndarray, repeat: int) -> float:
    for _ in range(3):
        session.run(None, {"x": x})
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        session.run(None, {"x": x})
        times.append(time.perf_counter() - t0)
    return float(np.median(times) * 1e3)


def main() -> None:
    clean_blas_env()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--layers", type=int, default=30)
    p.add_argument("--k", type=int, default=576)
    p.add_argument("--n", type=int, default=3072)
    p.add_argument("--repeat", type=int, default=15)
    args = p.parse_args()
    rng = np.random.default_rng(0)
    rows = []
    print("| weights | block | " + " | ".join(f"M={m} ms" for m in ROWS) + " | GB/s of weights @M=1 | M=8 / M=1 |")
    print("|---|---|" + "---|" * len(ROWS) + "---|---|")
    for name, bits, block, op in FORMATS:
        session = build_session(bits, block, op, args.layers, args.k, args.n, args.threads, rng)
        ms = {m: median_ms(session, rng.standard_normal((m, args.k), dtype=np.float32), args.repeat) for m in ROWS}
        weight_bytes = args.layers * args.k * args.n * (4 if not bits else bits / 8)
        row = {"weights": name, "bits": bits, "block": block, "ms": ms, "weight_bytes": weight_bytes,
               "gbs_m1": weight_bytes / ms[1] / 1e6, "ratio_8_1": ms[8] / ms[1]}
        rows.append(row)
        print(f"| {name} | {block or '-'} | " + " | ".join(f"{ms[m]:.2f}" for m in ROWS)
              + f" | {row['gbs_m1']:.1f} | {row['ratio_8_1']:.2f}x |", flush=True)
    path = write_json("weight_gemm", {"threads": args.threads, "layers": args.layers, "k": args.k, "n": args.n,
                                      "rows": rows})
    print(f"# wrote {path}")


if __name__ == "__main__":
    main()
