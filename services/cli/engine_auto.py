"""``./cy up --engine auto`` (the default): which engine ``up`` starts, and whether it builds llama.cpp.

The rules, the same on CUDA and on every other host:

- the model ships a GGUF (the default model does) and llama-cpp-python imports: llama.cpp, the
  fastest engine for a small model on one host (70-110 tokens/s for one stream on a CPU, against
  about 15 with transformers in fp32);
- the model ships a GGUF and llama-cpp-python does not import (a first run: it compiles from
  source for several minutes): transformers at once, llama-cpp-python built in the background,
  then a switch to llama.cpp without losing or cutting a request (``services.cli.engine_switch``);
- no GGUF: transformers.

``--engine transformers|llamacpp|vllm`` starts that engine and never switches.

Two environment variables replace the machine-facing steps (read once, at start-up):
``CY_LLAMACPP_PROBE``, a shell command whose success means llama-cpp-python is usable (default:
this interpreter imports ``llama_cpp``), and ``CY_LLAMACPP_INSTALL``, the shell command that
installs it (default: ``pip install llama-cpp-python==<the pin of the llamacpp extra>`` into this
interpreter's environment, at the lowest CPU priority).
"""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
from collections.abc import Callable, Mapping
from pathlib import Path
from dataclasses import dataclass

AUTO = "auto"
TRANSFORMERS = "transformers"
LLAMACPP = "llamacpp"
# The pin of pyproject.toml's `llamacpp` extra (a test keeps the two equal).
LLAMACPP_REQUIREMENT = "llama-cpp-python==0.3.36"
PROBE_ENV = "CY_LLAMACPP_PROBE"
INSTALL_ENV = "CY_LLAMACPP_INSTALL"


@dataclass(frozen=True)
class AutoChoice:
    """The engine to start now, why (printed by ``up``), and whether to build llama.cpp and switch to it."""

    engine: str
    reason: str
    build_llamacpp: bool = False


def choose(has_gguf: bool, llamacpp_usable: bool) -> AutoChoice:
    """The ``--engine auto`` rules (module docstring) as a pure function."""
    if not has_gguf:
        return AutoChoice(TRANSFORMERS, "the model ships no GGUF file, which llama.cpp needs")
    if llamacpp_usable:
        return AutoChoice(LLAMACPP, "the model ships a GGUF file and llama-cpp-python is installed "
                                    "(the fastest engine here)")
    return AutoChoice(TRANSFORMERS, "llama-cpp-python is not installed yet: serving with transformers now, "
                                    "building llama.cpp in the background, then switching to it", build_llamacpp=True)


def has_gguf(locate: Callable[[], Path]) -> bool:
    """Whether the GGUF file ``locate`` names exists (a model package without one raises FileNotFoundError)."""
    try:
        return locate().exists()
    except FileNotFoundError:
        return False


@dataclass(frozen=True)
class LlamaCppSetup:
    """How to tell whether llama-cpp-python is usable, and how to install it (shell commands)."""

    probe: str
    install: str

    @classmethod
    def from_env(cls, env: Mapping[str, str] = os.environ, python: str = sys.executable) -> LlamaCppSetup:
        """The commands of this environment: the overrides in ``env``, else this interpreter's import and pip."""
        default_probe = f"{shlex.quote(python)} -c 'import llama_cpp'"
        default_install = (f"nice -n 19 {shlex.quote(python)} -m pip install --disable-pip-version-check --no-input "
                           f"--progress-bar off '{LLAMACPP_REQUIREMENT}'")
        return cls(probe=env.get(PROBE_ENV) or default_probe, install=env.get(INSTALL_ENV) or default_install)

    def usable(self) -> bool:
        """Whether the probe succeeds now (a fresh process: an install since start-up counts)."""
        done = subprocess.run(self.probe, shell=True, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL, check=False)
        return done.returncode == 0

