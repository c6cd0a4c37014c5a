"""Issue 17's accelerator figures in one command: tuning speed against the reference, int4 kernels, int4 decode.

On a bare GPU machine of the device tool (python3 with jax 0.11.2 + CUDA, torch 2.11, transformers; no network):

    bash scripts/gpu_suite.sh            # = python3 scripts/gpu_suite.py --out "$OUT"

1. install: the wheels brought along in .gpu_wheels/ (scripts/fetch_gpu_wheels.sh: auto-round 0.16.1 and what the
   image lacks of its requirements) with `pip install --no-index --no-deps`, only those the machine lacks or holds
   in a version that a requirement rejects; then `import auto_round` is checked.
2. tuning: one Qwen3-8B-shaped block (hidden 4096, intermediate 12288, 32 / 8 heads, head_dim 128; a random-weight
   HF folder of --tune_layers such blocks written once, read by both sides) at nsamples 128 x seqlen 2048, batch 8,
   50 iterations, W4G128 sym: autoround-jax (`AutoRound.quantize`, amp: bf16 matmuls, one jit call per block)
   against the reference auto-round 0.16.1 on torch CUDA at its defaults (bf16 autocast, torch.compile on), each in
   its own process: seconds per block (first block, with compilation, and the next ones), peak device memory, ratio.
3. kernels: scripts/bench_int4_matmul.py on 4096x4096, 5120x27648 and 27648x5120 at M = 1, 4, 16, 64, 256
   (default schedule, XLA fallback, bf16 dot), then a sweep of kernels.gpu.variants at M <= 16 (and more as time
   allows), each variant checked against an f32 product before it is timed.
4. decode: a Qwen2.5-32B-shaped int4 W4G128 model with random packed weights built on the device, batch-1 decode
   tokens/s against the bandwidth floor (int4 weight bytes / the copy rate measured in the same run).

Each section runs in its own process with its own time box (shares of --budget_s, default 480 s; time a section
leaves unused goes to the later ones): a crash, an out-of-memory or a timeout ends that section only, with one line
saying why; tables are written as they fill, so a section cut short keeps its rows. Files in --out ($OUT, else
/tmp/gpu_suite_out):
summary.md (everything below, in order), tuning.md, kernels.md, decode.md, logs.txt (each child's output, tail).

`--dry_run` runs every section at tiny shapes on the CPU (Pallas in interpret mode, the reference on torch CPU
without torch.compile, no install): it proves the script end to end, never the speed.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = ROOT / "scripts"

# name: (hidden, intermediate, heads, kv heads, head_dim, vocab). The vocabulary is small: only the block is tuned.
TUNE_SHAPES = {
    "qwen3-8b": (4096, 12288, 32, 8, 128, 4096),
    "tiny": (128, 256, 4, 2, 32, 512),
}
# Full run: the settings. Dry run: seconds on a CPU.
TUNE_SETTINGS = {"full": dict(nsamples=128, seqlen=2048, batch_size=8, iters=50),
                 "dry": dict(nsamples=4, seqlen=32, batch_size=2, iters=3)}
# (share, min s, max s) per step: a step's time box is its share of the budget left, among the steps still to run.
SHARES = {"tuning_ours": (2.4, 60, 300), "tuning_ref": (3.0, 60, 300),
          "kernels": (2.3, 40, 300), "decode": (2.0, 40, 300)}
SECTION_STEPS = {"tuning": ["tuning_ours", "tuning_ref"], "kernels": ["kernels"], "decode": ["decode"]}


# ---------------------------------------------------------------------------------------------------------------
# wheels


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def read_wheels(folder: Path) -> dict[str, dict]:
    """project -> {version, path, requires: [requirement strings without extras-only ones]} for each wheel."""
    out = {}
    for path in sorted(folder.glob("*.whl")):
        name, version = path.name.split("-")[:2]
        requires = []
        with zipfile.ZipFile(path) as z:
            meta = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))
            for line in z.read(meta).decode("utf-8", "replace").splitlines():
                if line.startswith("Requires-Dist:"):
                    requires.append(line.split(":", 1)[1].strip())
        out[_norm(name)] = dict(version=version, path=str(path), requires=requires)
    return out


def installed_versions() -> dict[str, str]:
    out = {}
    for dist in importlib.metadata.distributions():
        name = dist.metadata.get("Name")
        if name:
            out.setdefault(_norm(name), dist.version)
    return out


def plan_install(wheels: dict[str, dict], installed: dict[str, str],
                 roots=("auto-round",)) -> tuple[list[str], list[str]]:
    """(wheel paths to install, notes). Starting from `roots`, a project is installed from its wheel when the
    machine lacks it or holds a version that a requirement of something being installed rejects; requirements
    that the machine satisfies are not followed further. Notes name what stays unmet."""
    from packaging.requirements import Requirement
    from packaging.version import Version

    chosen: dict[str, str] = {}
    notes: list[str] = []
    todo = []
    for root in roots:
        r = _norm(root)
        if r in installed and (r not in wheels or installed[r] == wheels[r]["version"]):
            notes.append(f"{root} {installed[r]} already installed")
        elif r in wheels:
            todo.append(r)
        else:
            notes.append(f"{root}: not installed and no wheel for it")
    while todo:
        name = todo.pop()
        if name in chosen:
            continue
        chosen[name] = wheels[name]["path"]
        for spec in wheels[name]["requires"]:
            req = Requirement(spec)
            if req.marker is not None and not req.marker.evaluate({"extra": ""}):
                continue
            dep = _norm(req.name)
            if dep in chosen:
                continue
            have = installed.get(dep)
            if have is not None and (not req.specifier or req.specifier.contains(Version(have), prereleases=True)):
                continue
            if dep in wheels and req.specifier.contains(Version(wheels[dep]["version"]), prereleases=True):
                todo.append(dep)
            elif have is None:
                notes.append(f"unmet: {name} needs {req}, not installed and no matching wheel")
            else:
                notes.append(f"unmet: {name} needs {req}, installed {have}, no matching wheel (kept)")
    return sorted(chosen.values()), notes


def install_step(wheel_dir: Path, dry: bool, site: Path) -> tuple[list[str], dict]:
    """Install what the machine lacks; returns (report lines, extra env for the children)."""
    lines, env = [], {}
    if not wheel_dir.is_dir():
        return [f"no wheel folder {wheel_dir}: nothing installed (bash scripts/fetch_gpu_wheels.sh brings it)"], env
    wheels = read_wheels(wheel_dir)
    files, notes = plan_install(wheels, installed_versions())
    lines.append(f"wheels in {wheel_dir.name}/: {len(wheels)}; to install: "
                 + (", ".join(Path(f).name for f in files) if files else "none"))
    lines += [f"  {n}" for n in notes]
    if dry or not files:
        if dry and files:
            lines.append("  (dry run: not installed)")
        return lines, env
    base = [sys.executable, "-m", "pip", "install", "--no-index", "--no-deps", "--no-cache-dir", "--no-compile",
            "--disable-pip-version-check", "-q"]
    r = subprocess.run(base + files, capture_output=True, text=True)
    if r.returncode != 0:
        lines.append(f"  pip into the environment failed (rc {r.returncode}): {(r.stderr or r.stdout).strip()[-300:]}")
        site.mkdir(parents=True, exist_ok=True)
        r = subprocess.run(base + ["--target", str(site)] + files, capture_output=True, text=True)
        if r.returncode != 0:
            why = (r.stderr or r.stdout).strip()[-300:]
            lines.append(f"  pip --target {site} failed too (rc {r.returncode}): {why}")
            return lines, env
        env["GPU_SUITE_SITE"] = str(site)
        lines.append(f"  installed into {site} (appended to the children's sys.path)")
    else:
        lines.append("  installed into the environment")
    return lines, env


def add_site() -> None:
    """Children: the --target fallback folder goes after site-packages, so it only adds what the machine lacks."""
    site = os.environ.get("GPU_SUITE_SITE")
    if site and site not in sys.path:
        sys.path.append(site)


# ---------------------------------------------------------------------------------------------------------------
# the random tuning model


def _bf16_bytes(a) -> bytes:
    import numpy as np

    a = np.ascontiguousarray(a, np.float32)
    return ((a.view(np.uint32) + 0x8000) >> 16).astype(np.uint16).tobytes()  # round half up to bf16


def write_random_qwen3(folder: Path, shape: str, layers: int, seed: int = 0) -> Path:
    """A Qwen3 HF folder with random bf16 weights (std 0.02, norms 1), tied embeddings, no tokenizer; written with
    numpy alone (safetensors layout by hand), so either side can make it. Reused when complete."""
    import numpy as np

    done = folder / ".complete"
    if done.exists():
        return folder
    hidden, inter, heads, kv, hd, vocab = TUNE_SHAPES[shape]
    folder.mkdir(parents=True, exist_ok=True)
    cfg = dict(architectures=["Qwen3ForCausalLM"], model_type="qwen3", vocab_size=vocab, hidden_size=hidden,
               intermediate_size=inter, num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv,
               head_dim=hd, rms_norm_eps=1e-6, rope_theta=1e6, max_position_embeddings=4096,
               tie_word_embeddings=True, torch_dtype="bfloat16", eos_token_id=2, bos_token_id=1, pad_token_id=0)
    (folder / "config.json").write_text(json.dumps(cfg, indent=1))
    shapes = {"model.embed_tokens.weight": (vocab, hidden), "model.norm.weight": (hidden,)}
    for i in range(layers):
        p = f"model.layers.{i}."
        shapes.update({p + "input_layernorm.weight": (hidden,), p + "post_attention_layernorm.weight": (hidden,),
                       p + "self_attn.q_proj.weight": (heads * hd, hidden),
                       p + "self_attn.k_proj.weight": (kv * hd, hidden),
                       p + "self_attn.v_proj.weight": (kv * hd, hidden),
                       p + "self_attn.o_proj.weight": (hidden, heads * hd),
                       p + "self_attn.q_norm.weight": (hd,), p + "self_attn.k_norm.weight": (hd,),
                       p + "mlp.gate_proj.weight": (inter, hidden), p + "mlp.up_proj.weight": (inter, hidden),
                       p + "mlp.down_proj.weight": (hidden, inter)})
    rng = np.random.default_rng(seed)
    header, offset = {"__metadata__": {"format": "pt"}}, 0
    for name, shp in shapes.items():
        n = int(np.prod(shp)) * 2
        header[name] = {"dtype": "BF16", "shape": list(shp), "data_offsets": [offset, offset + n]}
        offset += n
    head = json.dumps(header).encode()
    head += b" " * (-len(head) % 8)
    tmp = folder / "model.safetensors.part"
    with open(tmp, "wb") as f:
        f.write(len(head).to_bytes(8, "little") + head)
        for name, shp in shapes.items():
            if name.endswith("norm.weight"):
                f.write(_bf16_bytes(np.ones(shp, np.float32)))
            else:
                f.write(_bf16_bytes(rng.standard_normal(shp, np.float32) * np.float32(0.02)))
    tmp.rename(folder / "model.safetensors")
    write_word_tokenizer(folder, vocab)
    done.write_text("ok\n")
    return folder


def write_word_tokenizer(folder: Path, vocab: int) -> None:
    """A word-level tokenizer over the whole vocabulary (the reference refuses a model object without one; the
    calibration data are token ids either way)."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    words = ["<pad>", "<s>", "</s>", "<unk>"] + [f"w{i}" for i in range(4, vocab)]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps(dict(
        tokenizer_class="PreTrainedTokenizerFast", pad_token="<pad>", bos_token="<s>", eos_token="</s>",
        unk_token="<unk>", model_max_length=1 << 20)))


