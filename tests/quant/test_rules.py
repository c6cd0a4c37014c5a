"""The one rule engine (quant/rules.py) on plain name lists: pattern kinds and the reference's matching quirks, rule
order and precedence, float overrides, GPTQ dynamic; and both front-ends (the tuner's flags, a checkpoint's
quantization_config) agreeing through an export -> import round trip."""

import json
import os

import pytest

from autoround_jax.quant.rules import (FLOAT, LayerConfigError, Rule, checkpoint_rules, flag_rules, global_scheme,
                                       matches, quantized_blocks, resolve, unmatched)
from autoround_jax.quant.scheme import SCHEMES, LayerScheme, UnsupportedSchemeError

PREFIX = "model.layers"
BLOCKS = [f"{PREFIX}.{i}" for i in range(12)]
LINEARS = ["self_attn.q_proj", "self_attn.o_proj", "mlp.up_proj", "mlp.down_proj"]
NAMES = [f"{b}.{lin}" for b in BLOCKS for lin in LINEARS]
BASE = LayerScheme(4, 128, True)


def floats(out):
    return sorted(n for n, s in out.items() if s is None)


# -- matching -------------------------------------------------------------------------------------------------------
def test_substring_quirk_layers_1_is_not_layers_10():
    hit = [n for n in NAMES if matches("layers.1", n, "substring")]
    assert hit == [f"{PREFIX}.1.{lin}" for lin in LINEARS]
    assert matches("layers.1.mlp", "model.layers.1.mlp.up_proj", "substring")
    assert not matches("layers.1.mlp", "model.layers.10.mlp.up_proj", "substring")
    assert matches("mlp", "model.layers.10.mlp.up_proj", "substring")  # no trailing digit: a plain substring
    assert matches("up", "model.layers.10.mlp.up_proj", "substring")


def test_pattern_kinds():
    name = "model.layers.3.mlp.down_proj"
    assert matches(name, name, "exact") and not matches("mlp.down_proj", name, "exact")
    assert matches("model.layers.3", name, "prefix") and matches(name, name, "prefix")
    assert not matches("model.layers.3.ml", name, "prefix")  # prefixes end on a dot
    assert not matches("down_proj", name, "regex") and matches(".*down_proj", name, "regex")  # whole name
    assert matches("down_proj", name, "search") and matches(r"layers\.3\.", name, "search")
    assert not matches("(bad", name, "regex") and not matches("(bad", name, "search")  # invalid: never matches
    assert matches(r".*\.3\.mlp\..*", name, ("substring", "regex"))
    assert unmatched(["mlp", "nothing", "layers.12"], NAMES, "substring") == ["nothing", "layers.12"]
    with pytest.raises(ValueError, match="unknown match kind"):
        Rule("x", "glob")


# -- resolve: order, precedence, float ------------------------------------------------------------------------------
def test_matching_rules_apply_in_order_over_the_scheme_so_far():
    out = resolve(NAMES, BASE, [Rule("mlp", "substring", {"bits": 8}), Rule(".*down_proj", "regex", {"group_size": 32}),
                                Rule("layers.2", "substring", "W2A16G64")])
    assert out["model.layers.0.mlp.down_proj"] == LayerScheme(8, 32, True)  # both fields, merged
    assert out["model.layers.0.mlp.up_proj"] == LayerScheme(8, 128, True)
    assert out["model.layers.0.self_attn.q_proj"] == BASE
    assert out["model.layers.2.mlp.down_proj"] == SCHEMES["W2A16G64"]  # a preset replaces, last rule wins
    assert out["model.layers.10.mlp.up_proj"] == LayerScheme(8, 128, True)


def test_float_overrides_and_overrides_after_float():
    out = resolve(NAMES, BASE, [Rule("mlp", "substring", {"bits": 16}), Rule("up_proj", "search", {"sym": False}),
                                Rule("o_proj", "search", {"data_type": "float"}), Rule("q_proj", "search", FLOAT)])
    assert out["model.layers.0.mlp.down_proj"] is None
    assert out["model.layers.0.mlp.up_proj"] == LayerScheme(4, 128, False)  # float so far: laid over the base
    assert out["model.layers.0.self_attn.o_proj"] is None and out["model.layers.0.self_attn.q_proj"] is None


