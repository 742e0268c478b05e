"""Fused CPU kernels (csrc/decode.c) for the decode step, and GeGLU / RMSNorm at any size, with the
conditions under which they apply.

At one token per row, a Gemma layer's attention is ~150 tiny PyTorch ops whose dispatch costs far more than
their arithmetic. These wrappers run the same math in one C call each: q/k/v norms + RoPE + cache write,
attention over the cache slots, and GeGLU. Callers keep the PyTorch path for everything these do not cover
(prefill chunks, non-float32 activations, GPUs, no C compiler); tests/test_fused_decode.py holds the two
paths to each other.
"""

from __future__ import annotations

import torch

from .abi import struct
from .loader import kernels
from ..quant import linear
from ..quant.linear import QuantLinear, QuantWeight, _ptr, kernel_rows

SPLIT_SLOTS = 256  # cache slots per split-K range of the decode attention
ENABLED = True  # tests switch this off to run the plain PyTorch decode path on the same model
LAYER_LOOP = True  # tests switch this off to run the fused pieces one Python call at a time


def bf16_prompt(proj: torch.nn.Module, x: torch.Tensor) -> bool:
    """Whether ``proj`` (x) is a prompt-sized matmul that runs in bfloat16 (see QuantWeight.prefill_dtype), so
    the MLP can keep its activations in bfloat16 between its matmuls instead of widening them in between."""
    weight = getattr(proj, "qweight", None)
    return (weight is not None and weight.prefill_dtype == torch.bfloat16 and ENABLED and kernels() is not None
            and x.device.type == "cpu" and not kernel_rows(x))


def cpu_kernels_ok(x: torch.Tensor) -> bool:
    """True when the C kernels can take ``x``: float32 on the CPU, with the kernels built."""
    return ENABLED and x.dtype == torch.float32 and x.device.type == "cpu" and kernels() is not None


def fused_decode_ok(x: torch.Tensor) -> bool:
    """True when ``x`` (B, 1, E), one token per row, is a float32 CPU step the fused kernels can take."""
    return cpu_kernels_ok(x) and x.shape[1] == 1


def attn_prep(
    qkv: torch.Tensor,  # (B, 1, W) projections q|k|v (k, v absent on shared layers; v absent when K = V)
    n_heads: int,
    n_kv: int,
    head_dim: int,
    k_eq_v: bool,
    q_weight: torch.Tensor | None,
    k_weight: torch.Tensor | None,
    use_qk_norm: bool,
    use_v_norm: bool,
    eps: float,
    rope: tuple[torch.Tensor, torch.Tensor],  # cos, signed sin (B, 1, 1, D)
    cache_k: torch.Tensor | None,  # (B, S1, Hkv, D) or None on KV-shared layers
    cache_v: torch.Tensor | None,
    slot: torch.Tensor | None,  # (B, 1) cache slot of each row's new token
    rows: torch.Tensor | None = None,  # (B,) cache row of each token; None: token b -> row b
) -> torch.Tensor:  # (B, H, D) normalized, rotated queries
    B = qkv.shape[0]
    qkv = qkv.contiguous()
    cos, ssin = (t.contiguous() for t in rope)
    q = torch.empty(B, n_heads, head_dim)
    slot = slot.contiguous() if slot is not None else None
    rows = rows.contiguous() if rows is not None else None  # kept referenced: the kernel reads its memory
    kernels().attn_prep(
        _ptr(qkv), qkv.shape[-1], B, n_heads, n_kv, head_dim, int(k_eq_v),
        _ptr(q_weight), int(use_qk_norm), _ptr(k_weight), int(use_qk_norm), int(use_v_norm), eps,
        _ptr(cos), _ptr(ssin), _ptr(q), _ptr(cache_k), _ptr(cache_v),
        cache_k.shape[1] if cache_k is not None else 0, _ptr(slot), _ptr(rows),
        torch.get_num_threads(),
    )
    return q


