"""AutoRound: the reference's block-wise pipeline over a model read one block at a time.

Order of operations (reference `compress_block`): cache the first block's inputs for nsamples x seqlen tokens;
for each block, float targets Y_fp = block(X_fp); tuned inputs X_q are the outputs of the already-quantized
previous blocks (enable_quanted_input); tune V and the clip scales; keep the best iteration; X_fp <- Y_fp and
X_q <- block_q(X_q). Only one float block plus the calibration activations are in memory at any time.
iters=0 is plain RTN (no data) or, by default below 8 bits, opt-RTN: the float blocks run on float inputs to collect
each linear's imatrix, then an imatrix-weighted scale search (quant/opt_rtn.py) replaces the min/max scale.
"""

from __future__ import annotations

import hashlib
import os
import random
import time
import warnings
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from tqdm.auto import tqdm

from ..data.calibration import DatasetError, calibration_ids, valid_token_mask
from ..models.decoder import CausalLM, DecoderBlock, Rotary, attention_inputs
from ..models.layers import FloatWeight
from ..models.loading import ModelSource, parse_dtype
from ..models.precision import compute_dtype
from ..models.quantized import PHASES, BlockReport, QuantizedModel
from ..models.params_table import module_at
from ..models.sharding import leaf_shardings
from ..quant.opt_rtn import opt_rtn
from ..quant.qdq import QuantizedWeight, dequantize, rtn_quantize
from .checks import check_block, validate_before_tuning
from ..quant.scheme import SCHEMES, LayerScheme
from .fake_quant import FakeQuantWeight
from .imatrix import collect_block_imatrix
from .layer_selection import resolve_layers
from .forward import apply_block, apply_block_host, apply_block_sharded, to_host
from .mesh import axis_size, check_batch, describe, make_mesh, per_device_memory, put_rows, replicated
from .resume import RESUME_ENV, Resumer, run_settings
from . import moe_leaves
from .signround import TuneSettings, tune_block
from . import alg_ext as _alg_ext  # issue 15 (research recipes, SignRoundV2, AutoScheme)
from . import auto_scheme as _auto_scheme
from .recipes import Recipe, make_recipe
from .recipes import describe as describe_recipe
from .timing import BlockTimer, peak_host_gb

PRESETS = {
    "default": dict(iters=200, nsamples=128, seqlen=2048, batch_size=8),
    "best": dict(iters=1000, nsamples=512, seqlen=2048, batch_size=8),
    "light": dict(iters=50, nsamples=128, seqlen=2048, batch_size=8, lr=5e-3),
    # The reference's auto-round-rtn is plain RTN (disable_opt_rtn) with nsamples 1; auto-round-opt-rtn is opt-RTN.
    "rtn": dict(iters=0, nsamples=1, seqlen=2048, batch_size=8, disable_opt_rtn=True),
    "opt-rtn": dict(iters=0, nsamples=128, seqlen=2048, batch_size=8, disable_opt_rtn=False),
}


def resolve_disable_opt_rtn(disable_opt_rtn: bool | None, enable_opt_rtn: bool | None, bits: int) -> bool:
    """The reference's RTNConfig rule, so iters=0 means the same thing as there.

    enable_opt_rtn=True is disable_opt_rtn=False. None resolves to plain RTN for 8-bit int weights (the reference
    turns opt-RTN off for W8A16/W8A8 "to improve efficiency"; activations are never quantized here) and to
    opt-RTN below 8 bits. Only iters=0 reads it.
    """
    if enable_opt_rtn:
        if disable_opt_rtn:
            raise ValueError("disable_opt_rtn=True contradicts enable_opt_rtn=True: pass only one of them")
        return False
    if disable_opt_rtn is None:
        return bits >= 8
    return bool(disable_opt_rtn)


def default_lr(iters: int, bits: int) -> float:
    """1/iters, or 2/iters for <= 3 bits at >= 1000 iterations (reference `_lr_for_bits`)."""
    if iters <= 0:
        return 0.0
    return (2.0 if iters >= 1000 and bits <= 3 else 1.0) / iters


HOST_CHUNK_ITERS = 8  # low_gpu_mem_usage: iterations whose mini-batches are on the devices at once


