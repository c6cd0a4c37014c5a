"""lm-eval integration: JaxLM against lm-eval's own `hf` model (torch, fp32) on a tiny random Qwen3 that borrows
SmolLM2's tokenizer, on local jsonl tasks found through include_path."""

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from autoround_jax import load_model, load_tokenizer
from tests.tiny_models import build_model, save_model

pytest.importorskip("torch")
lm_eval = pytest.importorskip("lm_eval")
from lm_eval.api.instance import Instance  # noqa: E402

from autoround_jax.eval_cli import evaluate_lm, results_markdown, run_eval, write_results  # noqa: E402
from autoround_jax.generation import generate_ids  # noqa: E402
from autoround_jax.lm_eval_model import JaxLM, bucket  # noqa: E402

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
MC_DOCS = [
    ("The sky on a clear day is", ["blue", "green", "loud"], 0),
    ("Two plus two equals", ["four", "five", "seven"], 0),
    ("Water is", ["dry", "wet", "square"], 1),
    ("The opposite of hot is", ["cold", "warm", "tall"], 0),
    ("A cat says", ["woof", "moo", "meow"], 2),
    ("The sun rises in the", ["west", "east", "north"], 1),
    ("Ice is made of", ["fire", "stone", "water"], 2),
    ("The capital of France is", ["Paris", "Rome", "Berlin"], 0),
]
TEXTS = ["It was the best of times, it was the worst of times. " * 12, "Hello there, general Kenobi.",
         "Call me Ishmael. Some years ago, never mind how long precisely."]
QUESTIONS = [("What is two plus two?", "4"), ("Name a colour.", "blue"), ("What is the capital of Italy?", "Rome")]


def _write_tasks(folder: str) -> str:
    """Three offline tasks (multiple choice, rolling loglikelihood, generation) over local jsonl files."""
    rows = {
        "mc": [{"q": q, "choices": c, "label": y} for q, c, y in MC_DOCS],
        "roll": [{"text": t} for t in TEXTS],
        "gen": [{"question": q, "answer": a} for q, a in QUESTIONS],
    }
    for name, docs in rows.items():
        with open(os.path.join(folder, f"{name}.jsonl"), "w") as f:
            f.writelines(json.dumps(d) + "\n" for d in docs)
    common = "dataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {path}\ntest_split: test\n"
    yamls = {
        "tiny_mc": "output_type: multiple_choice\ndoc_to_text: '{{q}}'\ndoc_to_choice: '{{choices}}'\n"
                   "doc_to_target: label\nmetric_list:\n  - metric: acc\n  - metric: acc_norm\n",
        "tiny_roll": "output_type: loglikelihood_rolling\ndoc_to_text: ''\ndoc_to_target: '{{text}}'\n"
                     "metric_list:\n  - metric: word_perplexity\n  - metric: byte_perplexity\n",
        "tiny_gen": "output_type: generate_until\ndoc_to_text: 'Question: {{question}}\\nAnswer:'\n"
                    "doc_to_target: '{{answer}}'\ngeneration_kwargs:\n  until: ['\\n\\n', 'Question:']\n"
                    "  do_sample: false\n  max_gen_toks: 12\nmetric_list:\n  - metric: exact_match\n",
    }
    data = {"tiny_mc": "mc", "tiny_roll": "roll", "tiny_gen": "gen"}
    for task, body in yamls.items():
        path = os.path.join(folder, data[task] + ".jsonl")
        with open(os.path.join(folder, f"{task}.yaml"), "w") as f:
            f.write(f"task: {task}\n" + common.format(path=path) + body)
    return folder


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory, smollm2_dir):
    folder = save_model(build_model("qwen3_tune", seed=11, num_layers=2, vocab_size=49152),
                        str(tmp_path_factory.mktemp("lmeval_model")))
    for f in TOKENIZER_FILES:
        shutil.copy(os.path.join(smollm2_dir, f), folder)
    return folder


@pytest.fixture(scope="module")
def tasks_dir(tmp_path_factory):
    return _write_tasks(str(tmp_path_factory.mktemp("lmeval_tasks")))


@pytest.fixture(scope="module")
def jax_lm(tiny_dir):
    return JaxLM(load_model(tiny_dir, dtype="fp32"), load_tokenizer(tiny_dir), batch_size=4)


@pytest.fixture(scope="module")
def hf_lm(tiny_dir):
    from lm_eval.models.huggingface import HFLM

    return HFLM(pretrained=tiny_dir, device="cpu", dtype="float32", batch_size=4)


def _instances(kind, args):
    return [Instance(kind, {}, a, i) for i, a in enumerate(args)]