def attends_in_place(k: torch.Tensor, k_pos: torch.Tensor) -> bool:
    """Keys (B, K, Hkv, D) and their positions (B, K) are views into one cache the kernel can walk."""
    _, _, Hkv, D = k.shape
    return (k.stride(3) == 1 and k.stride(2) == D and k.stride(1) == Hkv * D and k_pos.stride(1) == 1
            and k.stride(0) % (Hkv * D) == 0 and k_pos.stride(0) == k.stride(0) // (Hkv * D))


def attend(
    q: torch.Tensor,  # (B, H, D)
    k: torch.Tensor,  # (B, K, Hkv, D) view of a cache
    v: torch.Tensor,
    k_pos: torch.Tensor,  # (B, K)
    q_pos: torch.Tensor,  # (B, 1)
    window: int | None,
    scale: float,
    softcap: float | None,
    rows: torch.Tensor | None = None,  # (B,) cache row each query reads (k, v, k_pos then cover all rows)
) -> torch.Tensor:  # (B, H * D)
    B, H, D = q.shape
    n_slots, Hkv = k.shape[1], k.shape[2]
    threads = torch.get_num_threads()
    # The slots are cut into fixed ranges done in parallel and merged (split-K). The ranges depend only on
    # slot numbers, never on the batch, so a row's result is the same whatever rows share the step.
    parts = max(1, -(-n_slots // SPLIT_SLOTS))
    out = torch.empty(B, H * D)
    scratch = torch.empty(B * H * parts * (D + 2))
    q_pos = q_pos.contiguous()
    rows = rows.contiguous() if rows is not None else None
    kernels().attend_decode(
        _ptr(q), _ptr(k), _ptr(v), _ptr(k_pos), _ptr(q_pos), _ptr(rows), B, H, Hkv, D,
        k.stride(0) // (Hkv * D), n_slots,
        window or 0, scale, softcap or 0.0, _ptr(out), _ptr(scratch), SPLIT_SLOTS, parts, threads,
    )
    return out


def gelu_mul(gate: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
    """gelu_tanh(gate) * other for float32 (..., n) tensors of one shape, with GeGLU's arithmetic (Gemma 4's
    per-layer input gate; the C layer loop computes it the same way)."""
    g, u = gate.contiguous(), other.contiguous()
    out = torch.empty_like(g)
    n = g.shape[-1]
    kernels().gelu_mul(_ptr(g), _ptr(u), n, _ptr(out), g.numel() // n, n, torch.get_num_threads())
    return out


def geglu(gate_up: torch.Tensor) -> torch.Tensor:
    """gelu_tanh(gate) * up for a fused (..., 2F) gate|up projection -> (..., F), float32 or bfloat16."""
    F2 = gate_up.shape[-1]
    flat = gate_up.contiguous()
    out = torch.empty(*gate_up.shape[:-1], F2 // 2, dtype=flat.dtype)
    fn = kernels().geglu_bf16 if flat.dtype == torch.bfloat16 else kernels().geglu
    fn(_ptr(flat), _ptr(out), flat.numel() // F2, F2 // 2, torch.get_num_threads())
    return out


# -- all decoder layers of a decode step in one call (csrc/layers.c) ---------------------------------------------

# The C structs, as the header declares them (abi.py builds them from csrc/gemmakit_kernels.h).
_QMatrix, _Layer, _StepSlots, _StepRope = (struct(name) for name in ("QMatrix", "Layer", "StepSlots", "StepRope"))


def _qmatrix(proj) -> _QMatrix | None:
    w = proj.qweight if isinstance(proj, QuantLinear) else None
    return w.qmatrix() if isinstance(w, QuantWeight) else None


def _f32_weight(norm) -> bool:
    w = norm.weight
    return w is not None and w.dtype == torch.float32 and w.is_contiguous()


LAYER_LOOP_PATH = "C layer loop"  # Gemma.decode_path when every layer runs in the one-call loop


def _layer_parts(layer) -> tuple | str:
    """What the C loop needs of a layer that the model alone decides: (main matrices, k and v apart, per-layer
    input matrices, norm modules), or why the layer cannot run there."""
    attn, mlp = layer.self_attn, layer.mlp
    if layer.moe:
        return "its mixture-of-experts block has no C loop yet"
    # q|k|v as one matrix, or (formats that cannot be stacked: Q4_K q and k beside a Q6_K v) q, k and v apart
    separate = not attn.shared and attn.qkv_proj is None
    qkv = attn.q_proj if attn.shared or separate else attn.qkv_proj
    mats = [_qmatrix(m) for m in (qkv, attn.o_proj, mlp.gate_up_proj, mlp.down_proj)]
    kv = [_qmatrix(attn.k_proj)] + ([_qmatrix(attn.v_proj)] if attn.v_proj is not None else []) if separate else []
    ple = [_qmatrix(layer.per_layer_input_gate), _qmatrix(layer.per_layer_projection)] if layer.ple else []
    if any(m is None for m in mats + kv + ple):  # gate and up also unfused (float weights) comes here
        return "a matrix is not quantized in a 16- or 32-group format"
    # The input and pre-MLP norms always run; the others are optional (None: skipped).
    modules = (layer.input_layernorm, layer.post_attention_layernorm, layer.pre_feedforward_layernorm,
               layer.post_feedforward_layernorm, attn.q_norm, getattr(attn, "k_norm", None))
    if layer.ple:
        modules += (layer.post_per_layer_input_norm,)
    if modules[0] is None or modules[2] is None or not all(_f32_weight(n) for n in modules if n is not None):
        return "a norm weight is not float32"
    return mats, kv, ple, modules


def choose_decode_path(model) -> str:
    """How the decode steps of a loaded model run, decided once at load (Gemma.decode_path): the one-call C
    layer loop, the C pieces called layer by layer (with the first layer that keeps it from the loop, and why),
    or PyTorch without compiled kernels."""
    if kernels() is None:
        return "PyTorch (no compiled kernels)"
    for i, layer in enumerate(model.layers):
        parts = _layer_parts(layer)
        if isinstance(parts, str):
            return f"C pieces, layer by layer (layer {i}: {parts})"
    return LAYER_LOOP_PATH


def _layer_entry(layer, cache_layer, slots_id: int) -> _Layer | None:
    """The C description of one decoder layer (``cache_layer``: the cache it reads, its owner's on a KV-shared
    layer), or None when the layer needs the Python loop."""
    parts = _layer_parts(layer)
    if isinstance(parts, str) or cache_layer is None or cache_layer.k.dtype != torch.float32:
        return None
    mats, kv, ple, modules = parts
    attn, separate = layer.self_attn, bool(kv)
    norms = [n.weight.data_ptr() if n is not None else None for n in modules]
    scalar = float(layer.layer_scalar.detach()) if layer.layer_scalar is not None else 1.0
    k = cache_layer.k  # (rows, S1, Hkv, D)
    entry = _Layer(*mats, *norms[:6], k.data_ptr(), cache_layer.v.data_ptr(), cache_layer.slots.pos.data_ptr(),
                   attn.n_heads, attn.n_kv, attn.head_dim, k.shape[1], attn.window or 0, attn.scale,
                   attn.softcap or 0.0, slots_id, 0 if layer.spec.sliding else 1, int(attn.shared), int(attn.k_eq_v),
                   int(getattr(attn, "v_norm", None) is not None), scalar)
    if separate:
        entry.k_sep = kv[0]
        if len(kv) > 1:
            entry.v_sep = kv[1]
    if layer.ple:
        P = layer.per_layer_input_gate.out_features
        entry.ple_gate, entry.ple_proj, entry.ple_norm = ple[0], ple[1], norms[6]
        entry.ple_offset = layer.spec.index * P
    return entry


def _layer_table(model, cache):
    """(ctypes array of the layers, the distinct slot tables they use), built once per model and cache; None
    when some layer needs the Python loop."""
    if model.decode_path not in (None, LAYER_LOOP_PATH):
        return None  # decided at load: some layer needs the Python loop
    cached = getattr(cache, "_fused_layers", None)
    if cached is not None and cached[0] is model and cached[2] == linear.KERNEL_TABLES_EPOCH:
        return cached[1]
    slot_tables: list = []  # the distinct Slots objects (one per cache size), in the order layers meet them
    entries: list | None = []
    for layer in model.layers:
        entry = None
        owner = layer.spec.kv_source if layer.spec.kv_source is not None else layer.spec.index
        cache_layer = cache.layers[owner]
        if cache_layer is not None:
            if not any(t is cache_layer.slots for t in slot_tables):
                slot_tables.append(cache_layer.slots)
            slots_id = next(i for i, t in enumerate(slot_tables) if t is cache_layer.slots)
            entry = _layer_entry(layer, cache_layer, slots_id)
        if entry is None:
            entries = None
            break
        entries.append(entry)
    table = ((_Layer * len(entries))(*entries), slot_tables) if entries else None
    cache._fused_layers = (model, table, linear.KERNEL_TABLES_EPOCH)
    return table


def decode_layers(model, x: torch.Tensor, positions: torch.Tensor, rope_local, rope_global, cache,
                  ple: torch.Tensor | None = None) -> bool:
    """Run every decoder layer of a decode step on ``x`` (B, 1, E) in place in one C call (csrc/layers.c), after
    ``cache.begin`` (``ple``: Gemma 4's per-layer inputs (B, 1, L, P)); bitwise what the Python loop over the
    fused pieces computes. False (nothing done) when this step or model is not one it covers."""
    if not (LAYER_LOOP and fused_decode_ok(x) and x.is_contiguous()):
        return False
    table = _layer_table(model, cache)
    if table is None:
        return False
    layers, slot_tables = table
    B = x.shape[0]
    qpos = positions.contiguous()
    index = [t.index.contiguous() for t in slot_tables]
    steps = (_StepSlots * len(slot_tables))(*[_StepSlots(ix.data_ptr(), t.visible_prefix(qpos))
                                              for t, ix in zip(slot_tables, index)])
    tables = [(c.contiguous(), s.contiguous()) for c, s in (rope_local, rope_global)]
    ropes = (_StepRope * 2)(*[_StepRope(c.data_ptr(), s.data_ptr()) for c, s in tables])
    rows = cache.rows.contiguous() if cache.rows is not None else None
    ple = ple.contiguous() if ple is not None else None  # (B, 1, L, P): a row of L * P values per token
    err = kernels().decode_layers(layers, len(layers), steps, ropes, x.data_ptr(), B, x.shape[-1], qpos.data_ptr(),
                                  _ptr(rows), _ptr(ple), ple[0].numel() if ple is not None else 0,
                                  model.config.rms_norm_eps, SPLIT_SLOTS, torch.get_num_threads())
    if err:
        raise MemoryError(f"decode_layers failed ({err})")
    return True