class AutoRound:
    """Weight-only AutoRound with the reference's names and defaults.

    model: an HF folder or hub id (read block by block), or a CausalLM already in memory.
    """

    def __init__(
        self,
        model: str | CausalLM,
        tokenizer=None,
        bits: int = 4,
        group_size: int = 128,
        sym: bool = True,
        iters: int = 200,
        lr: float | None = None,
        minmax_lr: float | None = None,
        nsamples: int = 128,
        seqlen: int = 2048,
        batch_size: int = 8,
        gradient_accumulate_steps: int = 1,
        dataset=None,
        seed: int = 42,
        layer_config=None,
        fp_layers=None,
        ignore_layers=None,
        to_quant_block_names=None,
        enable_minmax_tuning: bool = True,
        enable_quanted_input: bool = True,
        not_use_best_mse: bool = False,
        scale_dtype: str = "fp16",
        model_dtype: str = "auto",
        amp: bool = True,
        scheme: "str | _auto_scheme.AutoSchemeSpec | None" = None,
        disable_opt_rtn: bool | None = None,
        enable_opt_rtn: bool | None = None,
        progress: bool = True,
        mesh=None,
        device_map=None,
        low_gpu_mem_usage: bool = False,
        low_cpu_mem_usage: bool = True,
        resume_dir: str | None = None,
        resume: bool = True,
        objective=None,
        optimizer=None,
        recipe: Recipe | None = None,
        enable_alg_ext: bool = False,
        moe_route_all_experts: bool = False,
        **unsupported: Any,
    ):
        if unsupported:
            warnings.warn(f"ignored options not implemented in autoround-jax: {', '.join(sorted(unsupported))}")
        # -- issue 15: AutoScheme (mixed bits): the candidates' first scheme is the default, as the reference --
        self.auto_scheme = scheme if isinstance(scheme, _auto_scheme.AutoSchemeSpec) else None
        self.auto_scheme_result = None
        if self.auto_scheme is not None:
            if layer_config:
                raise ValueError("layer_config together with AutoScheme is not supported yet: drop one of them")
            first = self.auto_scheme.options[0]
            bits, group_size, sym, scheme = first.bits, first.group_size, first.sym, None
        # -- end issue 15 --
        if scheme is not None:
            if scheme.upper() not in SCHEMES:
                raise ValueError(f"unknown scheme {scheme!r}: use one of {', '.join(SCHEMES)}")
            s = SCHEMES[scheme.upper()]
            bits, group_size, sym = s.bits, s.group_size, s.sym
        if iters < 0 or nsamples < 1 or seqlen < 2 or batch_size < 1 or gradient_accumulate_steps < 1:
            raise ValueError("iters must be >= 0 and nsamples, seqlen, batch_size, gradient_accumulate_steps >= 1")
        self.default_scheme = LayerScheme(int(bits), int(group_size), bool(sym))
        self.disable_opt_rtn = resolve_disable_opt_rtn(disable_opt_rtn, enable_opt_rtn, int(bits))
        # MoE: as the reference, experts skip opt-RTN's search unless it was asked for explicitly
        self.opt_rtn_explicit = disable_opt_rtn is not None or enable_opt_rtn is not None
        self.iters, self.nsamples, self.seqlen = iters, nsamples, seqlen
        self.batch_size = min(batch_size, nsamples)
        self.gradient_accumulate_steps = gradient_accumulate_steps
        self.lr = lr if lr is not None else default_lr(iters, bits)
        self.minmax_lr = minmax_lr if minmax_lr is not None else self.lr
        self.dataset, self.seed = dataset, seed
        self.enable_minmax_tuning, self.enable_quanted_input = enable_minmax_tuning, enable_quanted_input
        self.not_use_best_mse = not_use_best_mse
        self.scale_dtype = parse_dtype(scale_dtype)
        self.progress = progress
        # Devices: `mesh` ("data=4,fsdp=2", a dict or a jax Mesh) over the devices `device_map` selects (the
        # reference's "0,1,2,3"); default every device on `data`; one device means no mesh (the plain path).
        self.mesh = make_mesh(mesh, device_map, self.batch_size) if iters > 0 else None
        check_batch(self.mesh, self.batch_size)
        self.low_gpu_mem_usage = bool(low_gpu_mem_usage)
        # quantize_and_save streams each finished block into the export and drops its codes (the reference's
        # low_cpu_mem_usage); quantize() then save_quantized() keeps every code in memory until the end.
        self.low_cpu_mem_usage = bool(low_cpu_mem_usage)
        self._stream = None  # the StreamingExport of a quantize_and_save run
        self._streamed_to: str | None = None
        # -- issue 15: the research recipe (tuning/recipes.py) and SignRoundV2 (tuning/alg_ext.py) --
        self.recipe = make_recipe(recipe, objective=objective, optimizer=optimizer)
        self.enable_alg_ext = bool(enable_alg_ext)
        if self.enable_alg_ext:
            self.recipe = _alg_ext.alg_ext_recipe(self.recipe, self.default_scheme, keep_objective=objective is not None)
        # -- end issue 15 --
        # MoE: calibration tokens go to every expert (the reference's AR_FORCE_MOE_ROUTING_ALL_EXPERTS)
        self.moe_route_all_experts = bool(moe_route_all_experts)
        # amp as the reference: bf16 matmul operands (f32 accumulation) on accelerators and on CPUs with bf16 units,
        # fp32 elsewhere. V, the clip scales, the qdq and the loss stay fp32 either way (models/precision.py).
        self.amp = bool(amp)
        self.compute_dtype = compute_dtype(self.amp)
        if isinstance(model, CausalLM):
            self.source = _InMemorySource(model)
            self.model_path = None
        else:
            self.source = ModelSource(model, dtype=model_dtype)
            self.model_path = self.source.path
            if tokenizer is None and self._has_tokenizer(self.source.path):
                from ..tokenizer import load_tokenizer

                tokenizer = load_tokenizer(self.source.path)  # text calibration needs it; RTN and token ids do not
        self.tokenizer = tokenizer
        self.config = self.source.config
        self.model_dtype = self.source.dtype
        self.layer_config = resolve_layers(
            self.config, self.default_scheme, fp_layers=fp_layers or ignore_layers, layer_config=layer_config,
            to_quant_block_names=to_quant_block_names,
        )
        self.quantized: dict[str, QuantizedWeight] = {}
        self.imatrix: dict[str, np.ndarray] = {}  # opt-RTN: the collected imatrix of each layer, [in_features]
        self.reports: list[BlockReport] = []
        self.seconds = 0.0
        # resume after a crash (tuning/resume.py): resume_dir, else $AR_RESUME_DIR; off for a model in memory
        resume_dir = resume_dir or os.environ.get(RESUME_ENV) or None
        self._resume = Resumer(_resumable(self, resume_dir), resume)

    @staticmethod
    def _has_tokenizer(path: str) -> bool:
        return any(os.path.isfile(os.path.join(path, f)) for f in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model"))

    # -- calibration ---------------------------------------------------------------------------------------------
    def _sample_from_model(self, nsamples: int, seqlen: int, seed: int) -> np.ndarray:
        """'--dataset self': sample text from the float model itself, starting from BOS (or token 0)."""
        from ..generation import generate_ids

        model = self.source.model()
        start = self.config.bos_token_id if self.config.bos_token_id is not None else 0
        prompt = np.full((nsamples, 1), start, np.int32)
        new = generate_ids(model, prompt, max_new_tokens=seqlen - 1, temperature=1.0, top_p=0.95, seed=seed)
        return np.concatenate([prompt, new], axis=1)

    def calibration(self) -> np.ndarray:
        return calibration_ids(self.dataset, self.tokenizer, self.nsamples, self.seqlen, self.seed,
                               self._sample_from_model)

    # -- the pipeline --------------------------------------------------------------------------------------------
    def _block_schemes(self, i: int) -> dict[str, LayerScheme]:
        prefix = f"model.layers.{i}."
        return {k[len(prefix):]: s for k, s in self.layer_config.items() if k.startswith(prefix) and s is not None}

    def _load_block(self, i: int) -> DecoderBlock:
        """Block i for quantizing: in fp32 when computing in fp32; under amp in the model dtype (matmuls cast their
        operands to bf16; the quantized linears' weights go to fp32 for the qdq). On a mesh its weights are sharded
        along output features over `fsdp` (replicated without that axis)."""
        dtype = jnp.float32 if self.compute_dtype == jnp.float32 else self.model_dtype
        block = self.source.block(i, dtype) if self.mesh is None else self.source.block(i, dtype, mesh=self.mesh)
        if self.moe_route_all_experts and hasattr(block.mlp, "route_all"):
            block.mlp.route_all = True  # calibration only: quantized_block() reloads with the model's routing
        return block

    def _to_fake_quant(self, block: DecoderBlock, schemes: dict[str, LayerScheme], imatrix=None) -> None:
        """imatrix {name: sum of x^2 [K]}: given when the recipe's init is "search" (SignRoundV2)."""
        r = self.recipe
        plain, stacks = moe_leaves.split_schemes(block, schemes)  # MoE experts: one stacked leaf per projection
        for name, scheme in plain.items():
            lin = module_at(block, name)
            w = lin.weight.w[...].astype(jnp.float32)
            init, clip = None, r.clip_range
            if r.init == "search":  # SignRoundV2: sym int layers only; others (the reference refuses them) as plain
                if _alg_ext.applies(scheme):
                    init = _alg_ext.init_scale(lin.weight.w[...], imatrix.get(name), scheme, self.scale_dtype)
                else:
                    clip = (0.0, 1.0)
            lin.weight = FakeQuantWeight(w, scheme, self.scale_dtype, self.enable_minmax_tuning,
                                         clip_range=clip, clip_init=r.clip_init, init_scale=init)
        if stacks and r.init == "search":
            raise ValueError("enable_alg_ext does not cover MoE experts yet: quantize this model without it")
        for stack, scheme in stacks.items():
            moe_leaves.to_fake_quant(block, stack, lambda w, s=scheme: FakeQuantWeight(
                w, s, self.scale_dtype, self.enable_minmax_tuning, clip_range=r.clip_range, clip_init=r.clip_init))
        if self.mesh is not None:  # V, clip scales and their init follow the weights' fsdp sharding
            state = nnx.state(block)
            nnx.update(block, jax.jit(lambda s: s, out_shardings=leaf_shardings(state, self.mesh, "layers.0."))(state))

    def _finalize(self, i: int, block: DecoderBlock, schemes: dict[str, LayerScheme]) -> None:
        """Record integer codes and turn the fake-quant leaves back into float (qdq) weights."""
        plain, stacks = moe_leaves.split_schemes(block, schemes)
        for name in plain:
            lin = module_at(block, name)
            self.quantized[f"model.layers.{i}.{name}"] = jax.tree.map(to_host, lin.weight.quantized())
            lin.weight = FloatWeight(lin.weight.dequantize().astype(self.compute_dtype))
        for stack in stacks:
            head, lin_name = stack.rsplit(".", 1)
            for e, qw in enumerate(moe_leaves.stacked_codes(block, stack)):
                self.quantized[f"model.layers.{i}.{head}.{e}.{lin_name}"] = qw
            moe_leaves.to_float(block, stack, self.compute_dtype)

    @property
    def opt_rtn(self) -> bool:
        """Whether iters=0 runs the reference's opt-RTN (imatrix-weighted scale search) rather than plain RTN."""
        return self.iters == 0 and not self.disable_opt_rtn

    def _uses_opt_rtn(self, scheme: LayerScheme) -> bool:
        """Opt-RTN exists for sym int only: the reference's iters=0 asym path is the plain int_asym quantizer."""
        return self.opt_rtn and scheme.sym and scheme.data_type == "int"

    def _needs_imatrix(self) -> bool:
        """As the reference: the imatrix is collected when the default scheme is sym (and some layer uses it)."""
        return (self.opt_rtn and self.default_scheme.sym
                and any(s is not None and self._uses_opt_rtn(s) for s in self.layer_config.values()))

    def quantize(self) -> tuple[CausalLM, dict[str, LayerScheme | None]]:
        """Tune every selected block; returns (fake-quant model, layer_config) like the reference."""
        self._quantize()
        return self.model(), self.layer_config

    def _choose_schemes(self) -> None:
        """AutoScheme: the per-layer schemes, chosen once before any block is quantized (or streamed)."""
        if self.auto_scheme is not None and self.auto_scheme_result is None:  # issue 15: per-layer schemes first
            self.auto_scheme_result = _auto_scheme.run_auto_scheme(
                self.source.model(), self.layer_config, self.auto_scheme, self.calibration(), self.batch_size)
            self.layer_config.update(self.auto_scheme_result.choices)

    def _quantize(self) -> None:
        validate_before_tuning(self)  # non-finite embedding/norm/head, vocab mismatch, dataset spec: before any block
        t_start = time.time()
        self._choose_schemes()
        try:
            self._run_pipeline()
        except jax.errors.JaxRuntimeError as e:
            # XLA:CPU runs bf16 x bf16 -> f32 dots only where its bf16 library takes them; a shape it declines ends
            # in "Unsupported element type for DotThunk". Never seen on the shapes we test, but a run must not die
            # of it: start over in fp32, which every CPU runs.
            if self.compute_dtype == jnp.float32 or "Unsupported element type" not in str(e):
                raise
            if self._stream not in (None, _DROP) and self._stream.blocks_written:
                raise ValueError(f"XLA:CPU cannot run this model's bf16 matmuls ({str(e).splitlines()[0]}) after "
                                 "some blocks were written: run again with --disable_amp (amp=False)") from None
            warnings.warn(f"XLA:CPU cannot run this model's bf16 matmuls ({str(e).splitlines()[0]}); quantizing in "
                          "fp32 instead (as with amp=False)")
            self.compute_dtype = jnp.float32
            self.quantized.clear(), self.imatrix.clear(), self.reports.clear()
            self._run_pipeline()
        self.seconds = time.time() - t_start

    def _run_pipeline(self) -> None:
        if self.iters == 0 and self._needs_imatrix():
            self._quantize_opt_rtn()
        elif self.iters == 0:
            self._quantize_rtn()
        else:
            self._quantize_tuned()

    def _rtn_block(self, i: int, block: DecoderBlock, schemes: dict[str, LayerScheme],
                   imatrix: dict[str, np.ndarray]) -> None:
        """Quantize one block's layers with iters=0: opt-RTN for sym layers when enabled, else plain RTN."""
        moe_leaves.split_schemes(block, schemes)  # the experts of a projection are stored stacked: one scheme each
        plain = {}
        for name, scheme in schemes.items():
            if not self._uses_opt_rtn(scheme) or (not self.opt_rtn_explicit and moe_leaves.expert_of(name)):
                plain[name] = scheme
                continue
            w = moe_leaves.float_weight(block, name).astype(jnp.float32)
            qw = opt_rtn(w, imatrix.get(name), scheme.bits, scheme.group_size, self.scale_dtype)
            self.quantized[f"model.layers.{i}.{name}"] = jax.tree.map(np.asarray, qw)
        for name, scheme in plain.items():  # the block's weights are not used again: codes only (an expert's alone)
            w = moe_leaves.float_weight(block, name).astype(jnp.float32)
            qw = rtn_quantize(w, bits=scheme.bits, group_size=scheme.group_size, sym=scheme.sym,
                              scale_dtype=self.scale_dtype)
            self.quantized[f"model.layers.{i}.{name}"] = jax.tree.map(to_host, qw)

    def _quantize_rtn(self) -> None:
        """iters=0 without an imatrix: plain RTN needs no calibration data (the reference's model-free route)."""
        for i in self._progress(range(self.config.num_layers)):
            t0 = time.time()
            schemes = self._block_schemes(i)
            if schemes:
                block = self._load_block(i)
                self._rtn_block(i, block, schemes, {})
            self.reports.append(BlockReport(i, None, None, None, time.time() - t0))
            check_block(self, i)  # finite loss, scales and codes before anything is written
            self._block_done(i)

    def _quantize_opt_rtn(self) -> None:
        """iters=0 with opt-RTN (the reference's OptimizedRTNQuantizer): per block, run the float block on its float
        inputs while collecting each quantized linear's imatrix, search the scales, and pass the float output on
        (no quantized-input cascade in this path)."""
        try:
            x, cos, sin, mask = self._block_inputs()
        except DatasetError as e:
            raise DatasetError(f"{e} (opt-RTN collects an imatrix from calibration data; pass disable_opt_rtn=True "
                               "or --disable_opt_rtn for plain RTN without data)") from None
        bs, nsamples = self.batch_size, x.shape[0]
        last = max((i for i in range(self.config.num_layers) if self._block_schemes(i)), default=-1)  # later: no work
        start = self._restore("opt-rtn", {"x_fp": x}, None)
        if start:
            x = self._restored.carry["x_fp"]
        for i in self._progress(range(start, self.config.num_layers)):
            t0 = time.time()
            schemes = self._block_schemes(i)
            if i <= last:
                block = self._load_block(i)
                probed = [n for n, s in schemes.items() if self._uses_opt_rtn(s)  # MoE experts: per-expert sums
                          and (self.opt_rtn_explicit or not moe_leaves.expert_of(n))]
                x, sums = collect_block_imatrix(block, probed, x, cos, sin, mask, bs)
                imatrix = {n: v / np.float32(nsamples) for n, v in sums.items()}  # the reference's imatrix_cnt
                self.imatrix.update({f"model.layers.{i}.{n}": v for n, v in imatrix.items()})
                if schemes:
                    self._rtn_block(i, block, schemes, imatrix)
                jax.block_until_ready(x)
            self.reports.append(BlockReport(i, None, None, None, time.time() - t0))
            check_block(self, i)  # finite loss, scales and codes before anything is written
            if i < last:
                self._checkpoint(i, {"x_fp": x}, None)
            self._block_done(i)

    def _block_inputs(self):
        """(first block's inputs [nsamples, T, D] on the device, cos, sin, mask for batch_size rows): opt-RTN's."""
        x, _, cos, sin, mask = self._tuning_inputs(on_device=True)
        return x, cos, sin, mask

    def _tuning_inputs(self, on_device: bool = False):
        """The first block's inputs where the run keeps its activations: on the device (plain, or on_device), sharded
        over the mesh's `data` axis and zero-padded to whole batches (mesh; each process embeds only its own rows),
        or as numpy in host memory (low_gpu_mem_usage). Plus cos, sin, mask for batch_size rows (replicated on a
        mesh)."""
        ids = np.asarray(self.calibration())
        self._calibration_sha256 = hashlib.sha256(np.ascontiguousarray(ids).tobytes()).hexdigest()  # resume signature
        self._valid = valid_token_mask(ids, getattr(self.tokenizer, "pad_token_id", None))  # the loss's positions
        n, t = ids.shape
        cos, sin, mask = attention_inputs(Rotary(self.config), None, self.batch_size, self.seqlen, self.compute_dtype)
        dtype = jnp.dtype(self.compute_dtype)
        if self.mesh is not None and not on_device:
            cos, sin, mask = jax.device_put((cos, sin, mask), replicated(self.mesh))
        if not on_device and (self.low_gpu_mem_usage or self.mesh is not None):
            embed = np.asarray(self.source.tensor("model.embed_tokens.weight").astype(dtype))
            if self.low_gpu_mem_usage:
                return embed[ids], n, cos, sin, mask
            rows = -(-n // self.batch_size) * self.batch_size  # every data shard holds whole local batches
            x = put_rows(lambda a, b: embed[ids[a:b]], n, (t, embed.shape[1]), dtype, self.mesh, rows)
            return x, n, cos, sin, mask
        x = jnp.take(self.source.tensor("model.embed_tokens.weight").astype(dtype), jnp.asarray(ids), axis=0)
        return x, n, cos, sin, mask

    def _forward(self, block: DecoderBlock, x, cos, sin, mask):
        """block(x) over all cached rows, wherever they live (see _tuning_inputs)."""
        if isinstance(x, np.ndarray):
            return apply_block_host(block, x, cos, sin, mask, self.batch_size, self.mesh)
        if self.mesh is not None:
            return apply_block_sharded(block, x, cos, sin, mask, self.batch_size, self.mesh)
        return apply_block(block, x, cos, sin, mask, self.batch_size)

    def _hint_memory(self, n: int) -> None:
        """One line when the cached activations (x_fp, x_q, y_fp) would not fit the devices' free memory."""
        if self.low_gpu_mem_usage:
            return
        need = 3 * n * self.seqlen * self.config.hidden_size * jnp.dtype(self.compute_dtype).itemsize
        stats = [jax.devices()[0].memory_stats() or {}] if jax.devices()[0].platform != "cpu" else []
        free = [s.get("bytes_limit", 0) - s.get("bytes_in_use", 0) for s in stats if s.get("bytes_limit")]
        shards = axis_size(self.mesh, "data")
        if free and need / shards > 0.8 * free[0]:
            print(f"autoround-jax: the cached activations take about {need / shards / 1e9:.1f} GB per device, more "
                  f"than the {free[0] / 1e9:.1f} GB free: pass --low_gpu_mem_usage (low_gpu_mem_usage=True) to keep "
                  "them in host memory, or lower --nsamples / --seqlen, or add devices to the data axis")

    def _quantize_tuned(self) -> None:
        x_fp, n, cos, sin, mask = self._tuning_inputs()
        self._hint_memory(n)
        rng = random.Random(self.seed)
        bs = self.batch_size
        x_q = x_fp
        settings = TuneSettings(self.iters, self.lr, self.minmax_lr, bs, self.gradient_accumulate_steps,
                                self.not_use_best_mse)
        start = self._restore("tuned", {"x_fp": x_fp, "x_q": x_fp}, rng)
        if start:
            x_fp = self._restored.carry["x_fp"]
            x_q = self._restored.carry.get("x_q", x_fp)
        bar = self._progress(range(start, self.config.num_layers))
        for i in bar:
            timer = BlockTimer()
            block = self._load_block(i)
            timer.lap("io", nnx.state(block))
            schemes = self._block_schemes(i)
            imatrix = None
            if self.recipe.init == "search" and schemes:  # SignRoundV2: the imatrix of the float block's inputs
                y_fp, imatrix = collect_block_imatrix(block, list(schemes), x_fp, cos, sin, mask, bs)
                if isinstance(x_fp, np.ndarray):  # low_gpu_mem_usage: back to host memory
                    y_fp = to_host(y_fp)
                elif self.mesh is not None:  # back onto the data shards
                    y_fp = jax.device_put(y_fp, x_fp.sharding)
            else:
                y_fp = self._forward(block, x_fp, cos, sin, mask)
            timer.lap("forward", y_fp)
            report = BlockReport(i, None, None, None, 0.0)
            if schemes:
                self._to_fake_quant(block, schemes, imatrix)
                r = tune_block(block, x_q, y_fp, cos, sin, mask, settings, rng, mesh=self.mesh, nsamples=n,
                               host_chunk=HOST_CHUNK_ITERS, recipe=self.recipe, valid=self._valid)
                timer.lap("step")
                report.loss_rtn, report.loss_best, report.best_iter = r.loss_rtn, r.loss_best, r.best_iter
                self._finalize(i, block, schemes)
                timer.lap("finalize")
                if hasattr(bar, "set_postfix_str"):
                    bar.set_postfix_str(f"loss iter 0: {r.loss_rtn:.6g} -> best iter {r.best_iter}: {r.loss_best:.6g}"
                                        + self._memory_postfix())
            x_q = self._forward(block, x_q, cos, sin, mask) if self.enable_quanted_input else y_fp
            x_fp = y_fp
            timer.lap("forward", x_q)
            report.seconds, report.split = timer.total, dict(timer.seconds)
            self.reports.append(report)
            check_block(self, i)  # finite loss, scales and codes before anything is written
            carry = {"x_fp": x_fp} if x_q is x_fp else {"x_fp": x_fp, "x_q": x_q}
            self._checkpoint(i, carry, rng)  # before the codes may leave memory (streaming)
            self._block_done(i)

    def _memory_postfix(self) -> str:
        mem = per_device_memory()
        return f"; device GB in use {'/'.join(f'{m[1]:.1f}' for m in mem)}" if mem else ""

    def set_resume_dir(self, directory: str | None, resume: bool = True) -> None:
        """Checkpoint after each block into directory (None: no checkpoints) and resume from it unless resume=False."""
        self._resume = Resumer(_resumable(self, directory), resume)

    def _restore(self, pipeline: str, carry_like: dict, rng: random.Random | None) -> int:
        """The first block to run: 0, or the block after the last checkpointed one (codes, imatrix, reports and the
        sampler's state restored; the activations in self._restored.carry)."""
        self._restored = self._resume.begin(run_settings(self, pipeline) if self._resume.enabled else {},
                                            carry_like, self.config.num_layers)
        if self._restored is None:
            return 0
        r = self._restored
        self.quantized.update(r.quantized), self.imatrix.update(r.imatrix)
        self.reports[:] = r.reports
        if rng is not None and r.rng_state is not None:
            rng.setstate(r.rng_state)
        if self.low_gpu_mem_usage:  # the activations live in host memory in this mode
            r.carry = {k: to_host(v) for k, v in r.carry.items()}
        for j in range(r.next_block):  # a streaming export writes the restored blocks first, from their codes
            self._block_done(j)
        return r.next_block

    def _checkpoint(self, i: int, carry: dict, rng: random.Random | None) -> None:
        """After block i: what block i + 1 needs, for a resume (tuning/resume.py)."""
        if self._resume.enabled:
            prefix = f"model.layers.{i}."
            pick = lambda d: {n: v for n, v in d.items() if n.startswith(prefix)}  # noqa: E731
            self._resume.save(i, carry, rng, pick(self.quantized), pick(self.imatrix), self.reports)

    def _progress(self, it):
        desc = "blocks" if self.mesh is None else f"blocks on {describe(self.mesh)}"
        quiet = not self.progress or jax.process_index() != 0
        return tqdm(it, desc=desc, unit="block", disable=quiet, dynamic_ncols=True)

    # -- results -------------------------------------------------------------------------------------------------
    def quantized_block(self, i: int, dtype=None) -> DecoderBlock:
        """Block i with quantized linears replaced by their dequantized (qdq) float weights."""
        dtype = dtype or self.model_dtype
        block = self.source.block(i, dtype)
        prefix = f"model.layers.{i}."
        for name, qw in self.quantized.items():
            if name.startswith(prefix):
                moe_leaves.set_weight(block, name[len(prefix):], dequantize(qw).astype(dtype))
        return block

    def model(self, dtype=None) -> CausalLM:
        """The fake-quant model (float weights holding the quantized values), for evaluation in JAX."""
        if self._streamed_to is not None:
            raise ValueError(f"the codes of this run were streamed to {self._streamed_to}: load that folder with "
                             "load_quantized")
        return self.source.model([self.quantized_block(i, dtype) for i in range(self.config.num_layers)], dtype)

    def _block_done(self, i: int) -> None:
        """After block i: a streaming export writes its tensors and the codes leave host memory."""
        if self._stream is None:
            return
        if self._stream is not _DROP:
            self._stream.block(self._result(with_summary=False), i)
        for name in [n for n in self.quantized if n.startswith(f"model.layers.{i}.")]:
            del self.quantized[name]

    def quantize_and_save(self, output_dir: str = "tmp_autoround", format: str = "auto_round",
                          overwrite: bool = False) -> str:
        """quantize() and save_quantized() in one go. With low_cpu_mem_usage (the default) and one packed format,
        each block is written as soon as it is done (formats/streaming.py), so host memory holds one block's codes
        at a time; the files equal those of quantize() followed by save_quantized(). Returns the output folder."""
        from ..formats.auto_round import FORMATS
        from ..formats.streaming import StreamingExport

        if not (self.low_cpu_mem_usage and format in FORMATS):
            self.quantize()
            return self.save_quantized(output_dir, format, overwrite)
        if self.source.path is None:
            raise ValueError("saving needs a model loaded from a folder (pass a path or hub id to AutoRound)")
        if jax.process_index() != 0:  # one process writes; the others only drop their copies of the codes
            self._stream = _DROP
            try:
                self._quantize()
            finally:
                self._stream = None
            _sync("export")
            self._streamed_to = os.path.abspath(output_dir)
            return self._streamed_to
        self._choose_schemes()  # the export's packing depends on every layer's scheme
        with StreamingExport(output_dir, format, overwrite) as export:
            export.start(self._result(with_summary=False, allow_empty=True))
            self._stream = export
            try:
                self._quantize()
            finally:
                self._stream = None
            self._streamed_to = export.finish(self._result())
        _sync("export")
        self._resume.clear()  # exported: the resume checkpoint has served
        return self._streamed_to

    def result(self) -> QuantizedModel:
        return self._result()

    def _result(self, with_summary: bool = True, allow_empty: bool = False) -> QuantizedModel:
        """The run as plain data (integer codes, layer schemes, per-block reports, settings): what exporters take."""
        if self.source.path is None:
            raise ValueError("saving needs a model loaded from a folder (pass a path or hub id to AutoRound)")
        if not self.reports and not allow_empty:
            raise ValueError("nothing to save: call quantize() first")
        if self._streamed_to is not None:
            raise ValueError(f"the codes of this run were streamed to {self._streamed_to} and are no longer in memory: "
                             "load that folder with load_quantized (or run quantize() then save_quantized())")
        amp = jnp.dtype(self.compute_dtype) == jnp.bfloat16
        settings = {"amp": amp, "iters": self.iters}
        if self.iters:
            settings.update(enable_minmax_tuning=self.enable_minmax_tuning,
                            enable_quanted_input=self.enable_quanted_input,
                            gradient_accumulate_steps=self.gradient_accumulate_steps, lr=self.lr,
                            minmax_lr=self.minmax_lr)
            if self.enable_alg_ext:  # issue 15: recorded only when on, so default exports stay byte-identical
                settings.update(enable_alg_ext=True)
        return QuantizedModel(self.config, dict(self.source.hf_config), self.source.reader, np.dtype(self.model_dtype),
                              self.default_scheme, dict(self.layer_config), self.quantized, settings, self.source.path,
                              reports=list(self.reports), summary=self.summary() if with_summary else "",
                              compute_dtype=jnp.dtype(self.compute_dtype).name)

    def save_quantized(self, output_dir: str = "tmp_autoround", format: str = "fake", overwrite: bool = False) -> str:
        """Write the quantized model. Formats: "fake" (float HF folder holding the dequantized weights),
        "auto_round", "auto_gptq", "auto_awq" (packed ints, as the reference writes them), "orbax" (the JAX-native
        checkpoint, formats/orbax_format.py). A comma list writes one subfolder per format, named as the reference
        names them (e.g. OUT/auto-round-auto-gptq, OUT/auto-gptq; OUT/orbax). A successful export removes the resume
        checkpoint."""
        from ..formats.auto_round import EXPORTERS, folder_name
        from ..formats.fake import save_fake
        from ..formats.orbax_format import save_orbax
        from ..io.hf_folder import atomic_folder

        formats = {"fake": save_fake, **EXPORTERS, "orbax": save_orbax}
        names = [f.strip() for f in format.split(",") if f.strip()]
        unknown = [f for f in names if f not in formats]
        if not names or unknown:
            raise ValueError(f"unknown format {', '.join(unknown) or format!r}: use one of {', '.join(formats)} "
                             "or a comma list of them")
        qm = self.result()
        if jax.process_index() == 0:  # under jax.distributed one process writes; every process has the codes
            if len(names) == 1:
                formats[names[0]](qm, output_dir, overwrite)
            else:
                with atomic_folder(output_dir, overwrite) as tmp:
                    for f in names:
                        formats[f](qm, os.path.join(tmp, f if f in ("fake", "orbax") else folder_name(qm, f)), False)
        _sync("export")
        self._resume.clear()  # exported: the resume checkpoint has served
        return os.path.abspath(output_dir)

    def _rtn_label(self) -> str:
        if self.iters:
            return ""
        opt = any(s is not None and self._uses_opt_rtn(s) for s in self.layer_config.values())
        return ", opt-RTN" if opt else ", plain RTN"

    def summary(self) -> str:
        n_q = sum(s is not None for s in self.layer_config.values())
        n_f = len(self.layer_config) - n_q
        peak_gb = peak_host_gb()
        tuned = [r for r in self.reports if r.loss_best is not None]
        lines = [
            f"quantized {n_q} linear layers, kept {n_f} block linears and lm_head in float "
            f"({self.default_scheme.bits}-bit, group {self.default_scheme.group_size}, "
            f"{'sym' if self.default_scheme.sym else 'asym'}, iters {self.iters}"
            f"{self._rtn_label()})",
            f"time {self.seconds:.1f} s ({self.seconds / max(len(self.reports), 1):.2f} s per block), "
            f"peak host memory {peak_gb:.2f} GB",
        ]
        lines.append(f"devices: {describe(self.mesh)}"
                     + (", activations in host memory (low_gpu_mem_usage)" if self.low_gpu_mem_usage else "")
                     + "".join(f"; {d} peak {peak:.2f} GB" for d, _, peak in per_device_memory()))
        splits = [r.split for r in self.reports if r.split]
        if splits:
            lines.append("time split: " + ", ".join(f"{p} {sum(sp[p] for sp in splits):.1f} s" for p in PHASES)
                         + f" ({jnp.dtype(self.compute_dtype).name} matmuls)")
        if self.auto_scheme_result is not None:  # issue 15
            lines += self.auto_scheme_result.lines()
        if self.iters and (recipe := describe_recipe(self.recipe)):  # issue 15
            lines.append(f"recipe: {recipe}" + (" (enable_alg_ext)" if self.enable_alg_ext else ""))
        if tuned:
            lines.append(f"mean block loss: RTN {np.mean([r.loss_rtn for r in tuned]):.6g} -> tuned "
                         f"{np.mean([r.loss_best for r in tuned]):.6g}")
        return "\n".join(lines)


def _resumable(ar: "AutoRound", directory: str | None) -> str | None:
    """The resume folder, or None where checkpoints are not taken: a model passed in memory, or a run spanning
    several processes (each would write its own copy; not supported yet)."""
    if directory is None or ar.model_path is None:
        return None
    if jax.process_count() > 1:
        if jax.process_index() == 0:
            print("autoround-jax: no resume checkpoints in a multi-process run (not supported yet)")
        return None
    return directory


_DROP = object()  # the stream of a process that does not write: codes are dropped after each block


def _sync(name: str) -> None:
    """Every process waits here (the writer finishing the export) under jax.distributed; a no-op alone."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


class _InMemorySource:
    """ModelSource's interface over a CausalLM already in memory."""

    def __init__(self, model: CausalLM):
        self._model = model
        self.config = model.config
        self.dtype = model.dtype
        self.path = None

    def block(self, i: int, dtype=None, mesh=None) -> DecoderBlock:
        graphdef, state = nnx.split(self._model.layers[i])
        if dtype is not None:
            state = jax.tree.map(lambda a: a.astype(dtype) if jnp.issubdtype(a.dtype, jnp.floating) else a, state)
        state = jax.tree.map(jnp.array, state)
        if mesh is not None:
            state = jax.device_put(state, leaf_shardings(state, mesh, f"layers.{i}."))
        return nnx.merge(graphdef, state)

    def tensor(self, name: str):
        assert name == "model.embed_tokens.weight", name
        return self._model.embed_tokens[...]

    def model(self, blocks=None, dtype=None) -> CausalLM:
        m = self._model
        if blocks is None:
            return m
        out = nnx.merge(*nnx.split(m))  # the same arrays in a new module tree, whose blocks are replaced
        out.layers = nnx.List(list(blocks))
        return out