def calibration_ids(shape: str, nsamples: int, seqlen: int):
    import numpy as np

    vocab = TUNE_SHAPES[shape][5]
    return np.random.default_rng(42).integers(3, vocab, (nsamples, seqlen)).astype(np.int64)


# ---------------------------------------------------------------------------------------------------------------
# children


def child_tuning_ours(a) -> None:
    import jax
    import jax.numpy as jnp

    from autoround_jax.tuning.autoround import AutoRound

    s = TUNE_SETTINGS["dry" if a.dry_run else "full"]
    folder = write_random_qwen3(Path(a.work) / f"random-{a.tune_shape}-{a.tune_layers}", a.tune_shape, a.tune_layers)
    ids = calibration_ids(a.tune_shape, s["nsamples"], s["seqlen"]).astype("int32")
    dev = jax.devices()[0]
    ar = AutoRound(str(folder), bits=4, group_size=128, sym=True, iters=s["iters"], nsamples=s["nsamples"],
                   seqlen=s["seqlen"], batch_size=s["batch_size"], dataset=ids, amp=True, progress=False)
    t0 = time.perf_counter()
    ar.quantize()
    wall = time.perf_counter() - t0
    stats = dev.memory_stats() or {}
    res = dict(impl="autoround-jax", device=f"{dev.device_kind} ({jax.default_backend()})", jax=jax.__version__,
               precision=f"amp, {jnp.dtype(ar.compute_dtype).name} matmuls, jit (one call per block)",
               blocks=[r.seconds for r in ar.reports], compile=[r.split.get("compile", 0.0) for r in ar.reports],
               wall=wall, peak_bytes=stats.get("peak_bytes_in_use"),
               peak_what="JAX allocator peak_bytes_in_use" if stats else "n/a on this backend",
               losses=[(r.loss_rtn, r.loss_best) for r in ar.reports], **s)
    Path(a.work, "tuning_ours.json").write_text(json.dumps(res))
    print(json.dumps(res), flush=True)


