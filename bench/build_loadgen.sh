#!/usr/bin/env bash
# Compile bench/loadgen.c into bench/.build/loadgen (git-ignored).
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
mkdir -p "$here/.build"
gcc -O2 -pthread -Wall -Wextra -o "$here/.build/loadgen" "$here/loadgen.c" -lm
