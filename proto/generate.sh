#!/bin/sh
# Regenerate the committed Python code of the .proto files here; run from the repository root.
# Use a protoc no newer than the protobuf runtime the project pins: grpcio-tools 1.75 bundles protoc 31.1,
# whose code runs on protobuf >= 6.31.1 (pip install "grpcio-tools==1.75.1", the `dev` extra pins it;
# its gRPC stubs ask for grpcio >= 1.75.1).
set -eu
PYTHON=${PYTHON:-python}
"$PYTHON" -m grpc_tools.protoc -Iproto --python_out=pollinate/edge --pyi_out=pollinate/edge proto/bundle.proto
# split.proto is mapped to its package path, so that split_pb2_grpc.py imports
# `from pollinate.methods.sfprompt import split_pb2` rather than a top-level `split_pb2`.
"$PYTHON" -m grpc_tools.protoc -Ipollinate/methods/sfprompt=proto --python_out=. --pyi_out=. \
  --grpc_python_out=. proto/split.proto
for f in pollinate/edge/bundle_pb2.py pollinate/edge/bundle_pb2.pyi pollinate/methods/sfprompt/split_pb2.py \
         pollinate/methods/sfprompt/split_pb2.pyi pollinate/methods/sfprompt/split_pb2_grpc.py; do
  # generated code: keep linters off it
  { echo "# ruff: noqa"; echo "# mypy: ignore-errors"; cat "$f"; } > "$f.tmp" && mv "$f.tmp" "$f"
done
