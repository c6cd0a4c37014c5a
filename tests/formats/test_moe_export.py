"""Qwen3-MoE / Qwen2-MoE exports against the reference's (auto-round 0.16.1): RTN tensors byte for byte under the
per-expert 2-D names, the same quantization_config (routers recorded float: extra_config for auto_round, GPTQ
`dynamic` and modules_in_block_to_quantize, AWQ modules_to_not_convert), routers never quantized;
and an expert whose projections differ in scheme is a one-line error."""

import pytest

from autoround_jax.io.safetensors_io import load_file
from autoround_jax.tuning.autoround import AutoRound
from tests.formats import reference
from tests.formats.test_auto_round_export import assert_same_tensors, our_export, read_config

pytest.importorskip("auto_round")

MOE_CASES = {
    "q3moe_w4g128_sym": ("qwen3_moe_e5k2", dict(bits=4, group_size=128, sym=True), "auto_round"),
    "q2moe_w4g32_asym": ("qwen2_moe_e7k1", dict(bits=4, group_size=32, sym=False), "auto_round"),
    "q3moe_w2g64_sym": ("qwen3_moe_e5k2", dict(bits=2, group_size=64, sym=True), "auto_round"),
    "q2moe_gptq_w4g32_sym": ("qwen2_moe_e7k1", dict(bits=4, group_size=32, sym=True), "auto_gptq"),
    "q3moe_awq_w4g32_asym": ("qwen3_moe_e5k2", dict(bits=4, group_size=32, sym=False), "auto_awq"),
}
SLOW = ("q3moe_w2g64_sym", "q3moe_awq_w4g32_asym")


@pytest.mark.parametrize("case", [c if c not in SLOW else pytest.param(c, marks=pytest.mark.slow) for c in MOE_CASES])
def test_moe_rtn_export_equals_reference(case, tiny_src, tmp_path):
    family, scheme, fmt = MOE_CASES[case]
    ref = reference.reference_export(tiny_src(family), str(tmp_path / "ref"), fmt, **scheme)
    ours = our_export(tiny_src(family), str(tmp_path / "out"), fmt, **scheme)
    assert_same_tensors(ours, ref)
    (our_cfg, our_qc), (ref_cfg, ref_qc) = read_config(ours), read_config(ref)
    assert our_qc == ref_qc
    assert our_cfg == ref_cfg
    tensors = load_file(f"{ours}/model.safetensors")
    assert "model.layers.0.mlp.experts.4.down_proj.qweight" in tensors
    assert "model.layers.0.mlp.gate.weight" in tensors and not any(".mlp.gate.q" in k for k in tensors)


def test_routers_are_never_quantized_even_when_asked(tiny_src):
    kw = dict(tokenizer=object(), iters=0, disable_opt_rtn=True, model_dtype="fp32", progress=False, amp=False)
    with pytest.raises(ValueError, match="match no layer"):  # the router is not a quantizable layer at all
        AutoRound(tiny_src("qwen2_moe_e7k1"), layer_config={"model.layers.0.mlp.gate": {"bits": 4}}, **kw)
    ar = AutoRound(tiny_src("qwen2_moe_e7k1"), **kw)
    assert not any(n.endswith(("mlp.gate", "shared_expert_gate")) for n in ar.layer_config)
    assert ar.layer_config["model.layers.0.mlp.experts.6.up_proj"] is not None


def test_experts_of_one_projection_need_one_scheme(tiny_src):
    ar = AutoRound(tiny_src("qwen3_moe_e5k2"), tokenizer=object(), iters=0, disable_opt_rtn=True,
                   model_dtype="fp32", progress=False, amp=False, fp_layers="model.layers.0.mlp.experts.2.up_proj")
    with pytest.raises(ValueError, match="one scheme"):
        ar.quantize()
    # every expert of a projection in float is fine: the whole stacked projection stays float
    ar = AutoRound(tiny_src("qwen3_moe_e5k2"), tokenizer=object(), iters=0, disable_opt_rtn=True,
                   model_dtype="fp32", progress=False, amp=False, fp_layers="up_proj")
    ar.quantize()
    assert "model.layers.0.mlp.experts.0.gate_proj" in ar.quantized
    assert not any("up_proj" in n for n in ar.quantized)


def test_expert_regex_layer_config_and_fp_layers_equal_the_reference(tiny_src, tmp_path):
    """A regex layer_config over every expert's up_proj (8 bits) and fp_layers on down_proj: the same tensors byte
    for byte and the same per-layer extra_config entries. (The reference also records the user's regex keys
    themselves in extra_config, for dense models too; ours records the layers they resolved to.)"""
    scheme = dict(bits=4, group_size=32, sym=True, fp_layers="down_proj",
                  layer_config={".*experts.*up_proj": {"bits": 8, "group_size": 32, "sym": True}})
    src = tiny_src("qwen3_moe_e5k2")
    ref = reference.reference_export(src, str(tmp_path / "ref"), "auto_round", **scheme)
    ours = our_export(src, str(tmp_path / "out"), "auto_round", **scheme)
    assert_same_tensors(ours, ref)
    (_, our_qc), (_, ref_qc) = read_config(ours), read_config(ref)
    ours_extra, ref_extra = our_qc.pop("extra_config"), ref_qc.pop("extra_config")
    assert our_qc == ref_qc
    assert ours_extra == {k: v for k, v in ref_extra.items() if k not in (".*down_proj.*", ".*experts.*up_proj.*")}
    assert ours_extra["model.layers.0.mlp.experts.3.up_proj"]["bits"] == 8


def test_opt_rtn_on_moe_skips_the_experts_search_like_the_reference(tiny_src, tmp_path):
    """iters=0 with the default opt-RTN: the reference searches scales for attention and dense layers but gives
    MoE experts plain RTN unless opt-RTN was asked for explicitly. Block 0 (sparse) equals its export byte for byte;
    block 1 (dense) sees the float MoE output, whose last-bit differences move a few scale-search ties."""
    import glob
    import os

    import numpy as np
    import torch
    import transformers
    from auto_round import AutoRound as RefAutoRound

    src, ids = tiny_src("qwen3_moe_e5k2"), reference.calibration_ids(8, 32)
    kw = dict(iters=0, nsamples=8, seqlen=32, batch_size=4, bits=4, group_size=32, sym=True)
    model = transformers.AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
    RefAutoRound(model, tokenizer=reference.DummyTokenizer(), device_map="cpu", enable_torch_compile=False, amp=False,
                 dataset=[torch.from_numpy(r[None].astype(np.int64)) for r in ids], **kw).quantize_and_save(
        output_dir=str(tmp_path / "ref"), format="auto_round")
    ref = os.path.dirname(glob.glob(str(tmp_path / "ref" / "*" / "config.json"))[0])
    ar = AutoRound(src, tokenizer=object(), dataset=ids, model_dtype="fp32", amp=False, progress=False, **kw)
    ar.quantize()
    assert ar.opt_rtn
    ours = ar.save_quantized(str(tmp_path / "out"), format="auto_round")
    a, b = load_file(f"{ours}/model.safetensors"), load_file(f"{ref}/model.safetensors")
    assert sorted(a) == sorted(b)
    for k in a:
        if k.startswith("model.layers.0."):
            assert a[k].tobytes() == b[k].tobytes(), k
        elif k.endswith(".qweight"):
            assert (a[k] != b[k]).mean() < 0.01, k