def test_final_rules_make_the_first_match_decide_and_negate_selects_the_rest():
    rules = [Rule(("model.layers.0", "model.layers.1"), "prefix", FLOAT, negate=True, final=True),
             Rule("model.layers.0.mlp.up_proj", "exact", {"bits": 8}, final=True),
             Rule("mlp", "search", {"bits": 2}, final=True), Rule("up_proj", "search", {"group_size": 32}, final=True)]
    out = resolve(NAMES, BASE, rules)
    assert floats(out) == sorted(n for n in NAMES if not n.startswith(("model.layers.0.", "model.layers.1.")))
    assert out["model.layers.0.mlp.up_proj"] == LayerScheme(8, 128, True)  # exact first, never merged
    assert out["model.layers.1.mlp.up_proj"] == LayerScheme(2, 128, True)  # the first regex, not both
    assert out["model.layers.1.self_attn.q_proj"] == BASE


def test_unsupported_overrides_are_refused():
    with pytest.raises(UnsupportedSchemeError, match="unsupported scheme: data_type 'int', 5 bits"):
        resolve(NAMES, BASE, [Rule("mlp", "substring", {"bits": 5})])
    with pytest.raises(UnsupportedSchemeError, match="data_type 'nv_fp'"):
        resolve(NAMES, BASE, [Rule("mlp", "substring", {"data_type": "nv_fp"})])
    with pytest.raises(UnsupportedSchemeError, match="unknown scheme 'W5A16'"):
        resolve(NAMES, BASE, [Rule("mlp", "substring", "W5A16")])


# -- front-end 1: the tuner's flags ---------------------------------------------------------------------------------
def flags(**kw):
    return resolve(NAMES, BASE, flag_rules(NAMES, BLOCKS, block_prefix=PREFIX, **kw))


def test_flags_precedence_blocks_then_layer_config_then_fp_layers():
    out = flags(to_quant_block_names="layers.1,model.layers.2", fp_layers="layers.1.mlp,o_proj",
                layer_config={"mlp": {"bits": 8}, r".*\.1\.mlp\.down_proj": {"group_size": 32},
                              "model.layers.5.self_attn.q_proj": "W2A16"})
    assert out["model.layers.2.mlp.up_proj"] == LayerScheme(8, 128, True)
    assert out["model.layers.2.self_attn.q_proj"] == BASE
    assert out["model.layers.1.mlp.down_proj"] is None  # --fp_layers beats --layer_config
    assert out["model.layers.10.mlp.down_proj"] == LayerScheme(8, 128, True)  # outside the blocks, but layer_config
    assert out["model.layers.10.self_attn.q_proj"] is None  # outside the blocks ('layers.1' is not 'layers.10')
    assert out["model.layers.5.self_attn.q_proj"] == SCHEMES["W2A16"]
    assert all(out[f"{b}.self_attn.o_proj"] is None for b in BLOCKS)


def test_flags_refuse_entries_that_select_nothing():
    with pytest.raises(ValueError, match=r"--to_quant_block_names entries match no block: layers\.12 \(this model's "
                                         r"blocks are model\.layers\.0 \.\.\. model\.layers\.11"):
        flags(to_quant_block_names="layers.1,layers.12")
    with pytest.raises(LayerConfigError, match="keys match no layer: 'mlp.upp_proj'"):
        flags(layer_config={"mlp.upp_proj": {"bits": 8}})
    with pytest.raises(LayerConfigError, match="unknown field 'bit'"):
        flags(layer_config='{"mlp": {"bit": 8}}')
    assert flags(layer_config={"lm_head": {"bits": 16}}) == flags()  # lm_head stays float anyway: accepted


# -- front-end 2: a checkpoint's quantization_config ----------------------------------------------------------------
def checkpoint(qc):
    return resolve(NAMES, global_scheme(qc), checkpoint_rules(qc, NAMES, quantized_blocks(qc, PREFIX)))


def test_checkpoint_precedence_exact_then_dynamic_then_extra_regexes():
    qc = {"bits": 4, "group_size": 128, "sym": True,
          "extra_config": {"model.layers.0.mlp.up_proj": {"bits": 8}, ".*mlp.*": {"bits": 2},
                           "up_proj": {"group_size": 32}},
          "dynamic": {r"+:.*layers\.1\..*": {"bits": 3, "group_size": 64}, r"-:.*\.2\.mlp\..*": {},
                      "model.layers.3": {"bits": 8}, "+:o_proj": {}}}
    out = checkpoint(qc)
    assert out["model.layers.0.mlp.up_proj"] == LayerScheme(8, 128, True)  # exact extra_config first
    assert out["model.layers.1.mlp.up_proj"] == LayerScheme(3, 64, True)  # then dynamic
    assert out["model.layers.11.mlp.up_proj"] == LayerScheme(2, 128, True)  # then the first extra regex only
    assert out["model.layers.2.mlp.down_proj"] is None  # '-:' keeps float
    assert out["model.layers.3.self_attn.q_proj"] == BASE  # a dynamic key without +:/- is ignored
    assert out["model.layers.4.self_attn.o_proj"] == BASE  # '+:' with no fields is ignored


