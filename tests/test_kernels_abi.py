"""The declared kernel boundary: the ctypes side read from csrc/gemmakit_kernels.h agrees with what the C
compiler makes of the same header, every C definition matches its declaration, and the loader refuses a library
built for another ABI number with a clear message and falls back."""

from __future__ import annotations

import ctypes
import json
import os
import re
import shutil
import subprocess
import sys

import pytest

from gemmakit.kernels import abi, loader

pytestmark = pytest.mark.skipif(shutil.which("cc") is None and shutil.which("gcc") is None,
                                reason="needs a C compiler")
CC = shutil.which("cc") or shutil.which("gcc")


def _compile_and_run(tmp_path, source: str) -> str:
    (tmp_path / "probe.c").write_text(source)
    subprocess.run([CC, f"-I{loader.CSRC}", "-o", str(tmp_path / "probe"), str(tmp_path / "probe.c")], check=True)
    return subprocess.run([str(tmp_path / "probe")], capture_output=True, text=True, check=True).stdout


def test_struct_layouts_match_the_c_compilers(tmp_path) -> None:
    """sizeof and every field's offset, from the compiler, equal the ctypes classes built from the header."""
    decl = abi.declarations()
    lines = []
    for name, cls in decl.structs.items():
        lines.append(f'printf("{name} size %zu\\n", sizeof({name}));')
        lines += [f'printf("{name} {field} %zu\\n", offsetof({name}, {field}));' for field, _ in cls._fields_]
    out = _compile_and_run(tmp_path, "#include <stdio.h>\n#include <stddef.h>\n#include \"gemmakit_kernels.h\"\n"
                                     "int main(void) {\n" + "\n".join(lines) + "\nreturn 0;\n}\n")
    for line in out.splitlines():
        name, what, value = line.split()
        cls = decl.structs[name]
        expected = ctypes.sizeof(cls) if what == "size" else getattr(cls, what).offset
        assert int(value) == expected, f"{name}.{what}: C says {value}, ctypes {expected}"
    assert set(decl.structs) == {"QMatrix", "Layer", "StepSlots", "StepRope", "SampleRow"}


def test_every_exported_symbol_is_declared_and_every_declaration_defined() -> None:
    """The library's exported functions are exactly the header's (nm), so nothing crosses undeclared."""
    lib = loader.kernels()
    assert lib is not None
    nm = shutil.which("nm")
    if nm is None:
        pytest.skip("needs nm (binutils)")
    symbols = subprocess.run([nm, "-D", "--defined-only", lib._name], capture_output=True, text=True,
                             check=True).stdout
    exported = {m.group(1) for m in re.finditer(r" T (\w+)$", symbols, flags=re.M)} - {"_init", "_fini"}
    assert exported == set(abi.declarations().functions)


