#!/bin/sh
# Regenerate the committed Python code of the .proto files here; run from the repository root.
# Use a protoc no newer than the protobuf runtime the project pins: grpcio-tools 1.75 bundles protoc 31.1,
# whose code runs on protobuf >= 6.31.1 (pip install "grpcio-tools==1.75.*" in a scratch venv).
set -eu
PYTHON=${PYTHON:-python}
"$PYTHON" -m grpc_tools.protoc -Iproto --python_out=pollinate/edge --pyi_out=pollinate/edge proto/bundle.proto
for f in pollinate/edge/bundle_pb2.py pollinate/edge/bundle_pb2.pyi; do
  # generated code: keep linters off it
  { echo "# ruff: noqa"; echo "# mypy: ignore-errors"; cat "$f"; } > "$f.tmp" && mv "$f.tmp" "$f"
done
