"""Compute precision: which dtype the matmuls of a block run in, and the mixed-precision contraction itself.

`amp` follows the reference (auto-round's autocast): on accelerators, and on CPUs with bf16 units, matmul operands
are bf16 with f32 accumulation; elsewhere (AVX2-only CPUs, where XLA's bf16 dots are slower than fp32) everything
stays fp32. XLA:CPU only reaches the bf16 units for bf16 x bf16 -> f32 products (measured on an avx512_bf16 EPYC:
324 GFLOP/s against 160 for bf16 -> bf16 and 171 for fp32), so `mixed_einsum` always asks for an f32 result and
rounds it to the activation dtype afterwards, in the forward pass and in both gradient contractions.
"""

from __future__ import annotations

import functools
import os
import platform

import jax
import jax.numpy as jnp
import numpy as np

# Set to 0 or 1 to override the CPU detection (tests, or a CPU whose flags are hidden by a hypervisor).
CPU_BF16_ENV = "AUTOROUND_JAX_CPU_BF16"
_X86_BF16_FLAGS = ("avx512_bf16", "amx_bf16")


def cpu_flags() -> set[str]:
    """The CPU feature flags the kernel reports (x86 'flags', Arm 'Features'); empty where unknown."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() in ("flags", "Features"):
                    return set(value.split())
    except OSError:
        pass
    return set()


def cpu_has_bf16(respect_env: bool = True) -> bool:
    """Whether this CPU has bf16 dot units (x86 AVX512-BF16 or AMX-BF16, Arm BF16); AUTOROUND_JAX_CPU_BF16=0/1 wins."""
    forced = os.environ.get(CPU_BF16_ENV) if respect_env else None
    if forced in ("0", "1"):
        return forced == "1"
    flags = cpu_flags()
    if platform.machine().lower() in ("aarch64", "arm64"):
        return "bf16" in flags
    return any(f in flags for f in _X86_BF16_FLAGS)


def cpu_flag_summary() -> str:
    """The flags that decide CPU speed and precision here, e.g. 'avx2 avx512f avx512_bf16 amx_bf16' (for logs)."""
    flags = cpu_flags()
    wanted = ("avx2", "avx512f", "avx512_bf16", "avx512_fp16", "amx_bf16", "amx_tile", "bf16", "asimd", "sve")
    return " ".join(f for f in wanted if f in flags) or "none of avx2/avx512/bf16"


def compute_dtype(amp: bool, backend: str | None = None):
    """The matmul operand dtype for `amp`: bf16 on GPU/TPU and on CPUs with bf16 units, fp32 otherwise."""
    if not amp:
        return jnp.float32
    backend = backend or jax.default_backend()
    if backend in ("gpu", "tpu") or (backend == "cpu" and cpu_has_bf16()):
        return jnp.bfloat16
    return jnp.float32


# XLA:CPU hands dots and reductions to YNNPACK by default. A YNNPACK reduction cannot absorb the element-wise work
# that produces its input, so every reduction of a tuning step (qdq's per-group sums, softmax, norms) first wrote its
# input out in full. Under amp, with dots only, XLA fuses those passes: a SignRound step on a SmolLM2 block went from
# 58 to 54 ms (2-core Sapphire Rapids). In fp32 the same setting cost 8% (174 against 161 ms), so it is used only
# for computations with bf16/fp16 operands.
YNN_DOTS_ONLY = {"xla_cpu_experimental_ynn_fusion_type": "LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT"}


@functools.cache
def cpu_compiler_options() -> dict | None:
    """YNN_DOTS_ONLY where it applies: on the CPU backend, when this jaxlib knows the option (checked once by
    compiling a one-op function) and XLA_FLAGS does not already choose the YNNPACK fusions; None elsewhere."""
    if jax.default_backend() != "cpu" or "xla_cpu_experimental_ynn_fusion_type" in os.environ.get("XLA_FLAGS", ""):
        return None
    try:
        jax.jit(lambda x: x + 1, compiler_options=YNN_DOTS_ONLY).lower(jnp.zeros((2,), jnp.float32)).compile()
    except Exception:  # an XLA without the option: keep its defaults
        return None
    return dict(YNN_DOTS_ONLY)


def _has_half_floats(tree) -> bool:
    return any(getattr(leaf, "dtype", None) in (jnp.bfloat16, jnp.float16) for leaf in jax.tree.leaves(tree))


def cpu_tuned_jit(fn, **jit_kwargs):
    """jax.jit(fn, **jit_kwargs); calls with bf16/fp16 array arguments (amp) compile with cpu_compiler_options().
    The options are decided at the first such call, not at import, so that importing never starts a backend."""
    plain = jax.jit(fn, **jit_kwargs)
    half = []

    @functools.wraps(fn)
    def call(*args, **kwargs):
        if not _has_half_floats((args, kwargs)):
            return plain(*args, **kwargs)
        if not half:
            options = cpu_compiler_options()
            half.append(jax.jit(fn, compiler_options=options, **jit_kwargs) if options else plain)
        return half[0](*args, **kwargs)

    return call


def _grad_specs(spec: str) -> tuple[str, str]:
    """For 'A,B->C': the einsums giving dA ('C,B->A') and dB ('A,C->B')."""
    ins, out = spec.split("->")
    a, b = ins.split(",")
    return f"{out},{b}->{a}", f"{a},{out}->{b}"


def physical_transpose(a: jax.Array, perm: tuple[int, ...]) -> jax.Array:
    """jnp.transpose(a, perm) as a real row-major array, even on XLA:CPU (elsewhere the plain transpose).

    XLA folds a transpose into the dot that consumes it, and XLA:CPU's bf16 dot library (YNNPACK) only takes a left
    operand whose contracting dimension is the last one: otherwise the dot runs as an fp32 Eigen dot, 4x slower (the
    weight gradient x^T g of a 1024x576 by 1024x1536 linear: 8.5 ms, against 2.3 ms for the dot plus 1.3 ms for a real
    transpose; 2-core Sapphire Rapids). A conditional is a computation boundary that the folding does not cross; its
    predicate is false only for a NaN first element, where the loss is NaN anyway.
    """
    perm = tuple(perm)
    if perm == tuple(range(a.ndim)):
        return a
    if jax.default_backend() != "cpu":
        return jnp.transpose(a, perm)
    first = a[(0,) * a.ndim]
    shape = tuple(a.shape[p] for p in perm)
    return jax.lax.cond(first == first, lambda t: jnp.transpose(t, perm), lambda t: jnp.zeros(shape, t.dtype), a)


def _layout_plan(sa: str, sb: str, out: str):
    """Operand and output permutations that put a dot in the form YNNPACK runs in bf16: batch dimensions first, the
    left operand [batch, free_a, contract], the right one [batch, contract, free_b] or [batch, free_b, contract]."""
    batch = [c for c in sa if c in sb and c in out]
    contract = [c for c in sa if c in sb and c not in out]
    fa, fb = [c for c in sa if c not in sb], [c for c in sb if c not in sa]
    perm_a = tuple(sa.index(c) for c in batch + fa + contract)
    b_kn, b_nk = tuple(sb.index(c) for c in batch + contract + fb), tuple(sb.index(c) for c in batch + fb + contract)
    perm_b, b_contract_last = (b_nk, True) if b_nk == tuple(range(len(sb))) or b_kn != tuple(range(len(sb))) else (b_kn, False)
    res = batch + fa + fb
    perm_out = tuple(res.index(c) for c in out)
    return batch, fa, fb, contract, perm_a, perm_b, b_contract_last, perm_out


def _moved(perm: tuple[int, ...]) -> bool:
    return perm != tuple(range(len(perm)))


def _cpu_einsum(spec: str, a: jax.Array, b: jax.Array) -> jax.Array:
    """einsum(spec, a, b) with an f32 result, laid out for XLA:CPU's bf16 dots: operands that are not already in
    the canonical layout are transposed for real (see physical_transpose); of the two operand orders, the one that
    moves fewer bytes is used."""
    ins, out = spec.split("->")
    sa, sb = ins.split(",")

    def cost(x, y, sx, sy):
        *_, pa, pb, _, po = _layout_plan(sx, sy, out)
        n_out = int(np.prod([d for c, d in (dict(zip(sx, x.shape)) | dict(zip(sy, y.shape))).items() if c in out]))
        # bytes moved: the operands in their dtypes, the result in f32
        return ((x.nbytes if _moved(pa) else 0) + (y.nbytes if _moved(pb) else 0) + (4 * n_out if _moved(po) else 0))

    if cost(b, a, sb, sa) < cost(a, b, sa, sb):
        a, b, sa, sb = b, a, sb, sa
    batch, fa, fb, contract, perm_a, perm_b, b_contract_last, perm_out = _layout_plan(sa, sb, out)
    dim = dict(zip(sa, a.shape)) | dict(zip(sb, b.shape))
    size = lambda cs: int(np.prod([dim[c] for c in cs], dtype=np.int64))  # noqa: E731
    nb, na, nn, nk = size(batch), size(fa), size(fb), size(contract)
    a3 = physical_transpose(a, perm_a).reshape(nb, na, nk)
    b3 = physical_transpose(b, perm_b).reshape((nb, nn, nk) if b_contract_last else (nb, nk, nn))
    rc = 2 if b_contract_last else 1
    y = jax.lax.dot_general(a3, b3, (((2,), (rc,)), ((0,), (0,))), preferred_element_type=jnp.float32)
    y = y.reshape([dim[c] for c in batch + fa + fb])
    return physical_transpose(y, perm_out)  # a plain transpose would be folded back into the dot


def f32_einsum(spec: str, a: jax.Array, b: jax.Array) -> jax.Array:
    """einsum(spec, a, b) with operands in a's dtype and an f32 result (no custom gradient: for hand-written
    VJPs); on XLA:CPU laid out for its bf16 dots, GPUs and TPUs take any operand layout natively."""
    if jax.default_backend() == "cpu":
        return _cpu_einsum(spec, a, b)
    return jnp.einsum(spec, a, b, preferred_element_type=jnp.float32)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _mixed(spec: str, out_f32: bool, a: jax.Array, b: jax.Array) -> jax.Array:
    y = f32_einsum(spec, a, b.astype(a.dtype))
    return y if out_f32 else y.astype(a.dtype)


def _mixed_fwd(spec, out_f32, a, b):
    # Keep b in a's dtype, the copy the dot used, for the backward's dx dot: keeping the fp32 b (the fake-quant
    # weight) wrote it out in full and converted it again in the backward. A 0-d array carries b's dtype.
    bc = b.astype(a.dtype)
    y = f32_einsum(spec, a, bc)
    return (y if out_f32 else y.astype(a.dtype)), (a, bc, jnp.zeros((), b.dtype))


def _mixed_bwd(spec, out_f32, res, g):
    a, bc, b_dtype = res
    cd = a.dtype
    spec_a, spec_b = _grad_specs(spec)
    g = g.astype(cd)
    da = f32_einsum(spec_a, g, bc).astype(a.dtype)
    db = f32_einsum(spec_b, a, g).astype(b_dtype.dtype)  # stays f32 for an f32 b (the fake-quant weight: V's path)
    return da, db


_mixed.defvjp(_mixed_fwd, _mixed_bwd)


def mixed_einsum(spec: str, a: jax.Array, b: jax.Array, out_f32: bool = False) -> jax.Array:
    """einsum(spec, a, b) in a's dtype. fp32 `a`: a plain fp32 einsum. bf16/fp16 `a`: both operands in a's dtype,
    accumulated in f32 (forward and gradients), the result rounded to a's dtype (kept f32 with out_f32); b's gradient
    keeps b's dtype, so an fp32 weight (the fake-quant qdq output) gets an f32-accumulated gradient.

    spec: two operands, explicit output, no ellipsis, no repeated index within an operand; every index of an operand
    appears in the other operand or the output.
    """
    if a.dtype == jnp.float32:
        return jnp.einsum(spec, a, b.astype(jnp.float32))
    return _mixed(spec, out_f32, a, b)


def linear(x: jax.Array, w: jax.Array) -> jax.Array:
    """x [..., K] @ w[N, K].T in x's dtype (see mixed_einsum)."""
    if x.dtype == jnp.float32:
        return jnp.einsum("...k,nk->...n", x, w.astype(jnp.float32))
    lead = x.shape[:-1]
    y = _mixed("mk,nk->mn", False, x.reshape(-1, x.shape[-1]), w)
    return y.reshape(*lead, w.shape[0])
