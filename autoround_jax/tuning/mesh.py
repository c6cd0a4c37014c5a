"""The device mesh of a tuning run: which devices, which axes, and how activations and block leaves are laid out.

Two axes, both optional:
- `data`: the cached activations are sharded along samples; each step's mini-batch is split over the data shards and
  XLA sums the gradients (an all-reduce it inserts itself).
- `fsdp`: the block's float weights, V and clip scales are sharded along output features (models/sharding.py's
  rules), so a block larger than one device's memory tunes.

Everything here is plain `jax.sharding` (jit propagates the shardings; no pmap), so the same code runs on one host or
under `jax.distributed.initialize()` on many, where the mesh spans every process's devices.
"""

from __future__ import annotations

import math
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

AXES = ("data", "fsdp")


def select_devices(device_map: str | int | Sequence[int] | None = None) -> list:
    """The devices a run may use: all of them (every process's, in order), or the reference's `--device_map 0,1,2,3`
    / `--device 0` (indices into jax.devices(); "auto", "cpu", "cuda", "tpu" mean all)."""
    devices = jax.devices()
    if device_map is None or (isinstance(device_map, str) and device_map.strip().lower() in
                              ("", "auto", "cpu", "cuda", "gpu", "tpu", "xpu")):
        return devices
    if isinstance(device_map, int):
        picks = [device_map]
    elif isinstance(device_map, str):
        text = device_map.strip().lower().replace("cuda:", "").replace("gpu:", "").replace("tpu:", "")
        try:
            picks = [int(p) for p in text.split(",") if p.strip()]
        except ValueError:
            raise ValueError(f"--device_map {device_map!r}: give device indices like 0,1,2,3 (or auto)") from None
    else:
        picks = [int(p) for p in device_map]
    bad = [p for p in picks if not 0 <= p < len(devices)]
    if bad or len(set(picks)) != len(picks) or not picks:
        raise ValueError(f"--device_map {device_map!r}: this machine has {len(devices)} devices (indices 0 to "
                         f"{len(devices) - 1}); give distinct indices among them")
    return [devices[p] for p in picks]


def parse_mesh_spec(spec: str | dict | None) -> dict[str, int]:
    """'data=4,fsdp=2' -> {'data': 4, 'fsdp': 2}; unknown axis names and non-positive sizes are refused."""
    if spec is None:
        return {}
    if isinstance(spec, dict):
        items = list(spec.items())
    else:
        items = []
        for part in str(spec).split(","):
            if not part.strip():
                continue
            name, eq, size = part.partition("=")
            if not eq:
                raise ValueError(f"--mesh {spec!r}: write axes as name=size, e.g. data=4,fsdp=2")
            try:
                items.append((name.strip(), int(size)))
            except ValueError:
                raise ValueError(f"--mesh {spec!r}: axis size {size.strip()!r} is not an integer") from None
    out: dict[str, int] = {}
    for name, size in items:
        if name not in AXES:
            raise ValueError(f"--mesh: unknown axis {name!r}: the axes are {' and '.join(AXES)} (e.g. data=4,fsdp=2)")
        if name in out:
            raise ValueError(f"--mesh: axis {name!r} given twice")
        if int(size) < 1:
            raise ValueError(f"--mesh: axis {name}={size} must be at least 1")
        out[name] = int(size)
    return out


def make_mesh(spec: str | dict | Mesh | None = None, device_map=None, batch_size: int | None = None) -> Mesh | None:
    """The run's Mesh (axes data, fsdp), or None for a plain one-device run.

    Default: the selected devices on `data` (as many as divide batch_size, so that the default never refuses a
    batch). A mesh whose size (the product of its axes) exceeds the selected devices is refused; a smaller one uses
    the first devices.
    """
    if isinstance(spec, Mesh):
        unknown = [a for a in spec.axis_names if a not in AXES]
        if unknown:
            raise ValueError(f"mesh axis {unknown[0]!r} is unknown: name the axes {' and '.join(AXES)}")
        return spec
    devices = select_devices(device_map)
    sizes = parse_mesh_spec(spec)
    if not sizes:
        d = len(devices)
        if batch_size:
            d = max(k for k in range(1, d + 1) if batch_size % k == 0)
            if d < len(devices):
                print(f"autoround-jax: tuning on {d} of {len(devices)} devices (batch_size {batch_size} splits over "
                      f"{d}); pass a batch_size that is a multiple of {len(devices)} to use them all")
        sizes = {"data": d}
    need = math.prod(sizes.values())
    if need > len(devices):
        raise ValueError(f"--mesh {','.join(f'{k}={v}' for k, v in sizes.items())} needs {need} devices but "
                         f"{len(devices)} are available: make the product of the axis sizes at most {len(devices)}")
    if need == 1 and jax.process_count() == 1:
        return None  # one device: the plain path, byte-identical to a run without a mesh
    shape = (sizes.get("data", 1), sizes.get("fsdp", 1))
    return Mesh(np.asarray(devices[:need], dtype=object).reshape(shape), AXES)


