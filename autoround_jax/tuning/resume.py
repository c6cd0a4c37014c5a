"""Resume a quantization run after a crash, a preemption or `kill -9`, from the last finished block.

Layout of a resume folder (orbax, every write atomic: a folder is written under a temporary name and renamed when
complete, so a kill during a save leaves the previous checkpoint usable):

    DIR/state/<n>/       orbax CheckpointManager step n = blocks finished (max_to_keep=1):
        arrays/          what block n needs: the quantized-input chain x_q and the float inputs x_fp (x_q is not
                         stored when it is x_fp), with the run's shardings on restore
        meta/            JSON: signature and settings of the run, the sampler's random.Random state, the per-block
                         reports, a crc32 of every stored array and of every block's codes
    DIR/blocks/<i>/      block i's integer codes (QuantizedWeight trees) and imatrix, written once when block i ends

Block codes live in their own folders so a checkpoint costs the activations plus one block's codes, not all codes
so far. Both are written by a background thread while the next block tunes (codes first, then the step that
names them), and the next save() waits for it: a checkpoint then costs the tuner almost nothing on a host whose
cores are idle while an accelerator tunes; a kill loses at most the block whose checkpoint was being written. A later streaming export can mark a block "already written" in meta instead of keeping its codes here.
A checkpoint whose signature differs (another model, scheme, dataset, ...) is never reused; one that fails its
checksums or cannot be read is dropped with one line, and the run starts fresh.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import random
import shutil
import sys
import threading
import time
import zlib
from typing import Any, Callable, Mapping

import jax
import numpy as np

from ..models.quantized import BlockReport
from ..quant.qdq import QuantizedWeight

RESUME_ENV = "AR_RESUME_DIR"  # the reference's name
FORMAT_VERSION = 1
_CODES = ("codes", "scales", "zeros")


def default_resume_dir(output_dir: str) -> str:
    """A hidden folder beside the output folder: <parent>/.<name>.autoround-resume."""
    out = os.path.abspath(output_dir)
    return os.path.join(os.path.dirname(out), f".{os.path.basename(out)}.autoround-resume")


def model_identity(path: str) -> dict[str, Any]:
    """What identifies a model folder's weights cheaply: config.json's hash and, per safetensors file, its size and
    the hash of its header (names, dtypes, shapes, offsets). Different weights of equal layout are not told apart
    unless the files differ in header; copying or touching a folder does not change it."""
    out: dict[str, Any] = {}
    for name in sorted(os.listdir(path)):
        file = os.path.join(path, name)
        if name == "config.json":
            out[name] = _sha256_file(file)
        elif name.endswith(".safetensors"):
            with open(file, "rb") as f:
                n = int.from_bytes(f.read(8), "little")
                out[name] = [os.path.getsize(file), hashlib.sha256(f.read(min(n, 100_000_000))).hexdigest()]
    return out


def _sha256_file(file: str) -> str:
    with open(file, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def signature(settings: Mapping[str, Any]) -> str:
    return hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()


def _crc(a) -> int:
    return zlib.crc32(np.ascontiguousarray(np.asarray(a)).view(np.uint8).reshape(-1))


def _nest(flat: Mapping[str, Any]) -> dict[str, Any]:
    """{"self_attn.q_proj": v} -> {"self_attn": {"q_proj": v}}: orbax joins tree keys with dots itself."""
    out: dict[str, Any] = {}
    for key, v in flat.items():
        *head, last = key.split(".")
        d = out
        for h in head:
            d = d.setdefault(h, {})
        d[last] = v
    return out


def _get(tree: Mapping[str, Any], key: str):
    for part in key.split("."):
        tree = tree[part]
    return tree


@dataclasses.dataclass
class ResumeState:
    """What the next block needs, as restored."""

    next_block: int
    carry: dict[str, jax.Array]  # "x_fp" and (unless equal to it) "x_q"
    rng_state: Any  # random.Random.getstate(), or None
    quantized: dict[str, QuantizedWeight]
    imatrix: dict[str, np.ndarray]
    reports: list[BlockReport]


class CorruptCheckpoint(ValueError):
    """A resume checkpoint that fails its checksums or its layout."""


class Resumer:
    """Saves after each finished block and restores at the start of a run; a no-op without a directory."""

    def __init__(self, directory: str | None, resume: bool = True, announce: Callable[[str], None] | None = None):
        self.directory = os.path.abspath(directory) if directory else None
        self.resume = resume
        self.announce = announce or (lambda line: print(line, file=sys.stderr, flush=True))
        self.settings: dict[str, Any] = {}
        self._manager = None
        self._meta_blocks: dict[str, Any] = {}
        self._writer: threading.Thread | None = None
        self._error: BaseException | None = None
        self.background_seconds: list[float] = []  # per state write (benchmarks read it)

    @property
    def enabled(self) -> bool:
        return self.directory is not None

    # -- start ---------------------------------------------------------------------------------------------------
    def begin(self, settings: Mapping[str, Any], carry_like: Mapping[str, jax.Array],
              num_blocks: int) -> ResumeState | None:
        """The checkpoint of this very run if there is a usable one (announced), else None after clearing the
        folder (announced with the reason when there was something to drop). carry_like gives the activations'
        shapes, dtypes and shardings (the run's own, freshly computed)."""
        self.settings = json.loads(json.dumps(dict(settings), default=str))
        self._meta_blocks = {}
        if not self.enabled:
            return None
        state_dir = os.path.join(self.directory, "state")
        if not self.resume:
            if os.path.isdir(self.directory):
                self.announce(f"not resuming (--no_resume): starting fresh, replacing checkpoint {self.directory}")
            self.clear()
            return None
        if not os.path.isdir(state_dir):
            self.clear()
            return None
        try:
            restored = self._restore(carry_like, num_blocks)
        except _DifferentRun as e:
            self.announce(f"resume checkpoint {self.directory} is from a different run ({e}): starting fresh")
            self.clear()
            return None
        except Exception as e:  # noqa: BLE001 -- any unreadable checkpoint: say so once and start over
            msg = (str(e).splitlines()[0] if str(e) else "").split(" See full TensorStore")[0]
            self.announce(f"resume checkpoint {self.directory} is unreadable ({e.__class__.__name__}: {msg[:200]}): "
                          "starting fresh")
            self.clear()
            return None
        if restored is None:
            self.clear()
            return None
        self.announce(f"resuming from block {restored.next_block} of {num_blocks} (checkpoint {self.directory})")
        return restored

    def _open(self):
        import orbax.checkpoint as ocp

        if self._manager is None:
            opts = ocp.CheckpointManagerOptions(max_to_keep=1, create=True, enable_async_checkpointing=False)
            self._manager = ocp.CheckpointManager(os.path.join(self.directory, "state"), options=opts)
        return self._manager

    def _restore(self, carry_like: Mapping[str, jax.Array], num_blocks: int) -> ResumeState | None:
        import orbax.checkpoint as ocp

        mgr = self._open()
        step = mgr.latest_step()
        if step is None:
            return None
        meta = mgr.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
        if meta.get("format_version") != FORMAT_VERSION:
            raise _DifferentRun(f"checkpoint format {meta.get('format_version')}, this version writes "
                                f"{FORMAT_VERSION}")
        if meta.get("signature") != signature(self.settings):
            raise _DifferentRun(_what_changed(meta.get("settings", {}), self.settings))
        if meta["next_block"] != step or not 0 < step <= num_blocks:
            raise CorruptCheckpoint(f"step {step} holds block {meta['next_block']} of {num_blocks}")
        names = [k for k in ("x_fp", "x_q") if k in meta["crc"]]
        target = {k: jax.ShapeDtypeStruct(carry_like[k].shape, carry_like[k].dtype,
                                          sharding=getattr(carry_like[k], "sharding", None)) for k in names}
        arrays = mgr.restore(step, args=ocp.args.Composite(arrays=ocp.args.StandardRestore(target)))["arrays"]
        for k in names:
            if _crc(arrays[k]) != meta["crc"][k]:
                raise CorruptCheckpoint(f"{k} fails its checksum")
        quantized, imatrix = {}, {}
        for i in range(step):
            q, im = self._read_block(i, meta["blocks"].get(str(i)))
            quantized.update(q)
            imatrix.update(im)
        self._meta_blocks = dict(meta["blocks"])
        rng = meta.get("rng")
        rng_state = None if rng is None else (rng[0], tuple(rng[1]), rng[2])
        reports = [BlockReport(**r) for r in meta["reports"]]
        return ResumeState(step, dict(arrays), rng_state, quantized, imatrix, reports)

    def _read_block(self, i: int, info: Mapping[str, Any] | None):
        import orbax.checkpoint as ocp

        if info is None:
            raise CorruptCheckpoint(f"no record of block {i}")
        if not info["layers"] and not info["imatrix"]:
            return {}, {}
        tree = ocp.StandardCheckpointer().restore(os.path.join(self.directory, "blocks", str(i)))
        quantized, imatrix = {}, {}
        for name, s in info["layers"].items():
            arrs = {k: np.asarray(_get(tree, f"codes.{name}.{k}")) for k in _CODES}
            if [_crc(arrs[k]) for k in _CODES] != s["crc"]:
                raise CorruptCheckpoint(f"the codes of {name} fail their checksum")
            quantized[name] = QuantizedWeight(**arrs, bits=s["bits"], group_size=s["group_size"], sym=s["sym"])
        for name, crc in info["imatrix"].items():
            a = np.asarray(_get(tree, f"imatrix.{name}"))
            if _crc(a) != crc:
                raise CorruptCheckpoint(f"the imatrix of {name} fails its checksum")
            imatrix[name] = a
        return quantized, imatrix

    # -- after each block ----------------------------------------------------------------------------------------
    def save(self, i: int, carry: Mapping[str, jax.Array], rng: random.Random | None,
             codes: Mapping[str, QuantizedWeight], imatrix: Mapping[str, np.ndarray],
             reports: list[BlockReport]) -> None:
        """Block i is finished: in a background thread, write its codes, then the activations the next block needs
        (step i + 1, which names block i's codes only once they are on disk). Returns at once after the previous
        checkpoint is complete; the arguments are snapshotted here (the arrays are immutable)."""
        if not self.enabled:
            return
        self.wait()
        snapshot = dict(carry), None if rng is None else _json_rng(rng.getstate()), dict(codes), dict(imatrix), [
            dataclasses.asdict(r) for r in reports]
        self._writer = threading.Thread(target=self._write, args=(i, *snapshot), name="autoround-resume")
        self._writer.start()

    def _write(self, i: int, arrays: dict, rng_state, codes: dict, imatrix: dict, reports: list) -> None:
        import orbax.checkpoint as ocp

        try:
            t0 = time.perf_counter()
            layers = {n: dict(bits=q.bits, group_size=q.group_size, sym=q.sym,
                              crc=[_crc(getattr(q, k)) for k in _CODES]) for n, q in codes.items()}
            im = {n: _crc(v) for n, v in imatrix.items()}
            if layers or im:
                tree = {"codes": _nest({f"{n}.{k}": np.asarray(getattr(q, k)) for n, q in codes.items()
                                        for k in _CODES}),
                        "imatrix": _nest({n: np.asarray(v) for n, v in imatrix.items()})}
                ckpt = ocp.StandardCheckpointer()
                ckpt.save(os.path.join(self.directory, "blocks", str(i)), {k: v for k, v in tree.items() if v},
                          force=True)
                ckpt.wait_until_finished()
            self._meta_blocks[str(i)] = {"layers": layers, "imatrix": im}
            meta = {"format_version": FORMAT_VERSION, "signature": signature(self.settings),
                    "settings": self.settings, "next_block": i + 1, "rng": rng_state, "reports": reports,
                    "blocks": dict(self._meta_blocks), "crc": {k: _crc(v) for k, v in arrays.items()}}
            mgr = self._open()
            mgr.save(i + 1, args=ocp.args.Composite(arrays=ocp.args.StandardSave(arrays),
                                                    meta=ocp.args.JsonSave(meta)), force=True)
            mgr.wait_until_finished()
            self.background_seconds.append(time.perf_counter() - t0)
        except BaseException as e:  # noqa: BLE001 -- raised in the tuner's thread by wait()
            self._error = e

    def wait(self) -> None:
        """Until the last checkpoint is on disk; its write error, if any, is raised here."""
        if self._writer is not None:
            self._writer.join()
            self._writer = None
        if self._error is not None:
            e, self._error = self._error, None
            raise e

    def clear(self) -> None:
        """Remove the checkpoint (a finished export, or a fresh start)."""
        try:
            self.wait()
        except Exception:  # noqa: BLE001 -- a failed write of a checkpoint being removed does not matter
            pass
        if self._manager is not None:
            self._manager.close()
            self._manager = None
        if self.directory and os.path.isdir(self.directory):
            shutil.rmtree(self.directory, ignore_errors=True)


class _DifferentRun(Exception):
    pass


def _json_rng(state) -> list:
    version, internal, gauss = state
    return [version, list(internal), gauss]


def _what_changed(old: Mapping[str, Any], new: Mapping[str, Any]) -> str:
    """'bits changed: 4 -> 3' for the first setting that differs (all of them named when several do)."""
    order = [k for k in new if k != "calibration_sha256"] + [k for k in old if k not in new] + ["calibration_sha256"]
    keys = [k for k in dict.fromkeys(order) if old.get(k) != new.get(k)]  # user-facing settings before derived ones
    if not keys:
        return "settings differ"
    k = keys[0]
    a, b = json.dumps(old.get(k), default=str), json.dumps(new.get(k), default=str)
    one = f"{k} changed: {a[:60]} -> {b[:60]}"
    return one if len(keys) == 1 else f"{one}; also {', '.join(keys[1:])}"


def run_settings(ar, pipeline: str) -> dict[str, Any]:
    """Every setting of an AutoRound run that changes its result (the signature's input), readable by name."""
    from ..version import __version__

    s = ar.default_scheme
    return {
        "pipeline": pipeline, "autoround_jax_version": __version__,
        "model": os.path.abspath(ar.model_path), "model_files": model_identity(ar.model_path),
        "model_dtype": str(np.dtype(ar.model_dtype)), "compute_dtype": str(np.dtype(ar.compute_dtype)),
        "bits": s.bits, "group_size": s.group_size, "sym": s.sym, "data_type": s.data_type,
        "layer_config": {n: None if v is None else dataclasses.asdict(v) for n, v in sorted(ar.layer_config.items())},
        "dataset": ar.dataset if ar.dataset is None or isinstance(ar.dataset, str) else repr(ar.dataset),
        "nsamples": ar.nsamples, "seqlen": ar.seqlen, "seed": ar.seed,
        "calibration_sha256": getattr(ar, "_calibration_sha256", None),
        "iters": ar.iters, "lr": ar.lr, "minmax_lr": ar.minmax_lr, "batch_size": ar.batch_size,
        "gradient_accumulate_steps": ar.gradient_accumulate_steps,
        "enable_minmax_tuning": ar.enable_minmax_tuning, "enable_quanted_input": ar.enable_quanted_input,
        "not_use_best_mse": ar.not_use_best_mse, "scale_dtype": str(np.dtype(ar.scale_dtype)),
        "disable_opt_rtn": ar.disable_opt_rtn,
    }
