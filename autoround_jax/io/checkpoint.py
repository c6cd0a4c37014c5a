"""Name-level access to an HF checkpoint folder (one safetensors file or an indexed set of shards), and hub ids
resolved to local folders. Knows tensor names and files, not models."""

from __future__ import annotations

import os

import numpy as np

from ..validation import check_finite
from .files import read_json
from .safetensors_io import CheckpointError, SafetensorsFile


def resolve_model_path(name_or_path: str) -> str:
    """A local folder as is; otherwise a hub id downloaded (or found in the cache) through huggingface_hub."""
    if os.path.isdir(name_or_path):
        return name_or_path
    if os.path.exists(name_or_path):
        raise FileNotFoundError(f"{name_or_path} is a file: pass the model folder that holds config.json")
    if name_or_path.startswith((".", "/", "~")) or name_or_path.count("/") != 1:
        raise FileNotFoundError(f"model folder {name_or_path} not found: pass an existing folder or a hub id like Qwen/Qwen3-8B")
    from huggingface_hub import snapshot_download

    try:
        return snapshot_download(
            name_or_path,
            allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja", "tokenizer*"],
        )
    except Exception as e:  # offline or unknown repo: one line, with the fix
        raise FileNotFoundError(
            f"cannot fetch {name_or_path} from the hub ({e.__class__.__name__}): download it elsewhere and pass "
            "the local folder, or unset HF_HUB_OFFLINE"
        ) from None


class CheckpointReader:
    """Name-level access to the tensors of an HF folder (model.safetensors or an indexed set of shards)."""

    def __init__(self, path: str):
        self.path = path
        index = os.path.join(path, "model.safetensors.index.json")
        single = os.path.join(path, "model.safetensors")
        if os.path.isfile(index):
            weight_map = read_json(index).get("weight_map")
            if not isinstance(weight_map, dict) or not weight_map or not all(
                    isinstance(k, str) and isinstance(v, str) for k, v in weight_map.items()):
                raise CheckpointError(f"{index}: no \"weight_map\" object of tensor name -> shard file; restore or "
                                      "re-download the index file")
            files = {}
            for fname in sorted(set(weight_map.values())):
                fpath = os.path.join(path, fname)
                if not os.path.isfile(fpath):
                    raise CheckpointError(f"{fpath}: shard listed in model.safetensors.index.json is missing")
                files[fname] = SafetensorsFile(fpath)
            self._where = {}
            for name, fname in weight_map.items():
                if name not in files[fname].keys():
                    raise CheckpointError(f"{fname}: the index lists tensor {name} but the shard does not hold it")
                self._where[name] = files[fname]
        elif os.path.isfile(single):
            f = SafetensorsFile(single)
            self._where = {k: f for k in f.keys()}
        else:
            raise CheckpointError(
                f"{path}: no model.safetensors or model.safetensors.index.json (only safetensors checkpoints load)"
            )

        self._checked: set[str] = set()

    def keys(self) -> list[str]:
        return list(self._where)

    def __contains__(self, name: str) -> bool:
        return name in self._where

    def shape(self, name: str) -> tuple[int, ...]:
        return self._where[name].shape(name)

    def get(self, name: str) -> np.ndarray:
        """The tensor as stored; a float tensor holding NaN or inf is refused (checked once per tensor)."""
        if name not in self._where:
            raise CheckpointError(f"{self.path}: tensor {name} is missing from the checkpoint")
        arr = self._where[name].get(name)
        if name not in self._checked:
            check_finite(arr, name, self._where[name].path)
            self._checked.add(name)
        return arr