def child_tuning_ref(a) -> None:
    add_site()
    import numpy as np
    import torch
    import transformers
    from auto_round import AutoRound as RefAutoRound
    from auto_round.algorithms import composer

    s = TUNE_SETTINGS["dry" if a.dry_run else "full"]
    folder = write_random_qwen3(Path(a.work) / f"random-{a.tune_shape}-{a.tune_layers}", a.tune_shape, a.tune_layers)
    cuda = torch.cuda.is_available() and not a.dry_run
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    block_seconds = []
    original = composer.AlgorithmComposer.compress_block

    partial = Path(a.work, "tuning_ref.partial.json")

    def timed(self, *args, **kwargs):  # the reference's per-block pipeline: float targets, tuning, quantized outputs
        sync()
        t0 = time.perf_counter()
        try:
            return original(self, *args, **kwargs)
        finally:
            sync()
            block_seconds.append(time.perf_counter() - t0)
            peak = torch.cuda.max_memory_allocated() if cuda else None
            partial.write_text(json.dumps(dict(blocks=block_seconds, peak_bytes=peak)))  # kept if the box ends it

    composer.AlgorithmComposer.compress_block = timed
    torch.manual_seed(42)
    model = transformers.AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.bfloat16)
    ids = calibration_ids(a.tune_shape, s["nsamples"], s["seqlen"])
    data = [torch.from_numpy(row[None]) for row in np.asarray(ids)]
    kwargs = dict(bits=4, group_size=128, sym=True, iters=s["iters"], nsamples=s["nsamples"], seqlen=s["seqlen"],
                  batch_size=s["batch_size"], dataset=data)
    if a.dry_run:  # torch CPU without compile; on the GPU: the reference's defaults (device 0, amp, torch.compile)
        kwargs.update(device_map="cpu", enable_torch_compile=False)
    tok = transformers.AutoTokenizer.from_pretrained(str(folder))
    note = ""
    try:
        ar, wall = _ref_quantize(RefAutoRound, model, tok, kwargs, cuda, sync)
    except Exception as e:  # noqa: BLE001 - e.g. torch.compile failing on this image: one more try without it
        if kwargs.get("enable_torch_compile") is False:
            raise
        note = f"; the default run failed ({type(e).__name__}: {str(e).splitlines()[0][:150]}), rerun without compile"
        print(f"reference at its defaults failed: {e!r}; retrying with enable_torch_compile=False", flush=True)
        block_seconds.clear()
        model = transformers.AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.bfloat16)
        ar, wall = _ref_quantize(RefAutoRound, model, tok, dict(kwargs, enable_torch_compile=False), cuda, sync)
    compiled = getattr(ar, "enable_torch_compile", None)
    if cuda:
        peak, what = torch.cuda.max_memory_allocated(), "torch.cuda.max_memory_allocated"
        device = torch.cuda.get_device_name(0)
    else:
        peak, what, device = None, "n/a on CPU", "cpu"
    res = dict(impl="auto-round 0.16.1", device=device, torch=torch.__version__,
               precision=f"amp={getattr(ar, 'amp', '?')} ({getattr(ar, 'amp_dtype', '?')}), torch.compile={compiled}"
               + note,
               blocks=block_seconds, wall=wall, peak_bytes=peak, peak_what=what,
               version=importlib.metadata.version("auto-round"), **s)
    Path(a.work, "tuning_ref.json").write_text(json.dumps(res))
    print(json.dumps(res), flush=True)