def test_checkpoint_exclusions_come_first():
    qc = {"bits": 4, "group_size": 32, "sym": False, "block_name_to_quantize": [[f"{PREFIX}.0", f"{PREFIX}.1"]],
          "modules_to_not_convert": ["lm_head", ["o_proj"]], "modules_in_block_to_quantize": [["mlp.up_proj",
                                                                                               "self_attn.q_proj"]],
          "extra_config": {"model.layers.0.self_attn.o_proj": {"bits": 8}, "model.layers.5.mlp.up_proj": {"bits": 8}}}
    assert quantized_blocks(qc, PREFIX) == ["model.layers"]  # nested lists: their common prefix
    out = checkpoint(qc)
    assert sorted(n for n, s in out.items() if s is not None) == sorted(
        f"{b}.{lin}" for b in BLOCKS for lin in ("mlp.up_proj", "self_attn.q_proj"))
    assert out["model.layers.5.mlp.up_proj"] == LayerScheme(8, 32, False)
    assert out["model.layers.0.self_attn.o_proj"] is None  # modules_to_not_convert beats extra_config
    assert floats(checkpoint({"bits": 4, "block_name_to_quantize": "model.layers.1,model.layers.2"})) == sorted(
        n for n in NAMES if not n.startswith(("model.layers.1.", "model.layers.2.")))


def test_checkpoint_global_scheme_and_awq_keys():
    assert global_scheme({"w_bit": 4, "q_group_size": 64, "zero_point": True}) == LayerScheme(4, 64, False)
    assert global_scheme({"bits": 8, "group_size": -1, "sym": True, "data_type": "int"}) == LayerScheme(8, -1, True)
    with pytest.raises(UnsupportedSchemeError, match="bits 16: nothing is quantized"):
        global_scheme({"bits": 16})
    with pytest.raises(UnsupportedSchemeError, match="unsupported scheme"):
        global_scheme({"bits": 6})


# -- both front-ends, one engine: a layer_config run exported, then imported ------------------------------------------
@pytest.fixture(scope="module")
def tuned(tmp_path_factory):
    """A tiny 2-block Qwen3 quantized (plain RTN) with per-layer overrides from every tuner flag."""
    pytest.importorskip("torch")
    from autoround_jax.tuning.autoround import AutoRound
    from tests.tiny_models import build_model, save_model

    src = save_model(build_model("qwen3_tune", num_layers=2), str(tmp_path_factory.mktemp("src")))
    ar = AutoRound(src, tokenizer=object(), bits=4, group_size=32, sym=True, iters=0, disable_opt_rtn=True,
                   model_dtype="fp32", progress=False, amp=False, fp_layers="layers.0.mlp.up_proj",
                   layer_config={"model.layers.1.mlp.down_proj": {"bits": 8}, r".*\.0\.self_attn\.[qk]_proj":
                                 {"group_size": 64, "sym": False}, "o_proj": "W2A16G32", "layers.1.mlp.gate_proj":
                                 {"bits": 16}})
    ar.quantize()
    return ar


@pytest.mark.parametrize("fmt", ["auto_round", "auto_gptq"])
def test_layer_config_round_trips_through_export_and_import(tuned, fmt, tmp_path):
    from autoround_jax.formats.quantized_import import layer_schemes

    lc = tuned.layer_config
    assert lc["model.layers.1.mlp.down_proj"] == LayerScheme(8, 32, True)
    assert lc["model.layers.0.self_attn.k_proj"] == LayerScheme(4, 64, False)
    assert lc["model.layers.1.self_attn.o_proj"] == SCHEMES["W2A16G32"]
    assert lc["model.layers.0.mlp.up_proj"] is None and lc["model.layers.1.mlp.gate_proj"] is None
    out = tuned.save_quantized(str(tmp_path / fmt), format=fmt)
    with open(os.path.join(out, "config.json")) as f:
        qc = json.load(f)["quantization_config"]
    assert ("extra_config" in qc) == (fmt == "auto_round") and ("dynamic" in qc) == (fmt == "auto_gptq")
    assert layer_schemes(tuned.config, qc) == lc
