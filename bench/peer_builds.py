"""Peer servers for ``bench/peer_servers.py``: llama.cpp's own ``llama-server``, built once into a cache.

The server is built from the very llama.cpp sources that the installed ``llama-cpp-python``
vendors (its sdist's ``vendor/llama.cpp``), so both sides of the comparison run the same kernels;
only the serving loop around them differs. The build (about 5-15 minutes on 2 cores) is part of
the benchmark, not of any test, and is reused from ``~/.cache/cy-llm/llama-server-<version>/``.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import aiohttp

CACHE = Path(os.environ.get("CY_BENCH_CACHE", Path.home() / ".cache" / "cy-llm"))
CMAKE_FLAGS = ("-DLLAMA_BUILD_SERVER=ON", "-DLLAMA_CURL=OFF", "-DLLAMA_OPENSSL=OFF", "-DCMAKE_BUILD_TYPE=Release")


async def wait_healthy(proc: asyncio.subprocess.Process, url: str, log: Path, name: str,
                       timeout: float = 300, interval: float = 0.5) -> None:
    """Poll ``url``'s ``/health`` until it answers 200; raise (with the end of ``log``) if the peer
    server ``name`` exits first or ``timeout`` passes."""
    async with aiohttp.ClientSession() as s:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if proc.returncode is not None:
                tail = log.read_text(errors="replace")[-3000:] if log.is_file() else ""
                raise RuntimeError(f"{name} exited with {proc.returncode}; see {log}:\n{tail}")
            with contextlib.suppress(aiohttp.ClientError):
                async with s.get(f"{url}/health") as r:
                    if r.status == 200:
                        return
            await asyncio.sleep(interval)
    raise TimeoutError(f"{name} did not become healthy in {timeout:.0f} s; see {log}")


def llama_cpp_python_version() -> str:
    """The installed ``llama-cpp-python`` version (whose vendored llama.cpp the server is built from)."""
    import llama_cpp

    return llama_cpp.__version__


def _sdist(version: str, work: Path) -> Path:
    """The ``llama-cpp-python`` sdist of ``version``: from the cache, else downloaded with pip."""
    name = f"llama_cpp_python-{version}.tar.gz"
    for where in (work, Path("/opt/wheels")):
        if (where / name).is_file():
            return where / name
    work.mkdir(parents=True, exist_ok=True)
    subprocess.run([sys.executable, "-m", "pip", "download", "--no-binary", ":all:", "--no-deps",
                    f"llama-cpp-python=={version}", "-d", str(work)], check=True)
    return work / name


def _vendored_sources(version: str) -> Path:
    """``vendor/llama.cpp`` of the sdist, extracted under the cache."""
    work = CACHE / "src"
    root = work / f"llama_cpp_python-{version}"
    if not (root / "vendor" / "llama.cpp" / "CMakeLists.txt").is_file():
        with tarfile.open(_sdist(version, work)) as tar:
            tar.extractall(work, filter="data")
    return root / "vendor" / "llama.cpp"


def llama_server(version: str | None = None, jobs: int = 2) -> Path:
    """Path of a ``llama-server`` built from ``llama-cpp-python``'s vendored llama.cpp (built on first use)."""
    version = version or llama_cpp_python_version()
    target = CACHE / f"llama-server-{version}"
    binary = target / "llama-server"
    if binary.is_file():
        return binary
    src = _vendored_sources(version)
    build = src / "build"
    print(f"building llama-server {version} from {src} (once; several minutes)", file=sys.stderr)
    nice = ["nice", "-n", "10"] if shutil.which("nice") else []
    subprocess.run([*nice, "cmake", "-S", str(src), "-B", str(build), *CMAKE_FLAGS], check=True)
    subprocess.run([*nice, "cmake", "--build", str(build), "--target", "llama-server", "-j", str(jobs)], check=True)
    target.mkdir(parents=True, exist_ok=True)
    for lib in (build / "bin").iterdir():  # the server and the shared ggml/llama libraries beside it
        if lib.is_file():
            shutil.copy2(lib, target / lib.name)
    return binary


if __name__ == "__main__":
    print(llama_server())