def axis_size(mesh: Mesh | None, axis: str) -> int:
    return 1 if mesh is None or axis not in mesh.shape else int(mesh.shape[axis])


def check_batch(mesh: Mesh | None, batch_size: int) -> None:
    """Each micro-batch is split over the data shards, so batch_size must divide by the data axis."""
    d = axis_size(mesh, "data")
    if batch_size % d:
        lower = max(k for k in range(1, d + 1) if batch_size % k == 0 and d % k == 0)
        raise ValueError(f"batch_size {batch_size} does not split over data={d} devices: use a batch_size that is a "
                         f"multiple of {d}, or a smaller data axis (e.g. --mesh data={lower})")


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def rows_sharding(mesh: Mesh) -> NamedSharding:
    """Sharded along the leading (sample) axis over `data`, replicated over `fsdp`."""
    return NamedSharding(mesh, P("data"))


def put_rows(rows_of, n: int, row_shape: tuple[int, ...], dtype, mesh: Mesh, rows: int) -> jax.Array:
    """A [rows, *row_shape] array sharded over `data`, zero beyond row n; rows_of(start, stop) -> numpy rows
    start..stop-1 (< n). Each process computes only the rows of its own devices (its share of the calibration data).
    """
    def shard(index):
        sl = index[0]
        start, stop = sl.start or 0, rows if sl.stop is None else sl.stop
        part = np.asarray(rows_of(start, min(stop, n)), dtype) if start < n else np.zeros((0,) + row_shape, dtype)
        if part.shape[0] < stop - start:
            part = np.concatenate([part, np.zeros((stop - start - part.shape[0],) + row_shape, dtype)])
        return part[(slice(None),) + tuple(index[1:])]

    return jax.make_array_from_callback((rows,) + tuple(row_shape), rows_sharding(mesh), shard)


def _gather_rows(x: jax.Array, idx: jax.Array) -> jax.Array:
    """x[idx], with 16-bit floats gathered as their uint16 bits: XLA:CPU has no bf16 gather and upcasts the whole
    operand to f32 first, which converted every cached activation row (not just the mini-batch) in every iteration
    (2.1 ms of a 75 ms SmolLM2 step at 8 cached samples, growing with nsamples). Bit-exact."""
    if x.dtype.itemsize == 2 and jnp.issubdtype(x.dtype, jnp.floating):
        bits = jax.lax.bitcast_convert_type(x, jnp.uint16)[idx]
        return jax.lax.bitcast_convert_type(bits, x.dtype)
    return x[idx]


def take_rows(x: jax.Array, idx: jax.Array, mesh: Mesh | None) -> jax.Array:
    """x[idx] for a mini-batch inside jit; on a mesh the result is sharded over `data` like x.

    Each data shard picks the rows of idx it holds (zeros elsewhere) and a reduce-scatter hands every shard its
    slice of the batch: one batch of rows crosses the interconnect, never the cached activations. Exact: each row is
    a sum of one value and zeros.
    """
    if mesh is None or axis_size(mesh, "data") == 1:
        return _gather_rows(x, idx)

    def local(xl, ids):
        n_local = xl.shape[0]
        li = ids - jax.lax.axis_index("data") * n_local
        own = (li >= 0) & (li < n_local)
        rows = jnp.where(own.reshape((-1,) + (1,) * (xl.ndim - 1)), _gather_rows(xl, jnp.clip(li, 0, n_local - 1)),
                         jnp.zeros((), xl.dtype))
        return jax.lax.psum_scatter(rows, "data", scatter_dimension=0, tiled=True)

    return jax.shard_map(local, mesh=mesh, in_specs=(P("data"), P()), out_specs=P("data"))(x, idx)


def per_device_memory() -> list[tuple[str, float, float]]:
    """(device, bytes in use GB, peak GB) for each local device that reports memory stats (GPU/TPU; CPU: none)."""
    out = []
    for d in jax.local_devices():
        try:
            stats = d.memory_stats() or {}
        except Exception:  # noqa: BLE001 - backends without memory stats
            stats = {}
        if stats:
            out.append((str(d), stats.get("bytes_in_use", 0) / 1e9, stats.get("peak_bytes_in_use", 0) / 1e9))
    return out


def describe(mesh: Mesh | None) -> str:
    if mesh is None:
        return f"1 device ({jax.devices()[0].platform})"
    axes = ",".join(f"{a}={s}" for a, s in mesh.shape.items())
    procs = f" over {jax.process_count()} processes" if jax.process_count() > 1 else ""
    return f"{mesh.size} {mesh.devices.flat[0].platform} devices ({axes}){procs}"
