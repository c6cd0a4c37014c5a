"""The torch reference (auto-round 0.16.1) as an oracle for the packed formats: exports of the tiny models, its own
dequantization of a packed layer, and transformers loading an export (test-only; imports torch)."""

from __future__ import annotations

import glob
import os

import numpy as np

# name: (tiny family, our AutoRound scheme kwargs, format). The reference gets the same scheme (fp_layers is its
# ignore_layers). Together: Qwen2 (biases) and Qwen3, 2/3/4/8 bits, groups 32/128/-1, sym and asym, K not a
# multiple of G (Qwen2 down_proj K=320 at G=128), float layers and per-layer overrides, all three formats.
FP = "model.layers.1.mlp.down_proj"
CASES = {
    "q2_w4g32_sym": ("qwen2_tune", dict(bits=4, group_size=32, sym=True), "auto_round"),
    "q3_w4g128_asym": ("qwen3_tune", dict(bits=4, group_size=128, sym=False), "auto_round"),
    "q2_w3gm1_asym": ("qwen2_tune", dict(bits=3, group_size=-1, sym=False), "auto_round"),
    "q2_w2g128_sym": ("qwen2_tune", dict(bits=2, group_size=128, sym=True), "auto_round"),
    "q2_w3g128_sym": ("qwen2_tune", dict(bits=3, group_size=128, sym=True), "auto_round"),
    "q3_w2g32_asym": ("qwen3_tune", dict(bits=2, group_size=32, sym=False), "auto_round"),
    "q3_w8gm1_asym": ("qwen3_tune", dict(bits=8, group_size=-1, sym=False), "auto_round"),
    "q3_w8g32_sym_mixed": ("qwen3_tune", dict(bits=8, group_size=32, sym=True, fp_layers=FP,
                                              layer_config={"model.layers.0.mlp.up_proj": {"bits": 4}}), "auto_round"),
    "q3_w4g32_asym_mixed": ("qwen3_tune", dict(bits=4, group_size=32, sym=False, layer_config={
        "model.layers.0.mlp.up_proj": {"bits": 8, "group_size": 32, "sym": True}}), "auto_round"),
    "q2_w4g32_asym_fp": ("qwen2_tune", dict(bits=4, group_size=32, sym=False, fp_layers=FP), "auto_round"),
    "q3_gptq_mixed": ("qwen3_tune", dict(bits=4, group_size=32, sym=True, fp_layers=FP, layer_config={
        "model.layers.0.mlp.up_proj": {"bits": 8, "group_size": 32, "sym": True}}), "auto_gptq"),
    "q2_gptq_asym": ("qwen2_tune", dict(bits=4, group_size=128, sym=False), "auto_gptq"),
    "q3_awq_fp": ("qwen3_tune", dict(bits=4, group_size=32, sym=False, fp_layers=FP), "auto_awq"),
}
TUNED = dict(iters=8, lr=0.05, nsamples=4, seqlen=32, batch_size=2)  # enough for tuning to move codes off RTN


class DummyTokenizer:
    """The reference insists on a tokenizer object; token-id calibration data never uses it."""


def calibration_ids(n: int = 4, seqlen: int = 32) -> np.ndarray:
    return np.random.default_rng(0).integers(3, 301, size=(n, seqlen)).astype(np.int32)


def reference_export(src: str, out: str, fmt: str, iters: int = 0, **scheme) -> str:
    """Run the reference's quantize_and_save on the fp32 tiny model in src; returns the folder it wrote."""
    import torch
    import transformers
    from auto_round import AutoRound

    kw = dict(scheme)
    if "fp_layers" in kw:
        kw["ignore_layers"] = kw.pop("fp_layers")
    if iters:
        kw.update(dataset=[torch.tensor(row[None]) for row in calibration_ids(kw["nsamples"], kw["seqlen"])])
    else:
        kw.update(disable_opt_rtn=True)
    model = transformers.AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
    os.environ["AR_ALLOW_W8_ASYM"] = "1"  # 0.16.1 refuses 8-bit asym for vLLM's sake unless asked
    # amp=False pins fp32: by default the reference autocasts to bf16 on CPUs with bf16 units (and not on AVX2-only
    # ones), so its codes and scales would depend on the host. Ours is pinned to fp32 on the other side.
    ar = AutoRound(model, tokenizer=DummyTokenizer(), iters=iters, device_map="cpu", enable_torch_compile=False,
                   format=fmt, amp=False, **kw)
    ar.quantize_and_save(output_dir=out, format=fmt)
    (folder,) = glob.glob(os.path.join(out, "*", "config.json"))  # it appends a "w4g32"-style subfolder
    return os.path.dirname(folder)


def transformers_model(folder: str):
    """An export loaded by transformers + auto-round on the CPU, kept in fp32 with its float16 scales.

    auto-round forces its torch backends to fp16; letting them run fp32 keeps the reference's dequantized weights
    (fp16 products) while the rest of the model stays exact, so logits compare at fp32 precision.
    """
    import torch
    import transformers
    from auto_round.inference.backend import BackendInfos

    for info in BackendInfos.values():
        if info.compute_dtype and "float32" not in info.compute_dtype:
            info.compute_dtype = [*info.compute_dtype, "float32"]
    kw = {}
    if '"gptq"' in open(os.path.join(folder, "config.json")).read():
        kw["quantization_config"] = transformers.AutoRoundConfig(backend="auto")  # plain loading asks for optimum
    return transformers.AutoModelForCausalLM.from_pretrained(folder, device_map="cpu", dtype=torch.float32, **kw).eval()


def quant_linear_weight(module) -> np.ndarray:
    """W [N, K] exactly as the reference's QuantLinear.forward builds it (x = I, bias dropped)."""
    import torch

    bias, module.bias = module.bias, None
    try:
        with torch.no_grad():
            return module(torch.eye(module.infeatures, dtype=torch.float32)).T.numpy()
    finally:
        module.bias = bias


def awq_weight(t: dict, bits: int, group_size: int) -> np.ndarray:
    """W [N, K] from the reference's own AWQ GEMM dequantization (float16)."""
    import torch
    from auto_round.export.export_to_awq.utils import dequantize_gemm

    k = t["qweight"].shape[0]
    w = dequantize_gemm(*(torch.from_numpy(np.array(t[s])) for s in ("qweight", "qzeros", "scales")), bits,
                        k if group_size == -1 else group_size)
    return w.T.numpy()


def logits(model, ids: np.ndarray) -> np.ndarray:
    import torch

    with torch.no_grad():
        return model(torch.from_numpy(ids.astype(np.int64))).logits.float().numpy()


def assert_matches_transformers(folder: str, ours, ids: np.ndarray) -> None:
    """transformers + auto-round on `folder` against our packed model: every packed layer decodes to the
    reference's weights bit for bit, and the logits agree."""
    torch_model = transformers_model(folder)
    for name, module in torch_model.named_modules():
        if hasattr(module, "qweight"):
            leaf = ours.layers[int(name.split(".")[2])]
            for part in name.split(".")[3:]:
                leaf = getattr(leaf, part)
            np.testing.assert_array_equal(np.asarray(leaf.weight.dequantize(), np.float32), quant_linear_weight(module),
                                          err_msg=name)
    want, got = logits(torch_model, ids), np.asarray(ours(ids))
    # The Pallas/XLA kernels multiply fp16 scales in fp32 where QuantLinear rounds W to fp16 first.
    assert np.abs(got - want).max() <= 2e-3 * np.abs(want).max(), np.abs(got - want).max()
