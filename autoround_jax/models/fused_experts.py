"""Checkpoints that hold MoE experts fused, as transformers 5 keeps them in memory: `mlp.experts.gate_up_proj`
[E, 2I, D] (gate rows first, then up) and `mlp.experts.down_proj` [E, D, I]. save_pretrained and hub checkpoints use
per-expert names (`mlp.experts.E.gate_proj.weight`); this view presents a fused checkpoint under those names, so the
params table, the loader and the exporters see one naming whatever the file holds.
"""

from __future__ import annotations

import re

import numpy as np

_FUSED = re.compile(r"^(?P<p>.*\.mlp\.experts)\.(?P<kind>gate_up_proj|down_proj)$")


class UnfusedExperts:
    """A CheckpointReader view: fused expert tensors appear as per-expert 2-D tensors (read lazily, one slice each)."""

    def __init__(self, reader):
        self.reader, self.path = reader, reader.path
        self._virtual: dict[str, tuple[str, int, slice]] = {}  # per-expert name -> (fused name, expert, rows)
        for name in reader.keys():
            m = _FUSED.match(name)
            if not m:
                continue
            shape = reader.shape(name)
            if len(shape) != 3:
                continue
            n_exp, rows = shape[0], shape[1]
            parts = ({"gate_proj": slice(0, rows // 2), "up_proj": slice(rows // 2, rows)}
                     if m["kind"] == "gate_up_proj" else {"down_proj": slice(0, rows)})
            for e in range(n_exp):
                for lin, sl in parts.items():
                    self._virtual[f"{m['p']}.{e}.{lin}.weight"] = (name, e, sl)
        self._hidden = {v[0] for v in self._virtual.values()}
        self._cache: tuple[str, np.ndarray] | None = None  # the last fused tensor read (a block's experts in a row)

    @property
    def fused(self) -> bool:
        return bool(self._virtual)

    def keys(self) -> list[str]:
        return [k for k in self.reader.keys() if k not in self._hidden] + list(self._virtual)

    def __contains__(self, name: str) -> bool:
        return name in self._virtual or (name in self.reader and name not in self._hidden)

    def shape(self, name: str) -> tuple[int, ...]:
        if name in self._virtual:
            fused, _, sl = self._virtual[name]
            shape = self.reader.shape(fused)
            return (sl.stop - sl.start, shape[2])
        return self.reader.shape(name)

    def get(self, name: str) -> np.ndarray:
        if name in self._virtual:
            fused, e, sl = self._virtual[name]
            if self._cache is None or self._cache[0] != fused:
                self._cache = (fused, np.asarray(self.reader.get(fused)))
            return np.ascontiguousarray(self._cache[1][e, sl])
        return self.reader.get(name)


def unfused(reader):
    """reader itself for per-expert checkpoints, else the per-expert view of its fused expert tensors."""
    view = UnfusedExperts(reader)
    return view if view.fused else reader
