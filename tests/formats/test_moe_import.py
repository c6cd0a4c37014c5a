"""The reference's MoE exports (tuned and RTN) read back into the packed int model (stacked experts): logits and greedy generation
equal transformers' torch forward of the same checkpoint dequantized to a float folder, and convert works both ways
(packed -> another packing -> the same model)."""

import numpy as np
import pytest

from autoround_jax import load_quantized
from autoround_jax.formats.quantized_import import convert
from autoround_jax.generation import generate_ids
from autoround_jax.quant.packed_weight import PackedWeight
from tests.formats import reference

pytest.importorskip("auto_round")
torch = pytest.importorskip("torch")


@pytest.fixture(scope="module", params=[
    ("qwen3_moe_e5k2", dict(bits=4, group_size=128, sym=True, **reference.TUNED)),  # tuned; auto_gptq packing
    pytest.param(("qwen2_moe_e7k1", dict(bits=4, group_size=32, sym=False)), marks=pytest.mark.slow),  # RTN, AWQ
], ids=["qwen3_moe_sym_tuned", "qwen2_moe_asym_rtn"])
def ref_export(request, tiny_src, tmp_path_factory):
    family, scheme = request.param
    return reference.reference_export(tiny_src(family), str(tmp_path_factory.mktemp("ref")), "auto_round", **scheme)


def test_reference_moe_export_imports_packed_with_matching_logits(ref_export, tmp_path):
    import transformers

    ours = load_quantized(ref_export, dtype="fp32")
    assert isinstance(ours.layers[0].mlp.experts.up_proj.weight, PackedWeight)  # experts stay packed, stacked
    float_folder = convert(ref_export, str(tmp_path / "float"), to="float")
    torch_model = transformers.AutoModelForCausalLM.from_pretrained(float_folder, dtype=torch.float32).eval()
    ids = reference.calibration_ids(2, 24)
    ref = reference.logits(torch_model, ids)
    got = np.asarray(ours(ids))
    # As tests/formats/reference.py: the int kernels multiply fp16 scales in fp32 where the float folder holds W
    # rounded to fp16 (below one fp16 ulp of W per weight).
    assert np.abs(got - ref).max() <= 2e-3 * np.abs(ref).max(), np.abs(got - ref).max()
    prompt = ids[:1, :9]
    with torch.no_grad():
        want = torch_model.generate(torch.from_numpy(prompt).long(), max_new_tokens=8, do_sample=False,
                                    eos_token_id=None, pad_token_id=0).numpy()[0, 9:]
    assert generate_ids(ours, prompt, max_new_tokens=8)[0].tolist() == want.tolist()


def test_convert_moe_both_ways_keeps_the_model(ref_export, tmp_path):
    ids = reference.calibration_ids(2, 16)
    base = np.asarray(load_quantized(ref_export, dtype="fp32")(ids))
    gptq = convert(ref_export, str(tmp_path / "gptq"), to="auto_gptq")
    back = convert(gptq, str(tmp_path / "back"), to="auto_round")
    for folder in (gptq, back):
        np.testing.assert_allclose(np.asarray(load_quantized(folder, dtype="fp32")(ids)), base, rtol=0, atol=1e-5)