def test_bucket_shapes_stay_few():
    assert [bucket(n) for n in (1, 16, 17, 100, 512, 513, 1500)] == [16, 16, 32, 128, 512, 1024, 1536]
    assert bucket(200, cap=256) == 256 and bucket(300, cap=300) == 320 and bucket(3000, 2048) == 3000


def test_compiles_stay_few(jax_lm):
    """30 requests of 30 different lengths, in batches of 4: one compile per (length bucket, continuation bucket)."""
    from autoround_jax import lm_eval_model

    lm_eval_model._score.clear_cache()
    reqs = [(" ".join(["word"] * n), " and" * (1 + n % 5)) for n in range(1, 31)]
    jax_lm.loglikelihood(_instances("loglikelihood", reqs), disable_tqdm=True)
    assert lm_eval_model._score._cache_size() <= 3  # 8 batches; T in {16, 32, 64}, C = 8


def test_loglikelihood_equals_hf_model(jax_lm, hf_lm):
    """Same values and greedy flags as lm-eval's hf model, whatever eval_bs; covers empty contexts, trailing spaces,
    left truncation past max_length, shared contexts (one forward for one-token choices) and a greedy answer."""
    greedy = jax_lm.generate_until(_instances("generate_until", [("The answer is", {"until": [], "max_gen_toks": 6})]),
                                   disable_tqdm=True)[0]
    reqs = [("The capital of France is", " Paris"), ("The capital of France is", " London"), ("", "Hello world"),
            ("Once upon a time ", "there was a dragon"), ("a b c " * 100, "d e f"), ("Q: 2+2?\nA:", " 4"),
            ("Q: 2+2?\nA:", " 5"), ("x", " y z w v u t s r q p o n m"), ("The answer is", greedy)]
    inst = _instances("loglikelihood", reqs)
    ours, ref = jax_lm.loglikelihood(inst, disable_tqdm=True), hf_lm.loglikelihood(inst, disable_tqdm=True)
    np.testing.assert_allclose([o[0] for o in ours], [r[0] for r in ref], rtol=1e-4)
    assert [o[1] for o in ours] == [r[1] for r in ref]
    assert ours[-1][1], "the model's own greedy continuation must be flagged greedy"
    one = JaxLM(jax_lm.model, jax_lm.tokenizer, batch_size=1).loglikelihood(inst, disable_tqdm=True)
    np.testing.assert_allclose([o[0] for o in one], [o[0] for o in ours], rtol=1e-5)


def test_loglikelihood_rolling_equals_hf_model(jax_lm, hf_lm):
    """Several windows per document (max_length 64) and a one-window document."""
    from lm_eval.models.huggingface import HFLM

    inst = _instances("loglikelihood_rolling", [(t,) for t in TEXTS])
    ours = JaxLM(jax_lm.model, jax_lm.tokenizer, batch_size=4, max_length=64).loglikelihood_rolling(inst, True)
    hf = HFLM(pretrained=hf_lm.model, tokenizer=hf_lm.tokenizer, device="cpu", batch_size=4, max_length=64)
    np.testing.assert_allclose(ours, hf.loglikelihood_rolling(inst, disable_tqdm=True), rtol=1e-4)
    assert len(jax_lm.tok_encode(TEXTS[0])) > 2 * 64


