"""Compile checks that need no GPU: every csrc/*.cu with nvcc for sm_90a, csrc/bindings.cpp against the torch
headers (syntax), its TORCH_LIBRARY schemas (parsed by torch), and every Triton kernel ahead of time for sm_90."""

import os
import re
import shutil
import subprocess
import sysconfig
from pathlib import Path

import pytest
import torch
import triton
from triton.backends.compiler import GPUTarget

from dsm_kernels.testing import aot_script_main, check_arrival_protocol

ROOT = Path(__file__).resolve().parents[2]
CSRC = ROOT / "csrc"
CUDA_HOME = Path(os.environ.get("CUDA_HOME", "/usr/local/cuda"))
NVCC = shutil.which("nvcc") or (str(CUDA_HOME / "bin/nvcc") if (CUDA_HOME / "bin/nvcc").exists() else None)
needs_nvcc = pytest.mark.skipif(NVCC is None, reason="nvcc not found (set CUDA_HOME)")


@needs_nvcc
@pytest.mark.parametrize("source", sorted(p.name for p in CSRC.glob("*.cu")))
def test_nvcc_compiles_for_sm90a(source, tmp_path):
    cmd = [NVCC, "-c", "-O3", "-std=c++17", "-Xcompiler", "-fPIC", "-gencode=arch=compute_90a,code=sm_90a",
           "-Werror", "all-warnings", str(CSRC / source), "-o", str(tmp_path / "k.o")]  # fmt: skip
    res = subprocess.run(cmd, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr[-4000:]
    assert (tmp_path / "k.o").stat().st_size > 0


@needs_nvcc
@pytest.mark.parametrize("source", sorted(p.name for p in CSRC.glob("*.cu") if "pdl_launch_and_wait" in p.read_text()))
def test_programmatic_dependents_never_load_through_the_non_coherent_path(source, tmp_path):
    """A kernel launched as a programmatic dependent (it calls griddepcontrol.wait) starts while the kernel before
    still writes, and PTX allows ld.global.nc only for data read-only for the kernel's whole lifetime: every such
    kernel must load through L2 (.cg) or L1-coherent paths. 30 instantiations loaded q, K/V, seq_lens and the block
    table with .nc before."""
    cmd = [NVCC, "-ptx", "-O3", "-std=c++17", "-gencode=arch=compute_90a,code=sm_90a", str(CSRC / source), "-o",
           str(tmp_path / "k.ptx")]  # fmt: skip
    res = subprocess.run(cmd, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr[-4000:]
    entries = re.split(r"(?m)^\.(?:visible\s+)?entry\s+", (tmp_path / "k.ptx").read_text())[1:]
    dependents = [e for e in entries if "griddepcontrol.wait" in e]
    assert dependents
    bad = [e.split("(")[0] for e in dependents if re.search(r"\bld\.global\.nc", e)]
    assert not bad, f"{len(bad)} programmatic dependents load with .nc, e.g. {bad[0]}"


def test_bindings_schemas_parse():
    text = (CSRC / "bindings.cpp").read_text()
    defs = re.findall(r'm\.def\(((?:"[^"]*"\s*)+)\)', text)
    schemas = ["".join(re.findall(r'"([^"]*)"', d)) for d in defs]
    assert {s.split("(")[0] for s in schemas} == {
        "multistream_embed", "append_kv", "paged_decode_attention", "sample_tokens", "paged_decode_blocks_per_sm"
    }  # fmt: skip
    for s in schemas:
        schema = torch._C.parse_schema("dsm::" + s)
        if schema.name == "dsm::paged_decode_blocks_per_sm":  # a query: returns the occupancy, writes nothing
            assert str(schema.returns[0].type) == "int" and all(a.alias_info is None for a in schema.arguments)
            continue
        assert schema.arguments[0].alias_info is not None and schema.arguments[0].alias_info.is_write, s


@pytest.mark.skipif(shutil.which("g++") is None, reason="g++ not found")
def test_bindings_cpp_syntax(tmp_path):
    """bindings.cpp against this torch's headers. A CPU wheel lacks c10's generated cuda_cmake_macros.h only, so an
    empty stand-in is provided; linking needs a CUDA torch and happens in the GPU session (scripts/gpu_check.sh)."""
    from torch.utils.cpp_extension import include_paths

    inc = [f"-I{p}" for p in include_paths()]
    if not any(Path(p, "c10/cuda/impl/cuda_cmake_macros.h").exists() for p in include_paths()):
        stub = tmp_path / "c10/cuda/impl"
        stub.mkdir(parents=True)
        (stub / "cuda_cmake_macros.h").write_text("#pragma once\n")
        inc.insert(0, f"-I{tmp_path}")
    cmd = ["g++", "-fsyntax-only", "-std=c++17", *inc, f"-I{sysconfig.get_paths()['include']}",
           f"-I{CUDA_HOME / 'include'}", "-DTORCH_EXTENSION_NAME=_C", str(CSRC / "bindings.cpp")]  # fmt: skip
    res = subprocess.run(cmd, capture_output=True, text=True)
    assert res.returncode == 0, "\n".join(line for line in res.stderr.splitlines() if "error" in line)[-4000:]


def _types(kernel, ptrs: dict, default="i32", floats=()):
    return {n: ptrs.get(n, "fp32" if n in floats else default) for n in kernel.arg_names}


def _aot_cases():
    """(label, kernel, argument types, constexprs, options) of every Triton kernel at its GPU configurations."""
    from dsm_kernels.embed import _embed_kernel
    from dsm_kernels.paged_attention import _append_kv_kernel, _decode_merge_kernel, _decode_split_kernel
    from dsm_kernels.sampling import _num_warps, _sample_kernel

    for dt in ("bf16", "fp32"):
        k = _embed_kernel
        ptrs = {n: f"*{dt}" for n in ("text_ptr", "text2_ptr", "audio_ptr", "cond_ptr", "out_ptr")} | {
            "tok_ptr": "*i64"
        }
        yield (
            f"embed {dt}",
            k,
            _types(k, ptrs),
            {"K": 33, "HAS_TEXT2": True, "HAS_COND": True, "BLOCK_D": 256},
            {"num_warps": 2},
        )
    for dt, head_dim, hb in (("bf16", 128, 1), ("fp16", 64, 2), ("fp32", 64, 2)):
        k = _append_kv_kernel
        ptrs = {n: f"*{dt}" for n in ("k_ptr", "v_ptr", "kc_ptr", "vc_ptr")} | {"slot_ptr": "*i64"}
        yield f"append_kv {dt}", k, _types(k, ptrs), {"BLOCK": 2048}, {}
        k = _decode_split_kernel
        ptrs = {n: f"*{dt}" for n in ("q_ptr", "k_ptr", "v_ptr")}
        ptrs |= {"bt_ptr": "*i32", "len_ptr": "*i32", "m_ptr": "*fp32", "l_ptr": "*fp32", "acc_ptr": "*fp32",
                 "cnt_ptr": "*i32", "out_ptr": f"*{dt}"}  # fmt: skip
        for merge in (False, True):  # the last split merges in the same launch, or a second kernel does
            consts = {"NUM_SPLITS": 12, "MERGE": merge, "HEAD_DIM": head_dim, "HB": hb, "BLOCK_D": head_dim,
                      "BLOCK_N": 32, "BLOCK_S": 16}  # fmt: skip
            yield f"decode_split {dt} d{head_dim} merge={merge}", k, _types(k, ptrs, floats=("qk_scale",)), consts, {}
        k = _decode_merge_kernel
        ptrs = {"m_ptr": "*fp32", "l_ptr": "*fp32", "acc_ptr": "*fp32", "out_ptr": f"*{dt}"}
        yield f"decode_merge {dt} d{head_dim}", k, _types(k, ptrs), {"HB": hb, "BLOCK_D": head_dim, "BLOCK_S": 16}, {}
    for dt, block_v in (("bf16", 8192), ("fp32", 2048)):
        k = _sample_kernel
        ptrs = {"logits_ptr": f"*{dt}", "null_ptr": f"*{dt}", "temp_ptr": "*fp32", "seed_ptr": "*i64",
                "step_ptr": "*i64", "out_ptr": "*i64"}  # fmt: skip
        consts = {"HAS_NULL": True, "ROWS": 1, "BLOCK_V": block_v, "PDL": True}
        opts = {"num_warps": _num_warps(block_v), "enable_fp_fusion": False}
        yield f"sample {dt} V{block_v}", k, _types(k, ptrs, floats=("cfg_coef",)), consts, opts


def aot_compile_all() -> list[str]:
    """triton.compile every case for sm_90 (needs TRITON_INTERPRET unset: the interpreter replaces @jit)."""
    done = []
    for label, kernel, types, constexprs, options in _aot_cases():
        sig = {name: ("constexpr" if name in constexprs else types[name]) for name in kernel.arg_names}
        # what the JIT assumes at run time for 16-byte-aligned tensors and strides divisible by 16
        attrs = {(i,): [["tt.divisibility", 16]] for i, n in enumerate(kernel.arg_names)
                 if n not in constexprs and (sig[n].startswith("*") or n.startswith("stride"))}  # fmt: skip
        src = triton.compiler.ASTSource(fn=kernel, signature=sig, constexprs=constexprs, attrs=attrs)
        cc = triton.compile(src, target=GPUTarget("cuda", 90, 32), options=options)
        assert "sm_90" in cc.asm["ptx"] and len(cc.asm["cubin"]) > 0, label
        ptx = cc.asm["ptx"]
        if constexprs.get("PDL"):  # programmatic dependent launch: the wait precedes every global load
            assert ptx.index("griddepcontrol.wait") < ptx.index("ld.global"), label
        if "griddepcontrol.wait" in ptx:  # as the CUDA kernels: nothing through the non-coherent path
            assert not re.search(r"\bld\.global\.nc", ptx), label
        if constexprs.get("MERGE"):  # the last split merges: barrier, acq_rel count, partials read from L2
            check_arrival_protocol(cc.asm["ptx"])
        done.append(f"{label}: {len(cc.asm['cubin'])} B cubin, {cc.metadata.shared} B smem")
    return done


def test_triton_aot_compiles_for_sm90(aot_output):
    if os.environ.get("TRITON_INTERPRET") != "1":
        assert len(aot_compile_all()) == len(list(_aot_cases()))
        return
    out = aot_output(__file__)
    assert out.count("cubin") == len(list(_aot_cases())), out


if __name__ == "__main__":
    aot_script_main(lambda: print("\n".join(aot_compile_all())), __file__)
