"""Compile checks that need no GPU: every csrc/*.cu with nvcc for sm_90a, csrc/bindings.cpp against the torch
headers (syntax), its TORCH_LIBRARY schemas (parsed by torch), and every Triton kernel ahead of time for sm_90."""

import os
import re
import shutil
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


# Triton's wheel ships the CUDA binary tools (its own SASS inspection uses them).
CUDA_TOOLS = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
PERSISTENT = ("depformer.cu", "decoder.cu", "rvq.cu")


def _nvcc_object(source: str, out_dir: Path) -> list[str]:
    # -lineinfo maps each SASS instruction to its source line (it does not change the code)
    return [NVCC, "-c", "-O3", "-std=c++17", "-Xcompiler", "-fPIC", "-gencode=arch=compute_90a,code=sm_90a",
            "-Werror", "all-warnings", "-Xptxas", "-v", "-lineinfo", str(CSRC / source), "-o",
            str(out_dir / f"{source}.o")]  # fmt: skip


def _nvcc_ptx(source: str, out_dir: Path) -> list[str]:
    return [NVCC, "-ptx", "-O3", "-std=c++17", "-gencode=arch=compute_90a,code=sm_90a", str(CSRC / source), "-o",
            str(out_dir / f"{source}.ptx")]  # fmt: skip


def _gxx_bindings(out_dir: Path) -> list[str]:
    """g++ -fsyntax-only of bindings.cpp. A CPU wheel lacks c10's generated cuda_cmake_macros.h only, so an empty
    stand-in is provided (under ``out_dir``)."""
    from torch.utils.cpp_extension import include_paths

    inc = [f"-I{p}" for p in include_paths()]
    if not any(Path(p, "c10/cuda/impl/cuda_cmake_macros.h").exists() for p in include_paths()):
        stub = out_dir / "stub/c10/cuda/impl"
        stub.mkdir(parents=True, exist_ok=True)
        (stub / "cuda_cmake_macros.h").write_text("#pragma once\n")
        inc.insert(0, f"-I{out_dir / 'stub'}")
    return ["g++", "-fsyntax-only", "-std=c++17", *inc, f"-I{sysconfig.get_paths()['include']}",
            f"-I{CUDA_HOME / 'include'}", "-DTORCH_EXTENSION_NAME=_C", "-DDSM_CUDA_ARCH_NAME=90a",
            str(CSRC / "bindings.cpp")]  # fmt: skip


def background_jobs(test: str, params: dict, out_dir: Path):
    """The compiler runs a collected test below will ask for (conftest starts them in the background queue at
    collection: on 2 cores two compile at once instead of one after another)."""
    if test == "test_nvcc_compiles_for_sm90a" and NVCC:
        return [(("nvcc -c", params["source"]), _nvcc_object(params["source"], out_dir))]
    if test == "test_programmatic_dependents_never_load_through_the_non_coherent_path" and NVCC:
        return [(("nvcc -ptx", params["source"]), _nvcc_ptx(params["source"], out_dir))]
    if test == "test_bindings_cpp_syntax" and shutil.which("g++"):
        return [(("g++", "bindings.cpp"), _gxx_bindings(out_dir))]
    return []


@needs_nvcc
@pytest.mark.parametrize("source", sorted(p.name for p in CSRC.glob("*.cu")))
def test_nvcc_compiles_for_sm90a(source, background):
    rc, _, err = background(("nvcc -c", source), _nvcc_object(source, background.dir))
    assert rc == 0, err[-4000:]
    assert (background.dir / f"{source}.o").stat().st_size > 0
    if source in PERSISTENT:  # 512 threads a block, one per SM: at most 128 registers a thread
        regs = [int(n) for n in re.findall(r"Used (\d+) registers", err)]
        # spills: none in the released models' dtypes; a few bytes in the fp32 instances' sampling and attention
        funcs = re.split(r"Function properties for ", err)[1:]
        spills = {f.split()[0]: int(re.search(r"(\d+) bytes spill stores", f).group(1)) for f in funcs}
        assert regs and max(regs) <= 128, regs
        assert all(n == 0 or ("IfLi" in name and n <= 32) for name, n in spills.items()), spills
        if "stream.gemv(" in (CSRC / source).read_text():  # the weight-streaming GEMV of persistent.cuh
            _assert_gemv_loop_in_registers(background.dir / f"{source}.o", background.dir)


