"""The I/O layer, below models/: safetensors files, HF folders (atomic writes, sharding), hub path resolution and
name-level checkpoint access. Imports nothing from the rest of the package except validation's checks."""
