"""Compile every Triton kernel of the project for a Hopper GPU (sm_90) without a GPU.

    python tests/kernel_compile_probe.py OUT.json      (TRITON_INTERPRET must be unset)

Triton's compiler (TTIR → TTGIR → LLVM → PTX → cubin with its bundled ptxas) runs on the CPU; each
kernel variant (dtype, epilogue) is compiled with the first tile of its autotuning list, the
largest. Writes {case: {"shared": bytes, "cubin": bool, "error": str | None}}.
"""

from __future__ import annotations

import json
import sys

# case id: (kernel, activation dtype, flags)
CASES = {
    **{f"rows-{dt}-{kind}": ("rows", dt, kind) for dt in ("bf16", "fp32") for kind in ("swiglu", "scaled", "plain")},
    **{f"wgrad-{dt}-{kind}": ("wgrad", dt, kind) for dt in ("bf16", "fp32") for kind in ("scaled", "plain")},
    **{f"gram-{dt}-k{k}-F{f}": ("gram", dt, (k, f)) for dt in ("bf16", "fp32") for k, f in ((8, 1408), (2, 4096))},
}


def _compile(fn, pointers: dict, consts: dict, num_warps: int = 4, num_stages: int = 3):
    """``fn`` compiled for sm_90: ``pointers`` types the pointer arguments, the other runtime
    arguments are i32 (``eps2`` fp32), ``consts`` gives the constexprs."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    signature = {}
    for name in fn.arg_names:
        if name in consts:
            signature[name] = "constexpr"
        else:
            signature[name] = pointers.get(name, "fp32" if name == "eps2" else "i32")
    src = ASTSource(fn=fn, signature=signature, constexprs=consts)
    return triton.compile(src, target=GPUTarget("cuda", 90, 32),
                          options={"num_warps": num_warps, "num_stages": num_stages})


def _kernels(case):
    from megatron_moe_reg.experts.kernels import grouped_gemm as gg
    from megatron_moe_reg.losses import specialization_kernels as sk

    kernel, dt, flags = case
    act = f"*{dt}"
    if kernel == "gram":
        sp, bf = sk._launch_shape(*flags)
        consts = {"SP": sp, "BF": bf}
        return [
            _compile(sk._gram_terms_kernel, {"x_ptr": act, "src_ptr": "*i64", "w_ptr": "*fp32", "r_ptr": "*fp32",
                                             "dg_ptr": "*fp32"}, consts),
            _compile(sk._gram_backward_kernel, {"x_ptr": act, "src_ptr": "*i64", "dg_ptr": "*fp32", "c_ptr": "*fp32",
                                                "dx_ptr": "*fp32"}, consts),
        ]
    scale = "*fp32" if flags == "scaled" else act
    if kernel == "rows":
        tuner = gg._rows_swiglu if flags == "swiglu" else gg._rows_plain
        fn = gg._rows_matmul_kernel
        pointers = {"a_ptr": act, "b_table": "*i64", "c_ptr": act, "h_ptr": act, "row_offsets": "*i32",
                    "scale_ptr": scale}
        consts = {"SWIGLU": flags == "swiglu", "ROW_SCALE": flags == "scaled", "IEEE": dt == "fp32",
                  "E_POW2": gg.expert_slots(8)}
    else:
        tuner, fn = gg._wgrad, gg._wgrad_kernel
        pointers = {"a_ptr": act, "b_ptr": act, "c_ptr": act, "row_offsets": "*i32", "scale_ptr": scale}
        consts = {"ROW_SCALE": flags == "scaled", "IEEE": dt == "fp32"}
    config = tuner.configs[0]
    return [_compile(fn, pointers, {**consts, **config.kwargs}, config.num_warps, config.num_stages)]


def main(out: str) -> None:
    results = {}
    for name, case in CASES.items():
        try:
            kernels = _kernels(case)
            results[name] = {"shared": max(k.metadata.shared for k in kernels),
                             "cubin": all(bool(k.asm.get("cubin")) for k in kernels), "error": None}
        except Exception as e:  # reported per case
            results[name] = {"shared": None, "cubin": False, "error": f"{type(e).__name__}: {str(e)[:2000]}"}
    with open(out, "w") as f:
        json.dump(results, f, indent=1)


if __name__ == "__main__":
    main(sys.argv[1])
