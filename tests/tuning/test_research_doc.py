"""docs/research.md's worked example (a new objective in under 30 lines) runs as written on a tiny model."""

import os
import re

import numpy as np

from tests.tiny_models import build_model, save_model

DOC = os.path.join(os.path.dirname(__file__), "..", "..", "docs", "research.md")


def test_worked_example_runs_and_its_objective_is_used(tmp_path, capsys):
    text = open(DOC).read()
    (block,) = re.findall(r"```python\n(.*?)```", text, re.S)
    assert len(block.strip().splitlines()) < 30
    folder = save_model(build_model("qwen3_tune", num_layers=1), str(tmp_path / "m"))
    ids = np.random.default_rng(0).integers(3, 301, size=(4, 32)).astype(np.int32)
    ns = dict(MODEL=folder, SETTINGS=dict(dataset=ids, iters=3, nsamples=4, seqlen=32, batch_size=2,
                                          model_dtype="fp32", progress=False))
    exec(compile(block, "docs/research.md", "exec"), ns)
    ar = ns["ar"]
    assert ar.recipe.objective is ns["skip_sink_mse"] and "mean block loss" in capsys.readouterr().out
    # the objective really is what was optimised: with the first 4 positions as the only ones left, the loss is 0
    import jax.numpy as jnp

    out, tgt = jnp.ones((2, 6, 3)), jnp.zeros((2, 6, 3))
    mask = (jnp.arange(6) < 5).astype(jnp.float32)[None, :, None]
    assert float(ns["skip_sink_mse"](out, tgt, mask)) == 1.0
    assert float(ns["skip_sink_mse"](out.at[:, 4:].set(0), tgt, mask)) == 0.0