def _ref_quantize(cls, model, tok, kwargs, cuda: bool, sync):
    """(the reference's AutoRound after quantize(), wall seconds); the peak memory counter starts here."""
    import torch

    ar = cls(model, tokenizer=tok, **kwargs)
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    ar.quantize()
    sync()
    return ar, time.perf_counter() - t0


def child_kernels(a) -> None:
    sys.path.insert(0, str(SCRIPTS))
    import bench_int4_matmul as b
    import jax

    deadline = time.monotonic() + a.box - 10
    out = Path(a.out) / "kernels.md"
    if a.dry_run:
        layers, ms, v_ms, sets, calls, reps = b.DRY_LAYERS[:1], [1, 4], [1], 1, 1, 1
    else:
        layers, ms, v_ms, sets, calls, reps = b.LAYERS, b.MS, [1, 4, 16], None, 10, 5
    copy = b.copy_tbps(2**20 if a.dry_run else 2**30)
    intro = (f"jax {jax.__version__} on {jax.devices()[0].device_kind} ({jax.default_backend()}); copy rate "
             f"{copy:.3f} TB/s (read + write, measured here); int4 g128 asym, bf16 x, "
             + ("1 weight set per call (dry run)" if a.dry_run else "R weight sets per call (256 MB of int4 per call)")
             + f", median of {reps} reps of {calls} queued calls; rel err against an f32 product of the same x and "
             "the dequantized W")
    default_lines = [intro, "", "Default schedules (`kernels.gpu.choose`), XLA fallback and bf16 dot:", "",
                     b.header(copy)]
    variant_lines = ["", "Variants (`kernels.gpu.variants`; default rows above):", "", b.header(copy, True)]

    def write():
        out.write_text("\n".join(default_lines + (variant_lines if len(variant_lines) > 4 else [])) + "\n")

    def emit_default(row):
        default_lines.append(b.format_row(row))
        print(default_lines[-1], flush=True)
        write()

    def emit_variant(row):
        variant_lines.append(b.format_row(row, True))
        print(variant_lines[-1], flush=True)
        write()

    write()
    baselines: dict = {}
    order = sorted(layers, key=lambda kn: (kn != (5120, 27648), kn != (27648, 5120)))  # the goal's shape first
    for k, n in order:  # the table the issue asks for first
        if time.monotonic() > deadline:
            print(f"time box spent: default table cut before {k}x{n}", flush=True)
            break
        b.bench_layer(k, n, ms, sets, calls=calls, reps=reps, copy=copy, emit=emit_default, deadline=deadline,
                      baselines=baselines)
    for k, n in order:  # then the sweep
        if time.monotonic() > deadline:
            print("time box spent: variant sweep cut here", flush=True)
            break
        b.bench_layer(k, n, v_ms, sets, variants=True, skip=("default",), calls=calls, reps=reps, copy=copy,
                      emit=emit_variant, deadline=deadline, baselines=baselines)


