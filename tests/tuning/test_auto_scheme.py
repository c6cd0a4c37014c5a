"""AutoScheme pieces against the reference 0.16.1: its bit-counting rule (compute_layer_bits) and its dynamic
program (choose_bits_per_layer_with_path) on the same numbers; DeltaLoss on a tiny model meets the budget."""

import numpy as np
import pytest

from autoround_jax.quant.scheme import LayerScheme
from autoround_jax.tuning import auto_scheme
from tests.tiny_models import build_model, save_model

torch = pytest.importorskip("torch")
SCHEMES = [LayerScheme(2, 64, True), LayerScheme(4, 128, True), LayerScheme(8, 128, True)]


def _ref_bits(out_f, in_f, s, ignore=False):
    from auto_round.auto_scheme.utils import compute_layer_bits

    lin = torch.nn.Linear(in_f, out_f, bias=False)
    lin.bits, lin.group_size, lin.sym, lin.data_type = s.bits, s.group_size, s.sym, "int"
    return compute_layer_bits(lin, ignore)[0]


@pytest.mark.parametrize("shape", [(96, 128), (64, 320), (40, 100)])
@pytest.mark.parametrize("scheme", SCHEMES + [LayerScheme(3, -1, False), LayerScheme(4, 32, False)])
def test_layer_bits_follow_the_reference_rule(shape, scheme):
    for ignore in (False, True):
        assert auto_scheme.layer_bits(*shape, scheme, ignore) == _ref_bits(*shape, scheme, ignore)


def test_dp_picks_the_reference_choice_on_the_same_numbers():
    from auto_round.auto_scheme.delta_loss import choose_bits_per_layer_with_path

    rng = np.random.default_rng(0)
    for trial in range(20):
        n = int(rng.integers(3, 9))
        shapes = {f"l{i}": (int(rng.integers(2, 9)) * 32, int(rng.integers(2, 9)) * 32) for i in range(n)}
        scores = rng.gamma(1.0, 1.0, (3, n)) * np.array([[8.0], [1.0], [0.1]])
        total = sum(o * i for o, i in shapes.values())
        budget = int(total * rng.uniform(2.6, 6.0))
        ours = {name: [(si, auto_scheme.layer_bits(o, i, s), float(scores[si, k])) for si, s in enumerate(SCHEMES)]
                for k, (name, (o, i)) in enumerate(shapes.items())}
        ref_in = {name: [(si, b, loss, [name]) for si, b, loss in opts] for name, opts in ours.items()}
        ref_loss, ref_path = choose_bits_per_layer_with_path(ref_in, budget)
        loss, chosen = auto_scheme.choose_schemes(ours, budget)
        if ref_path is None:
            assert chosen is None
            continue
        assert loss == ref_loss
        assert chosen == {names[0]: si for names, si in ref_path}


def test_autoscheme_on_a_tiny_model_meets_the_budget_as_the_reference_counts_and_exports(tmp_path):
    """DeltaLoss scores, the allocation against the reference's DP and bit rule at several targets, then the tuned
    mixed-bit export: extra_config per layer, and transformers + auto-round decode it to our weights."""
    import json

    from auto_round.auto_scheme.delta_loss import choose_bits_per_layer_with_path

    from autoround_jax import load_quantized
    from autoround_jax.tuning.autoround import AutoRound
    from tests.formats.reference import assert_matches_transformers

    folder = save_model(build_model("qwen3_tune", num_layers=2), str(tmp_path / "m"))
    ids = np.random.default_rng(0).integers(3, 301, size=(4, 32)).astype(np.int32)
    spec = auto_scheme.AutoScheme("W2A16G64,W4A16,W8A16", 4.5)
    ar = AutoRound(folder, scheme=spec, dataset=ids, iters=4, nsamples=4, seqlen=32, batch_size=2,
                   model_dtype="fp32", progress=False)
    ar.quantize()
    res = ar.auto_scheme_result
    names, scores = list(res.choices), res.scores
    assert scores.shape == (3, 14) and np.isfinite(scores).all()
    assert (scores[0] > scores[1]).mean() > 0.9 and (scores[1] > scores[2]).mean() > 0.9  # fewer bits, more loss
    model = ar.source.model()
    shapes = {n: tuple(auto_scheme._linear(model, n).weight.shape) for n in names}
    total = sum(o * i for o, i in shapes.values())
    for target in (3.0, 4.5, 6.0):
        chosen, avg = auto_scheme.allocate(shapes, SCHEMES, scores, target)
        used = sum(_ref_bits(*shapes[n], s) for n, s in chosen.items())  # counted by the reference's rule
        assert used <= int(total * target) and avg == used / total
        ref_in = {n: [(si, _ref_bits(*shapes[n], s), float(scores[si, k]), [n]) for si, s in enumerate(SCHEMES)]
                  for k, n in enumerate(names)}
        _, ref_path = choose_bits_per_layer_with_path(ref_in, int(total * target))
        assert chosen == {p[0][0]: SCHEMES[p[1]] for p in ref_path}
        if target == 4.5:
            assert chosen == res.choices and avg == res.avg_bits
    with pytest.raises(ValueError, match="too small"):
        auto_scheme.allocate(shapes, SCHEMES, scores, 2.0)

    assert ar.default_scheme == SCHEMES[0] and len(set(res.choices.values())) > 1
    assert all(ar.layer_config[n] == s for n, s in res.choices.items())
    summary = ar.summary()
    assert "AutoScheme: target 4.5" in summary and f"achieved {res.avg_bits:.4f}" in summary and "block 1:" in summary
    out = ar.save_quantized(str(tmp_path / "out"), format="auto_round")
    qc = json.load(open(f"{out}/config.json"))["quantization_config"]
    assert (qc["bits"], qc["group_size"]) == (2, 64)
    for name, s in res.choices.items():
        extra = qc.get("extra_config", {}).get(name, {})
        assert (extra.get("bits", 2), extra.get("group_size", 64)) == (s.bits, s.group_size), name
    assert_matches_transformers(out, load_quantized(out, dtype="fp32"), ids[:2, :16])


def test_cli_schemes_and_aliases():
    from autoround_jax.cli import build_quantize_parser

    p = build_quantize_parser()
    a = p.parse_args(["--schemes", "W2A16G64,W4A16", "W8A16", "--bits", "3.0", "--ignore_scale_zp_bits"])
    spec = auto_scheme.parse_spec(a.schemes, a.bits, a.ignore_scale_zp_bits)
    assert spec.names == ("W2A16G64", "W4A16", "W8A16") and spec.avg_bits == 3.0 and spec.ignore_scale_zp_bits
    with pytest.warns(UserWarning, match="--avg_bits is deprecated"):
        b = p.parse_args(["--options", "W2A16G64,W4A16", "--avg_bits", "2.5"])
    assert auto_scheme.parse_spec(b.schemes, b.bits).avg_bits == 2.5
    with pytest.raises(ValueError, match="please set --bits"):
        auto_scheme.parse_spec(["W4A16"], None)
    with pytest.raises(ValueError, match="unknown scheme 'W5A16'"):
        auto_scheme.parse_spec("W4A16,W5A16", 4)


def test_cli_schemes_refuses_overrides_in_one_line(tmp_path, capsys):
    from autoround_jax.cli import run

    assert run(["--model", str(tmp_path), "--schemes", "W2A16G64,W4A16", "--bits", "3", "--group_size", "32"]) == 2
    err = capsys.readouterr().err.strip()
    assert "--group_size/--asym do not apply to --schemes" in err and len(err.splitlines()) == 1
