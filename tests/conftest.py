import contextlib
import os
import shutil
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

import pytest
import torch

os.environ.setdefault("NO_TORCH_COMPILE", "1")  # the moshi oracle would otherwise compile Inductor kernels on CPU
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def _waits_on_background(item) -> bool:
    return bool({"aot_output", "background"} & set(getattr(item, "fixturenames", ())))


def pytest_configure(config):
    # pytest-xdist: its workers share the cores already, and intra-op threads on top of them only add spin waits.
    if os.environ.get("PYTEST_XDIST_WORKER"):
        torch.set_num_threads(1)


def pytest_collection_modifyitems(config, items):
    # The tests that wait on a background job (sm_90 compiles, the sanitized emulator run: ~4 min on a 2-core runner)
    # run last, so that the interpreter-bound tests run while the compilers do instead of the session idling on the
    # wait. Under pytest-xdist a worker runs its jobs itself, and they go first: the longest work at the start leaves
    # no long job alone at the end while the other worker idles.
    items.sort(key=_waits_on_background, reverse=bool(os.environ.get("PYTEST_XDIST_WORKER")))  # stable
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@contextlib.contextmanager
def _single_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


@pytest.fixture(scope="module")
def one_thread():
    """For modules of tiny models (``pytestmark = pytest.mark.usefixtures("one_thread")``): their ops are too small
    for intra-op threads, which on a busy 2-core box only add spin waits (one module went from 179 s to 5 s)."""
    with _single_thread():
        yield


@pytest.fixture(scope="session")
def mimi_sd():
    """``random_mimi_state_dict(0)``, built once per session (its codebook calibration runs Mimi over a probe, ~1.5 s
    a build) for the tests that only read it (``Mimi`` copies nothing in place). Built on one thread, as the
    ``tiny_stt_ckpt`` Mimi file is, so that the two are the same weights."""
    from dsm.mimi import random_mimi_state_dict

    with _single_thread():
        return random_mimi_state_dict(0)


@pytest.fixture(scope="session")
def tiny_stt_ckpt(tmp_path_factory):
    """The tiny-stt random checkpoint (seed 0, fp32 LM; its Mimi file is ``save_random_mimi(seed=0)``), written once
    per session, on one thread, for the STT, server and Mimi tests, which only read it."""
    from dsm.checkpoint import write_random_checkpoint

    with _single_thread():
        return write_random_checkpoint("tiny-stt", tmp_path_factory.mktemp("stt") / "tiny-stt", seed=0,
                                       dtype=torch.float32)


