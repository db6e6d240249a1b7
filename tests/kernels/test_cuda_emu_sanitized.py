"""The emulated CUDA kernels' tests (backend ``cuda_emu``) once more, built with AddressSanitizer and UBSan's integer
and alignment checks: a kernel that reads or writes past a tensor (a load its mask should have stopped, a wrong
stride), overflows a 32-bit index, or makes a 16-byte access through a misaligned pointer, fails here even when the
bytes it touched happened not to change its output. A GPU run
would need compute-sanitizer for the same check.

It runs in a subprocess (libasan must be loaded before Python starts), from the background queue at collection."""

import os
import subprocess
import sys
from pathlib import Path

import cuda_emu

HERE = Path(__file__).resolve().parent
FILES = ["test_embed.py", "test_paged_attention.py", "test_sampling.py", "test_depformer.py",
         "test_decoder.py", "test_mimi_kernels.py"]


def _libasan() -> str:
    path = subprocess.run([cuda_emu.CXX or "g++", "-print-file-name=libasan.so"], capture_output=True, text=True,
                          check=True).stdout.strip()
    if not os.path.isabs(path):
        raise RuntimeError(f"{cuda_emu.CXX} has no libasan.so (it printed {path!r}): install the compiler's libasan")
    return path


def _job(job_dir: Path):
    env = dict(os.environ, DSM_CUDA_EMU_SANITIZE="1", TRITON_INTERPRET="1", LD_PRELOAD=_libasan(),
               ASAN_OPTIONS=f"detect_leaks=0:log_path={job_dir / 'asan'}",
               UBSAN_OPTIONS=f"print_stacktrace=1:log_path={job_dir / 'ubsan'}")
    # the kernels' own cases (not the whole Mimi model on the emulated kernels: minutes under ASan)
    args = [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", "-k",
            "cuda_emu and not steps_cuda_emulated", *(str(HERE / f) for f in FILES)]
    return ("cuda_emu sanitized",), args, env, 900


def background_jobs(test: str, params: dict, job_dir: Path):
    return [_job(job_dir)] if test == "test_emulated_kernels_touch_only_their_tensors" else []


def test_emulated_kernels_touch_only_their_tensors(background):
    rc, out, err = background(*_job(background.dir))
    reports = "".join(p.read_text() for p in sorted(background.dir.glob("[au][sb]san.*")))
    tail = (out + err)[-3000:]
    assert rc == 0 and not reports, f"sanitized cuda_emu tests failed (rc {rc}):\n{reports[-6000:]}\n{tail}"
    assert " passed" in out, out[-2000:]
