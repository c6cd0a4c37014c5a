"""The one rule engine that picks each linear's quantization scheme, for the tuner and for the importer alike.

Layer names are plain strings ("model.layers.3.mlp.up_proj"): which names exist, and their shapes, are the
callers' knowledge (models/); this module imports nothing from models/, tuning/, formats/ or io/.

A `Rule` says which names it matches (one pattern kind: exact, prefix, substring, regex or search; several
patterns match when any does; `negate` matches the names none matches) and what it does to them: a dict of
LayerScheme fields laid over the scheme so far, a preset name (SCHEMES), or FLOAT. `resolve` starts every name at the
base scheme and applies the matching rules in order; a `final` rule is the last one to touch a name. So "every
matching rule, later ones win" (the tuner's flags) and "the first match decides" (a checkpoint's quantization_config)
are both ordered rule lists.

Two front-ends build those lists:
- `flag_rules`: the tuner's flags, as the reference's quantizer reads them (--to_quant_block_names, --layer_config
  names and regexes, --fp_layers), schema-checked with messages naming the flag.
- `checkpoint_rules`: a checkpoint's quantization_config, with the reference loader's precedence
  (auto_round/inference/convert_model.py::get_layer_config): block_name_to_quantize, AWQ modules_to_not_convert and
  GPTQ modules_in_block_to_quantize first, then exact extra_config names, then GPTQ `dynamic` (+: / -: regexes),
  then extra_config regexes.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import os
import re
from typing import Any, Callable, Iterable, Mapping, Sequence, Union

from .scheme import FLOAT_DATA_TYPES, SCHEMES, SUPPORTED_BITS, LayerScheme, UnsupportedSchemeError

FLOAT = "float"  # a rule's scheme: keep the layer in float (not a preset name, so never ambiguous)


# -- matching -------------------------------------------------------------------------------------------------------
def _regex(pattern: str, name: str, fn: Callable) -> bool:
    try:
        return fn(pattern, name) is not None
    except re.error:  # the reference loader skips invalid patterns; the tuner's front-end refuses them up front
        return False


def match_substring(item: str, name: str) -> bool:
    """The reference's fp_layers matching: the exact name, a dotted prefix, or a substring; an item ending in a digit
    ('layers.1') matches whole dotted components only, so not 'layers.10'."""
    if name == item or name.startswith(item + "."):
        return True
    if item[-1:].isdigit():
        return (item + ".") in (name + ".")
    return item in name


MATCHERS: dict[str, Callable[[str, str], bool]] = {
    "exact": lambda p, n: n == p,
    "prefix": lambda p, n: n == p or n.startswith(p + "."),  # a module and everything under it
    "substring": match_substring,
    "regex": lambda p, n: _regex(p, n, re.fullmatch),  # the whole name
    "search": lambda p, n: _regex(p, n, re.search),  # anywhere in the name (the reference loader's re.search)
}


def matches(pattern: str, name: str, match: str | Sequence[str]) -> bool:
    """Whether `name` matches `pattern` by one pattern kind, or by any of several (e.g. ("substring", "regex"))."""
    kinds = (match,) if isinstance(match, str) else match
    return any(MATCHERS[k](pattern, name) for k in kinds)


def unmatched(patterns: Iterable[str], names: Iterable[str], match: str | Sequence[str]) -> list[str]:
    """The patterns that match none of the names (a flag entry that selects nothing)."""
    names = list(names)
    return [p for p in patterns if not any(matches(p, n, match) for n in names)]


# -- rules ----------------------------------------------------------------------------------------------------------
Override = Union[Mapping[str, Any], str]  # LayerScheme fields, a SCHEMES preset name, or FLOAT


@dataclasses.dataclass(frozen=True)
class Rule:
    """Names matching `pattern` (any of several) by `match` get `scheme`. negate: the names matching none of them.
    final: no later rule touches a name this one matched."""

    pattern: str | tuple[str, ...]
    match: str | tuple[str, ...] = "regex"
    scheme: Override = FLOAT
    negate: bool = False
    final: bool = False

    def __post_init__(self):
        if isinstance(self.pattern, str):
            object.__setattr__(self, "pattern", (self.pattern,))
        else:
            object.__setattr__(self, "pattern", tuple(self.pattern))
        kinds = (self.match,) if isinstance(self.match, str) else tuple(self.match)
        unknown = [k for k in kinds if k not in MATCHERS]
        if unknown or not kinds:
            raise ValueError(f"unknown match kind {unknown or kinds}: use {', '.join(MATCHERS)}")
        object.__setattr__(self, "match", kinds)

    def matches(self, name: str) -> bool:
        return any(matches(p, name, self.match) for p in self.pattern) != self.negate


def apply_override(scheme: LayerScheme | None, override: Override, base: LayerScheme) -> LayerScheme | None:
    """One override laid over the scheme so far (over `base` when the layer is float so far); None: float.
    Fields left out keep their value; bits >= 16 or a float data_type mean float."""
    if isinstance(override, str):
        if override == FLOAT:
            return None
        if override.upper() not in SCHEMES:
            raise UnsupportedSchemeError(f"unknown scheme {override!r}: use one of {', '.join(SCHEMES)} or a dict")
        return SCHEMES[override.upper()]
    start = base if scheme is None else scheme
    d = override
    bits, data_type = int(d.get("bits", start.bits)), str(d.get("data_type", start.data_type))
    if bits >= 16 or data_type in FLOAT_DATA_TYPES:
        return None
    if not data_type.startswith("int") or bits not in SUPPORTED_BITS:
        raise UnsupportedSchemeError(f"unsupported scheme: data_type {data_type!r}, {bits} bits (int 2/3/4/8-bit only)")
    return LayerScheme(bits, int(d.get("group_size", start.group_size)), bool(d.get("sym", start.sym)))


def resolve(names: Iterable[str], base: LayerScheme, rules: Sequence[Rule]) -> dict[str, LayerScheme | None]:
    """Every name -> its scheme (None: float): `base`, then each matching rule in order, up to the first final one."""
    out: dict[str, LayerScheme | None] = {}
    for name in names:
        scheme: LayerScheme | None = base
        for rule in rules:
            if rule.matches(name):
                scheme = apply_override(scheme, rule.scheme, base)
                if rule.final:
                    break
        out[name] = scheme
    return out


# -- front-end 1: the tuner's flags ---------------------------------------------------------------------------------
def parse_names(spec: str | list[str] | None) -> list[str]:
    """'a,b' or ['a','b'] -> ['a','b']."""
    if not spec:
        return []
    items = spec.split(",") if isinstance(spec, str) else list(spec)
    return [s.strip() for s in items if s.strip()]


LAYER_FIELDS = ("bits", "group_size", "sym", "data_type", "act_bits")
LAYER_CONFIG_MATCH = ("substring", "regex")  # a --layer_config key: a (partial) layer name or a regex of the whole
_EXAMPLE = '{"mlp.down_proj": {"bits": 8}}'


class LayerConfigError(ValueError):
    """--layer_config of the wrong shape, with unknown fields, bad values or keys that match no layer."""


def parse_layer_config(spec: str | Mapping[str, Any] | None) -> dict[str, Any]:
    """--layer_config (JSON text or a dict) -> {key: scheme name or field dict}, schema-checked."""
    if not spec:
        return {}
    if isinstance(spec, Mapping):
        config = dict(spec)
    else:
        try:
            config = json.loads(spec)
        except json.JSONDecodeError as e:
            raise LayerConfigError(
                f"--layer_config is not valid JSON ({e.msg} at column {e.colno}): {spec!r}; write e.g. '{_EXAMPLE}'"
            ) from None
        if not isinstance(config, dict):
            raise LayerConfigError(f"--layer_config must be a JSON object {{layer name or regex: {{bits, group_size, "
                                   f"sym}}}}, got a {_json_type(config)}; write e.g. '{_EXAMPLE}'")
    for key, val in config.items():
        _check_entry(key, val)
    return config


def _json_type(v: Any) -> str:
    return {dict: "object", list: "list", str: "string", bool: "boolean", type(None): "null"}.get(
        type(v), "number" if isinstance(v, (int, float)) else type(v).__name__)


def _check_entry(key: Any, val: Any) -> None:
    where = f"--layer_config[{key!r}]"
    if not isinstance(key, str) or not key.strip():
        raise LayerConfigError(f"--layer_config key {key!r} must be a layer name or regex")
    try:
        re.compile(key)
    except re.error as e:
        raise LayerConfigError(f"--layer_config key {key!r} is not a valid regular expression ({e}): escape special "
                               "characters or use the plain layer name") from None
    if isinstance(val, str):
        if val.upper() not in SCHEMES:
            raise LayerConfigError(f"{where}: unknown scheme {val!r}: use one of {', '.join(SCHEMES)} or an object "
                                   "like {\"bits\": 8}")
        return
    if not isinstance(val, Mapping):
        raise LayerConfigError(f"{where} is a {_json_type(val)}: each value must be an object like {{\"bits\": 8, "
                               f"\"group_size\": 128, \"sym\": true}} or a scheme name; write e.g. '{_EXAMPLE}'")
    for field, v in val.items():
        if field not in LAYER_FIELDS:
            close = difflib.get_close_matches(str(field), LAYER_FIELDS, n=1)
            hint = f"did you mean {close[0]!r}? " if close else ""
            raise LayerConfigError(f"{where}: unknown field {field!r}: {hint}known fields are {', '.join(LAYER_FIELDS)}")
        if field in ("bits", "group_size", "act_bits") and (isinstance(v, bool) or not isinstance(v, int)):
            raise LayerConfigError(f"{where}[{field!r}] is {v!r} ({_json_type(v)}): use an integer, e.g. "
                                   f"{8 if field != 'group_size' else 128}")
        if field == "sym" and not isinstance(v, bool):
            raise LayerConfigError(f"{where}['sym'] is {v!r} ({_json_type(v)}): use true or false")
        if field == "data_type" and (not isinstance(v, str) or v not in ("int", *FLOAT_DATA_TYPES)):
            raise LayerConfigError(f"{where}['data_type'] is {v!r}: autoround-jax quantizes to int; use \"int\", or "
                                   "\"float\" to keep the layer in float")
        if field == "act_bits" and v < 16:
            raise LayerConfigError(f"{where}['act_bits'] is {v}: activations are never quantized here (weight-only); "
                                   "drop act_bits or set it to 16")
    if "bits" in val and val["bits"] < 16 and val["bits"] not in SUPPORTED_BITS:
        raise LayerConfigError(f"{where}: bits {val['bits']} is not supported: use one of 2, 3, 4, 8 (or 16 to keep "
                               "the layer in float)")


def _float_head(key: str, val: Any) -> bool:
    """A key for lm_head that keeps it in float: true already (lm_head is never quantized), so accepted."""
    if not re.fullmatch(r"(.*\.)?lm_head", key):
        return False
    return isinstance(val, Mapping) and (val.get("bits", 16) >= 16 or val.get("data_type") in FLOAT_DATA_TYPES)


def flag_rules(names: Sequence[str], blocks: Sequence[str], *, block_prefix: str, fp_layers=None, layer_config=None,
               to_quant_block_names=None) -> list[Rule]:
    """The tuner's flags as rules over `names` (every block linear) in `blocks` (every block, in order; each name
    lies under one): layers outside --to_quant_block_names float, then every matching --layer_config entry in order
    (over the scheme so far), then --fp_layers float. Entries that select nothing are refused here; --fp_layers
    entries are checked by the caller after resolving (`unmatched(parse_names(fp_layers), names, "substring")`)."""
    fp = parse_names(fp_layers)
    overrides = parse_layer_config(layer_config)
    selectors = parse_names(to_quant_block_names)
    rules: list[Rule] = []
    if selectors:
        missing = unmatched(selectors, blocks, "substring")
        if missing:
            last = f"{block_prefix}.{len(blocks) - 1}"
            raise ValueError(f"--to_quant_block_names entries match no block: {', '.join(missing)} (this model's "
                             f"blocks are {block_prefix}.0 ... {last}; pass {block_prefix} for all)")
        selected = [b for b in blocks if any(match_substring(s, b) for s in selectors)]
        if len(selected) < len(blocks):
            rules.append(Rule(tuple(selected), "prefix", FLOAT, negate=True))
    unused = [k for k in unmatched(overrides, names, LAYER_CONFIG_MATCH) if not _float_head(k, overrides[k])]
    if unused:
        raise LayerConfigError(f"--layer_config keys match no layer: {', '.join(map(repr, unused))} (names look like "
                               f"{block_prefix}.5.mlp.up_proj or a regex such as .*down_proj; lm_head always stays "
                               "in float)")
    rules += [Rule(key, LAYER_CONFIG_MATCH, val) for key, val in overrides.items()]
    if fp:
        rules.append(Rule(tuple(fp), "substring", FLOAT))
    return rules


# -- front-end 2: a checkpoint's quantization_config ----------------------------------------------------------------
def global_scheme(qc: Mapping[str, Any]) -> LayerScheme:
    """The checkpoint's global scheme: bits/group_size/sym (AutoAWQ: w_bit/q_group_size/zero_point), data_type."""
    bits = int(qc.get("bits", qc.get("w_bit", 4)))
    group = int(qc.get("group_size", qc.get("q_group_size", 128)))
    sym = bool(qc["sym"]) if "sym" in qc else not bool(qc.get("zero_point", False))
    scheme = apply_override(None, {"data_type": qc.get("data_type", "int")}, LayerScheme(bits, group, sym))
    if scheme is None:
        raise UnsupportedSchemeError(f"quantization_config has bits {bits}: nothing is quantized")
    return scheme