def child_decode(a) -> None:
    """A 16-block model of the 32B's layers first (a row within minutes even if the 64-block compile is slow),
    then the whole 64-block Qwen2.5-32B shape; each report is written as soon as it is measured."""
    sys.path.insert(0, str(SCRIPTS))
    import bench_decode
    from bench_int4_matmul import copy_tbps

    import jax

    copy = copy_tbps(2**22 if a.dry_run else 2**30)
    runs = [("tiny", None)] if a.dry_run else [("32b", 16), ("32b", None)]
    reports = []
    for size, layers in runs:
        reports.append(bench_decode.random_int4_report(size, backend="auto", steps=4 if a.dry_run else 32,
                                                       reps=1 if a.dry_run else 3, copy_tbps=copy, layers=layers))
        (Path(a.out) / "decode.md").write_text("\n\n".join(reports) + "\n")
        print(reports[-1], flush=True)
        jax.clear_caches()


CHILDREN = {"tuning_ours": child_tuning_ours, "tuning_ref": child_tuning_ref, "kernels": child_kernels,
            "decode": child_decode}


# ---------------------------------------------------------------------------------------------------------------
# the parent


def run_child(step: str, a, box: float, env_extra: dict) -> tuple[str, float]:
    """Run one step in its own process group, killed at `box` seconds; returns (status line, seconds)."""
    log = Path(a.work) / f"{step}.log"
    cmd = [sys.executable, str(Path(__file__).resolve()), "--_child", step, "--out", a.out, "--work", a.work,
           "--box", f"{box:.0f}", "--tune_shape", a.tune_shape, "--tune_layers", str(a.tune_layers)]
    if a.dry_run:
        cmd.append("--dry_run")
    env = dict(os.environ, PYTHONUNBUFFERED="1", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
               XLA_PYTHON_CLIENT_PREALLOCATE="false", **env_extra)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT)] + [p for p in [os.environ.get("PYTHONPATH")] if p])
    if a.dry_run:
        env["JAX_PLATFORMS"] = "cpu"
    t0 = time.monotonic()
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=a.work, env=env,
                                start_new_session=True)
        try:
            rc = proc.wait(timeout=box)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            rc = None
    secs = time.monotonic() - t0
    if rc == 0:
        return f"{step}: ok in {secs:.0f} s", secs
    tail = [ln for ln in log.read_text(errors="replace").splitlines() if ln.strip()]
    why = next((ln for ln in reversed(tail) if re.search(r"Error|Exception|error:|Killed|Traceback", ln)),
               tail[-1] if tail else "no output")
    if rc is None:
        return f"{step}: TIMED OUT after its {box:.0f} s box (rows written so far are kept); last line: " \
               f"{tail[-1][:200] if tail else 'none'}", secs
    return f"{step}: FAILED (rc {rc}) after {secs:.0f} s: {why.strip()[:300]}", secs