class _BackgroundJobs:
    """Subprocesses started at collection and run one at a time on a worker thread while the tests go on: the suite's
    own process keeps one core busy (the Triton interpreter is single-threaded), these jobs (compilers, a few
    self-contained CLI runs) use another.
    A test asking for a job that has not started yet runs it itself, so the answer never waits behind the queue; one
    waiting on a job the worker runs takes the next queued job meanwhile."""

    def __init__(self):
        self._cv = threading.Condition()
        self._jobs: dict = {}
        self._queue: list = []
        self._closed = False
        self._thread = None

    def submit(self, key, args, env, timeout=None):
        with self._cv:
            if self._closed or key in self._jobs:
                return
            self._jobs[key] = {"args": args, "env": env, "timeout": timeout, "state": "queued", "proc": None,
                               "result": None}
            self._queue.append(key)
            if self._thread is None:
                self._thread = threading.Thread(target=self._work, name="dsm-test-jobs", daemon=True)
                self._thread.start()
            self._cv.notify_all()

    def _run(self, job):
        try:
            proc = subprocess.Popen(job["args"], env=job["env"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                    text=True)
            with self._cv:
                job["proc"] = proc
                if self._closed:  # the session ended while it started
                    proc.kill()
            try:
                out, err = proc.communicate(timeout=job["timeout"])
                result = (proc.returncode, out, err)
            except subprocess.TimeoutExpired:
                proc.kill()
                out, err = proc.communicate()
                result = (None, out, f"{err}\n{job['args']}: timed out after {job['timeout']} s")
        except Exception as e:  # noqa: BLE001 - reported by the test that asks, never a stuck waiter
            result = (None, "", f"{job['args']}: {e!r}")
        with self._cv:
            job["result"], job["state"] = result, "done"
            self._cv.notify_all()

    def _work(self):
        while True:
            with self._cv:
                while not self._closed and not self._queue:
                    self._cv.wait()
                if self._closed:
                    return
                job = self._jobs[self._queue.pop(0)]
                job["state"] = "running"
            self._run(job)

    def result(self, key, args, env, timeout=None):
        """(returncode, stdout, stderr) of the job ``key``: its background run's, or a run now (returncode None: it
        could not start, or timed out)."""
        with self._cv:
            job = self._jobs.get(key)
            mine = job is None or job["state"] == "queued"
            if job is None:
                job = self._jobs[key] = {"args": args, "env": env, "timeout": timeout, "proc": None, "result": None}
            elif mine:
                self._queue.remove(key)
            job["state"] = "running" if mine else job["state"]
        if mine:
            self._run(job)
        while True:  # waiting on the worker: run the next queued job meanwhile rather than idle
            with self._cv:
                if job["state"] == "done":
                    return job["result"]
                if not self._queue:
                    self._cv.wait()
                    continue
                other = self._jobs[self._queue.pop(0)]
                other["state"] = "running"
            self._run(other)

    def close(self):
        with self._cv:
            self._closed = True
            self._queue.clear()
            running = [j["proc"] for j in self._jobs.values() if j["state"] == "running" and j["proc"] is not None]
            self._cv.notify_all()
        for proc in running:  # a session stopped early (-x): no compiler outlives it
            proc.kill()


_JOBS = _BackgroundJobs()


def _aot_job(path):
    """``dsm_kernels.testing.run_aot_script``'s run of ``path``: ``python <path> --aot`` without TRITON_INTERPRET, with
    a Triton cache of this session's own: a compile cached from another checkout keeps that checkout's file paths
    and line numbers in its PTX, which the PTX checks read source lines through (``testing.prewait_loads``)."""
    path = str(Path(path).resolve())
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(_job_dir() / "triton-cache")
    return ("aot", path), [sys.executable, path, "--aot"], env


_JOB_DIR = None


def _job_dir() -> Path:
    """Where background jobs write their files: one folder per session, removed at its end."""
    global _JOB_DIR
    if _JOB_DIR is None:
        _JOB_DIR = Path(tempfile.mkdtemp(prefix="dsm-test-jobs-"))
    return _JOB_DIR


def pytest_collection_finish(session):
    if os.environ.get("PYTEST_XDIST_WORKER"):  # each worker collects every item but runs a share: run on demand
        return
    for item in session.items:  # after -k / -m selection: only the checks that will run, in the order they run
        names = getattr(item, "fixturenames", ())
        if "aot_output" in names:
            _JOBS.submit(*_aot_job(item.path))
        jobs = getattr(getattr(item, "module", None), "background_jobs", None)
        if "background" in names and jobs is not None:
            for key, args, *rest in jobs(item.originalname, getattr(getattr(item, "callspec", None), "params", {}),
                                         _job_dir()):
                env, timeout = (*rest, None, None)[:2]
                _JOBS.submit(key, args, dict(os.environ) if env is None else env, timeout)


def pytest_sessionfinish(session):
    _JOBS.close()
    if _JOB_DIR is not None:
        shutil.rmtree(_JOB_DIR, ignore_errors=True)


@pytest.fixture
def background():
    """``background(key, args, env=None, timeout=None)``: (returncode, stdout, stderr) of ``subprocess.run(args,
    env=env, timeout=timeout)`` (env None: the current environment; returncode None: it could not start or timed out)
    for a test whose module's ``background_jobs(test_name, params, job_dir)`` named that job, as ``(key, args[, env[,
    timeout]])``, at collection, so that it ran (or is running) in the background queue; ``background.dir`` is the
    ``job_dir`` its files went to."""

    def run(key, args, env=None, timeout=None):
        return _JOBS.result(key, args, dict(os.environ) if env is None else env, timeout)

    run.dir = _job_dir()
    return run


@pytest.fixture
def aot_output():
    """``run_aot_script`` (the file's sm_90 AOT compile, ``<file> --aot`` in a subprocess without the interpreter),
    started in the background when the test was collected: the same command, environment, output and failure (an
    AssertionError with the output's tail); the compiles (~40 s on a fresh CI runner, whose Triton cache is empty)
    overlap the interpreter-bound tests instead of following them."""

    def run(path) -> str:
        rc, out, err = _JOBS.result(*_aot_job(path))
        if rc != 0:
            raise AssertionError((out + err)[-4000:])
        return out

    return run


@pytest.fixture
def cuda_emulated(monkeypatch):
    """dsm_kernels' ``cuda`` backend on the CPU: its ops run the CUDA C++ kernels of csrc/ through
    ``tests/kernels/cuda_emu.py``, and the ops without a CUDA kernel fall back to Triton, as on a GPU. So a model or
    engine test can run its ``cuda`` configuration (the arguments the model passes to the CUDA kernels) in CPU CI.
    Returns a Counter of the emulated kernels' calls, so that a test can check they ran."""
    import collections

    import dsm_kernels

    monkeypatch.syspath_prepend(str(Path(__file__).parent / "kernels"))
    import cuda_emu

    calls = collections.Counter()
    ops = {op: dict(impls) for op, impls in dsm_kernels._OPS.items()}
    for op, fn in cuda_emu.OPS.items():
        def counted(*args, _fn=fn, _op=op, **kw):
            calls[_op] += 1
            return _fn(*args, **kw)

        monkeypatch.setattr(cuda_emu, fn.__name__, counted)
        ops[op]["cuda"] = f"cuda_emu:{fn.__name__}"
    monkeypatch.setattr(dsm_kernels, "_OPS", ops)
    real = dsm_kernels.available_backends

    def available(device="cpu"):
        return [*real(device), "cuda"] if torch.device(device).type == "cpu" else real(device)

    monkeypatch.setattr(dsm_kernels, "available_backends", available)
    dsm_kernels._load.cache_clear()  # resolve() caches what it imported: no stale function either side of the test
    yield calls
    dsm_kernels._load.cache_clear()