def test_generate_until_stops_at_strings_like_hf_model(jax_lm, hf_lm):
    """Free greedy text first; then a stop string picked from its middle must cut it there, for us and lm-eval's hf
    model alike, with any eval_bs."""
    prompts = ["Hello", "The answer is", "a b c d e f g h", "Question: why?\nAnswer:"]
    free_kw = {"until": [], "max_gen_toks": 20, "do_sample": False}
    free = jax_lm.generate_until(_instances("generate_until", [(p, free_kw) for p in prompts]), disable_tqdm=True)
    assert free == hf_lm.generate_until(_instances("generate_until", [(p, free_kw) for p in prompts]), True)
    stop = free[1][len(free[1]) // 2:][:4]
    kw = {"until": [stop, "never-appears"], "max_gen_toks": 20, "do_sample": False}
    inst = _instances("generate_until", [(p, kw) for p in prompts])
    ours = jax_lm.generate_until(inst, disable_tqdm=True)
    assert ours == [f.split(stop)[0] for f in free]
    assert len(ours[1]) < len(free[1])
    assert ours == hf_lm.generate_until(inst, disable_tqdm=True)
    assert ours == JaxLM(jax_lm.model, jax_lm.tokenizer, batch_size=1).generate_until(inst, disable_tqdm=True)


def test_generate_until_is_greedy_generate_ids(jax_lm):
    """The same tokens as autoround_jax.generation.generate_ids, cut at the stop string."""
    prompt, stop = "Once upon a time", " the"
    ids = np.asarray([jax_lm.tok_encode(prompt)], np.int32)
    toks = generate_ids(jax_lm.model, ids, max_new_tokens=16, eos_token_ids=sorted(jax_lm._eos_ids))[0]
    expected = jax_lm.tok_decode(toks.tolist()).split(stop)[0]
    inst = _instances("generate_until", [(prompt, {"until": [stop], "max_gen_toks": 16})])
    assert jax_lm.generate_until(inst, disable_tqdm=True) == [expected]


def test_simple_evaluate_matches_hf_model_on_local_tasks(jax_lm, hf_lm, tasks_dir):
    """All three output types through lm_eval.simple_evaluate: identical accuracy and exact match, same
    perplexities."""
    kw = dict(include_path=tasks_dir, include_defaults=False, bootstrap_iters=0)
    tasks = "tiny_mc,tiny_roll,tiny_gen"
    ours, ref = evaluate_lm(jax_lm, tasks, **kw)["results"], evaluate_lm(hf_lm, tasks, **kw)["results"]
    for key in ("acc,none", "acc_norm,none"):
        assert ours["tiny_mc"][key] == ref["tiny_mc"][key]
    assert ours["tiny_gen"]["exact_match,none"] == ref["tiny_gen"]["exact_match,none"]
    for key in ("word_perplexity,none", "byte_perplexity,none"):
        assert ours["tiny_roll"][key] == pytest.approx(ref["tiny_roll"][key], rel=1e-4)


def test_chat_template_like_hf_model(jax_lm, hf_lm, tasks_dir):
    history = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    assert jax_lm.apply_chat_template(history) == hf_lm.apply_chat_template(history)
    assert jax_lm.tokenizer_name == hf_lm.tokenizer_name
    kw = dict(include_path=tasks_dir, include_defaults=False, bootstrap_iters=0, apply_chat_template=True,
              system_instruction="Answer with one word.", num_fewshot=1)
    ours, ref = evaluate_lm(jax_lm, "tiny_mc", **kw), evaluate_lm(hf_lm, "tiny_mc", **kw)
    assert ours["results"]["tiny_mc"]["acc,none"] == ref["results"]["tiny_mc"]["acc,none"]


def test_limit_and_eval_bs(jax_lm, tasks_dir):
    """--limit N evaluates the first N docs; the score does not depend on --eval_bs."""
    kw = dict(include_path=tasks_dir, include_defaults=False, bootstrap_iters=0, limit=3)
    a = run_eval(jax_lm.model, jax_lm.tokenizer, "tiny_mc", batch_size=2, **kw)
    b = run_eval(jax_lm.model, jax_lm.tokenizer, "tiny_mc", batch_size=8, **kw)
    assert a["n-samples"]["tiny_mc"] == {"original": len(MC_DOCS), "effective": 3}
    assert a["results"]["tiny_mc"] == b["results"]["tiny_mc"]


def test_gen_kwargs_and_log_samples_like_hf_model(jax_lm, hf_lm, tasks_dir, tmp_path, capsys):
    """--gen_kwargs overrides the task's generation settings and --log_samples keeps every response, as lm-eval's hf
    model does; the samples go to samples_<task>.jsonl beside the results JSON, not into it."""
    from autoround_jax.cli import run

    kw = dict(include_path=tasks_dir, include_defaults=False, bootstrap_iters=0, gen_kwargs="max_gen_toks=3",
              log_samples=True)
    ours, ref = evaluate_lm(jax_lm, "tiny_gen", **kw), evaluate_lm(hf_lm, "tiny_gen", **kw)
    assert ours["configs"]["tiny_gen"]["generation_kwargs"]["max_gen_toks"] == 3
    responses = lambda r: [d["resps"] for d in r["samples"]["tiny_gen"]]  # noqa: E731
    assert len(responses(ours)) == len(QUESTIONS) and responses(ours) == responses(ref)
    path = write_results(ours, str(tmp_path / "out"))
    assert "samples" not in json.loads(open(path).read())
    lines = (tmp_path / "out" / "samples_tiny_gen.jsonl").read_text().splitlines()
    assert [json.loads(line)["resps"] for line in lines] == responses(ours)
    capsys.readouterr()  # drop the progress bars so far
    assert run(["eval", "--tasks", "tiny_gen", "--include_path", tasks_dir, "--log_samples"]) == 2
    assert capsys.readouterr().err.strip() == (
        "autoround-jax: error: --log_samples needs --output_path (where the samples files go)")


def test_missing_task_is_a_clear_error(tasks_dir):
    with pytest.raises(ValueError, match="^Tasks not found: nope$"):
        evaluate_lm(None, "tiny_mc,nope", include_path=tasks_dir, include_defaults=False)


def test_cli_eval_table_json_and_errors(tiny_dir, tasks_dir, tmp_path, capsys):
    """In-process (the bundled task index is built once): table on stdout, results JSON, one-line errors."""
    from autoround_jax.cli import run

    assert run(["eval", "--model", tiny_dir, "--tasks", "tiny_mc,no_such_task", "--include_path", tasks_dir]) == 2
    err = capsys.readouterr().err
    assert err.strip() == "autoround-jax: error: Tasks not found: no_such_task"
    out = tmp_path / "res.json"
    args = ["eval", "--model", tiny_dir, "--tasks", "tiny_mc", "--include_path", tasks_dir, "--eval_bs", "4",
            "--limit", "5", "--model_dtype", "fp32", "--output_path", str(out), "--seed", "1"]
    assert run(args) == 0
    stdout = capsys.readouterr().out
    assert "|tiny_mc|" in stdout.replace(" ", "") and "acc" in stdout
    saved = json.loads(out.read_text())
    assert saved["n-samples"]["tiny_mc"]["effective"] == 5 and "acc,none" in saved["results"]["tiny_mc"]


def test_quantized_models_and_markdown_table(jax_lm, tiny_dir, tasks_dir, tmp_path):
    """run_eval straight after quantization (RTN, fake-quant leaves) next to the float run; its auto_round export,
    loaded packed by the CLI's loader, scores the same."""
    from autoround_jax.eval_cli import load_for_eval
    from autoround_jax.tuning.autoround import AutoRound

    ar = AutoRound(tiny_dir, jax_lm.tokenizer, iters=0, disable_opt_rtn=True, bits=4, group_size=128,
                   model_dtype="fp32", dataset="fortunes", progress=False)
    qmodel, _ = ar.quantize()
    kw = dict(include_path=tasks_dir, include_defaults=False, bootstrap_iters=0, batch_size=4)
    fp = run_eval(jax_lm.model, jax_lm.tokenizer, "tiny_mc,tiny_roll", **kw)
    q = run_eval(qmodel, jax_lm.tokenizer, "tiny_mc,tiny_roll", **kw)
    packed = run_eval(*load_for_eval(ar.save_quantized(str(tmp_path / "w4"), format="auto_round"), "fp32"),
                      "tiny_mc,tiny_roll", **kw)
    ppl = lambda r: r["results"]["tiny_roll"]["word_perplexity,none"]  # noqa: E731
    assert np.isfinite(ppl(q)) and ppl(q) != ppl(fp)
    assert ppl(packed) == pytest.approx(ppl(q), rel=1e-4)
    assert packed["results"]["tiny_mc"]["acc,none"] == q["results"]["tiny_mc"]["acc,none"]
    table = results_markdown(fp, q).splitlines()
    assert table[0] == "| Metric | BF16 | INT4 |" and any(r.startswith("| tiny_mc acc |") for r in table)


def test_results_markdown():
    fp = {"results": {"arc_easy": {"alias": "arc_easy", "sample_len": 8, "acc,none": 0.5, "acc_stderr,none": 0.01},
                      "gsm8k": {"exact_match,strict-match": 0.25}}}
    q = {"results": {"arc_easy": {"acc,none": 0.4567}}}
    assert results_markdown(fp, q) == "\n".join([
        "| Metric | BF16 | INT4 |", "|---|---|---|", "| arc_easy acc | 0.5000 | 0.4567 |",
        "| gsm8k exact_match (strict-match) | 0.2500 | - |"])


def test_cli_parser_does_not_import_lm_eval():
    code = ("import sys; from autoround_jax.cli import build_parser; build_parser(); "
            "assert 'lm_eval' not in sys.modules and 'torch' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_quantize_with_eval_writes_the_seeds_table(tiny_dir, tasks_dir, tmp_path, capsys):
    """`autoround-jax --eval` (as the reference): quantize, export, then lm-eval float and INT4 side by side."""
    from autoround_jax.cli import run

    out = tmp_path / "q"
    args = ["--model", tiny_dir, "--iters", "0", "--disable_opt_rtn", "--model_dtype", "fp32",
            "--output_dir", str(out), "--eval",
            "--tasks", "tiny_mc", "--include_path", str(tasks_dir), "--eval_bs", "4", "--limit", "4"]
    assert run(args) == 0
    folder = next(out.iterdir())
    table = (folder / "eval.md").read_text().splitlines()
    assert table[0] == "| Metric | float | INT4 |" and any(r.startswith("| tiny_mc acc |") for r in table)
    assert json.loads((folder / "eval_quantized.json").read_text())["n-samples"]["tiny_mc"]["effective"] == 4
    assert "| Metric | float | INT4 |" in capsys.readouterr().out
    assert run([*args, "--tasks", "no_such_task", "--overwrite"]) == 2  # bad task fails before tuning
