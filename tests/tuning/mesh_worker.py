"""Run by tests/tuning/test_mesh.py in a subprocess with 8 simulated CPU devices (XLA_FLAGS must be set before jax
starts, so it cannot run inside the pytest process). Prints one JSON line with what the tests assert on."""

import json
import os
import sys

import numpy as np


def run(path, ids, mesh, low=False, **kw):
    from autoround_jax.tuning.autoround import AutoRound

    ar = AutoRound(path, iters=4, nsamples=ids.shape[0], seqlen=ids.shape[1], batch_size=8, dataset=ids, mesh=mesh,
                   low_gpu_mem_usage=low, progress=False, **kw)
    ar.quantize()
    return ar


def compare(base, other) -> dict:
    same = total = 0
    worst_scale = worst_loss = 0.0
    for name, qw in base.quantized.items():
        q = other.quantized[name]
        same += int(np.sum(np.asarray(q.codes) == np.asarray(qw.codes)))
        total += np.asarray(qw.codes).size
        a, b = np.asarray(qw.scales, np.float64), np.asarray(q.scales, np.float64)
        worst_scale = max(worst_scale, float(np.max(np.abs(a - b) / np.maximum(np.abs(a), 1e-12))))
    for r0, r1 in zip(base.reports, other.reports):
        for a, b in ((r0.loss_rtn, r1.loss_rtn), (r0.loss_best, r1.loss_best)):
            worst_loss = max(worst_loss, abs(a - b) / abs(a))
    return {"codes_equal": same / total, "scale_rel": worst_scale, "loss_rel": worst_loss}


def shard_rows(ar) -> dict:
    """Rows of each device's shard: of the cached activations, of a fsdp-sharded weight, of its V and clip scale."""
    x, n, *_ = ar._tuning_inputs()
    block = ar._load_block(0)
    ar._to_fake_quant(block, ar._block_schemes(0))
    w = block.mlp.up_proj.weight
    rows = lambda a: sorted({s.data.shape[0] for s in a.addressable_shards})  # noqa: E731
    return {"x_rows": x.shape[0], "x_shards": rows(x), "w_rows": w.w.shape[0], "w_shards": rows(w.w[...]),
            "v_rows": w.v.shape[0], "v_shards": rows(w.v[...]), "scale_shards": rows(w.min_scale[...])}


def main() -> None:
    import jax

    from autoround_jax.tuning.autoround import AutoRound

    assert jax.device_count() == 8, jax.devices()
    out = {}
    ids = np.random.default_rng(0).integers(3, 300, (16, 24)).astype(np.int32)
    for label, path, meshes in (("qwen3", sys.argv[1], ("data=8", "data=4,fsdp=2", "data=2+low")),
                                ("qwen2", sys.argv[2], ("data=4,fsdp=2",))):
        base = run(path, ids, "data=1")
        assert base.mesh is None
        for spec in meshes:
            ar = run(path, ids, spec.split("+")[0], low=spec.endswith("+low"))
            out[f"{label} {spec}"] = compare(base, ar)
        if label == "qwen3":  # per-sample loss masks (trailing repeats: the reference's rule without a pad id)
            masked = ids.copy()
            masked[:, -4:] = 7
            base_m = run(path, masked, "data=1")
            assert base_m._valid is not None
            for spec in ("data=4", "data=2+low"):
                out[f"{label} {spec} masked"] = compare(base_m, run(path, masked, spec.split("+")[0],
                                                                    low=spec.endswith("+low")))
        out[f"{label} shards"] = shard_rows(AutoRound(path, iters=4, nsamples=ids.shape[0], seqlen=ids.shape[1],
                                                      batch_size=8, dataset=ids, mesh="data=4,fsdp=2", progress=False))
    print("RESULT " + json.dumps(out))


if __name__ == "__main__":
    main()