def quantized_blocks(qc: Mapping[str, Any], default: str) -> list[str]:
    """block_name_to_quantize (or to_quant_block_names) as a list: 'a,b', ['a', 'b'], or nested lists of block names
    (their common prefix); `default` (e.g. 'model.layers') when absent."""
    names = qc.get("block_name_to_quantize") or qc.get("to_quant_block_names") or default
    if isinstance(names, str):
        return [n.strip() for n in names.split(",") if n.strip()]
    return [os.path.commonprefix(n).rstrip(".") if isinstance(n, (list, tuple)) else n for n in names]


def _flat(items) -> list[str]:
    return [x for n in items or [] for x in (n if isinstance(n, (list, tuple)) else [n])]


def checkpoint_rules(qc: Mapping[str, Any], names: Sequence[str], blocks: Sequence[str]) -> list[Rule]:
    """A quantization_config as first-match rules over `names` (every block linear), `blocks` from
    `quantized_blocks`: outside the blocks, in modules_to_not_convert or outside modules_in_block_to_quantize: float;
    else an extra_config entry for the exact name; else the first matching GPTQ dynamic regex ('-:' float); else the
    first matching extra_config regex (every key that is not a layer name); else the global scheme."""
    extra = dict(qc.get("extra_config") or {})
    dynamic = {k[2:]: ({"bits": 16} if k.startswith("-:") else v) for k, v in (qc.get("dynamic") or {}).items()
               if k[:2] in ("+:", "-:")}  # unprefixed keys are ignored, as convert_from_autogptq_dynamic does
    skip, keep = _flat(qc.get("modules_to_not_convert")), _flat(qc.get("modules_in_block_to_quantize"))
    known = set(names)
    rules = [Rule(tuple(blocks), "prefix", FLOAT, negate=True, final=True)]
    if skip:
        rules.append(Rule(tuple(skip), "search", FLOAT, final=True))
    if keep:
        rules.append(Rule(tuple(keep), "search", FLOAT, negate=True, final=True))
    rules += [Rule(k, "exact", v, final=True) for k, v in extra.items() if k in known]
    rules += [Rule(k, "search", v, final=True) for k, v in dynamic.items() if v]
    rules += [Rule(k, "search", v, final=True) for k, v in extra.items() if k not in known and v]
    return rules