def _gib(b) -> str:
    return f"{b / 2**30:.2f}" if b else "n/a"


def tuning_table(work: Path, a) -> list[str]:
    """The tuning section's markdown from the two children's JSON (whichever exist)."""
    s = TUNE_SETTINGS["dry" if a.dry_run else "full"]
    hidden, inter, heads, kv, hd, _ = TUNE_SHAPES[a.tune_shape]
    lines = [f"{a.tune_shape}-shaped block (hidden {hidden}, intermediate {inter}, {heads}/{kv} heads, head_dim {hd}; "
             f"random bf16 weights, {a.tune_layers} blocks), W4G128 sym, nsamples {s['nsamples']} x seqlen "
             f"{s['seqlen']}, batch {s['batch_size']}, {s['iters']} iterations; the same random token ids on both "
             "sides. "
             "s/block is the whole per-block pipeline (float targets, tuning, quantized outputs; ours also reads "
             "the block from disk); 'steady' is the median of the blocks after the first.", "",
             "| implementation | device | precision | s/block, first (incl. compile) | s/block, steady "
             "| quantize() wall s | peak device memory GiB |", "|---|---|---|---|---|---|---|"]
    res = {}
    for side in ("ours", "ref"):
        f = work / f"tuning_{side}.json"
        if f.exists():
            res[side] = json.loads(f.read_text())
    part = work / "tuning_ref.partial.json"
    if "ref" not in res and part.exists():  # the reference was cut short: the blocks it finished
        p = json.loads(part.read_text())
        if p["blocks"]:
            res["ref"] = dict(impl="auto-round 0.16.1 (cut short by its time box)", device="cuda",
                              precision="defaults (amp bf16, torch.compile)", blocks=p["blocks"], wall=float("nan"),
                              peak_bytes=p["peak_bytes"])
    for side, r in res.items():
        blocks = r["blocks"]
        steady = sorted(blocks[1:])[len(blocks[1:]) // 2] if len(blocks) > 1 else None
        r["steady"] = steady
        first = f"{blocks[0]:.2f}" if blocks else "n/a"
        lines.append(f"| {r['impl']} | {r['device']} | {r['precision']} | {first} | "
                     f"{f'{steady:.2f}' if steady else 'n/a'} | {r['wall']:.1f} | {_gib(r['peak_bytes'])} |"
                     .replace("| nan |", "| n/a |"))
    for side in ("ours", "ref"):
        if side not in res:
            lines.append(f"| {'autoround-jax' if side == 'ours' else 'auto-round 0.16.1'} | - | - | missing "
                         "(see the step's status line) | | | |")
    if len(res) == 2:
        o, r = res["ours"], res["ref"]
        if o["steady"] and r["steady"]:
            lines.append(f"\nreference / ours, steady s/block: {r['steady'] / o['steady']:.2f}x (goal >= 2x)")
        if o["blocks"] and r["blocks"]:
            lines.append(f"reference / ours, first block incl. compile: {r['blocks'][0] / o['blocks'][0]:.2f}x")
        if o["peak_bytes"] and r["peak_bytes"]:
            lines.append(f"peak memory ours / reference: {o['peak_bytes'] / r['peak_bytes']:.2f} (goal <= 1)")
    return lines


def environment_lines() -> list[str]:
    lines = [f"python {sys.version.split()[0]} ({sys.executable})"]
    for pkg in ("jax", "jaxlib", "flax", "torch", "transformers", "auto-round", "triton"):
        try:
            lines.append(f"{pkg} {importlib.metadata.version(pkg)}")
        except importlib.metadata.PackageNotFoundError:
            lines.append(f"{pkg}: not installed")
    if shutil.which("nvidia-smi"):
        r = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total,driver_version,clocks.sm,clocks.mem",
                            "--format=csv,noheader"], capture_output=True, text=True)
        lines.append(f"nvidia-smi: {(r.stdout or r.stderr).strip()}")
    else:
        lines.append("nvidia-smi: not found (no NVIDIA GPU here)")
    return lines