def _assert_gemv_loop_in_registers(obj: Path, out_dir: Path) -> None:
    """No local-memory load or store in the persistent GEMV's inner loop (persistent.cuh's row_dot), in any kernel
    instance: a per-row accumulator array indexed with a run-time row anywhere put the accumulators on the stack,
    and this loop then stored each one there on every 16-byte weight load (memory-bound code, 5% more instructions
    at 4 rows; the same on an H200 with less slack)."""
    import subprocess

    marker = "acc[b] += wv[i] * xv[i]"
    line = next(i for i, text in enumerate((CSRC / "persistent.cuh").read_text().splitlines(), 1) if marker in text)
    subprocess.run([str(CUDA_TOOLS / "cuobjdump"), "-xelf", "all", str(obj)], cwd=out_dir, check=True,
                   capture_output=True)  # fmt: skip
    cubins = sorted(out_dir.glob(f"{obj.stem.split('.')[0]}*.cubin"))
    assert cubins
    for cubin in cubins:
        sass = subprocess.run([str(CUDA_TOOLS / "nvdisasm"), "-g", "-c", str(cubin)], check=True, capture_output=True,
                              text=True).stdout  # fmt: skip
        here, bad, seen = None, 0, False
        for text in sass.splitlines():
            m = re.search(r'//## File "([^"]+)", line (\d+)', text)
            if m:
                here = (Path(m.group(1)).name, int(m.group(2)))
            elif here == ("persistent.cuh", line) and re.search(r"\b(FFMA|LDL|STL)\b", text):
                seen = True
                bad += bool(re.search(r"\b(LDL|STL)\b", text))
        assert seen, f"{cubin.name}: no SASS attributed to persistent.cuh:{line} ({marker})"
        assert bad == 0, f"{cubin.name}: {bad} local loads/stores in the GEMV's inner loop (persistent.cuh:{line})"


@needs_nvcc
@pytest.mark.parametrize("source", sorted(p.name for p in CSRC.glob("*.cu") if "pdl_launch_and_wait" in p.read_text()))
def test_programmatic_dependents_never_load_through_the_non_coherent_path(source, background):
    """A kernel launched as a programmatic dependent (it calls griddepcontrol.wait) starts while the kernel before
    still writes, and PTX allows ld.global.nc only for data read-only for the kernel's whole lifetime: every such
    kernel must load through L2 (.cg) or L1-coherent paths. 30 instantiations loaded q, K/V, seq_lens and the block
    table with .nc before."""
    rc, _, err = background(("nvcc -ptx", source), _nvcc_ptx(source, background.dir))
    assert rc == 0, err[-4000:]
    entries = re.split(r"(?m)^\.(?:visible\s+)?entry\s+", (background.dir / f"{source}.ptx").read_text())[1:]
    dependents = [e for e in entries if "griddepcontrol.wait" in e]
    assert dependents
    bad = [e.split("(")[0] for e in dependents if re.search(r"\bld\.global\.nc", e)]
    assert not bad, f"{len(bad)} programmatic dependents load with .nc, e.g. {bad[0]}"


def test_bindings_schemas_parse():
    text = (CSRC / "bindings.cpp").read_text()
    defs = re.findall(r'm\.def\(((?:"[^"]*"\s*)+)\)', text)
    schemas = ["".join(re.findall(r'"([^"]*)"', d)) for d in defs]
    assert {s.split("(")[0] for s in schemas} == {
        "multistream_embed", "append_kv", "paged_decode_attention", "sample_tokens", "paged_decode_blocks_per_sm",
        "depformer_frame", "decoder_step", "rvq_encode",
    }  # fmt: skip
    for s in schemas:
        schema = torch._C.parse_schema("dsm::" + s)
        if schema.name == "dsm::paged_decode_blocks_per_sm":  # a query: returns the occupancy, writes nothing
            assert str(schema.returns[0].type) == "int" and all(a.alias_info is None for a in schema.arguments)
            continue
        assert schema.arguments[0].alias_info is not None and schema.arguments[0].alias_info.is_write, s
        if schema.name in ("dsm::depformer_frame", "dsm::decoder_step"):  # every output, and the caches
            written = {"depformer_frame": 2, "decoder_step": 5}[schema.name.split("::")[1]]
            assert all(a.alias_info is not None and a.alias_info.is_write for a in schema.arguments[:written]), s


@pytest.mark.skipif(shutil.which("g++") is None, reason="g++ not found")
def test_bindings_cpp_syntax(background):
    """bindings.cpp against this torch's headers (see ``_gxx_bindings``); linking needs a CUDA torch and happens in
    the GPU session (scripts/gpu_check.sh)."""
    rc, _, err = background(("g++", "bindings.cpp"), _gxx_bindings(background.dir))
    assert rc == 0, "\n".join(line for line in err.splitlines() if "error" in line)[-4000:]


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
