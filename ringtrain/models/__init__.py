"""Saved models: versions, a plain file format any numpy can read, int8 export, loading.

* :mod:`.architecture` writes a :class:`~ringtrain.train.nn.Sequential` as text and builds
  it back (no code is ever executed: a fixed grammar of layer names and integers).
* :mod:`.quantize` quantises Dense weights to int8, one float32 scale per output channel.
* :mod:`.files` reads and writes model files in the safetensors layout (an 8-byte length,
  a JSON header, raw little-endian tensors) with numpy alone, and :func:`load_model`
  loads a model file, a checkpoint or a run directory's newest checkpoint.
* :mod:`.versions` lists the versions of a run directory: job, generation, step, content
  hash and parent of every checkpoint and model file.
"""

from .saved import SavedModel, export_model, load_model
from .tensorfile import ModelFileError, read_tensors, write_tensors
from .versions import Version, VersionEntry, list_versions

__all__ = ["ModelFileError", "SavedModel", "Version", "VersionEntry", "export_model",
           "list_versions", "load_model", "read_tensors", "write_tensors"]
