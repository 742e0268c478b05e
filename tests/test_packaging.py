"""The wheel as a user installs it: built from this tree, installed into a fresh virtual environment (not the
editable install the Makefile uses), then run: the C kernels must build from the sources inside the wheel."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import venv
import zipfile
from pathlib import Path

ROOT = Path(__file__).parent.parent
SHIPPED = ["gemmakit/py.typed", "gemmakit/__main__.py",
           *(f"gemmakit/kernels/csrc/{name}" for name in ("qgemv.c", "qgemm.c", "decode.c", "layers.c", "sample.c",
                                                          "abi.c", "gemmakit_kernels.h", "vecmath.h", "qpack.h")),
           "gemmakit/server/static/index.html", "gemmakit/server/static/chat.js",
           "gemmakit/server/static/chat.css", "gemmakit/server/static/vendor/marked.umd.js",
           "gemmakit/server/static/vendor/purify.min.js"]


# torch and what it needs at run time (its metadata's requirements, and theirs).
TORCH_DISTRIBUTIONS = ("torch", "sympy", "mpmath", "networkx", "filelock", "typing_extensions", "jinja2",
                       "markupsafe", "fsspec")


def _share_distributions(python: str, names: tuple[str, ...], folder: Path) -> None:
    """Make these installed distributions (packages and their .dist-info, so pip counts them as installed) visible
    to another environment: symbolic links in ``folder``, which a .pth file adds to that environment's path."""
    from importlib.metadata import distribution

    folder.mkdir()
    for name in names:
        dist = distribution(name)
        site = Path(dist.locate_file(""))
        tops = {Path(str(f)).parts[0] for f in dist.files or [] if not str(f).startswith("..")}
        for top in tops:
            if (site / top).exists() and not (folder / top).exists():
                (folder / top).symlink_to(site / top)
    site_packages = _run(python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])").stdout.strip()
    (Path(site_packages) / "shared-torch.pth").write_text(str(folder) + "\n")


def _run(*args: str, env: dict | None = None, timeout: float = 900) -> subprocess.CompletedProcess:
    proc = subprocess.run(list(args), capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})})
    assert proc.returncode == 0, f"{args}: {proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"
    return proc


def test_wheel_installs_into_a_fresh_venv_and_generates(tmp_path, llm) -> None:
    dist = tmp_path / "dist"
    _run(sys.executable, "-m", "pip", "wheel", "--no-deps", "--quiet", "-w", str(dist), str(ROOT))
    (wheel,) = dist.glob("gemmakit-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    assert not [name for name in SHIPPED if name not in names]
    metadata = zipfile.ZipFile(wheel).read(next(n for n in names if n.endswith("METADATA"))).decode()
    assert "License-Expression: Apache-2.0" in metadata and "Provides-Extra: server" in metadata

    env_dir = tmp_path / "venv"
    venv.create(env_dir, with_pip=True)
    python = str(env_dir / "bin" / "python")
    # torch first, as the README says: here the test's own torch, made visible to the new environment (unpacking
    # the ~700 MB wheel again took about a minute), then the wheel with its other dependencies from the index.
    _share_distributions(python, TORCH_DISTRIBUTIONS, tmp_path / "torch-site")
    assert "2.13" in _run(python, "-c", "import torch; print(torch.__version__)").stdout
    _run(python, "-m", "pip", "install", "--quiet", str(wheel))

    # A fresh cache: the kernels are compiled from the wheel's own sources, and nothing warns of a fallback.
    cache = {"XDG_CACHE_HOME": str(tmp_path / "cache")}
    prompt = "The capital of France is"
    out = _run(python, "-m", "gemmakit", "run", prompt, "-n", "8", "--temperature", "0", "--json", env=cache,
               timeout=300)
    assert "unavailable" not in out.stderr and "falling back" not in out.stderr, out.stderr
    assert json.loads(out.stdout)["token_ids"] == llm.generate(prompt, max_tokens=8, temperature=0).token_ids
    assert list((tmp_path / "cache" / "gemmakit" / "kernels").glob("*.so"))
    assert "kernels: compiled C" in _run(python, "-m", "gemmakit", "bench", "--prompt-tokens", "16",
                                         "--decode-tokens", "4", env=cache, timeout=300).stdout

    # Without the [server] extra, serve says what to install (one line, no traceback).
    serve = subprocess.run([python, "-m", "gemmakit", "serve"], capture_output=True, text=True, timeout=120)
    assert serve.returncode == 2 and "pip install 'gemmakit[server]'" in serve.stderr
    assert "Traceback" not in serve.stderr


def test_a_failed_kernel_build_warns_once_with_the_reason(tmp_path) -> None:
    """No compiler: one warning that gives the reason and says decoding is much slower; answers still come."""
    script = ("import gemmakit, json; llm = gemmakit.load(); "
              "print(json.dumps(gemmakit.kernels.kernel_status())); "
              "print(llm.generate('Hi', max_tokens=2, temperature=0).usage.completion_tokens)")
    env = {**os.environ, "XDG_CACHE_HOME": str(tmp_path), "CC": str(tmp_path / "no-such-cc")}
    proc = subprocess.run([sys.executable, "-c", "import gemmakit.kernels; " + script], capture_output=True,
                          text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr
    status, tokens = proc.stdout.splitlines()
    assert json.loads(status) == {"available": False,
                                  "reason": f"cannot run the C compiler {str(tmp_path / 'no-such-cc')!r}: "
                                            "No such file or directory"}
    assert tokens == "2"
    warnings = [line for line in proc.stderr.splitlines() if "CPU kernels unavailable" in line]
    assert len(warnings) == 1 and "much slower" in warnings[0] and "no-such-cc" in warnings[0]
