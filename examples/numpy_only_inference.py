"""Run a ringtrain model file on a device that has numpy and nothing else (not ringtrain).

    ringtrain export ringtrain-default --int8 --out model-int8.safetensors
    python examples/numpy_only_inference.py model-int8.safetensors x.npy   # prints classes

The file is the safetensors layout: an 8-byte little-endian header length, a JSON header
(tensor name -> dtype, shape, byte offsets; ``__metadata__`` -> the architecture), then the
raw tensors. An int8 weight ``i.weight`` has its per-output-column float32 scales in
``i.weight.scale``. This script is self-contained on purpose: copy it to the device.
"""

from __future__ import annotations

import json
import re
import sys

import numpy as np

DTYPES = {"F64": "<f8", "F32": "<f4", "I8": "i1"}


def load(path: str) -> tuple[list[str], dict[str, np.ndarray]]:
    """(layer texts, tensors) of a model file."""
    with open(path, "rb") as handle:
        size = int.from_bytes(handle.read(8), "little")
        header = json.loads(handle.read(size))
        data = handle.read()
    layers = json.loads(header.pop("__metadata__")["layers"])
    tensors = {}
    for name, entry in header.items():
        begin, end = entry["data_offsets"]
        tensors[name] = np.frombuffer(data[begin:end], DTYPES[entry["dtype"]]).reshape(
            entry["shape"])
    return layers, tensors


def forward(layers: list[str], tensors: dict[str, np.ndarray], x: np.ndarray) -> np.ndarray:
    """The model's outputs for a batch ``x`` of shape (n, features)."""
    out = x.astype(np.float32)
    for index, layer in enumerate(layers):
        if layer.startswith("Dense("):
            weight = tensors[f"{index}.weight"].astype(np.float32)
            scale = tensors.get(f"{index}.weight.scale")
            if scale is not None:
                weight = weight * scale
            out = out @ weight + tensors[f"{index}.bias"]
        elif layer == "ReLU()":
            out = np.maximum(out, 0)
        elif layer == "Tanh()":
            out = np.tanh(out)
        else:
            raise SystemExit(f"unknown layer {layer!r}")
    return out


if __name__ == "__main__":
    if len(sys.argv) != 3 or not re.search(r"\.npy$", sys.argv[2]):
        raise SystemExit("usage: numpy_only_inference.py MODEL.safetensors X.npy")
    model_layers, model_tensors = load(sys.argv[1])
    batch = np.load(sys.argv[2], allow_pickle=False)
    sys.stdout.write("".join(f"{c}\n" for c in
                             np.argmax(forward(model_layers, model_tensors, batch), axis=1)))