def test_header_definitions_agree_with_the_c_files(tmp_path) -> None:
    """The sources compile with -Werror against the header: a definition that differs from its declaration
    (a changed parameter list) is a compile error, not a silent mismatch."""
    proc = subprocess.run([CC, "-fsyntax-only", "-march=native", "-fopenmp", f"-I{loader.CSRC}", "-Werror", "-Wall",
                           *map(str, loader.SOURCES)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]


@pytest.mark.parametrize("march", ["skylake-avx512", "icelake-server", "haswell", "x86-64"])
def test_the_kernels_build_for_every_instruction_set_they_have_a_path_for(tmp_path, march: str) -> None:
    """The loader builds with -march=native, so each machine compiles its own path: AVX-512 without VNNI (the
    Intel Xeons without it), with VNNI, AVX2, plain C. GCC 12 once crashed (an internal compiler error) on the
    first of these only, which a build on this machine alone would not show."""
    flags = [f if f != "-march=native" else f"-march={march}" for f in loader.FLAGS]
    proc = subprocess.run([CC, *map(str, loader.SOURCES), *flags, "-o", str(tmp_path / "kernels.so")],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]


THREADS_AFTER = r"""
import os, sys, time, torch, gemmakit
from gemmakit.engine import Engine
from gemmakit.kernels import release_thread_workers
def count(expected, settle=2.0):
    # pthread_join returns once the kernel clears the thread's id, a moment before the thread leaves
    # /proc/self/task: on a loaded machine a joined worker can still be listed, so wait for it to go (a worker
    # that stays, idle or spinning, is still counted when the wait ends).
    deadline = time.monotonic() + settle
    while len(os.listdir("/proc/self/task")) > expected and time.monotonic() < deadline:
        time.sleep(0.01)
    return len(os.listdir("/proc/self/task"))
torch.set_num_threads(2)
base = len(os.listdir("/proc/self/task"))
torch.zeros(1 << 24).add_(1.0)  # a parallel torch op: this thread gets a worker (torch shares our libgomp)
with_worker = count(base, settle=0)
release_thread_workers()
released = count(base)
llm = gemmakit.load(sys.argv[1], threads=2)  # parallel packing and a warm-up, then the workers are let go
loaded = count(base)
engine = Engine(llm.model, llm.tokenizer, llm.stop_token_ids, 64, max_batch=2)  # zeroes its cache in parallel
made = count(base + 1) - 1  # less the engine's own thread
engine.shutdown()
print(base, with_worker, released, loaded, made)
"""


def test_threads_that_are_done_with_parallel_work_keep_no_openmp_workers(model_path) -> None:
    """libgomp lets a thread's workers spin between parallel regions only while it manages no more threads than
    there are CPUs: the idle workers of the thread that loaded the model (or made an engine's cache) made the
    engine's sleep and wake at every region (a lone sequence ~1.3x slower through the server on 2 cores). After
    load() and Engine(), the calling thread has none left."""
    proc = subprocess.run([sys.executable, "-c", THREADS_AFTER, str(model_path)], capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    base, with_worker, released, loaded, made = map(int, proc.stdout.split()[-5:])
    assert with_worker == base + 1  # the same runtime: torch's parallel op made this thread one worker
    assert released == base and loaded == base and made == base


def _status_with(lib_path, extra_env=None) -> tuple[dict, str]:
    """kernel_status() and the library in use, in a fresh process with GEMMAKIT_KERNELS_LIB=lib_path (the cache
    is this session's, so the fallback build is the one already there)."""
    script = ("import json, gemmakit.kernels as k; lib = k.kernels(); "
              "print(json.dumps(k.kernel_status())); print(lib._name if lib is not None else '')")
    env = {**os.environ, "GEMMAKIT_KERNELS_LIB": str(lib_path), **(extra_env or {})}
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr
    status, name = proc.stdout.splitlines()
    return {**json.loads(status), "name": name}, proc.stderr


def test_a_stale_library_is_refused_and_the_kernels_are_built_instead(tmp_path) -> None:
    stale = tmp_path / "stale.so"
    (tmp_path / "stale.c").write_text("#include <stdint.h>\nint64_t gemmakit_kernels_abi(void) { return 1; }\n")
    subprocess.run([CC, "-shared", "-fPIC", "-o", str(stale), str(tmp_path / "stale.c")], check=True)
    status, stderr = _status_with(stale)
    needed = abi.declarations().abi
    assert f"built for kernel ABI 1, and this gemmakit needs ABI {needed} (a stale build)" in stderr
    assert "building the kernels from the sources instead" in stderr
    assert status["available"] and status["name"] == loader.kernels()._name


def test_a_stale_library_without_a_compiler_falls_back_to_pytorch(tmp_path) -> None:
    foreign = tmp_path / "foreign.so"
    (tmp_path / "foreign.c").write_text("int something_else(void) { return 0; }\n")
    subprocess.run([CC, "-shared", "-fPIC", "-o", str(foreign), str(tmp_path / "foreign.c")], check=True)
    status, stderr = _status_with(foreign, {"CC": str(tmp_path / "no-such-cc"), "XDG_CACHE_HOME": str(tmp_path)})
    assert "exports no gemmakit_kernels_abi" in stderr
    assert status["available"] is False and "no-such-cc" in status["reason"] and status["name"] == ""


def test_a_current_prebuilt_library_is_used_as_is(tmp_path) -> None:
    built = loader.kernels()
    status, stderr = _status_with(built._name)
    assert status["available"] and status["name"] == built._name and "refusing" not in stderr