def parent(a) -> int:
    t_start = time.monotonic()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    for stale in ("tuning_ours.json", "tuning_ref.json", "tuning_ref.partial.json"):
        (work / stale).unlink(missing_ok=True)
    for name in ("summary.md", "tuning.md", "kernels.md", "decode.md", "logs.txt"):
        (out / name).unlink(missing_ok=True)
    sections = [s.strip() for s in a.sections.split(",") if s.strip()]
    steps = [st for s in sections for st in SECTION_STEPS[s]]
    summary = [f"# GPU suite, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}"
               + (" (DRY RUN: tiny shapes on the CPU; no figure here means anything)" if a.dry_run else ""), ""]
    summary += ["## Environment", ""] + [f"- {ln}" for ln in environment_lines()] + [""]
    status = []

    def box_for(i: int) -> float:
        """Step i's share of the budget left (shares of the steps still to run), within its min/max, never past
        the budget."""
        left = a.budget_s - (time.monotonic() - t_start)
        share, lo, hi = SHARES[steps[i]]
        total = sum(SHARES[p][0] for p in steps[i:])
        return min(left, hi, max(lo, left * share / total))

    env_extra: dict = {}
    t0 = time.monotonic()
    try:
        lines, env_extra = install_step(Path(a.wheels), a.dry_run or a.skip_install,
                                        Path(tempfile.gettempdir()) / "gpu_suite_site")
    except Exception as e:  # noqa: BLE001
        lines = [f"install step failed: {type(e).__name__}: {e}"]
    if "tuning_ref" in steps and not a.dry_run:
        check = subprocess.run([sys.executable, "-c", "import sys, os; s = os.environ.get('GPU_SUITE_SITE'); "
                                "s and sys.path.append(s); import auto_round, importlib.metadata as m; "
                                "print('import auto_round ok,', m.version('auto-round'))"],
                               capture_output=True, text=True, env=dict(os.environ, **env_extra), timeout=120)
        lines.append(check.stdout.strip() if check.returncode == 0 else
                     f"import auto_round FAILED: {(check.stderr.strip().splitlines() or ['?'])[-1][:300]}")
    status.append(f"install: {time.monotonic() - t0:.0f} s")
    summary += ["## Install", ""] + [f"    {ln}" for ln in lines] + [""]
    print("\n".join(lines), flush=True)

    for i, step in enumerate(steps):
        box = box_for(i)
        if box < 10:
            status.append(f"{step}: SKIPPED, the budget is spent ({box:.0f} s left)")
            print(status[-1], flush=True)
            continue
        print(f"== {step} (box {box:.0f} s)", flush=True)
        line, _ = run_child(step, a, box, env_extra)
        status.append(line)
        print(line, flush=True)

    if "tuning" in sections:
        (out / "tuning.md").write_text("\n".join(tuning_table(work, a)) + "\n")
    total = time.monotonic() - t_start
    summary += ["## Status", ""] + [f"- {s}" for s in status]
    summary += [f"- total: {total:.0f} s of a {a.budget_s:.0f} s budget", ""]
    for name, title in (("tuning", "Tuning, one block"), ("kernels", "Int4 kernels"), ("decode", "Int4 decode")):
        if name in sections:
            f = out / f"{name}.md"
            summary += [f"## {title}", "", f.read_text().rstrip() if f.exists() else "(no table: see Status)", ""]
    (out / "summary.md").write_text("\n".join(summary) + "\n")
    with open(out / "logs.txt", "w") as f:
        for step in steps:
            log = work / f"{step}.log"
            text = log.read_text(errors="replace") if log.exists() else "(no log)\n"
            f.write(f"===== {step}\n{text[-200_000:]}\n")
    print("\n".join(summary), flush=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=os.environ.get("OUT") or str(Path(tempfile.gettempdir()) / "gpu_suite_out"),
                    help="folder for the markdown tables (default: $OUT, else /tmp/gpu_suite_out)")
    ap.add_argument("--work", default=str(Path(tempfile.gettempdir()) / "gpu_suite_work"),
                    help="scratch folder (random model, child logs)")
    ap.add_argument("--wheels", default=str(ROOT / ".gpu_wheels"), help="wheel folder to install from")
    ap.add_argument("--skip_install", action="store_true")
    ap.add_argument("--sections", default="tuning,kernels,decode", help="comma list of tuning, kernels, decode")
    ap.add_argument("--budget_s", type=float, default=480.0, help="wall-clock budget for everything (seconds)")
    ap.add_argument("--tune_layers", type=int, default=2, help="blocks in the random tuning model (>= 2 gives a steady "
                    "per-block time after the first block's compilation)")
    ap.add_argument("--tune_shape", default=None, choices=sorted(TUNE_SHAPES))
    ap.add_argument("--dry_run", action="store_true", help="tiny shapes on the CPU; proves the script, not the speed")
    ap.add_argument("--_child", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--box", type=float, default=0.0, help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    a.tune_shape = a.tune_shape or ("tiny" if a.dry_run else "qwen3-8b")
    if a._child:
        CHILDREN[a._child](a)
        return 0
    bad = {s.strip() for s in a.sections.split(",") if s.strip()} - set(SECTION_STEPS)
    if bad:
        ap.error(f"unknown sections {sorted(bad)}: use tuning, kernels, decode")
    return parent(a)


if __name__ == "__main__":
    sys.exit(main())
