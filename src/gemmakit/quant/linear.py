"""Weights that stay quantized in memory: int8 (or 4-bit) values with a scale (and min) per group of 16 or 32.

Every GGML quant type maps onto this layout exactly (see ggml.split); K-quants keep ggml's two factors of each
scale (see :func:`two_level_bytes`). Small batches (decode: up to 16 rows)
multiply straight from int8 with the C kernel, reading the weight once for all rows; larger ones (prefill)
dequantize the weight to float32 and use PyTorch's matmul.
"""

from __future__ import annotations

import ctypes
import functools
import threading

import torch
import torch.nn.functional as F
from torch import nn

from ..kernels import kernels
from ..kernels.abi import struct
from ..errors import InvalidParameterError

MAX_KERNEL_ROWS = 16  # a prompt chunk of up to this many tokens multiplies through the integer kernel
KS_COLS = 256  # columns per super-scale in the two-level scale layout of K-quants (csrc/qgemv.c)


def two_level_bytes(group: int) -> int:
    """Bytes of one 16-row block's two-level scales for KS_COLS columns: 16 float32 super-scales, then 16 int8
    sub-scales for each of the KS_COLS / group groups."""
    return 64 + 16 * (KS_COLS // group)


def expand_two_level(packed: torch.Tensor, group: int) -> torch.Tensor:
    """Two-level scales (blocks, S * two_level_bytes) uint8 -> the flat packed layout (blocks, 16 * G) float32,
    each scale the super-scale times the sub-scale in float32, as the kernels compute it."""
    blocks = packed.shape[0]
    chunks = packed.view(blocks, -1, two_level_bytes(group))  # (blocks, S, bytes)
    super_ = chunks[..., :64].contiguous().view(torch.float32)  # (blocks, S, 16 rows)
    sub = chunks[..., 64:].contiguous().view(torch.int8).view(blocks, chunks.shape[1], KS_COLS // group, 16)
    return (super_.unsqueeze(2) * sub.float()).reshape(blocks, -1)  # [block][group][row]


def kernel_rows(x: torch.Tensor) -> bool:
    """Whether the rows of ``x`` (..., K) go through the integer decode kernel rather than dequantize + GEMM:
    up to MAX_KERNEL_ROWS rows (a decode step, a short prompt), or any number of one-token rows (..., 1, K),
    the batched and ragged steps of the engine, whose rows must not depend on one another (the kernel computes
    each row the same way whatever the batch; a GEMM library may not)."""
    return x.numel() <= MAX_KERNEL_ROWS * x.shape[-1] or (x.dim() >= 3 and x.shape[-2] == 1)


def fast_rms_norm(x: torch.Tensor, weight: torch.Tensor | None, eps: float) -> torch.Tensor:
    """RMSNorm of a float32 CPU tensor in one C call (faster than PyTorch's eager norm at decode and prefill sizes)."""
    lib = kernels()
    if lib is None or (weight is not None and weight.dtype != torch.float32):
        w = weight.float() if weight is not None else None
        return F.rms_norm(x, (x.shape[-1],), w, eps)
    x = x.contiguous()
    out = torch.empty_like(x)
    lib.rms_norm(_ptr(x), _ptr(weight), _ptr(out), x.numel() // x.shape[-1], x.shape[-1], eps)
    return out


def _ptr(t: torch.Tensor | None) -> ctypes.c_void_p | None:
    return ctypes.c_void_p(t.data_ptr()) if t is not None else None


def _round16(n: int) -> int:
    return (n + 15) // 16 * 16


def pack(q: torch.Tensor, scale: torch.Tensor, mins: torch.Tensor | None, bits: int = 8) -> tuple[torch.Tensor, ...]:
    """Row-major (N, K) int8 values and (N, G) scales/mins -> the kernel's packed layout (csrc/qgemv.c):
    q (N16 / 16, 16 * K) with 16 rows x 2 columns per 32 bytes (bits=8), or (N16 / 16, 8 * K) uint8 with
    16 rows x 4 columns per 32 bytes, columns 4i + e and 4i + 2 + e of a row as the nibbles of one byte (bits=4,
    values 0..15); scales (N16 / 16, 16 * G) as [group][row]. N16 is N rounded up to a multiple of 16 (the
    padding rows are zero)."""
    N, K = q.shape
    G = scale.shape[1]
    pad = _round16(N) - N
    blocks = _round16(N) // 16

    def rows_padded(t: torch.Tensor) -> torch.Tensor:
        return F.pad(t, (0, 0, 0, pad)) if pad else t

    if bits == 4:  # (blocks, K/4, 16 rows, e, nibble): column 4i + 2 * nibble + e
        quads = rows_padded(q).view(blocks, 16, K // 4, 2, 2).permute(0, 2, 1, 4, 3).to(torch.uint8)
        qp = (quads[..., 0] | (quads[..., 1] << 4)).reshape(blocks, 8 * K).contiguous()
    else:
        pairs = rows_padded(q).view(blocks, 16, K // 2, 2).permute(0, 2, 1, 3)  # (blocks, K/2, 16 rows, 2 columns)
        qp = pairs.reshape(blocks, 16 * K).contiguous()

    def scales(t: torch.Tensor | None) -> torch.Tensor | None:
        if t is None:
            return None
        return rows_padded(t).view(blocks, 16, G).permute(0, 2, 1).reshape(blocks, 16 * G).contiguous()

    return qp, scales(scale), scales(mins)


def unpack(qp: torch.Tensor, sp: torch.Tensor, mp: torch.Tensor | None, N: int, K: int,
           bits: int = 8) -> tuple[torch.Tensor, ...]:
    """Inverse of :func:`pack`: row-major q (N, K) int8, scale (N, G), mins (N, G) or None."""
    blocks = qp.shape[0]
    G = sp.shape[1] // 16
    if bits == 4:
        b = qp.view(torch.uint8).view(blocks, K // 4, 16, 2)
        quads = torch.stack([b & 15, b >> 4], dim=-1).to(torch.int8)  # (blocks, K/4, 16 rows, e, nibble)
        q = quads.permute(0, 2, 1, 4, 3).reshape(blocks * 16, K)[:N]
    else:
        q = qp.view(blocks, K // 2, 16, 2).permute(0, 2, 1, 3).reshape(blocks * 16, K)[:N]

    def scales(t: torch.Tensor | None) -> torch.Tensor | None:
        return None if t is None else t.view(blocks, G, 16).permute(0, 2, 1).reshape(blocks * 16, G)[:N]

    return q, scales(sp), scales(mp)


def unpack_weight(w: QuantWeight) -> tuple[torch.Tensor, ...]:
    """A :class:`QuantWeight`'s row-major q (N, K) int8, scale (N, G) and mins (N, G) or None, whatever the scale
    layout (two-level scales come back as their float32 products)."""
    sp, mp = w.scale, w.mins
    if w.two_level:
        sp = expand_two_level(sp, w.group)
        mp = expand_two_level(mp, w.group) if mp is not None else None
    return unpack(w.q, sp, mp, w.N, w.K, w.bits)


class QuantWeight(nn.Module):
    """A (N, K) matrix of int8 values (``bits=8``) or unsigned 4-bit ones (``bits=4``), with a float32 or
    float16 scale (and optional min) per group of 16 or 32 weights, or two-level K-quant scales (see
    :attr:`two_level`), kept in the packed layout of csrc/qgemv.c.
    Build it from row-major values with ``QuantWeight(q, scale, mins, group, bits)`` or, without a row-major
    copy, with :meth:`from_packed`."""

    def __init__(self, q: torch.Tensor, scale: torch.Tensor, mins: torch.Tensor | None, group: int,
                 bits: int = 8) -> None:
        N, K = q.shape
        self._init_packed(*pack(q, scale, mins, bits), group, bits, N, K)

    @classmethod
    def from_packed(cls, qp: torch.Tensor, sp: torch.Tensor, mp: torch.Tensor | None, group: int, bits: int,
                    N: int, K: int) -> QuantWeight:
        self = cls.__new__(cls)
        self._init_packed(qp, sp, mp, group, bits, N, K)
        return self

    def _init_packed(self, qp: torch.Tensor, sp: torch.Tensor, mp: torch.Tensor | None, group: int, bits: int,
                     N: int, K: int) -> None:
        super().__init__()
        # Not persistent: they are filled from the checkpoint by the loader, not through load_state_dict.
        self.register_buffer("q", qp, persistent=False)
        self.register_buffer("scale", sp, persistent=False)
        self.register_buffer("mins", mp, persistent=False)
        self.group, self.bits, self.N, self.K = group, bits, N, K
        # dtype of the prefill matmuls (more than 16 rows); see :func:`set_prefill_dtype`.
        self.prefill_dtype = torch.float32
        # bits x is rounded to in decode products (the C kernel): 16 or 8; see :func:`set_decode_x_bits`.
        self.decode_x_bits = 16
        self._args: tuple | None = None  # the kernel's fixed arguments (the tensors never move on CPU)
        self._qmatrix = None  # this matrix as the kernels' struct, built at the first prompt product

    @property
    def shape(self) -> torch.Size:
        return torch.Size((self.N, self.K))

    @property
    def two_level(self) -> bool:
        """Whether the scales (and mins) are two-level (K-quants: a float32 per row and KS_COLS columns times an
        int8 per group, held as raw bytes) rather than one float per group."""
        return self.scale.dtype == torch.uint8

    @property
    def kernel_flags(self) -> int:
        """The C kernels' format flags: bit 0 float16 scales and mins (exact for formats with fp16 block
        scales; else float32), bit 1 4-bit values, bit 2 two-level scales, bit 3 decode products round x to 8
        bits (:attr:`decode_x_bits`)."""
        return (int(self.scale.dtype == torch.float16) | (2 if self.bits == 4 else 0) | (4 if self.two_level else 0)
                | (8 if self.decode_x_bits == 8 else 0))

    def qmatrix(self):
        """This matrix as the kernels' QMatrix struct (csrc/gemmakit_kernels.h), or None where the kernels do not
        take it (a group other than 16 or 32)."""
        if self.group not in (16, 32) or self.K % self.group:
            return None
        return struct("QMatrix")(self.q.data_ptr(), self.scale.data_ptr(),
                                 self.mins.data_ptr() if self.mins is not None else None, self.N, self.K, self.group,
                                 self.kernel_flags)

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in (self.q, self.scale, self.mins) if t is not None)

    def dequantize(self, rows: torch.Tensor | None = None, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Values of all rows, or of the given row ids (an embedding lookup), as float32 or bfloat16."""
        lib = kernels()
        n_rows = self.N if rows is None else rows.numel()
        if lib is not None and self.q.device.type == "cpu" and dtype in (torch.float32, torch.bfloat16):
            out = torch.empty(n_rows, self.K, dtype=dtype)
            ids = rows.reshape(-1).to(torch.int64).contiguous() if rows is not None else None
            lib.dequant_rows(_ptr(self.q), _ptr(self.scale), _ptr(self.mins), self.kernel_flags, _ptr(out), self.K,
                             self.group, _ptr(ids), n_rows, int(dtype == torch.bfloat16), torch.get_num_threads())
            return out
        q, scale, mins = unpack_weight(self)
        if rows is not None:
            q, scale = q[rows.reshape(-1)], scale[rows.reshape(-1)]
            mins = mins[rows.reshape(-1)] if mins is not None else None
        n = q.shape[0]
        values = scale.float().unsqueeze(-1) * q.reshape(n, self.K // self.group, self.group).float()
        if mins is not None:
            values = values - mins.float().unsqueeze(-1)
        return values.view(n, self.K).to(dtype)

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        """x (..., K) -> (..., N) float32 (bfloat16 for bfloat16 x on the bf16 prompt path).

        Decode-sized inputs (:func:`kernel_rows`) go through the C kernel, which rounds x to 16 (or 8, see
        :func:`set_decode_x_bits`) bits per group of ``group`` values (see csrc/qgemv.c); prompt chunks of more
        rows multiply the dequantized weight with PyTorch in ``prefill_dtype`` (float32 or bfloat16), or, for int8 and 4-bit weights, go through the C kernel
        with x rounded to 8 bits per group (see :func:`set_prefill_dtype`).
        """
        lib = kernels()
        K = x.shape[-1]
        if lib is not None and x.device.type == "cpu" and kernel_rows(x):
            # Decode: the C kernel, with as little Python around it as possible (it runs ~70 times a token).
            if x.dtype != torch.float32 or not x.is_contiguous():
                x = x.float().contiguous()
            if self._args is None:
                self._args = (_ptr(self.q), _ptr(self.scale), _ptr(self.mins), self.N, self.group, self.kernel_flags)
            q, scale, mins, N, group, flags = self._args
            y = torch.empty(*x.shape[:-1], N)
            if lib.qgemv(q, scale, mins, x.data_ptr(), y.data_ptr(), x.numel() // K, N, K, group, flags,
                         torch.get_num_threads()) == 0:
                return y
        lead = x.shape[:-1]
        flat = x.reshape(-1, K)
        if self.prefill_dtype == torch.int8 and self.bits == 4 and lib is not None and flat.device.type == "cpu":
            out = self._prefill_int8(lib, flat.float().contiguous())
            if out is not None:
                return out.view(*lead, -1)
        if self.prefill_dtype == torch.bfloat16 and flat.device.type == "cpu":
            out = self._prefill_matmul(flat.to(torch.bfloat16), torch.bfloat16)
            return (out if x.dtype == torch.bfloat16 else out.float()).view(*lead, -1)
        return self._prefill_matmul(flat.float().contiguous(), torch.float32).view(*lead, -1)

    def _prefill_int8(self, lib, flat: torch.Tensor) -> torch.Tensor | None:  # (M, K) float32 -> (M, N) float32
        """A 4-bit matrix's prompt product with x rounded to 8 bits per group (csrc/qgemm.c), or None where the
        kernel does not take it (a group other than 32, a build without AVX-512): the caller runs the float32 GEMM."""
        if self.group != 32:
            return None
        if self._qmatrix is None:
            self._qmatrix = self.qmatrix()
        out = torch.empty(flat.shape[0], self.N)
        if lib.qgemm_int8(ctypes.byref(self._qmatrix), flat.data_ptr(), out.data_ptr(), flat.shape[0],
                          torch.get_num_threads()) != 0:
            return None
        return out

    def _prefill_matmul(self, flat: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:  # (M, K) -> (M, N)
        """A prompt chunk's product, the weight dequantized a slab of rows at a time into this thread's reused
        buffer (see :func:`_slab`): the dequantized slab is still in cache when the GEMM reads it, and no
        full-size float copy of the weight is made (E2B's fused gate|up would be 151 MB, mapped fresh and
        faulted in page by page at every prompt chunk)."""
        lib = kernels()
        rows = _slab_rows(self.K, dtype)
        if lib is None or flat.device.type != "cpu" or rows >= self.N:
            return F.linear(flat, self.dequantize(dtype=dtype))
        out = torch.empty(flat.shape[0], self.N, dtype=dtype)
        slab = _slab(rows * self.K, dtype)
        for n0 in range(0, self.N, rows):
            n = min(rows, self.N - n0)
            weight = slab[: n * self.K].view(n, self.K)
            lib.dequant_rows(*self._block_pointers(n0 // 16), self.kernel_flags, _ptr(weight), self.K, self.group,
                             None, n, int(dtype == torch.bfloat16), torch.get_num_threads())
            out[:, n0 : n0 + n] = F.linear(flat, weight)
        return out

    def _block_pointers(self, block: int) -> tuple[ctypes.c_void_p, ...]:
        """q, scale and mins pointers of the packed matrix from its 16-row block ``block`` on (each tensor holds
        one row of bytes per block)."""
        return tuple(ctypes.c_void_p(t.data_ptr() + block * t.stride(0) * t.element_size()) if t is not None
                     else None for t in (self.q, self.scale, self.mins))


SLAB_BYTES = 4 << 20  # a dequantized slab of weight rows: fits in L3 beside the GEMM's other operands
SLAB_MIN_ROWS = 256  # fewer output columns per GEMM call costs more than the slab saves
_SLABS = threading.local()


def _slab_rows(K: int, dtype: torch.dtype) -> int:
    per_row = K * torch.empty((), dtype=dtype).element_size()
    return max(SLAB_MIN_ROWS, SLAB_BYTES // per_row // 16 * 16)


def _slab(numel: int, dtype: torch.dtype) -> torch.Tensor:
    """This thread's buffer for dequantized weight slabs, grown to the largest asked for and reused."""
    nbytes = numel * torch.empty((), dtype=dtype).element_size()
    buffer = getattr(_SLABS, "buffer", None)
    if buffer is None or buffer.numel() < nbytes:
        _SLABS.buffer = buffer = torch.empty(nbytes, dtype=torch.uint8)
    return buffer[:nbytes].view(dtype)


@functools.lru_cache(maxsize=1)
def cpu_flags() -> frozenset[str]:
    """This CPU's feature flags from /proc/cpuinfo (empty where it cannot be read)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def cpu_has_native_bf16() -> bool:
    """Whether this CPU multiplies bfloat16 natively (AVX-512 BF16 or AMX), where PyTorch's bf16 GEMM runs about
    2.5x faster than float32 (measured here: 400+ vs 150-190 GFLOPS at prefill shapes)."""
    return bool({"avx512_bf16", "amx_bf16"} & cpu_flags())


def fast_prefill_dtype() -> torch.dtype:
    """The prompt products' dtype a quantized model loads with by default: bfloat16 where the CPU multiplies it
    natively, else int8 where csrc/qgemm.c runs (AVX-512 BW: 8-bit activations for 4-bit weights, float32 for the
    others), else float32. See set_prefill_dtype."""
    if cpu_has_native_bf16():
        return torch.bfloat16
    return torch.int8 if "avx512bw" in cpu_flags() else torch.float32


def set_prefill_dtype(model: nn.Module, dtype: torch.dtype) -> None:
    """Run every quantized weight's prefill matmuls in ``dtype``: float32, bfloat16, or int8.

    int8 rounds each prompt row to 8 bits per group of 32 (step max|x| / 127, as llama.cpp's Q8 activations)
    and multiplies it with 4-bit weights in integers (csrc/qgemm.c, AVX-512 CPUs); other weights, and CPUs
    without AVX-512, keep float32. It makes 4-bit prompt products 1.5-2x faster here (no VNNI); on the default
    model (4-bit attention outputs) it moves prompt logits by up to 0.8, top-1 agreement 98.4%, mean NLL +0.15%
    (tests/test_quant_linear.py::test_fast_prefill_tracks_fp32_prefill).

    bfloat16 rounds activations and dequantized weights to 8 significant bits before the product (float32
    accumulation). On the default model that moves prompt logits by up to ~0.6 (of |logits| up to ~52) and mean
    NLL by +0.03%; decode steps are unaffected (their kernel works on the int8 values).
    """
    for module in model.modules():
        if isinstance(module, QuantWeight):
            module.prefill_dtype = dtype


def decode_x8_native() -> bool:
    """Whether the kernels multiply 8-bit decode x natively here (AVX-512 VNNI's vpdpbusd: 64 multiply-adds an
    instruction against vpdpwssd's 32 for 16-bit x). See set_decode_x_bits."""
    lib = kernels()
    return lib is not None and bool(lib.gemmakit_kernels_features() & 1)


def set_decode_x_bits(model: nn.Module, bits: int) -> None:
    """Round x to ``bits`` (16 or 8) bits per group in every quantized weight's decode products (csrc/qgemv.c).

    16, the default, keeps decode products within ~1e-5 of the float product (prompt-token logprobs within ~1e-3
    of float32 weights). 8 rounds each group of x to a step of max|x| / 127, as llama.cpp's Q8 activations do:
    where :func:`decode_x8_native` (AVX-512 VNNI), a decode step of 16 sequences runs ~1.2x faster (the
    server's 16 sampled streams: ~370 -> ~420 tok/s on a Zen 4) and a lone sequence no faster (8-10% slower
    through the server there);
    on the default model it moves decode logits by up to ~2 and logprobs by ~0.03 on average (up to ~0.3),
    mean NLL +0.3% (tests/test_quant_linear.py::test_decode_x8_tracks_x16). Elsewhere 8 gives the same values
    in plain C, slowly: for tests.

    Raises:
        InvalidParameterError: bits is neither 8 nor 16.
    """
    if bits not in (8, 16):
        raise InvalidParameterError(f"decode x bits={bits}: 8 or 16")
    for module in model.modules():
        if isinstance(module, QuantWeight):
            module.decode_x_bits = bits
            module._args = module._qmatrix = None  # both hold the flags
        elif isinstance(module, QuantExperts) and hasattr(module, "_qmatrices"):
            del module._qmatrices
    global KERNEL_TABLES_EPOCH
    KERNEL_TABLES_EPOCH += 1  # the C layer tables (kernels/fused.py) built before hold the old flags


KERNEL_TABLES_EPOCH = 0  # bumped when weights' kernel flags change: QMatrix structs built before are stale


class QuantLinear(nn.Module):
    """Drop-in for a bias-free nn.Linear whose weight stays quantized."""

    def __init__(self, weight: QuantWeight) -> None:
        super().__init__()
        self.qweight = weight
        self.out_features, self.in_features = weight.shape

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.qweight.matmul(x)
        return y if y.dtype == x.dtype else y.to(x.dtype)


class QuantEmbedding(nn.Module):
    """Token embedding that is also the tied output head, both read from the quantized table."""

    def __init__(self, weight: QuantWeight) -> None:
        super().__init__()
        self.qweight = weight
        self.num_embeddings, self.embedding_dim = weight.shape
        self.compute_dtype = torch.float32

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.qweight.dequantize(ids).view(*ids.shape, self.embedding_dim)

    def project(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.qweight.matmul(hidden)


class MappedEmbedding(nn.Module):
    """An embedding table read straight from the checkpoint's memory map: the rows a lookup needs are dequantized
    from their GGML blocks, the table itself is never converted, copied or made resident (Gemma 4's per-layer
    input table: 262,144 x 8,960 values on E2B, of which a token reads one row)."""

    def __init__(self, raw: torch.Tensor, qtype, shape: tuple[int, int]) -> None:
        super().__init__()
        self.raw = raw  # (rows, bytes per row) uint8, a view of the map; not a buffer: nothing copies it
        self.qtype = qtype
        self.num_embeddings, self.embedding_dim = shape
        self.compute_dtype = torch.float32

    def forward(self, ids: torch.Tensor) -> torch.Tensor:  # (...) -> (..., embedding_dim) float32
        from .ggml import dequantize

        unique, inverse = torch.unique(ids.reshape(-1), return_inverse=True)
        rows = dequantize(self.raw[unique], self.qtype, (unique.numel(), self.embedding_dim))
        return rows[inverse].view(*ids.shape, self.embedding_dim)


class QuantExperts(nn.Module):
    """Gemma 4's expert stacks with every expert's matrices quantized (a :class:`QuantWeight` each): a decode
    token reads only its top-k experts' packed rows, and a prompt chunk's tokens are grouped by expert, so each
    selected expert's weights are read once per step. The arithmetic is :class:`~gemmakit.model.Experts`'s."""

    def __init__(self, gate_up: list[QuantWeight], down: list[QuantWeight]) -> None:
        super().__init__()
        self.gate_up = nn.ModuleList(gate_up)  # expert e: (2F, E), gate rows then up rows
        self.down = nn.ModuleList(down)  # expert e: (E, F)

    def forward(self, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor,
                one_token_rows: bool = False) -> torch.Tensor:  # (N, E), (N, k), (N, k) -> (N, E)
        if one_token_rows and x.dtype == torch.float32 and self._tables() is not None:
            return self._decode_in_c(x, weights, ids)
        out = torch.zeros_like(x)
        for expert in torch.unique(ids).tolist():
            token, slot = torch.where(ids == expert)
            rows = x[token]
            if one_token_rows:  # (n, 1, E): through the integer kernel, each row computed alone (batch invariance)
                rows = rows.unsqueeze(1)
            gate, up = self.gate_up[expert].matmul(rows).reshape(len(token), -1).chunk(2, dim=-1)
            h = F.gelu(gate, approximate="tanh") * up
            y = self.down[expert].matmul(h.unsqueeze(1) if one_token_rows else h).reshape(len(token), -1)
            out.index_add_(0, token, y * weights[token, slot, None])
        return out

    def _tables(self) -> tuple | None:
        """The experts' QMatrix arrays for experts_decode (built once), or None without the kernels."""
        if not hasattr(self, "_qmatrices"):
            mats = [[w.qmatrix() for w in ws] for ws in (self.gate_up, self.down)]
            ok = kernels() is not None and all(m is not None for ms in mats for m in ms)
            self._qmatrices = tuple((struct("QMatrix") * len(ms))(*ms) for ms in mats) if ok else None
        return self._qmatrices

    def _decode_in_c(self, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """A decode step's rows through csrc/decode.c experts_decode: the loop above in one call per layer, each
        row computed alone (batch invariance), GeGLU by the kernels' own GELU."""
        gate_up, down = self._tables()
        x, ids = x.contiguous(), ids.to(torch.int64).contiguous()
        weights = weights.float().contiguous()
        out = torch.empty_like(x)
        err = kernels().experts_decode(gate_up, down, _ptr(x), x.shape[0], x.shape[1], _ptr(ids), _ptr(weights),
                                       ids.shape[1], _ptr(out), torch.get_num_threads())
        if err:
            raise MemoryError(f"experts_decode failed ({err})")
        return out


def concat_weights(weights: list[QuantWeight]) -> QuantWeight | None:
    """Stack matrices with the same input width and group layout into one (one kernel call instead of several)."""
    first = weights[0]
    if any(w.group != first.group or (w.mins is None) != (first.mins is None) or w.shape[1] != first.shape[1]
           or w.bits != first.bits or w.two_level != first.two_level for w in weights):
        return None
    if any(w.N % 16 for w in weights):
        return None  # padding rows would land inside the stacked matrix
    if first.two_level:  # blocks of 16 rows stack as they are
        mins = torch.cat([w.mins for w in weights]) if first.mins is not None else None
        return QuantWeight.from_packed(torch.cat([w.q for w in weights]), torch.cat([w.scale for w in weights]),
                                       mins, first.group, first.bits, sum(w.N for w in weights), first.K)
    # Mixed float16 / float32 scales stack as float32 (exact).
    dtype = torch.float16 if all(w.scale.dtype == torch.float16 for w in weights) else torch.float32
    mins = torch.cat([w.mins.to(dtype) for w in weights]) if first.mins is not None else None
    return QuantWeight.from_packed(torch.cat([w.q for w in weights]), torch.cat([w.scale.to(dtype) for w in weights]),
                                   mins, first.group, first.bits, sum(w.N for w in weights), first.K)


def fuse_projections(model: nn.Module) -> None:
    """Run q/k/v and gate/up as single matmuls where their quantized layouts allow it."""
    for module in model.modules():
        names = None
        if hasattr(module, "qkv_proj") and not getattr(module, "shared", True):
            names = ["q_proj", "k_proj"] + (["v_proj"] if module.v_proj is not None else [])
            target = "qkv_proj"
        elif hasattr(module, "gate_up_proj"):
            names, target = ["gate_proj", "up_proj"], "gate_up_proj"
        if not names or not all(hasattr(module, n) for n in names):
            continue  # e.g. MoE experts, whose gate_up_proj is a stored tensor, not a slot to fill
        parts = [getattr(module, n) for n in names]
        if not all(isinstance(p, QuantLinear) for p in parts):
            continue
        fused = concat_weights([p.qweight for p in parts])
        if fused is None:
            continue
        setattr(module, target, QuantLinear(fused))
        if target == "qkv_proj":
            module.qkv_sizes = [p.out_features for p in parts] + ([] if len(parts) == 3 else [0])
        for n in names:  # the fused copy replaces them; drop the originals' memory
            setattr(module, n, None)
