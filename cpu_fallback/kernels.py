"""numba kernels of the CPU backend: matmul over native weight blocks of every registry type (plain or per
expert), Q80 codec, norms, RoPE, attention, mixture-of-experts routing.

Hot loops use 8-lane float32 vectors built from numba intrinsics (explicit LLVM vector IR), so the weight
stream is decoded with SIMD whatever LLVM's loop vectoriser decides; 32-value block weights meet Q80
activations in exact integer block dots (AVX-VNNI or AVX2 byte multiply-adds where the CPU has them).
Every kernel writes into preallocated outputs; the Python wrappers only check shapes and pick the compiled
kernel.
"""

from __future__ import annotations

import platform
from collections.abc import Callable

import numba
import numpy as np
from llvmlite import binding as llvm_binding
from llvmlite import ir
from numba import njit, prange, types
from numba.core import cgutils
from numba.extending import intrinsic, models, register_model

from engine.errors import DllamaError
from engine.weight_types import WEIGHT_TYPES, WeightType, weight_type

Step = Callable[[int], None]  # a bound op: run it on the first n rows of its buffers

_FAST = {"reassoc", "contract", "nsz"}  # lets LLVM vectorise float reductions; no NaN/Inf assumptions

# error_model="numpy": float division by zero gives inf/nan instead of a Python exception, whose check would
# keep LLVM from vectorising any loop that divides. Kernels are cached on disk; helpers compile into them.
_helper = njit(error_model="numpy")
_fast_helper = njit(error_model="numpy", fastmath=_FAST)
_inline_helper = njit(error_model="numpy", inline="always")  # inlined in numba IR: constants fold through
_kernel = njit(error_model="numpy", cache=True)
_fast_kernel = njit(error_model="numpy", cache=True, fastmath=_FAST)
_parallel_kernel = njit(error_model="numpy", cache=True, parallel=True)

# ---------------------------------------------------------------------------------------------------------
# 8-lane float32 vectors: a numba type whose LLVM representation is <8 x float>, and the few operations the
# kernels need. Loads take an array and an offset counted in that array's elements (bytes for uint8 arrays);
# the elements from the offset on must be contiguous, which holds for every row of a row-major buffer.
# ---------------------------------------------------------------------------------------------------------

_F32 = ir.FloatType()
_I8, _I16, _I32, _I64 = ir.IntType(8), ir.IntType(16), ir.IntType(32), ir.IntType(64)
_V8F = ir.VectorType(_F32, 8)
_V8I = ir.VectorType(_I32, 8)
_CONTRACT = ("contract",)


class _F32x8Type(types.Type):
    """numba type of an 8-lane float32 vector held in a register."""

    def __init__(self) -> None:
        super().__init__(name="F32x8")


_f32x8 = _F32x8Type()


@register_model(_F32x8Type)
class _F32x8Model(models.PrimitiveModel):
    """Lowers _F32x8Type to LLVM's <8 x float>."""

    def __init__(self, dmm, fe_type):
        super().__init__(dmm, fe_type, _V8F)


def _elem_ptr(context, builder, arrty, arr, idx, llty):
    data = context.make_array(arrty)(context, builder, value=arr).data
    return builder.bitcast(builder.gep(data, [idx]), llty.as_pointer())


def _vec_loader(convert, lanes_type, doc):
    """Build an intrinsic loading 8 elements at array offset i and converting them to <8 x float>."""

    @intrinsic
    def load(typingctx, arr, i):
        if not isinstance(arr, types.Array):
            return None

        def codegen(context, builder, sig, args):
            p = _elem_ptr(context, builder, sig.args[0], args[0], args[1], lanes_type)
            return convert(builder, builder.load(p, align=1))

        return _f32x8(arr, types.intp), codegen

    load.__doc__ = f"Load {doc} from array offset i as 8 float32 lanes."
    return load


def _cvt_f32(b, v):
    return v


def _cvt_f16(b, v):
    return b.fpext(b.bitcast(v, ir.VectorType(ir.HalfType(), 8)), _V8F)


def _cvt_bf16(b, v):
    return b.bitcast(b.shl(b.zext(v, _V8I), ir.Constant(_V8I, [16] * 8)), _V8F)


def _cvt_lo4(b, v):
    return b.sitofp(b.and_(b.zext(v, _V8I), ir.Constant(_V8I, [15] * 8)), _V8F)


def _cvt_hi4(b, v):
    return b.sitofp(b.lshr(b.zext(v, _V8I), ir.Constant(_V8I, [4] * 8)), _V8F)


def _cvt_i8(b, v):
    return b.sitofp(b.sext(v, _V8I), _V8F)


def _cvt_u8(b, v):
    return b.sitofp(b.zext(v, _V8I), _V8F)


_ld_f32x8 = _vec_loader(_cvt_f32, _V8F, "8 float32")
_ld_f16x8 = _vec_loader(_cvt_f16, ir.VectorType(_I16, 8), "8 IEEE halves")
_ld_bf16x8 = _vec_loader(_cvt_bf16, ir.VectorType(_I16, 8), "8 bfloat16 bit patterns")
_ld_lo4x8 = _vec_loader(_cvt_lo4, ir.VectorType(_I8, 8), "low nibbles of 8 bytes, 0..15")
_ld_hi4x8 = _vec_loader(_cvt_hi4, ir.VectorType(_I8, 8), "high nibbles of 8 bytes, 0..15")
_ld_i8x8 = _vec_loader(_cvt_i8, ir.VectorType(_I8, 8), "8 signed bytes")
_ld_u8x8 = _vec_loader(_cvt_u8, ir.VectorType(_I8, 8), "8 unsigned bytes")


def _scalar_loader(convert, llty):
    """Build an intrinsic loading one element at array offset i (any alignment) as float32."""

    @intrinsic
    def load(typingctx, arr, i):
        if not isinstance(arr, types.Array):
            return None

        def codegen(context, builder, sig, args):
            p = _elem_ptr(context, builder, sig.args[0], args[0], args[1], llty)
            return convert(builder, builder.load(p, align=1))

        return types.float32(arr, types.intp), codegen

    return load


_ld_f16 = _scalar_loader(lambda b, v: b.fpext(b.bitcast(v, ir.HalfType()), _F32), _I16)
_ld_bf16 = _scalar_loader(lambda b, v: b.bitcast(b.shl(b.zext(v, _I32), ir.Constant(_I32, 16)), _F32), _I16)
_ld_f32 = _scalar_loader(lambda b, v: v, _F32)
_ld_i8 = _scalar_loader(lambda b, v: b.sitofp(v, _F32), _I8)


@intrinsic
def _st_f32x8(typingctx, arr, i, v):
    """Store 8 float32 at array offset i."""
    if not isinstance(arr, types.Array):
        return None

    def codegen(context, builder, sig, args):
        builder.store(args[2], _elem_ptr(context, builder, sig.args[0], args[0], args[1], _V8F), align=1)
        return context.get_dummy_value()

    return types.none(arr, types.intp, _f32x8), codegen


@intrinsic
def _st_f32(typingctx, arr, i, v):
    """Store one float32 at array offset i."""
    if not isinstance(arr, types.Array):
        return None

    def codegen(context, builder, sig, args):
        builder.store(args[2], _elem_ptr(context, builder, sig.args[0], args[0], args[1], _F32), align=1)
        return context.get_dummy_value()

    return types.none(arr, types.intp, types.float32), codegen


@intrinsic
def _st_f16(typingctx, arr, i, v):
    """Store one float32 as an IEEE half (round to nearest even) at array offset i."""
    if not isinstance(arr, types.Array):
        return None

    def codegen(context, builder, sig, args):
        h = builder.bitcast(builder.fptrunc(args[2], ir.HalfType()), _I16)
        builder.store(h, _elem_ptr(context, builder, sig.args[0], args[0], args[1], _I16), align=1)
        return context.get_dummy_value()

    return types.none(arr, types.intp, types.float32), codegen


def _kv_element(arr):
    """(LLVM element type, to-float32 converter of 8 lanes, of 1) of a KV-cache array: float32, or IEEE halves
    held as uint16 (an f16 cache); None for other arrays."""
    if not isinstance(arr, types.Array):
        return None
    if arr.dtype == types.float32:
        return _F32, _cvt_f32, lambda b, v: v
    if arr.dtype == types.uint16:
        return _I16, _cvt_f16, lambda b, v: b.fpext(b.bitcast(v, ir.HalfType()), _F32)
    return None


@intrinsic
def _ld_kv8(typingctx, arr, i):
    """8 values of a KV cache (float32, or halves as uint16) at array offset i as float32 lanes."""
    kind = _kv_element(arr)
    if kind is None:
        return None

    def codegen(context, builder, sig, args):
        p = _elem_ptr(context, builder, sig.args[0], args[0], args[1], ir.VectorType(kind[0], 8))
        return kind[1](builder, builder.load(p, align=1))

    return _f32x8(arr, types.intp), codegen


@intrinsic
def _ld_kv1(typingctx, arr, i):
    """One value of a KV cache at array offset i as float32."""
    kind = _kv_element(arr)
    if kind is None:
        return None

    def codegen(context, builder, sig, args):
        p = _elem_ptr(context, builder, sig.args[0], args[0], args[1], kind[0])
        return kind[2](builder, builder.load(p, align=1))

    return types.float32(arr, types.intp), codegen


@intrinsic
def _st_kv1(typingctx, arr, i, v):
    """Store one float32 into a KV cache at array offset i (as a half, rounded to nearest even, for f16)."""
    kind = _kv_element(arr)
    if kind is None:
        return None

    def codegen(context, builder, sig, args):
        value = args[2]
        if kind[0] is _I16:
            value = builder.bitcast(builder.fptrunc(value, ir.HalfType()), _I16)
        builder.store(value, _elem_ptr(context, builder, sig.args[0], args[0], args[1], kind[0]), align=1)
        return context.get_dummy_value()

    return types.none(arr, types.intp, types.float32), codegen


@intrinsic
def _pow2(typingctx, n):
    """2**n as float32 for an integer-valued float32 n in [-126, 127], built from the exponent bits."""

    def codegen(context, builder, sig, args):
        e = builder.add(builder.fptosi(args[0], _I32), ir.Constant(_I32, 127))
        return builder.bitcast(builder.shl(e, ir.Constant(_I32, 23)), _F32)

    return types.float32(types.float32), codegen


@intrinsic
def _vzero(typingctx):
    def codegen(context, builder, sig, args):
        return ir.Constant(_V8F, [0.0] * 8)

    return _f32x8(), codegen


@intrinsic
def _vsplat(typingctx, s):
    def codegen(context, builder, sig, args):
        v = builder.insert_element(ir.Constant(_V8F, ir.Undefined), args[0], ir.Constant(_I32, 0))
        return builder.shuffle_vector(v, ir.Constant(_V8F, ir.Undefined), ir.Constant(_V8I, [0] * 8))

    return _f32x8(types.float32), codegen


@intrinsic
def _vadd(typingctx, a, b):
    def codegen(context, builder, sig, args):
        return builder.fadd(args[0], args[1])

    return _f32x8(_f32x8, _f32x8), codegen


@intrinsic
def _vmul(typingctx, a, b):
    def codegen(context, builder, sig, args):
        return builder.fmul(args[0], args[1])

    return _f32x8(_f32x8, _f32x8), codegen


@intrinsic
def _vfma(typingctx, a, b, c):
    """a * b + c (fused where the CPU has FMA)."""

    def codegen(context, builder, sig, args):
        return builder.fadd(builder.fmul(args[0], args[1], flags=_CONTRACT), args[2], flags=_CONTRACT)

    return _f32x8(_f32x8, _f32x8, _f32x8), codegen


@intrinsic
def _vsum(typingctx, a):
    """Horizontal sum of the 8 lanes (pairwise tree, fixed order)."""

    def codegen(context, builder, sig, args):
        v, n = args[0], 8
        while n > 1:
            h = n // 2
            mask_lo = ir.Constant(ir.VectorType(_I32, h), list(range(h)))
            mask_hi = ir.Constant(ir.VectorType(_I32, h), list(range(h, n)))
            v = builder.fadd(builder.shuffle_vector(v, v, mask_lo), builder.shuffle_vector(v, v, mask_hi))
            n = h
        return builder.extract_element(v, ir.Constant(_I32, 0))

    return types.float32(_f32x8), codegen


@intrinsic
def _vsum8(typingctx, a0, a1, a2, a3, a4, a5, a6, a7):
    """Lane i of the result = horizontal sum of argument i (a transposing pairwise tree, 7 adds)."""

    def codegen(context, builder, sig, args):
        even = ir.Constant(_V8I, [0, 2, 4, 6, 8, 10, 12, 14])
        odd = ir.Constant(_V8I, [1, 3, 5, 7, 9, 11, 13, 15])

        def pair(a, b):  # lanes 0-3: adjacent-pair sums of a; lanes 4-7: those of b
            return builder.fadd(builder.shuffle_vector(a, b, even), builder.shuffle_vector(a, b, odd))

        v = list(args)
        while len(v) > 1:
            v = [pair(v[i], v[i + 1]) for i in range(0, len(v), 2)]
        return v[0]

    return _f32x8(*([_f32x8] * 8)), codegen


@intrinsic
def _vget(typingctx, v, i):
    """Lane i of v (i known only at run time)."""

    def codegen(context, builder, sig, args):
        return builder.extract_element(args[0], builder.trunc(args[1], _I32))

    return types.float32(_f32x8, types.intp), codegen


# ---------------------------------------------------------------------------------------------------------
# Loads of packed codes: 5- and 6-bit values split over a nibble and high bits elsewhere in the block, and
# the 6-bit sub-block scales of Q4_K/Q5_K. Shift and mask arguments are constants at every call site, so
# LLVM folds them into immediate operands.
# ---------------------------------------------------------------------------------------------------------


def _splat_i32(builder, v):
    """<8 x i32> of the integer v (any width)."""
    v = builder.trunc(v, _I32) if v.type.width > 32 else v
    v = builder.insert_element(ir.Constant(_V8I, ir.Undefined), v, ir.Constant(_I32, 0))
    return builder.shuffle_vector(v, ir.Constant(_V8I, ir.Undefined), ir.Constant(_V8I, [0] * 8))


def _bytes8(context, builder, sig, args, k):
    """The 8 bytes at offset args[k] of array args[0], zero-extended to <8 x i32>."""
    p = _elem_ptr(context, builder, sig.args[0], args[0], args[k], ir.VectorType(_I8, 8))
    return builder.zext(builder.load(p, align=1), _V8I)


def _i32x8(values):
    return ir.Constant(_V8I, list(values))


@intrinsic
def _ld_q5x8(typingctx, arr, oq, shift, oh, bit0):
    """Q5_0/Q5_1 codes: ((byte >> shift) & 15) | bit (bit0 + lane) of the uint32 at oh, as bit 4."""
    if not isinstance(arr, types.Array):
        return None

    def codegen(context, builder, sig, args):
        q = builder.and_(
            builder.lshr(_bytes8(context, builder, sig, args, 1), _splat_i32(builder, args[2])),
            _i32x8([15] * 8),
        )
        h = builder.load(_elem_ptr(context, builder, sig.args[0], args[0], args[3], _I32), align=1)
        bits = builder.add(_splat_i32(builder, args[4]), _i32x8(range(8)))
        hb = builder.shl(
            builder.and_(builder.lshr(_splat_i32(builder, h), bits), _i32x8([1] * 8)), _i32x8([4] * 8)
        )
        return builder.sitofp(builder.or_(q, hb), _V8F)

    return _f32x8(arr, types.intp, types.intp, types.intp, types.intp), codegen


@intrinsic
def _ld_hb8(typingctx, arr, oq, shift, oh, hshift, hmask):
    """K-quant codes ((q >> shift) & 15) | (((h >> hshift) & hmask) << 4) from the 8 bytes q at oq and the 8
    bytes h at oh (Q5_K: hmask 1, Q6_K: hmask 3, Q4_K: hmask 0, the plain nibble)."""
    if not isinstance(arr, types.Array):
        return None

    def codegen(context, builder, sig, args):
        q = builder.and_(
            builder.lshr(_bytes8(context, builder, sig, args, 1), _splat_i32(builder, args[2])),
            _i32x8([15] * 8),
        )
        h = builder.lshr(_bytes8(context, builder, sig, args, 3), _splat_i32(builder, args[4]))
        h = builder.shl(builder.and_(h, _splat_i32(builder, args[5])), _i32x8([4] * 8))
        return builder.sitofp(builder.or_(q, h), _V8F)

    return _f32x8(arr, types.intp, types.intp, types.intp, types.intp, types.intp), codegen


def _k4_loader(lo_lanes, lo_shift, hi_lanes, doc):
    """An intrinsic reading the 12 scale bytes b at offset o of a Q4_K/Q5_K super-block and returning, for
    sub-blocks 0..7, ((b[lo] >> lo_shift) & (63, or 15 from lane 4)) | (b[hi] >> 6) << 4 (lanes 4..7 only)."""
    lo_mask = _i32x8([63] * 4 + [15] * 4)
    hi_mask = _i32x8([0] * 4 + [48] * 4)  # (b >> 2) & 48 == (b >> 6) << 4

    @intrinsic
    def load(typingctx, arr, o):
        if not isinstance(arr, types.Array):
            return None

        def codegen(context, builder, sig, args):
            p = _elem_ptr(context, builder, sig.args[0], args[0], args[1], ir.VectorType(_I8, 16))
            b = builder.load(p, align=1)
            lo = builder.zext(builder.shuffle_vector(b, b, _i32x8(lo_lanes)), _V8I)
            hi = builder.zext(builder.shuffle_vector(b, b, _i32x8(hi_lanes)), _V8I)
            lo = builder.and_(builder.lshr(lo, _i32x8(lo_shift)), lo_mask)
            hi = builder.and_(builder.lshr(hi, _i32x8([2] * 8)), hi_mask)
            return builder.sitofp(builder.or_(lo, hi), _V8F)

        return _f32x8(arr, types.intp), codegen

    load.__doc__ = doc
    return load


_ld_k4_scales = _k4_loader(
    [0, 1, 2, 3, 8, 9, 10, 11],
    [0] * 8,
    [0, 1, 2, 3, 0, 1, 2, 3],
    "The eight 6-bit sub-block scales of a Q4_K/Q5_K super-block (scale bytes at o).",
)
_ld_k4_mins = _k4_loader(
    [4, 5, 6, 7, 8, 9, 10, 11],
    [0] * 4 + [4] * 4,
    [4, 5, 6, 7, 4, 5, 6, 7],
    "The eight 6-bit sub-block mins of a Q4_K/Q5_K super-block (scale bytes at o).",
)


def _store_codes(context, builder, buf_type, buf, codes):
    """Store <32 x i8> code vectors one after another from buf[0], then a compiler memory barrier.

    The kernels read the codes back with widening 8-byte loads; without the barrier LLVM forwards the stored
    bytes through registers with lane shuffles instead, which costs more than the reload (~20% on Q6_K).
    """
    for k, c in enumerate(codes):
        at = ir.Constant(_I64, 32 * k)
        builder.store(c, _elem_ptr(context, builder, buf_type, buf, at, c.type), align=1)
    builder.asm(ir.FunctionType(ir.VoidType(), []), "", "~{memory}", [], side_effect=True)


@intrinsic
def _q5k_unpack(typingctx, arr, oq, oh, bit, buf):
    """The 64 five-bit codes of a Q5_K chunk into buf[0:64] as bytes, in value order: low nibbles of the 32
    bytes at oq with bit `bit` of the 32 bytes at oh, then high nibbles with bit `bit` + 1."""
    if not isinstance(arr, types.Array) or not isinstance(buf, types.Array):
        return None

    def codegen(context, builder, sig, args):
        v32 = ir.VectorType(_I8, 32)
        q = builder.load(_elem_ptr(context, builder, sig.args[0], args[0], args[1], v32), align=1)
        h = builder.load(_elem_ptr(context, builder, sig.args[0], args[0], args[2], v32), align=1)
        b = builder.trunc(args[3], _I8)
        b = builder.shuffle_vector(
            builder.insert_element(ir.Constant(v32, ir.Undefined), b, ir.Constant(_I32, 0)),
            ir.Constant(v32, ir.Undefined),
            ir.Constant(ir.VectorType(_I32, 32), [0] * 32),
        )
        one, m4, b4 = ir.Constant(v32, [1] * 32), ir.Constant(v32, [15] * 32), ir.Constant(v32, [4] * 32)
        lo = builder.or_(builder.and_(q, m4), builder.shl(builder.and_(builder.lshr(h, b), one), b4))
        b1 = builder.add(b, one)
        hi = builder.or_(builder.lshr(q, b4), builder.shl(builder.and_(builder.lshr(h, b1), one), b4))
        _store_codes(context, builder, sig.args[4], args[4], (lo, hi))
        return context.get_dummy_value()

    return types.none(arr, types.intp, types.intp, types.intp, buf), codegen


@intrinsic
def _q6_unpack(typingctx, arr, ql, qh, buf):
    """The 128 six-bit codes of a Q6_K half-block (low bits at ql, high bits at qh) into buf[0:128] as bytes,
    in value order, assembled 32 at a time in byte lanes (cheaper than per 8 values in 32-bit lanes)."""
    if not isinstance(arr, types.Array) or not isinstance(buf, types.Array):
        return None

    def codegen(context, builder, sig, args):
        v32 = ir.VectorType(_I8, 32)

        def splat(n):
            return ir.Constant(v32, [n] * 32)

        def load(i):
            return builder.load(_elem_ptr(context, builder, sig.args[0], args[0], i, v32), align=1)

        lo, hi = load(args[1]), load(builder.add(args[1], ir.Constant(args[1].type, 32)))
        h = load(args[2])
        m4, m6 = splat(15), splat(48)
        codes = (
            builder.or_(builder.and_(lo, m4), builder.and_(builder.shl(h, splat(4)), m6)),
            builder.or_(builder.and_(hi, m4), builder.and_(builder.shl(h, splat(2)), m6)),
            builder.or_(builder.lshr(lo, splat(4)), builder.and_(h, m6)),
            builder.or_(builder.lshr(hi, splat(4)), builder.and_(builder.lshr(h, splat(2)), m6)),
        )
        _store_codes(context, builder, sig.args[3], args[3], codes)
        return context.get_dummy_value()

    return types.none(arr, types.intp, types.intp, buf), codegen


# ---------------------------------------------------------------------------------------------------------
# Integer block dots: the 32 byte codes of a weight block times the 32 signed codes of a Q80 activation
# block, summed exactly in eight 32-bit lanes (lane i: values 4i..4i+3). With AVX2, unsigned x signed
# products go through vpmaddubsw (pairs into 16 bits, exact for codes below 64) and vpmaddwd (into 32 bits),
# the integer path distributed-llama takes, or with AVX-VNNI one vpdpbusd (4-byte dots into 32 bits, no
# 16-bit step); elsewhere widening vector IR that LLVM lowers to the target's SIMD. Numba compiles for this
# host, so the choice is made once, here.
# ---------------------------------------------------------------------------------------------------------

_V32B, _V32W, _V16W = ir.VectorType(_I8, 32), ir.VectorType(_I16, 32), ir.VectorType(_I16, 16)
_X86_AVX2 = (
    platform.machine().lower() in ("x86_64", "amd64")
    and not numba.config.CPU_NAME  # an explicit NUMBA_CPU_NAME target may lack AVX2
    and bool(llvm_binding.get_host_cpu_features().get("avx2", False))
)
_X86_VNNI = _X86_AVX2 and bool(llvm_binding.get_host_cpu_features().get("avxvnni", False))


class _I8x32Type(types.Type):
    """numba type of 32 int8 lanes in a register."""

    def __init__(self) -> None:
        super().__init__(name="I8x32")


class _I32x8Type(types.Type):
    """numba type of 8 int32 lanes in a register."""

    def __init__(self) -> None:
        super().__init__(name="I32x8")


_b32, _w8 = _I8x32Type(), _I32x8Type()  # numba types (names apart from the IR helpers)


@register_model(_I8x32Type)
class _I8x32Model(models.PrimitiveModel):
    def __init__(self, dmm, fe_type):
        super().__init__(dmm, fe_type, _V32B)


@register_model(_I32x8Type)
class _I32x8Model(models.PrimitiveModel):
    def __init__(self, dmm, fe_type):
        super().__init__(dmm, fe_type, _V8I)


@intrinsic
def _ld_b32(typingctx, arr, i):
    """The 32 bytes at array offset i."""
    if not isinstance(arr, types.Array):
        return None

    def codegen(context, builder, sig, args):
        return builder.load(_elem_ptr(context, builder, sig.args[0], args[0], args[1], _V32B), align=1)

    return _b32(arr, types.intp), codegen


def _nib32(context, builder, arrty, arr, i):
    """<32 x i8> of the 32 nibbles of the 16 bytes at offset i in legacy block order: low, then high."""
    v16 = ir.VectorType(_I8, 16)
    b = builder.load(_elem_ptr(context, builder, arrty, arr, i, v16), align=1)
    lo = builder.and_(b, ir.Constant(v16, [15] * 16))
    hi = builder.lshr(b, ir.Constant(v16, [4] * 16))
    return builder.shuffle_vector(lo, hi, ir.Constant(ir.VectorType(_I32, 32), list(range(32))))


@intrinsic
def _ld_nib32(typingctx, arr, i):
    """The 32 four-bit codes of a Q4_0/Q4_1 block from its 16 nibble bytes at offset i."""
    if not isinstance(arr, types.Array):
        return None

    def codegen(context, builder, sig, args):
        return _nib32(context, builder, sig.args[0], args[0], args[1])

    return _b32(arr, types.intp), codegen


@intrinsic
def _ld_q5_32(typingctx, arr, oq, oh):
    """The 32 five-bit codes of a Q5_0/Q5_1 block: the nibbles at oq with bit j of the uint32 at oh as bit 4
    of value j."""
    if not isinstance(arr, types.Array):
        return None

    def codegen(context, builder, sig, args):
        v32i = ir.VectorType(_I32, 32)
        q = _nib32(context, builder, sig.args[0], args[0], args[1])
        h = builder.load(_elem_ptr(context, builder, sig.args[0], args[0], args[2], _I32), align=1)
        h = builder.insert_element(ir.Constant(v32i, ir.Undefined), h, ir.Constant(_I32, 0))
        h = builder.shuffle_vector(h, ir.Constant(v32i, ir.Undefined), ir.Constant(v32i, [0] * 32))
        bit = builder.and_(builder.lshr(h, ir.Constant(v32i, list(range(32)))), ir.Constant(v32i, [1] * 32))
        return builder.or_(q, builder.shl(builder.trunc(bit, _V32B), ir.Constant(_V32B, [4] * 32)))

    return _b32(arr, types.intp, types.intp), codegen


@intrinsic
def _bsplat(typingctx, n):
    """32 bytes of the constant n."""
    if not isinstance(n, types.IntegerLiteral):
        return None
    value = n.literal_value

    def codegen(context, builder, sig, args):
        return ir.Constant(_V32B, [value] * 32)

    return _b32(n), codegen


def _pair_sums(builder, v, lanes):
    """Adjacent-pair sums of the `lanes`-lane vector v."""
    even = ir.Constant(ir.VectorType(_I32, lanes // 2), list(range(0, lanes, 2)))
    odd = ir.Constant(ir.VectorType(_I32, lanes // 2), list(range(1, lanes, 2)))
    return builder.add(builder.shuffle_vector(v, v, even), builder.shuffle_vector(v, v, odd))


def _udot_ir(builder, acc, u, s):
    """IR of acc + the lane dots of _udot: one vpdpbusd with AVX-VNNI, else vpmaddubsw and vpmaddwd with
    AVX2 (pairs into 16 bits, exact for codes below 64), else widening vector IR."""
    if _X86_VNNI:
        dpbusd = cgutils.get_or_insert_function(
            builder.module, ir.FunctionType(_V8I, [_V8I, _V8I, _V8I]), "llvm.x86.avx512.vpdpbusd.256"
        )
        return builder.call(dpbusd, [acc, builder.bitcast(u, _V8I), builder.bitcast(s, _V8I)])
    if _X86_AVX2:
        madd_ub = cgutils.get_or_insert_function(
            builder.module, ir.FunctionType(_V16W, [_V32B, _V32B]), "llvm.x86.avx2.pmadd.ub.sw"
        )
        madd_wd = cgutils.get_or_insert_function(
            builder.module, ir.FunctionType(_V8I, [_V16W, _V16W]), "llvm.x86.avx2.pmadd.wd"
        )
        pairs = builder.call(madd_ub, [u, s])
        return builder.add(acc, builder.call(madd_wd, [pairs, ir.Constant(_V16W, [1] * 16)]))
    prod = builder.mul(builder.zext(u, _V32W), builder.sext(s, _V32W))
    dots = _pair_sums(builder, builder.sext(_pair_sums(builder, prod, 32), ir.VectorType(_I32, 16)), 16)
    return builder.add(acc, dots)


@intrinsic
def _udot(typingctx, u, s):
    """Lane i = sum_{j<4} u[4i+j] * s[4i+j], u unsigned codes below 64, s signed bytes (exact)."""

    def codegen(context, builder, sig, args):
        return _udot_ir(builder, ir.Constant(_V8I, [0] * 8), args[0], args[1])

    return _w8(_b32, _b32), codegen


@intrinsic
def _udot_add(typingctx, acc, u, s):
    """acc + _udot(u, s)."""

    def codegen(context, builder, sig, args):
        return _udot_ir(builder, args[0], args[1], args[2])

    return _w8(_w8, _b32, _b32), codegen


# Four-bit codes (Q4_0, Q4_1) times signed bytes: a product pair is at most 2 * 15 * 128 = 3840, so the
# eight slices of a block sum exactly in 16-bit lanes and one widening (vpmaddwd) per block follows, instead
# of one per slice. Not with AVX-VNNI, whose single vpdpbusd already does both steps.
_PAIRS16 = not _X86_VNNI


@intrinsic
def _pairs_add(typingctx, acc, u, s):
    """acc (16 int16 lanes held in 32 bytes) + the adjacent-pair sums of u[i] * s[i], u unsigned codes below
    16, s signed bytes: vpmaddubsw and vpaddw with AVX2, widening vector IR elsewhere (exact)."""

    def codegen(context, builder, sig, args):
        u, s = args[1], args[2]
        if _X86_AVX2:
            madd_ub = cgutils.get_or_insert_function(
                builder.module, ir.FunctionType(_V16W, [_V32B, _V32B]), "llvm.x86.avx2.pmadd.ub.sw"
            )
            pairs = builder.call(madd_ub, [u, s])
        else:
            pairs = _pair_sums(builder, builder.mul(builder.zext(u, _V32W), builder.sext(s, _V32W)), 32)
        return builder.bitcast(builder.add(builder.bitcast(args[0], _V16W), pairs), _V32B)

    return _b32(_b32, _b32, _b32), codegen


@intrinsic
def _pairs_sum(typingctx, acc):
    """Eight int32 lanes: lane i = int16 lanes 2i and 2i+1 of acc summed (vpmaddwd with ones on x86)."""

    def codegen(context, builder, sig, args):
        return _pair_sums(builder, builder.sext(builder.bitcast(args[0], _V16W), ir.VectorType(_I32, 16)), 16)

    return _w8(_b32), codegen


@intrinsic
def _sdot(typingctx, a, b):
    """Eight int32 lanes summing to the exact dot of two signed 32-byte vectors."""

    def codegen(context, builder, sig, args):
        v32i = ir.VectorType(_I32, 32)  # LLVM turns this widening multiply-add into vpmaddwd on x86
        wide = builder.mul(builder.sext(args[0], v32i), builder.sext(args[1], v32i))
        return _pair_sums(builder, _pair_sums(builder, wide, 32), 16)

    return _w8(_b32, _b32), codegen


@intrinsic
def _isub(typingctx, a, b):
    def codegen(context, builder, sig, args):
        return builder.sub(args[0], args[1])

    return _w8(_w8, _w8), codegen


@intrinsic
def _itof(typingctx, a):
    """int32 lanes to float32 lanes (exact below 2**24)."""

    def codegen(context, builder, sig, args):
        return builder.sitofp(args[0], _V8F)

    return _f32x8(_w8), codegen


# ---------------------------------------------------------------------------------------------------------
# Weight types, from engine.weight_types. Kernels see a weight as one read-only byte array: row r of expert e
# starts at byte e * estride + r * rstride. The code (the registry's small integer) picks the decoder; it is
# a compile-time constant in the matrix-vector kernels, built per type.
# ---------------------------------------------------------------------------------------------------------

_T_F32, _T_F16, _T_BF16 = (weight_type(n).code for n in ("f32", "f16", "bf16"))
_T_Q40, _T_Q41, _T_Q50, _T_Q51, _T_Q80 = (weight_type(n).code for n in ("q40", "q41", "q50", "q51", "q80"))
_T_Q4K, _T_Q5K, _T_Q6K = (weight_type(n).code for n in ("q4k", "q5k", "q6k"))
_FLOAT_CODES = (_T_F32, _T_F16, _T_BF16)
KV_DTYPES = {"f32": np.dtype(np.float32), "f16": np.dtype(np.uint16)}  # KV-cache types: halves as their bits
_LEGACY_CODES = (_T_Q40, _T_Q41, _T_Q50, _T_Q51, _T_Q80)  # 32-value blocks
_K_CODES = (_T_Q4K, _T_Q5K, _T_Q6K)  # 256-value super-blocks
_BLOCK_BYTES = tuple(t.block_bytes for t in sorted(WEIGHT_TYPES.values(), key=lambda t: t.code))
_Q80_BYTES = weight_type("q80").block_bytes  # Q80 activations: 32 values per block


@_helper
def _wload8(code, w, o):
    """8 float-typed weights from byte o."""
    if code == _T_F32:
        return _ld_f32x8(w, o)
    if code == _T_F16:
        return _ld_f16x8(w, o)
    return _ld_bf16x8(w, o)


@_helper
def _wload1(code, w, o):
    if code == _T_F32:
        return _ld_f32(w, o)
    if code == _T_F16:
        return _ld_f16(w, o)
    return _ld_bf16(w, o)


@_helper
def _q5x32(w, oq, oh):
    """The 32 five-bit codes of a Q5_0/Q5_1 block (nibbles at oq, high bits at oh) as four 8-lane vectors."""
    return (
        _ld_q5x8(w, oq, 0, oh, 0),
        _ld_q5x8(w, oq + 8, 0, oh, 8),
        _ld_q5x8(w, oq, 4, oh, 16),
        _ld_q5x8(w, oq + 8, 4, oh, 24),
    )


@_helper
def _qblock(code, w, o, x0, x1, x2, x3, sx):
    """One legacy weight block (bytes o..) dotted with float32 x0..x3 (sx = their sum), as 8 lanes.

    Q40: d*sum((n-8)*x); Q41: d*sum(n*x) + m*sum(x); Q50: d*(sum(q*x) - 16*sum(x)); Q51: d*sum(q*x) +
    m*sum(x); Q80: d*sum(q*x).
    """
    if code == _T_Q41:
        p = _vmul(_ld_lo4x8(w, o + 4), x0)
        p = _vfma(_ld_lo4x8(w, o + 12), x1, p)
        p = _vfma(_ld_hi4x8(w, o + 4), x2, p)
        p = _vfma(_ld_hi4x8(w, o + 12), x3, p)
        return _vfma(_vsplat(_ld_f16(w, o)), p, _vmul(_vsplat(_ld_f16(w, o + 2)), sx))
    if code == _T_Q40:
        m8 = _vsplat(np.float32(-8.0))
        p = _vmul(_vadd(_ld_lo4x8(w, o + 2), m8), x0)
        p = _vfma(_vadd(_ld_lo4x8(w, o + 10), m8), x1, p)
        p = _vfma(_vadd(_ld_hi4x8(w, o + 2), m8), x2, p)
        p = _vfma(_vadd(_ld_hi4x8(w, o + 10), m8), x3, p)
        return _vmul(_vsplat(_ld_f16(w, o)), p)
    if code == _T_Q50:
        q0, q1, q2, q3 = _q5x32(w, o + 6, o + 2)
        p = _vfma(q3, x3, _vfma(q2, x2, _vfma(q1, x1, _vmul(q0, x0))))
        return _vmul(_vsplat(_ld_f16(w, o)), _vfma(_vsplat(np.float32(-16.0)), sx, p))
    if code == _T_Q51:
        q0, q1, q2, q3 = _q5x32(w, o + 8, o + 4)
        p = _vfma(q3, x3, _vfma(q2, x2, _vfma(q1, x1, _vmul(q0, x0))))
        return _vfma(_vsplat(_ld_f16(w, o)), p, _vmul(_vsplat(_ld_f16(w, o + 2)), sx))
    p = _vmul(_ld_i8x8(w, o + 2), x0)
    p = _vfma(_ld_i8x8(w, o + 10), x1, p)
    p = _vfma(_ld_i8x8(w, o + 18), x2, p)
    p = _vfma(_ld_i8x8(w, o + 26), x3, p)
    return _vmul(_vsplat(_ld_f16(w, o)), p)


@_inline_helper
def _k45_chunk(w, oq, oh, c, five, x, xo, buf, sc, a0, a1):
    """a0 + sc[2c] * (dot of sub-block 2c: low nibbles of the 32 bytes at oq, x[xo:xo+32]) and a1 + sc[2c+1]
    * (dot of sub-block 2c+1: high nibbles, x[xo+32:xo+64]) of a Q4_K chunk, or of a Q5_K chunk (fifth bits
    at oh) when `five`; buf is 64 bytes of scratch."""
    lo, hi = _vzero(), _vzero()
    if five:
        _q5k_unpack(w, oq, oh, 2 * c, buf)
        for j in range(0, 32, 8):
            lo = _vfma(_ld_u8x8(buf, j), _ld_f32x8(x, xo + j), lo)
            hi = _vfma(_ld_u8x8(buf, 32 + j), _ld_f32x8(x, xo + 32 + j), hi)
    else:
        for j in range(0, 32, 8):
            lo = _vfma(_ld_lo4x8(w, oq + j), _ld_f32x8(x, xo + j), lo)
            hi = _vfma(_ld_hi4x8(w, oq + j), _ld_f32x8(x, xo + 32 + j), hi)
    return _vfma(_vsplat(_vget(sc, 2 * c)), lo, a0), _vfma(_vsplat(_vget(sc, 2 * c + 1)), hi, a1)


@_inline_helper
def _dot16(buf, i, x, xo):
    """8 lanes summing to the dot of the 16 byte codes buf[i:i+16] with x[xo:xo+16]."""
    return _vfma(_ld_u8x8(buf, i + 8), _ld_f32x8(x, xo + 8), _vmul(_ld_u8x8(buf, i), _ld_f32x8(x, xo)))


@_inline_helper
def _k6_half(w, ql, qh, x, xo, buf, sc):
    """sum_k sc[k] * (dot of sub-block k of a Q6_K half-block with x from xo), codes without their -32;
    buf is 128 bytes of scratch. Two accumulators halve the chain of dependent FMAs."""
    _q6_unpack(w, ql, qh, buf)
    a0, a1 = _vzero(), _vzero()
    for k in range(0, 8, 2):
        a0 = _vfma(_vsplat(_vget(sc, k)), _dot16(buf, 16 * k, x, xo + 16 * k), a0)
        a1 = _vfma(_vsplat(_vget(sc, k + 1)), _dot16(buf, 16 * k + 16, x, xo + 16 * k + 16), a1)
    return _vadd(a0, a1)


@_inline_helper
def _krow(code, w, o, xf, xs, xd, xo, go, n_super, q80x, buf):
    """One K-quant row (bytes o..) dotted with the prepared activations, as 8 lanes to be summed.

    xf holds the values (or Q80 codes) from element xo, xs their per-sub-block sums (times the Q80 scale) and
    xd the Q80 scale per sub-block, both from element go. Per sub-block the dot of the codes with xf comes
    first (an exact integer for Q80 activations), then its scale; the mins (Q6_K: the -32 offset) meet the
    sums xs once per super-block.
    """
    bs = _BLOCK_BYTES[code]
    acc = _vzero()
    for sb in range(n_super):
        ob, xb = o + bs * sb, xo + 256 * sb
        if code == _T_Q6K:
            d = _vsplat(_ld_f16(w, ob + 208))
            for h in range(2):
                sc = _vmul(d, _ld_i8x8(w, ob + 192 + 8 * h))
                g = go + 16 * sb + 8 * h
                a = _vmul(sc, _ld_f32x8(xd, g)) if q80x else sc
                s = _k6_half(w, ob + 64 * h, ob + 128 + 32 * h, xf, xb + 128 * h, buf, a)
                acc = _vadd(s, _vfma(_vmul(_vsplat(np.float32(-32.0)), sc), _ld_f32x8(xs, g), acc))
        else:
            five = code == _T_Q5K
            oq = ob + (48 if five else 16)
            sc = _vmul(_vsplat(_ld_f16(w, ob)), _ld_k4_scales(w, ob + 4))
            mn = _vmul(_vsplat(-_ld_f16(w, ob + 2)), _ld_k4_mins(w, ob + 4))
            g = go + 8 * sb
            a = _vmul(sc, _ld_f32x8(xd, g)) if q80x else sc
            a0, a1 = _k45_chunk(
                w, oq, ob + 16, 0, five, xf, xb, buf, a, _vfma(mn, _ld_f32x8(xs, g), acc), _vzero()
            )
            a0, a1 = _k45_chunk(w, oq + 32, ob + 16, 1, five, xf, xb + 64, buf, a, a0, a1)
            a0, a1 = _k45_chunk(w, oq + 64, ob + 16, 2, five, xf, xb + 128, buf, a, a0, a1)
            a0, a1 = _k45_chunk(w, oq + 96, ob + 16, 3, five, xf, xb + 192, buf, a, a0, a1)
            acc = _vadd(a0, a1)
    return acc


# ---------------------------------------------------------------------------------------------------------
# Row decoders: the float32 values of one weight row (embedding lookups, batched matmul scratch)
# ---------------------------------------------------------------------------------------------------------


@_helper
def _decode_float(code, w, o, dst):
    eb = _BLOCK_BYTES[code]
    cols = dst.shape[0]
    i = 0
    while i + 8 <= cols:
        _st_f32x8(dst, i, _wload8(code, w, o + eb * i))
        i += 8
    for j in range(i, cols):
        dst[j] = _wload1(code, w, o + eb * j)


@_helper
def _decode_legacy(code, w, o, dst):
    bs = _BLOCK_BYTES[code]
    for k in range(dst.shape[0] // 32):
        ob, i = o + bs * k, 32 * k
        d = _vsplat(_ld_f16(w, ob))
        if code == _T_Q41:
            m = _vsplat(_ld_f16(w, ob + 2))
            _st_f32x8(dst, i, _vfma(d, _ld_lo4x8(w, ob + 4), m))
            _st_f32x8(dst, i + 8, _vfma(d, _ld_lo4x8(w, ob + 12), m))
            _st_f32x8(dst, i + 16, _vfma(d, _ld_hi4x8(w, ob + 4), m))
            _st_f32x8(dst, i + 24, _vfma(d, _ld_hi4x8(w, ob + 12), m))
        elif code == _T_Q40:
            m8 = _vsplat(np.float32(-8.0))
            _st_f32x8(dst, i, _vmul(d, _vadd(_ld_lo4x8(w, ob + 2), m8)))
            _st_f32x8(dst, i + 8, _vmul(d, _vadd(_ld_lo4x8(w, ob + 10), m8)))
            _st_f32x8(dst, i + 16, _vmul(d, _vadd(_ld_hi4x8(w, ob + 2), m8)))
            _st_f32x8(dst, i + 24, _vmul(d, _vadd(_ld_hi4x8(w, ob + 10), m8)))
        elif code == _T_Q50 or code == _T_Q51:
            if code == _T_Q50:
                q0, q1, q2, q3 = _q5x32(w, ob + 6, ob + 2)
                m = _vmul(d, _vsplat(np.float32(-16.0)))
            else:
                q0, q1, q2, q3 = _q5x32(w, ob + 8, ob + 4)
                m = _vsplat(_ld_f16(w, ob + 2))
            _st_f32x8(dst, i, _vfma(d, q0, m))
            _st_f32x8(dst, i + 8, _vfma(d, q1, m))
            _st_f32x8(dst, i + 16, _vfma(d, q2, m))
            _st_f32x8(dst, i + 24, _vfma(d, q3, m))
        else:
            for j in range(4):
                _st_f32x8(dst, i + 8 * j, _vmul(d, _ld_i8x8(w, ob + 2 + 8 * j)))


@_helper
def _decode_k(code, w, o, dst):
    bs = _BLOCK_BYTES[code]
    for sb in range(dst.shape[0] // 256):
        ob, i0 = o + bs * sb, 256 * sb
        if code == _T_Q6K:
            m32 = _vsplat(np.float32(-32.0))
            for h in range(2):
                ql, qh, ih = ob + 64 * h, ob + 128 + 32 * h, i0 + 128 * h
                sc = _vmul(_vsplat(_ld_f16(w, ob + 208)), _ld_i8x8(w, ob + 192 + 8 * h))
                for j in range(0, 32, 8):
                    k = j // 16
                    q = _ld_hb8(w, ql + j, 0, qh + j, 0, 3)
                    _st_f32x8(dst, ih + j, _vmul(_vsplat(_vget(sc, k)), _vadd(q, m32)))
                    q = _ld_hb8(w, ql + 32 + j, 0, qh + j, 2, 3)
                    _st_f32x8(dst, ih + 32 + j, _vmul(_vsplat(_vget(sc, k + 2)), _vadd(q, m32)))
                    q = _ld_hb8(w, ql + j, 4, qh + j, 4, 3)
                    _st_f32x8(dst, ih + 64 + j, _vmul(_vsplat(_vget(sc, k + 4)), _vadd(q, m32)))
                    q = _ld_hb8(w, ql + 32 + j, 4, qh + j, 6, 3)
                    _st_f32x8(dst, ih + 96 + j, _vmul(_vsplat(_vget(sc, k + 6)), _vadd(q, m32)))
        else:
            hmask = 1 if code == _T_Q5K else 0
            oq = ob + (48 if code == _T_Q5K else 16)
            sc = _vmul(_vsplat(_ld_f16(w, ob)), _ld_k4_scales(w, ob + 4))
            mn = _vmul(_vsplat(-_ld_f16(w, ob + 2)), _ld_k4_mins(w, ob + 4))
            for sub in range(8):
                c, shift = sub // 2, 4 * (sub % 2)
                a, m = _vsplat(_vget(sc, sub)), _vsplat(_vget(mn, sub))
                for j in range(0, 32, 8):
                    q = _ld_hb8(w, oq + 32 * c + j, shift, ob + 16 + j, sub, hmask)
                    _st_f32x8(dst, i0 + 32 * sub + j, _vfma(a, q, m))


@_helper
def _decode_row(code, w, o, dst):
    """Full float32 values of the weight row at byte o into dst (cols,)."""
    if code == _T_F32 or code == _T_F16 or code == _T_BF16:
        _decode_float(code, w, o, dst)
    elif code == _T_Q4K or code == _T_Q5K or code == _T_Q6K:
        _decode_k(code, w, o, dst)
    else:
        _decode_legacy(code, w, o, dst)


# ---------------------------------------------------------------------------------------------------------
# Matrix-vector (B = 1), for a plain matrix or the k experts a token is routed to: slot s reads expert
# idx[s] and its input at byte s * xstride of x, and writes outputs s*rows... Work item g is quad g of every
# slot: rows g, g+q, g+2q, g+3q (q = rows/4). The four rows share the activation loads, and each thread reads
# four long sequential streams, which the hardware prefetcher follows (four adjacent rows per iteration
# restart the streams every few cache lines and halve the bandwidth). x is always bytes: float32 values or
# Q80 blocks. # Kernels are built per weight type so the type tests fold away at compile time.
# ---------------------------------------------------------------------------------------------------------


@_helper
def _far(g, i, q, rows):
    """Row i of quad g; past the end it repeats row g, so no two iterations write the same output."""
    g = np.int64(g)
    r = g + i * q
    return r if r < rows else g


@_helper
def _quad(g, q, rows):
    return _far(g, 0, q, rows), _far(g, 1, q, rows), _far(g, 2, q, rows), _far(g, 3, q, rows)


@_helper
def _xblock(x, xo, k):
    """Block k of the float32 activation row at byte xo as four 8-lane vectors and their sum."""
    o = xo + 128 * k
    x0, x1 = _ld_f32x8(x, o), _ld_f32x8(x, o + 32)
    x2, x3 = _ld_f32x8(x, o + 64), _ld_f32x8(x, o + 96)
    return x0, x1, x2, x3, _vadd(_vadd(x0, x1), _vadd(x2, x3))


@_helper
def _quad_f32(code, w, base, rstride, x, xo, out, oo, g, q, rows, cols):
    """Quad g of a 32-value block matrix (row r at byte base + r * rstride of w) times the float32 row at
    byte xo of x, into out[oo + r]."""
    bs = _BLOCK_BYTES[code]
    r0, r1, r2, r3 = _quad(g, q, rows)
    o0, o1 = base + r0 * rstride, base + r1 * rstride
    o2, o3 = base + r2 * rstride, base + r3 * rstride
    a0, a1, a2, a3 = _vzero(), _vzero(), _vzero(), _vzero()
    for k in range(cols // 32):
        x0, x1, x2, x3, sx = _xblock(x, xo, k)
        o = bs * k
        a0 = _vadd(a0, _qblock(code, w, o0 + o, x0, x1, x2, x3, sx))
        a1 = _vadd(a1, _qblock(code, w, o1 + o, x0, x1, x2, x3, sx))
        a2 = _vadd(a2, _qblock(code, w, o2 + o, x0, x1, x2, x3, sx))
        a3 = _vadd(a3, _qblock(code, w, o3 + o, x0, x1, x2, x3, sx))
    out[oo + r3], out[oo + r2] = _vsum(a3), _vsum(a2)
    out[oo + r1], out[oo + r0] = _vsum(a1), _vsum(a0)


def _make_mv_legacy(code: int):
    """B = 1 kernel for 32-value block weights and float32 x."""

    @_parallel_kernel
    def mv_legacy(w, rstride, estride, idx, x, xstride, out, rows, cols):
        q = (rows + 3) // 4
        for g in prange(q):
            for s in range(idx.shape[0]):
                _quad_f32(code, w, idx[s] * estride, rstride, x, s * xstride, out, s * rows, g, q, rows, cols)

    return mv_legacy


@_helper
def _xq80(x, o, code):
    """Q80 activation block at byte o: its codes, scale, exact sum of codes (float32) and the offset vector
    that takes the unsigned codes of Q4_0 (8) or Q5_0 (16) back to signed ones (udot(offset, codes))."""
    xv = _ld_b32(x, o + 2)
    if code == _T_Q40:
        off = _udot(_bsplat(8), xv)
    elif code == _T_Q50:
        off = _udot(_bsplat(16), xv)
    else:
        off = _udot(_bsplat(1), xv)  # Q4_1/Q5_1: the sum of the codes, which meets the block minimum
    return xv, _ld_f16(x, o), off


@_helper
def _wcodes(code, w, o):
    """The 32 codes of the legacy weight block at byte o: unsigned bytes (Q4_0 to Q5_1) or signed (Q8_0)."""
    if code == _T_Q40:
        return _ld_nib32(w, o + 2)
    if code == _T_Q41:
        return _ld_nib32(w, o + 4)
    if code == _T_Q50:
        return _ld_q5_32(w, o + 6, o + 2)
    if code == _T_Q51:
        return _ld_q5_32(w, o + 8, o + 4)
    return _ld_b32(w, o + 2)


@_helper
def _idot(code, wv, xv, off):
    """Exact integer dot (eight int32 lanes) of weight block codes wv (_wcodes) with Q80 codes xv, the
    offset of Q4_0/Q5_0 (_xq80) applied."""
    if code == _T_Q80:
        return _sdot(wv, xv)
    if code == _T_Q40 or code == _T_Q50:
        return _isub(_udot(wv, xv), off)
    return _udot(wv, xv)


@_helper
def _iacc(code, w, o, xv, off, dx, acc):
    """acc + d_w * d_x * (integer dot of the weight block at byte o with the Q80 block xv, scale dx); the
    Q4_1/Q5_1 minimum term is the caller's."""
    return _vfma(_vsplat(_ld_f16(w, o) * dx), _itof(_idot(code, _wcodes(code, w, o), xv, off)), acc)


@_helper
def _quad_q80(code, w, base, rstride, x, xo, out, oo, g, q, rows, cols):
    """Quad g of a matrix (row r at byte base + r * rstride of w) times the Q80 activation row at byte xo of
    x, into out[oo + r]: integer block dots, four rows sharing each activation block."""
    bs = _BLOCK_BYTES[code]
    r0, r1, r2, r3 = _quad(g, q, rows)
    o0, o1 = base + r0 * rstride, base + r1 * rstride
    o2, o3 = base + r2 * rstride, base + r3 * rstride
    a0, a1, a2, a3 = _vzero(), _vzero(), _vzero(), _vzero()
    m0, m1, m2, m3 = _vzero(), _vzero(), _vzero(), _vzero()
    for k in range(cols // 32):
        xv, dx, off = _xq80(x, xo + _Q80_BYTES * k, code)
        o = bs * k
        a0 = _iacc(code, w, o0 + o, xv, off, dx, a0)
        a1 = _iacc(code, w, o1 + o, xv, off, dx, a1)
        a2 = _iacc(code, w, o2 + o, xv, off, dx, a2)
        a3 = _iacc(code, w, o3 + o, xv, off, dx, a3)
        if code == _T_Q41 or code == _T_Q51:
            sx = _itof(off)  # lanes summing to the sum of the codes
            m0 = _vfma(_vsplat(_ld_f16(w, o0 + o + 2) * dx), sx, m0)
            m1 = _vfma(_vsplat(_ld_f16(w, o1 + o + 2) * dx), sx, m1)
            m2 = _vfma(_vsplat(_ld_f16(w, o2 + o + 2) * dx), sx, m2)
            m3 = _vfma(_vsplat(_ld_f16(w, o3 + o + 2) * dx), sx, m3)
    out[oo + r3], out[oo + r2] = _vsum(_vadd(a3, m3)), _vsum(_vadd(a2, m2))
    out[oo + r1], out[oo + r0] = _vsum(_vadd(a1, m1)), _vsum(_vadd(a0, m0))


def _make_mv_q80(code: int):
    """B = 1 kernel for 32-value block weights times Q80 activations (bytes x), per slot s: expert idx[s],
    its input at byte s * xstride, outputs s*rows..."""

    @_parallel_kernel
    def mv_q80(w, rstride, estride, idx, x, xstride, out, rows, cols):
        q = (rows + 3) // 4
        for g in prange(q):
            for s in range(idx.shape[0]):
                _quad_q80(code, w, idx[s] * estride, rstride, x, s * xstride, out, s * rows, g, q, rows, cols)

    return mv_q80


def _make_mv3(code: int, q80x: bool):
    """B = 1 kernel for up to three matrices of one 32-value block type and width sharing one input row x
    (bytes: Q80 blocks with q80x, else float32 values), as for q/k/v or gate/up: one parallel launch over all
    their quads. A matrix of 0 rows is absent. (The closure holds only an int and a bool: a captured
    dispatcher pickles with a per-process id, so the kernel would miss numba's cache in every process.)"""

    @_parallel_kernel
    def mv3(wa, wb, wc, rsa, rsb, rsc, x, outa, outb, outc, ra, rb, rc, cols):
        qa, qb, qc = (ra + 3) // 4, (rb + 3) // 4, (rc + 3) // 4
        for g in prange(qa + qb + qc):
            if g < qa:
                w, rs, out, q, nq, nr = wa, rsa, outa, g, qa, ra
            elif g < qa + qb:
                w, rs, out, q, nq, nr = wb, rsb, outb, g - qa, qb, rb
            else:
                w, rs, out, q, nq, nr = wc, rsc, outc, g - qa - qb, qc, rc
            if q80x:
                _quad_q80(code, w, 0, rs, x, 0, out, 0, q, nq, nr, cols)
            else:
                _quad_f32(code, w, 0, rs, x, 0, out, 0, q, nq, nr, cols)

    return mv3


@_helper
def _kprep(x, xstride, n_inputs, cols, q80x, group):
    """The activations of each slot input s as float32 values (Q80: the integer codes) at xf[s*cols..], their
    sums over groups of `group` values (Q80: times the block scale) at xs[s*cols/group..] and the Q80 scale
    of each group (1 for float32) at xd[s*cols/group..]."""
    n_groups = cols // group
    xf = np.empty(n_inputs * cols, np.float32)
    xs = np.empty(n_inputs * n_groups, np.float32)
    xd = np.ones(n_inputs * n_groups, np.float32)
    for s in range(n_inputs):
        for j in range(n_groups):
            total = np.float32(0.0)
            first = s * cols + j * group
            if q80x:
                ob = s * xstride + _Q80_BYTES * (j * group // 32)
                for i in range(group):
                    v = _ld_i8(x, ob + 2 + j * group % 32 + i)
                    xf[first + i] = v
                    total += v
                xd[s * n_groups + j] = _ld_f16(x, ob)
                xs[s * n_groups + j] = total * xd[s * n_groups + j]
            else:
                for i in range(group):
                    v = _ld_f32(x, s * xstride + 4 * (j * group + i))
                    xf[first + i] = v
                    total += v
                xs[s * n_groups + j] = total
    return xf, xs, xd


def _make_mv_k(code: int):
    """B = 1 kernel for K-quant weights; x float32 or Q80 bytes (q80x, a run-time flag: the activations are
    converted to float32 values or codes up front). One row per work item: the activations are not shared
    between rows, so a single sequential stream per row reads best."""

    @_parallel_kernel
    def mv_k(w, rstride, estride, idx, x, xstride, q80x, out, rows, cols, n_chunks):
        group = 16 if code == _T_Q6K else 32
        n_inputs = idx.shape[0] if xstride else 1
        xf, xs, xd = _kprep(x, xstride, n_inputs, cols, q80x, group)
        n_items = idx.shape[0] * rows
        for c in prange(n_chunks):
            buf = np.empty(128, np.uint8)
            first, end = n_items * c // n_chunks, n_items * (c + 1) // n_chunks
            s, r = first // rows, first % rows  # item t = s * rows + r: row r of slot s
            for t in range(first, end):
                xi = s if xstride else 0
                o = idx[s] * estride + r * rstride
                acc = _krow(code, w, o, xf, xs, xd, xi * cols, xi * cols // group, cols // 256, q80x, buf)
                out[t] = _vsum(acc)
                r += 1
                if r == rows:
                    s, r = s + 1, 0

    return mv_k


def _make_mv_float(code: int):
    """B = 1 kernel for f32/f16/bf16 weights and float32 x."""

    @_parallel_kernel
    def mv_float(w, rstride, estride, idx, x, xstride, out, rows, cols):
        eb = _BLOCK_BYTES[code]
        q = (rows + 3) // 4
        for g in prange(q):
            for s in range(idx.shape[0]):
                base, xo, oo = idx[s] * estride, s * xstride, s * rows
                r0, r1, r2, r3 = _quad(g, q, rows)
                o0, o1, o2, o3 = (
                    base + r0 * rstride,
                    base + r1 * rstride,
                    base + r2 * rstride,
                    base + r3 * rstride,
                )
                a0, a1, a2, a3 = _vzero(), _vzero(), _vzero(), _vzero()
                i = 0
                while i + 8 <= cols:
                    xv = _ld_f32x8(x, xo + 4 * i)
                    a0 = _vfma(_wload8(code, w, o0 + eb * i), xv, a0)
                    a1 = _vfma(_wload8(code, w, o1 + eb * i), xv, a1)
                    a2 = _vfma(_wload8(code, w, o2 + eb * i), xv, a2)
                    a3 = _vfma(_wload8(code, w, o3 + eb * i), xv, a3)
                    i += 8
                s0, s1, s2, s3 = _vsum(a0), _vsum(a1), _vsum(a2), _vsum(a3)
                for j in range(i, cols):
                    xj = _ld_f32(x, xo + 4 * j)
                    s0 += _wload1(code, w, o0 + eb * j) * xj
                    s1 += _wload1(code, w, o1 + eb * j) * xj
                    s2 += _wload1(code, w, o2 + eb * j) * xj
                    s3 += _wload1(code, w, o3 + eb * j) * xj
                out[oo + r3], out[oo + r2], out[oo + r1], out[oo + r0] = s3, s2, s1, s0

    return mv_float


# ---------------------------------------------------------------------------------------------------------
# Matrix-matrix (B > 1, prefill): each chunk of quads decodes its four rows once into scratch, then dots them
# with the activation rows two at a time (eight independent accumulators keep both FMA pipes busy). One
# kernel per weight type, so the decoder is straight-line code (a run-time type cost ~40% at B = 5).
# ---------------------------------------------------------------------------------------------------------


@_helper
def _dot4x2(buf, xa, xb, cols):
    """Dots of the four rows of buf with xa and with xb (8 sums, xa's first)."""
    b0, b1, b2, b3 = buf[0], buf[1], buf[2], buf[3]
    a0, a1, a2, a3 = _vzero(), _vzero(), _vzero(), _vzero()
    c0, c1, c2, c3 = _vzero(), _vzero(), _vzero(), _vzero()
    i = 0
    while i + 8 <= cols:
        u, v = _ld_f32x8(xa, i), _ld_f32x8(xb, i)
        w0, w1, w2, w3 = _ld_f32x8(b0, i), _ld_f32x8(b1, i), _ld_f32x8(b2, i), _ld_f32x8(b3, i)
        a0, a1, a2, a3 = _vfma(w0, u, a0), _vfma(w1, u, a1), _vfma(w2, u, a2), _vfma(w3, u, a3)
        c0, c1, c2, c3 = _vfma(w0, v, c0), _vfma(w1, v, c1), _vfma(w2, v, c2), _vfma(w3, v, c3)
        i += 8
    s0, s1, s2, s3 = _vsum(a0), _vsum(a1), _vsum(a2), _vsum(a3)
    t0, t1, t2, t3 = _vsum(c0), _vsum(c1), _vsum(c2), _vsum(c3)
    for j in range(i, cols):
        s0, s1, s2, s3 = s0 + b0[j] * xa[j], s1 + b1[j] * xa[j], s2 + b2[j] * xa[j], s3 + b3[j] * xa[j]
        t0, t1, t2, t3 = t0 + b0[j] * xb[j], t1 + b1[j] * xb[j], t2 + b2[j] * xb[j], t3 + b3[j] * xb[j]
    return s0, s1, s2, s3, t0, t1, t2, t3


def _make_mm(code: int):
    """B > 1 kernel for one weight type (the decoder folds to straight-line code)."""

    @_parallel_kernel
    def mm(w, base, rstride, rows, x, out, n_chunks):
        """out (B, rows) = x (B, cols) times the matrix whose row r starts at byte base + r * rstride of w."""
        n_b, cols = x.shape[0], x.shape[1]
        q = (rows + 3) // 4
        for c in prange(n_chunks):
            buf = np.empty((4, cols), np.float32)
            for g in range(q * c // n_chunks, q * (c + 1) // n_chunks):
                r = _quad(g, q, rows)
                for i in range(4):
                    _decode_row(code, w, base + r[i] * rstride, buf[i])
                for b in range(0, n_b, 2):
                    b2 = min(b + 1, n_b - 1)
                    s = _dot4x2(buf, x[b], x[b2], cols)
                    for i in range(3, -1, -1):
                        out[b, r[i]] = s[i]
                        out[b2, r[i]] = s[4 + i]

    return mm


# With Q80 activations and 32-value block weights a batch keeps integer block dots, with the lanes over rows
# instead of values: each chunk unpacks eight rows at a time into scratch where the 32 bytes of slice j of
# block k hold codes 4j..4j+3 of each of the eight rows, so _udot/_sdot against the activation codes
# 4j..4j+3 repeated in every lane give eight rows' partial dots at once and a block ends as one exact int32
# per row, with no horizontal sums; each unpacked slice meets four activation rows before the next is read.


@intrinsic
def _ld_rep4(typingctx, arr, i):
    """The 4 bytes at array offset i, repeated in each of the eight 32-bit lanes."""
    if not isinstance(arr, types.Array):
        return None

    def codegen(context, builder, sig, args):
        v = builder.load(_elem_ptr(context, builder, sig.args[0], args[0], args[1], _I32), align=1)
        return builder.bitcast(_splat_i32(builder, v), _V32B)

    return _b32(arr, types.intp), codegen


@intrinsic
def _st_lanes(typingctx, arr, o, stride, v):
    """Store 32-bit lane j of the 32 bytes v at array offset o + j * stride, for j < 8."""
    if not isinstance(arr, types.Array):
        return None

    def codegen(context, builder, sig, args):
        lanes = builder.bitcast(args[3], _V8I)
        for j in range(8):
            at = builder.add(args[1], builder.mul(args[2], ir.Constant(args[2].type, j)))
            p = _elem_ptr(context, builder, sig.args[0], args[0], at, _I32)
            builder.store(builder.extract_element(lanes, ir.Constant(_I32, j)), p, align=1)
        return context.get_dummy_value()

    return types.none(arr, types.intp, types.intp, _b32), codegen


@intrinsic
def _iadd(typingctx, a, b):
    def codegen(context, builder, sig, args):
        return builder.add(args[0], args[1])

    return _w8(_w8, _w8), codegen


@intrinsic
def _isplat(typingctx, n):
    """Eight int32 lanes of n."""

    def codegen(context, builder, sig, args):
        return _splat_i32(builder, args[0])

    return _w8(types.int32), codegen


@_helper
def _unpack_oct(code, w, base, rstride, first, rows, n_blocks, codes, d, m):
    """Rows first..first+7 (the last row repeated past the end) into the scratch: codes of block k, slice j,
    row i at byte 256k + 32j + 4i; scale and (Q4_1/Q5_1) minimum at d/m[8k + i]."""
    bs = _BLOCK_BYTES[code]
    for i in range(8):
        o = base + min(first + i, rows - 1) * rstride
        for k in range(n_blocks):
            ob = o + bs * k
            _st_lanes(codes, 256 * k + 4 * i, 32, _wcodes(code, w, ob))
            d[8 * k + i] = _ld_f16(w, ob)
            if code == _T_Q41 or code == _T_Q51:
                m[8 * k + i] = _ld_f16(w, ob + 2)


@_helper
def _code_sums(x, n_blocks):
    """Sum of the codes of each Q80 block of each row of x (B, n_blocks*34): int32 (B, n_blocks)."""
    sums = np.empty((x.shape[0], n_blocks), np.int32)
    for b in range(x.shape[0]):
        for k in range(n_blocks):
            total = 0
            for j in range(32):
                v = np.int32(x[b, _Q80_BYTES * k + 2 + j])
                total += v - 256 if v > 127 else v
            sums[b, k] = total
    return sums


@_helper
def _lane_dot(code, acc, wv, x, o):
    """acc + lane i: the dot of the four codes of row i in weight slice wv with the Q80 codes at byte o."""
    if code == _T_Q80:
        return _iadd(acc, _sdot(wv, _ld_rep4(x, o)))
    return _udot_add(acc, wv, _ld_rep4(x, o))


@_helper
def _oct_finish(code, d, m, k, x, ob, dot, s, acc):
    """acc + the eight rows' block k terms for the activation row x (Q80 block at byte ob, codes summing to
    s): d_w * d_x * (dot less the Q4_0/Q5_0 offset times s) + (Q4_1/Q5_1) m_w * d_x * s."""
    dx = _ld_f16(x, ob)
    if code == _T_Q40:
        dot = _isub(dot, _isplat(np.int32(8 * s)))
    elif code == _T_Q50:
        dot = _isub(dot, _isplat(np.int32(16 * s)))
    acc = _vfma(_vmul(_ld_f32x8(d, 8 * k), _vsplat(dx)), _itof(dot), acc)
    if code == _T_Q41 or code == _T_Q51:
        acc = _vfma(_ld_f32x8(m, 8 * k), _vsplat(dx * np.float32(s)), acc)
    return acc


@_helper
def _oct_k4(code, codes, k, x0, x1, x2, x3, ob):
    """Exact int32 dots of the eight unpacked rows' block k with the Q80 block at byte ob of x0..x3."""
    if _PAIRS16 and (code == _T_Q40 or code == _T_Q41):
        p0 = p1 = p2 = p3 = _bsplat(0)
        for j in range(8):
            wv = _ld_b32(codes, 256 * k + 32 * j)
            p0 = _pairs_add(p0, wv, _ld_rep4(x0, ob + 2 + 4 * j))
            p1 = _pairs_add(p1, wv, _ld_rep4(x1, ob + 2 + 4 * j))
            p2 = _pairs_add(p2, wv, _ld_rep4(x2, ob + 2 + 4 * j))
            p3 = _pairs_add(p3, wv, _ld_rep4(x3, ob + 2 + 4 * j))
        return _pairs_sum(p0), _pairs_sum(p1), _pairs_sum(p2), _pairs_sum(p3)
    i0 = i1 = i2 = i3 = _isplat(np.int32(0))
    for j in range(8):
        wv = _ld_b32(codes, 256 * k + 32 * j)
        i0 = _lane_dot(code, i0, wv, x0, ob + 2 + 4 * j)
        i1 = _lane_dot(code, i1, wv, x1, ob + 2 + 4 * j)
        i2 = _lane_dot(code, i2, wv, x2, ob + 2 + 4 * j)
        i3 = _lane_dot(code, i3, wv, x3, ob + 2 + 4 * j)
    return i0, i1, i2, i3


@_helper
def _oct_k1(code, codes, k, x0, ob):
    """_oct_k4 for one activation row."""
    if _PAIRS16 and (code == _T_Q40 or code == _T_Q41):
        p0 = _bsplat(0)
        for j in range(8):
            p0 = _pairs_add(p0, _ld_b32(codes, 256 * k + 32 * j), _ld_rep4(x0, ob + 2 + 4 * j))
        return _pairs_sum(p0)
    i0 = _isplat(np.int32(0))
    for j in range(8):
        i0 = _lane_dot(code, i0, _ld_b32(codes, 256 * k + 32 * j), x0, ob + 2 + 4 * j)
    return i0


@_helper
def _oct_dots4(code, codes, d, m, x, sums, b, n_blocks):
    """Dots of the eight unpacked rows with activation rows b..b+3 (past the end: the last row), as four
    8-lane vectors (lane i: row i)."""
    last = x.shape[0] - 1
    b0, b1, b2, b3 = b, min(b + 1, last), min(b + 2, last), min(b + 3, last)
    x0, x1, x2, x3 = x[b0], x[b1], x[b2], x[b3]
    a0, a1, a2, a3 = _vzero(), _vzero(), _vzero(), _vzero()
    for k in range(n_blocks):
        ob = _Q80_BYTES * k
        i0, i1, i2, i3 = _oct_k4(code, codes, k, x0, x1, x2, x3, ob)
        a0 = _oct_finish(code, d, m, k, x0, ob, i0, sums[b0, k], a0)
        a1 = _oct_finish(code, d, m, k, x1, ob, i1, sums[b1, k], a1)
        a2 = _oct_finish(code, d, m, k, x2, ob, i2, sums[b2, k], a2)
        a3 = _oct_finish(code, d, m, k, x3, ob, i3, sums[b3, k], a3)
    return a0, a1, a2, a3


@_helper
def _oct_dots1(code, codes, d, m, x, sums, b, n_blocks):
    """_oct_dots4 for activation row b alone (the same sums, so the same result bit for bit)."""
    x0, a0 = x[b], _vzero()
    for k in range(n_blocks):
        ob = _Q80_BYTES * k
        a0 = _oct_finish(code, d, m, k, x0, ob, _oct_k1(code, codes, k, x0, ob), sums[b, k], a0)
    return a0


def _make_mm_q80(code: int):
    """B > 1 kernel for up to three matrices of one 32-value block type and width sharing the Q80 rows x, one
    parallel launch over all their row octs (a matrix of 0 rows is absent)."""

    @_parallel_kernel
    def mm_q80(wa, wb, wc, base, rsa, rsb, rsc, ra, rb, rc, x, outa, outb, outc, n_chunks):
        """out* (B, r*) = Q80 rows x (B, cols/32*34) times the matrix whose row r starts at byte base + r *
        rs* of w*."""
        n_b, n_blocks = x.shape[0], x.shape[1] // _Q80_BYTES
        sums = _code_sums(x, n_blocks)
        na, nb, nc = (ra + 7) // 8, (rb + 7) // 8, (rc + 7) // 8
        n_octs = na + nb + nc
        for c in prange(n_chunks):
            codes = np.empty(256 * n_blocks, np.uint8)
            d, m = np.empty(8 * n_blocks, np.float32), np.zeros(8 * n_blocks, np.float32)
            res = np.empty(32, np.float32)
            for g in range(n_octs * c // n_chunks, n_octs * (c + 1) // n_chunks):
                if g < na:
                    w, rs, rows, out, first = wa, rsa, ra, outa, 8 * g
                elif g < na + nb:
                    w, rs, rows, out, first = wb, rsb, rb, outb, 8 * (g - na)
                else:
                    w, rs, rows, out, first = wc, rsc, rc, outc, 8 * (g - na - nb)
                _unpack_oct(code, w, base, rs, first, rows, n_blocks, codes, d, m)
                n_r = min(8, rows - first)
                b = 0
                while b < n_b:  # rows four at a time; a remainder of one or two row by row
                    if n_b - b >= 3:
                        a0, a1, a2, a3 = _oct_dots4(code, codes, d, m, x, sums, b, n_blocks)
                        _st_f32x8(res, 0, a0)
                        _st_f32x8(res, 8, a1)
                        _st_f32x8(res, 16, a2)
                        _st_f32x8(res, 24, a3)
                        n_t = min(4, n_b - b)
                    else:
                        _st_f32x8(res, 0, _oct_dots1(code, codes, d, m, x, sums, b, n_blocks))
                        n_t = 1
                    for t in range(n_t):
                        for i in range(n_r):
                            out[b + t, first + i] = res[8 * t + i]
                    b += n_t

    return mm_q80


_MM = {c: _make_mm(c) for c in _FLOAT_CODES + _LEGACY_CODES + _K_CODES}
_MM_Q80 = {c: _make_mm_q80(c) for c in _LEGACY_CODES}
_MV = {c: _make_mv_legacy(c) for c in _LEGACY_CODES}
_MV.update({c: _make_mv_float(c) for c in _FLOAT_CODES})
_MV_K = {c: _make_mv_k(c) for c in _K_CODES}
_MV_Q80 = {c: _make_mv_q80(c) for c in _LEGACY_CODES}
_MV3 = {(c, q80x): _make_mv3(c, q80x) for c in _LEGACY_CODES for q80x in (False, True)}


# ---------------------------------------------------------------------------------------------------------
# Q80 codec, embedding, merge-add
# ---------------------------------------------------------------------------------------------------------


@_helper
def _quantize_row(xr, orow):
    """One row of float32 values -> its Q80 blocks."""
    c127 = np.float32(127.0)
    for k in range(xr.shape[0] // 32):
        amax = np.float32(0.0)
        for j in range(32):
            amax = max(amax, abs(xr[32 * k + j]))
        d = amax / c127
        inv = np.float32(1.0) / d if d != 0 else np.float32(0.0)
        o = _Q80_BYTES * k
        _st_f16(orow, o, d)
        for j in range(32):
            orow[o + 2 + j] = np.uint8(np.int64(np.rint(xr[32 * k + j] * inv)) & 255)


@_kernel
def _quantize_q80(x, out):
    for b in range(x.shape[0]):
        _quantize_row(x[b], out[b])


@_kernel
def _dequantize_q80(xq, out):
    for b in range(xq.shape[0]):
        _decode_legacy(_T_Q80, xq[b], 0, out[b])


@_kernel
def _merge_add_q80(x, zq):
    n = x.shape[1]
    rb = n // 32 * _Q80_BYTES
    for b in range(x.shape[0]):
        xr, zr = x[b], zq[b]
        for s in range(zq.shape[1] // rb):
            for k in range(n // 32):
                o = s * rb + _Q80_BYTES * k
                d = _vsplat(_ld_f16(zr, o))
                for j in range(4):
                    i = 32 * k + 8 * j
                    _st_f32x8(xr, i, _vfma(d, _ld_i8x8(zr, o + 2 + 8 * j), _ld_f32x8(xr, i)))


@_kernel
def _embedding(code, w, rstride, rows, tokens, out):
    """Returns the index of the first out-of-range token, or -1."""
    for b in range(tokens.shape[0]):
        t = tokens[b]
        if t < 0 or t >= rows:
            return b
        _decode_row(code, w, t * rstride, out[b])
    return -1


@_kernel
def _kv_store(k_cache, v_cache, positions, k, v):
    """Returns the index of the first position outside the cache, or -1."""
    stride = k_cache.strides[0] // k_cache.itemsize
    for b in range(positions.shape[0]):
        p = positions[b]
        if p < 0 or p >= k_cache.shape[0]:
            return b
        for j in range(k.shape[1]):
            _st_kv1(k_cache, p * stride + j, k[b, j])
            _st_kv1(v_cache, p * stride + j, v[b, j])
    return -1


# ---------------------------------------------------------------------------------------------------------
# Elementwise, norm, RoPE, attention
# ---------------------------------------------------------------------------------------------------------


@_fast_helper
def _expf(x):
    """float32 e**x within 2 ulp from plain arithmetic, so loops calling it vectorise.

    Inputs below -87.3 give ~1.2e-38 instead of smaller values; from 88.38 up the result is inf.
    """
    x = min(max(x, np.float32(-87.3)), np.float32(88.7))
    n = np.rint(x * np.float32(1.44269504))
    r = x - n * np.float32(0.693359375) + n * np.float32(2.12194440e-4)
    p = np.float32(1.9875691500e-4)
    p = p * r + np.float32(1.3981999507e-3)
    p = p * r + np.float32(8.3334519073e-3)
    p = p * r + np.float32(4.1665795894e-2)
    p = p * r + np.float32(1.6666665459e-1)
    p = p * r + np.float32(5.0000001201e-1)
    p = p * r * r + r + np.float32(1.0)
    return p * _pow2(n)


@_fast_helper
def _silu_row(g, u):
    one = np.float32(1.0)
    for i in range(g.shape[0]):
        v = g[i]
        g[i] = v / (one + _expf(-v)) * u[i]


@_fast_kernel
def _silu_mul(gate, up):
    for b in range(gate.shape[0]):
        _silu_row(gate[b], up[b])


@_kernel
def _silu_mul_q80(gate, up, gate_q):
    """silu_mul and the Q80 blocks of its result in one launch (the next matmul's input)."""
    for b in range(gate.shape[0]):
        _silu_row(gate[b], up[b])
        _quantize_row(gate[b], gate_q[b])


@_fast_kernel
def _add(x, y):
    for b in range(x.shape[0]):
        xr, yr = x[b], y[b]
        for i in range(xr.shape[0]):
            xr[i] += yr[i]


@_fast_helper
def _rmsnorm_row(xr, weight, eps, orow):
    """Each group of m = len(weight) consecutive values of a row is normalised on its own (in place works:
    a group is read whole before it is written)."""
    m = weight.shape[0]
    for g in range(0, xr.shape[0], m):
        ss = np.float32(0.0)
        for i in range(m):
            ss += xr[g + i] * xr[g + i]
        inv = np.float32(1.0) / np.sqrt(ss / np.float32(m) + np.float32(eps))
        for i in range(m):
            orow[g + i] = weight[i] * (inv * xr[g + i])


@_fast_kernel
def _rmsnorm(x, weight, eps, out):
    for b in range(x.shape[0]):
        _rmsnorm_row(x[b], weight, eps, out[b])


@_kernel
def _rmsnorm_q80(x, weight, eps, out, out_q):
    """rmsnorm and the Q80 blocks of its result in one launch (the next matmuls' input)."""
    for b in range(x.shape[0]):
        _rmsnorm_row(x[b], weight, eps, out[b])
        _quantize_row(out[b], out_q[b])


@_fast_kernel
def _add_bias(x, bias):
    for b in range(x.shape[0]):
        xr = x[b]
        for i in range(xr.shape[0]):
            xr[i] += bias[i]


@_helper
def _rope_row(xr, c, s, head_dim, neox):
    """Rotate the pairs of every head of one row by the angles whose cosines and sines are c and s."""
    half = head_dim // 2
    step, span = (1, half) if neox else (2, 1)
    for h0 in range(0, xr.shape[0], head_dim):
        for j in range(half):
            i0 = h0 + step * j
            v0, v1 = xr[i0], xr[i0 + span]
            xr[i0] = v0 * c[j] - v1 * s[j]
            xr[i0 + span] = v0 * s[j] + v1 * c[j]


@_kernel
def _rope(x, positions, cos, sin, head_dim, neox):
    """Returns the index of the first row whose position lies outside the table, or -1."""
    for b in range(x.shape[0]):
        p = positions[b]
        if p < 0 or p >= cos.shape[0]:
            return b
        _rope_row(x[b], cos[p], sin[p], head_dim, neox)
    return -1


@_kernel
def _rope_qk_store(q, k, v, positions, base, span, cos, sin, head_dim, neox, k_cache, v_cache):
    """RoPE of q and k, then k and v into cache row base[b] + position of each batch row, in one launch.
    Returns the index of the first row whose position lies outside the table or the span of rows from
    base[b] (of the cache), or -1."""
    stride = k_cache.strides[0] // k_cache.itemsize
    for b in range(q.shape[0]):
        p = positions[b]
        r = base[b] + p
        if p < 0 or p >= cos.shape[0] or p >= span or r >= k_cache.shape[0]:
            return b
        _rope_row(q[b], cos[p], sin[p], head_dim, neox)
        _rope_row(k[b], cos[p], sin[p], head_dim, neox)
        for j in range(k.shape[1]):
            _st_kv1(k_cache, r * stride + j, k[b, j])
            _st_kv1(v_cache, r * stride + j, v[b, j])
    return -1


@_helper
def _dot(a, ao, b, bo, n):
    """Dot of n floats of a from offset ao with n values of the KV cache b from offset bo, in float32."""
    acc0, acc1 = _vzero(), _vzero()
    i = 0
    while i + 16 <= n:
        acc0 = _vfma(_ld_f32x8(a, ao + i), _ld_kv8(b, bo + i), acc0)
        acc1 = _vfma(_ld_f32x8(a, ao + i + 8), _ld_kv8(b, bo + i + 8), acc1)
        i += 16
    if i + 8 <= n:
        acc0 = _vfma(_ld_f32x8(a, ao + i), _ld_kv8(b, bo + i), acc0)
        i += 8
    s = _vsum(_vadd(acc0, acc1))
    for j in range(i, n):
        s += _ld_f32(a, ao + j) * _ld_kv1(b, bo + j)
    return s


@_helper
def _weighted_rows(p, n, rows, col, width, scale, out, ocol):
    """width floats of out from offset ocol = scale * sum_t p[t] * rows[t, col:col+width] over t < n (rows: a
    float32 or f16 KV cache)."""
    stride = rows.strides[0] // rows.itemsize
    c = 0
    while c + 32 <= width:
        a0, a1, a2, a3 = _vzero(), _vzero(), _vzero(), _vzero()
        for t in range(n):
            pt, o = _vsplat(p[t]), t * stride + col + c
            a0 = _vfma(pt, _ld_kv8(rows, o), a0)
            a1 = _vfma(pt, _ld_kv8(rows, o + 8), a1)
            a2 = _vfma(pt, _ld_kv8(rows, o + 16), a2)
            a3 = _vfma(pt, _ld_kv8(rows, o + 24), a3)
        sv = _vsplat(scale)
        _st_f32x8(out, ocol + c, _vmul(a0, sv))
        _st_f32x8(out, ocol + c + 8, _vmul(a1, sv))
        _st_f32x8(out, ocol + c + 16, _vmul(a2, sv))
        _st_f32x8(out, ocol + c + 24, _vmul(a3, sv))
        c += 32
    while c + 8 <= width:
        a0 = _vzero()
        for t in range(n):
            a0 = _vfma(_vsplat(p[t]), _ld_kv8(rows, t * stride + col + c), a0)
        _st_f32x8(out, ocol + c, _vmul(a0, _vsplat(scale)))
        c += 8
    for j in range(c, width):
        s = np.float32(0.0)
        for t in range(n):
            s += p[t] * _ld_kv1(rows, t * stride + col + j)
        _st_f32(out, ocol + j, s * scale)


@_fast_helper
def _softmax_inplace(s, n):
    """s[:n] = exp(s[:n] - max); returns the sum (the caller divides once at the end)."""
    top = s[0]
    for t in range(1, n):
        top = max(top, s[t])
    total = np.float32(0.0)
    for t in range(n):
        e = _expf(s[t] - top)
        s[t] = e
        total += e
    return total


@_helper
def _scores(q, qo, k_cache, ko, n, head_dim, scale, srow):
    """srow[t] = scale * (head_dim floats of q from offset qo) . k_cache[t, ko:ko+head_dim] for t < n.

    Eight positions at a time when head_dim is a multiple of 8: eight vector accumulators, then one
    transposing reduction instead of eight horizontal sums.
    """
    stride = k_cache.strides[0] // k_cache.itemsize
    t = 0
    if head_dim % 8 == 0:
        sv = _vsplat(scale)
        while t + 8 <= n:
            o = t * stride + ko
            a0, a1, a2, a3 = _vzero(), _vzero(), _vzero(), _vzero()
            a4, a5, a6, a7 = _vzero(), _vzero(), _vzero(), _vzero()
            for i in range(0, head_dim, 8):
                qv = _ld_f32x8(q, qo + i)
                a0 = _vfma(qv, _ld_kv8(k_cache, o + i), a0)
                a1 = _vfma(qv, _ld_kv8(k_cache, o + stride + i), a1)
                a2 = _vfma(qv, _ld_kv8(k_cache, o + 2 * stride + i), a2)
                a3 = _vfma(qv, _ld_kv8(k_cache, o + 3 * stride + i), a3)
                a4 = _vfma(qv, _ld_kv8(k_cache, o + 4 * stride + i), a4)
                a5 = _vfma(qv, _ld_kv8(k_cache, o + 5 * stride + i), a5)
                a6 = _vfma(qv, _ld_kv8(k_cache, o + 6 * stride + i), a6)
                a7 = _vfma(qv, _ld_kv8(k_cache, o + 7 * stride + i), a7)
            _st_f32x8(srow, t, _vmul(_vsum8(a0, a1, a2, a3, a4, a5, a6, a7), sv))
            t += 8
    for u in range(t, n):
        srow[u] = _dot(q, qo, k_cache, u * stride + ko, head_dim) * scale


@_helper
def _attend(q, k_cache, v_cache, pos, b, h, group, q_offset, head_dim, out, srow):
    """One (row, head): softmax(q.k_t / sqrt(head_dim)) over t = 0..pos, weighted sum of v_t into out; head h
    reads KV head (q_offset + h) // group."""
    qo = b * (q.strides[0] // 4) + h * head_dim
    ko = ((q_offset + h) // group) * head_dim
    _scores(q, qo, k_cache, ko, pos + 1, head_dim, np.float32(1.0) / np.sqrt(np.float32(head_dim)), srow)
    total = _softmax_inplace(srow, pos + 1)
    _weighted_rows(srow, pos + 1, v_cache, ko, head_dim, np.float32(1.0) / total, out, qo)


@_helper
def _attention_check(q, k_cache, v_cache, positions, n_heads, out, scratch):
    """-1 when all is well, -2 when a row is not contiguous, else the index of the first position outside the
    cache or the scratch."""
    if (
        q.strides[1] != 4
        or out.strides[1] != 4
        or k_cache.strides[1] != k_cache.itemsize
        or v_cache.strides[1] != v_cache.itemsize
        or scratch.strides[1] != 4
    ):
        return -2
    limit = min(k_cache.shape[0], scratch.shape[1])
    for b in range(q.shape[0]):
        if positions[b] < 0 or positions[b] >= limit:
            return b
    return -1


@_parallel_kernel
def _attention(q, k_cache, v_cache, positions, n_heads, group, q_offset, head_dim, out, scratch):
    bad = _attention_check(q, k_cache, v_cache, positions, n_heads, out, scratch)
    if bad != -1:
        return bad
    for bh in prange(q.shape[0] * n_heads):
        b, h = bh // n_heads, bh % n_heads
        _attend(q, k_cache, v_cache, positions[b], b, h, group, q_offset, head_dim, out, scratch[bh])
    return -1


# ---------------------------------------------------------------------------------------------------------
# Mixture of experts: routing and the weighted sum of the experts' outputs
# ---------------------------------------------------------------------------------------------------------


@_kernel
def _moe_route(logits, k, normalize, idx_out, w_out):
    """Per row: softmax of the logits in float64, the k largest (ties: lower expert first), their weights."""
    n_e = logits.shape[1]
    taken = np.zeros(n_e, np.bool_)
    p = np.empty(k, np.float64)
    for b in range(logits.shape[0]):
        row = logits[b]
        top = np.float64(row[0])
        for e in range(1, n_e):
            top = max(top, np.float64(row[e]))
        total = 0.0
        for e in range(n_e):
            total += np.exp(np.float64(row[e]) - top)
            taken[e] = False
        chosen = 0.0
        for j in range(k):
            best = -1
            for e in range(n_e):
                if not taken[e] and (best < 0 or row[e] > row[best]):
                    best = e
            taken[best] = True
            idx_out[b, j] = best
            p[j] = np.exp(np.float64(row[best]) - top) / total
            chosen += p[j]
        for j in range(k):
            w_out[b, j] = p[j] / chosen if normalize else p[j]


@_kernel
def _moe_sum(ys, w, out):
    """out[b] = sum over slots s, in slot order, of w[b, s] * ys[b, s*n:(s+1)*n] (float32 mul, then add)."""
    n = out.shape[1]
    for b in range(out.shape[0]):
        yr, orow = ys[b], out[b]
        for i in range(n):
            orow[i] = np.float32(0.0)
        for s in range(w.shape[1]):
            ws = w[b, s]
            for i in range(n):
                orow[i] += ws * yr[s * n + i]


# ---------------------------------------------------------------------------------------------------------
# Public API
# ---------------------------------------------------------------------------------------------------------


def set_threads(n: int) -> None:
    """Threads for the parallel kernels launched from the calling thread (numba's setting is per thread).

    n runs from 1 to the CPUs numba sees (NUMBA_NUM_THREADS).
    """
    limit = numba.config.NUMBA_NUM_THREADS
    if not isinstance(n, int) or not 1 <= n <= limit:
        raise DllamaError(f"thread count {n!r} must be an integer from 1 to {limit} (the CPUs numba can use)")
    numba.set_num_threads(n)


def _weight_view(
    w: np.ndarray, wtype: str, experts: bool
) -> tuple[WeightType, np.ndarray, int, int, int, int]:
    """(type, read-only bytes from the weight's first byte to its last, expert stride, row stride, rows, cols)
    of a matrix (rows, n) or, with experts, an expert stack (E, rows, n); n is cols for float types, bytes
    of whole blocks otherwise. A 1-D weight is one row."""
    t = weight_type(wtype)
    if w.ndim == 1 and not experts:
        w = w.reshape(1, -1)
    if w.ndim != (3 if experts else 2) or w.strides[-1] != w.itemsize:
        raise DllamaError(
            f"{wtype} weight must be {3 if experts else 2}-D with contiguous rows "
            f"(shape {w.shape}, strides {w.strides})"
        )
    b = np.asarray(w).view(np.uint8)
    if b.shape[-1] % t.block_bytes:
        raise DllamaError(
            f"weight row of {b.shape[-1]} bytes is not a whole number of {t.ggml_name} blocks "
            f"({t.block_bytes} bytes for {t.block_values} values)"
        )
    if b.flags.c_contiguous:
        flat = b.ravel()
    elif min(b.strides) > 0:
        # strided rows or experts: one span over them all (the bytes between are never read)
        span = sum((n - 1) * s for n, s in zip(b.shape, b.strides, strict=True)) + 1
        flat = np.lib.stride_tricks.as_strided(b, (span,), (1,))
    else:
        raise DllamaError(f"{wtype} weight has a negative or zero stride ({w.strides})")
    # read-only either way: one compiled specialisation whether the model file is mapped read-only or not
    flat.setflags(write=False)
    cols = b.shape[-1] // t.block_bytes * t.block_values
    return t, flat, b.strides[0] if experts else 0, b.strides[-2], b.shape[-2], cols


def _rows_contiguous(a: np.ndarray, what: str) -> None:
    if a.ndim != 2 or a.strides[1] != a.itemsize:
        raise DllamaError(f"{what} must be 2-D with contiguous rows (shape {a.shape}, strides {a.strides})")


_SLOT0 = np.zeros(1, np.int32)  # the expert list of a plain matrix: one slot, no expert offset


def _mv(
    code: int,
    q80x: bool,
    w: np.ndarray,
    rstride: int,
    estride: int,
    idx: np.ndarray,
    x: np.ndarray,
    xstride: int,
    out: np.ndarray,
    rows: int,
    cols: int,
) -> None:
    """One activation row (bytes; Q80 blocks when q80x) times the len(idx) experts idx (B = 1 kernels)."""
    if rows == 0:
        return
    if code in _K_CODES:
        _MV_K[code](w, rstride, estride, idx, x, xstride, q80x, out, rows, cols, _n_chunks(len(idx) * rows))
    elif q80x:
        _MV_Q80[code](w, rstride, estride, idx, x, xstride, out, rows, cols)
    else:
        _MV[code](w, rstride, estride, idx, x, xstride, out, rows, cols)


def matmul(w: np.ndarray, wtype: str, x: np.ndarray, out: np.ndarray) -> None:
    """out[b, r] = sum_c W[r, c] * x[b, c] for float32 x (B, cols); W in its native encoding `wtype`."""
    t, wb, _, rstride, rows, cols = _weight_view(w, wtype, experts=False)
    _rows_contiguous(x, "matmul input")
    _rows_contiguous(out, "matmul output")
    if (
        x.shape[1] != cols
        or out.shape != (x.shape[0], rows)
        or x.dtype != np.float32
        or out.dtype != np.float32
    ):
        raise DllamaError(
            f"matmul shapes disagree: {wtype} weight {rows}x{cols}, x {x.shape} {x.dtype}, "
            f"out {out.shape} {out.dtype}"
        )
    if x.shape[0] == 1:
        _mv(t.code, False, wb, rstride, 0, _SLOT0, x[0].view(np.uint8), 0, out[0], rows, cols)
    elif x.shape[0] > 1:
        _MM[t.code](wb, 0, rstride, rows, x, out, _n_chunks(rows))


def matmul_q80(w: np.ndarray, wtype: str, xq: np.ndarray, out: np.ndarray) -> None:
    """matmul with Q80 activations xq uint8 (B, cols/32*34), dllama's numerics.

    32-value block W at any B, K-quant W at B = 1: an exact integer dot per 32 values (per K-quant
    sub-block) times the block scales, d_w*d_x*sum(qw*qx) (+ the min or offset terms, m_w*d_x*sum(qx)).
    Otherwise (K-quant batches, float weights) the activations are de-quantised into a temporary (their
    exact values) and multiplied in float32, which differs from the integer form only by rounding.
    """
    t, wb, _, rstride, rows, cols = _weight_view(w, wtype, experts=False)
    _rows_contiguous(xq, "matmul_q80 input")
    _rows_contiguous(out, "matmul_q80 output")
    if (
        cols % 32
        or xq.shape[1] != cols // 32 * _Q80_BYTES
        or out.shape != (xq.shape[0], rows)
        or xq.dtype != np.uint8
        or out.dtype != np.float32
    ):
        raise DllamaError(
            f"matmul_q80 shapes disagree: {wtype} weight {rows}x{cols}, "
            f"xq {xq.shape} {xq.dtype}, out {out.shape} {out.dtype}"
        )
    if xq.shape[0] == 1 and t.quantized:
        _mv(t.code, True, wb, rstride, 0, _SLOT0, xq[0], 0, out[0], rows, cols)
    elif xq.shape[0] > 1 and t.code in _LEGACY_CODES:
        _MM_Q80[t.code](wb, wb, wb, 0, rstride, 0, 0, rows, 0, 0, xq, out, out, out, _n_chunks(rows))
    elif xq.shape[0] > 0:
        x = np.empty((xq.shape[0], cols), np.float32)
        _dequantize_q80(xq, x)
        matmul(w, wtype, x, out)


def bind_matmuls(mats: list[tuple[np.ndarray, str]], x: np.ndarray, outs: list[np.ndarray]) -> Step:
    """A step(n) computing, for each (w, wtype) of `mats` and its out, matmul (float32 x) or matmul_q80
    (Q80 x) of x[:n] into out[:n].

    Shapes are checked once, here. Up to three matrices of one 32-value block type and width are one direct
    kernel launch for n = 1, and for any n with Q80 x (the per-call checks and views, ~10 µs, and one
    parallel wake-up, ~13 µs with two passive threads, per matrix were a third of a SmolLM2 token); other n
    and types go through the public functions.
    """
    q80x = x.dtype == np.uint8
    public = matmul_q80 if q80x else matmul
    for (w, wtype), out in zip(mats, outs, strict=True):
        public(w, wtype, x[:0], out[:0])  # the shape checks, on no rows

    def each(n: int) -> None:
        for (w, wtype), out in zip(mats, outs, strict=True):
            public(w, wtype, x[:n], out[:n])

    views = [_weight_view(w, wtype, experts=False) for w, wtype in mats]
    t, cols = views[0][0], views[0][5]
    if not (t.code in _LEGACY_CODES and len(mats) <= 3 and all(v[0] == t and v[5] == cols for v in views)):
        return each
    kernel = _MV3[t.code, q80x]
    absent = (t, views[0][1], 0, views[0][3], 0, cols)  # a matrix of no rows
    (_, wa, _, sa, ra, _), (_, wb, _, sb, rb, _), (_, wc, _, sc, rc, _) = (views + [absent] * 3)[:3]
    oa, ob, oc = ([o[0] for o in outs] + [outs[0][0]] * 3)[:3]
    x1 = x[0].view(np.uint8)
    mm3 = _MM_Q80[t.code] if q80x else None
    batch, chunks = _row_views(x, *(outs + [outs[0]] * 3)[:3]), _n_chunks(ra + rb + rc)

    def step(n: int) -> None:
        if n == 1:
            kernel(wa, wb, wc, sa, sb, sc, x1, oa, ob, oc, ra, rb, rc, cols)
        elif mm3 is not None:
            xn, ya, yb, yc = batch(n)
            mm3(wa, wb, wc, 0, sa, sb, sc, ra, rb, rc, xn, ya, yb, yc, chunks)
        else:
            each(n)

    return step


def _n_chunks(rows: int) -> int:
    """Work items of a batched matmul: a few per thread for balance, never more than the row quads."""
    return max(1, min((rows + 3) // 4, 4 * numba.get_num_threads()))


def quantize_q80(x: np.ndarray, out: np.ndarray) -> None:
    """float32 (B, n) -> Q80 blocks uint8 (B, n/32*34): d = fp16(amax/127), q = round-half-even(x/d)."""
    _rows_contiguous(out, "quantize_q80 output")
    if x.shape[1] % 32 or out.shape != (x.shape[0], x.shape[1] // 32 * _Q80_BYTES):
        raise DllamaError(f"quantize_q80 shapes disagree: x {x.shape}, out {out.shape}")
    _quantize_q80(x, out)


def dequantize_q80(xq: np.ndarray, out: np.ndarray) -> None:
    """Q80 blocks uint8 (B, n/32*34) -> float32 (B, n)."""
    _rows_contiguous(xq, "dequantize_q80 input")
    _rows_contiguous(out, "dequantize_q80 output")
    if out.shape[1] % 32 or xq.shape != (out.shape[0], out.shape[1] // 32 * _Q80_BYTES):
        raise DllamaError(f"dequantize_q80 shapes disagree: xq {xq.shape}, out {out.shape}")
    _dequantize_q80(xq, out)


def merge_add_q80(x: np.ndarray, slices_q80: np.ndarray) -> None:
    """x += de-quantised slices, added one after another in slice order (the dllama MERGE_ADD of Q80 inputs).

    slices_q80 is uint8 (B, n_slices * n/32*34): slice s of row b occupies bytes [s*n/32*34, (s+1)*n/32*34).
    """
    _rows_contiguous(x, "merge_add_q80 output")
    _rows_contiguous(slices_q80, "merge_add_q80 input")
    rb = x.shape[1] // 32 * _Q80_BYTES
    if x.shape[1] % 32 or slices_q80.shape[0] != x.shape[0] or slices_q80.shape[1] % rb:
        raise DllamaError(f"merge_add_q80 shapes disagree: x {x.shape}, slices {slices_q80.shape}")
    _merge_add_q80(x, slices_q80)


def embedding(w: np.ndarray, wtype: str, tokens: np.ndarray, out: np.ndarray) -> None:
    """out[b] = de-quantised row tokens[b] of the embedding table."""
    t, wb, _, rstride, rows, cols = _weight_view(w, wtype, experts=False)
    _rows_contiguous(out, "embedding output")
    if out.shape != (tokens.shape[0], cols) or out.dtype != np.float32:
        raise DllamaError(
            f"embedding shapes disagree: {wtype} table {rows}x{cols}, out {out.shape} {out.dtype}"
        )
    bad = _embedding(t.code, wb, rstride, rows, tokens, out)
    if bad >= 0:
        raise DllamaError(f"token id {int(tokens[bad])} is outside the vocabulary (0..{rows - 1})")


def rmsnorm(x: np.ndarray, weight: np.ndarray, eps: float, out: np.ndarray) -> None:
    """Per row and per group of m = len(weight) values: out = weight * x / sqrt(mean(x^2) + eps).

    m = x.shape[1] normalises whole rows; m = head_dim normalises each head (Qwen3's q/k norm). out may be x.
    """
    m = weight.shape[0] if weight.ndim == 1 else 0
    if x.ndim != 2 or m == 0 or x.shape[1] % m or out.shape != x.shape:
        raise DllamaError(
            f"rmsnorm shapes disagree: x {x.shape}, weight {weight.shape} (a divisor of the row), "
            f"out {out.shape}"
        )
    _rmsnorm(x, weight, float(eps), out)


def rope_table(
    head_dim: int,
    theta: float,
    neox: bool,
    scaling: tuple | None,
    freq_factors: np.ndarray | None,
    max_pos: int,
) -> tuple[np.ndarray, np.ndarray]:
    """float32 cos/sin (max_pos, head_dim//2) of pos * freq_j, freq_j = theta**(-2j/head_dim).

    scaling = (factor, low_freq_factor, high_freq_factor, orig_max_seq_len) applies Llama 3.1's rule when
    factor != 1; freq_factors divide the frequencies (GGUF rope_freqs). Both pairings (neox or interleaved)
    use the same per-pair frequencies, so `neox` only documents which `rope` layout the table serves.
    """
    if head_dim <= 0 or head_dim % 2 or theta <= 0 or max_pos <= 0 or not isinstance(neox, bool):
        raise DllamaError(f"bad RoPE parameters: head_dim {head_dim}, theta {theta}, max_pos {max_pos}")
    half = head_dim // 2
    freq = 1.0 / theta ** (np.arange(half, dtype=np.float64) * 2.0 / head_dim)
    if scaling is not None and scaling[0] != 1:
        factor, low, high, orig = (float(v) for v in scaling)
        if factor <= 0 or high <= low or orig <= 0:
            raise DllamaError(f"bad Llama 3.1 RoPE scaling {tuple(scaling)}")
        wavelen = 2.0 * np.pi / freq
        smooth = (orig / wavelen - low) / (high - low)
        mid = (1.0 - smooth) * freq / factor + smooth * freq
        freq = np.where(wavelen < orig / high, freq, np.where(wavelen > orig / low, freq / factor, mid))
    if freq_factors is not None:
        f = np.asarray(freq_factors, np.float64).reshape(-1)
        if f.shape != (half,) or np.any(f <= 0):
            raise DllamaError(f"rope_freqs has {f.size} entries (expected {half} positive divisors)")
        freq = freq / f
    angle = np.arange(max_pos, dtype=np.float32)[:, None] * freq.astype(np.float32)[None, :]
    angle64 = angle.astype(np.float64)
    return np.cos(angle64).astype(np.float32), np.sin(angle64).astype(np.float32)


def rope(
    x: np.ndarray, positions: np.ndarray, cos: np.ndarray, sin: np.ndarray, head_dim: int, neox: bool
) -> None:
    """Rotate x (B, n_heads*head_dim) in place, row b by positions[b], in NeoX or interleaved pairs."""
    if x.shape[1] % head_dim or cos.shape[1] != head_dim // 2 or positions.shape[0] != x.shape[0]:
        raise DllamaError(f"rope shapes disagree: x {x.shape}, head_dim {head_dim}, table {cos.shape}")
    _rope_done(_rope(x, positions, cos, sin, head_dim, neox), positions, cos)


def _rope_done(bad: int, positions: np.ndarray, cos: np.ndarray) -> None:
    if bad >= 0:
        raise DllamaError(
            f"position {int(positions[bad])} is beyond the RoPE table ({cos.shape[0]} positions)"
        )


def attention(
    q: np.ndarray,
    k_cache: np.ndarray,
    v_cache: np.ndarray,
    positions: np.ndarray,
    n_heads: int,
    n_kv_heads: int,
    head_dim: int,
    out: np.ndarray,
    scratch: np.ndarray,
    group: int | None = None,
    q_offset: int = 0,
) -> None:
    """Causal multi-head attention of q (B, n_heads*head_dim) over cache rows 0..positions[b], into out.

    q head h reads kv head (q_offset + h) // group (group: n_heads // n_kv_heads unless given, for a node
    whose query heads start inside a GQA group). The caches are float32, or uint16 holding IEEE halves (an
    f16 KV cache). scratch is float32 (>= B*n_heads, > max position): row b*n_heads + h holds that head's
    scores.
    """
    group = _attention_group(
        q, k_cache, v_cache, positions, n_heads, n_kv_heads, head_dim, out, scratch, group, q_offset
    )
    _attend_all(q, k_cache, v_cache, positions, n_heads, group, q_offset, head_dim, out, scratch)


def _attention_group(
    q, k_cache, v_cache, positions, n_heads, n_kv_heads, head_dim, out, scratch, group, q_offset
):
    """attention()'s GQA group size, once its arguments are checked: shapes agree and the query heads read
    exactly the cache's KV heads."""
    if group is None and n_kv_heads > 0 and n_heads % n_kv_heads == 0:
        group = n_heads // n_kv_heads
    if not (
        n_heads > 0
        and n_kv_heads > 0
        and group
        and 0 <= q_offset < group
        and (q_offset + n_heads - 1) // group == n_kv_heads - 1
        and q.shape[1] == n_heads * head_dim
        and out.shape == q.shape
        and k_cache.shape[1] == n_kv_heads * head_dim
        and v_cache.shape == k_cache.shape
        and k_cache.dtype in KV_DTYPES.values()
        and v_cache.dtype == k_cache.dtype
        and positions.shape[0] == q.shape[0]
        and scratch.shape[0] >= q.shape[0] * n_heads
    ):
        raise DllamaError(
            f"attention shapes disagree: q {q.shape}, heads {n_heads}/{n_kv_heads}x{head_dim} "
            f"(group {group}, offset {q_offset}), cache {k_cache.shape}, out {out.shape}, "
            f"scratch {scratch.shape}"
        )
    return group


def _attend_all(q, k_cache, v_cache, positions, n_heads, group, q_offset, head_dim, out, scratch) -> None:
    """attention() past its shape checks: (row, head) pairs over the threads, even for a few positions, since
    a serial attention between two parallel matmuls lets the spinning helper threads fall asleep (SmolLM2's
    2-thread decode: wo 18 -> 11 us, 4.5% faster per token)."""
    bad = _attention(q, k_cache, v_cache, positions, n_heads, group, q_offset, head_dim, out, scratch)
    if bad == -2:
        raise DllamaError("attention needs q, out, caches and scratch with contiguous rows")
    if bad >= 0:
        raise DllamaError(
            f"position {int(positions[bad])} is outside the KV cache ({k_cache.shape[0]} rows) "
            f"or the attention scratch ({scratch.shape[1]} columns)"
        )


def kv_store(
    k_cache: np.ndarray, v_cache: np.ndarray, positions: np.ndarray, k: np.ndarray, v: np.ndarray
) -> None:
    """k_cache[positions[b]] = k[b] and v_cache[positions[b]] = v[b] for each batch row b (rounded to
    nearest-even halves for an f16 cache: uint16 arrays)."""
    if (
        k.shape != v.shape
        or k_cache.shape != v_cache.shape
        or k_cache.dtype not in KV_DTYPES.values()
        or v_cache.dtype != k_cache.dtype
        or k.shape[1:] != k_cache.shape[1:]
        or positions.shape[0] != k.shape[0]
    ):
        raise DllamaError(f"kv_store shapes disagree: cache {k_cache.shape}, k {k.shape}, v {v.shape}")
    _kv_store_done(_kv_store(k_cache, v_cache, positions, k, v), positions, k_cache)


def _kv_store_done(bad: int, positions: np.ndarray, k_cache: np.ndarray) -> None:
    if bad >= 0:
        raise DllamaError(f"position {int(positions[bad])} is outside the KV cache ({k_cache.shape[0]} rows)")


def silu_mul(gate: np.ndarray, up: np.ndarray) -> None:
    """gate = silu(gate) * up in place, float32 (B, n)."""
    if gate.shape != up.shape:
        raise DllamaError(f"silu_mul shapes disagree: gate {gate.shape}, up {up.shape}")
    _silu_mul(gate, up)


def add(x: np.ndarray, y: np.ndarray) -> None:
    """x += y, float32 (B, n)."""
    if x.shape != y.shape:
        raise DllamaError(f"add shapes disagree: x {x.shape}, y {y.shape}")
    _add(x, y)


def add_bias(x: np.ndarray, bias: np.ndarray) -> None:
    """x (B, n) += bias (n,), float32 (Qwen2's q/k/v biases)."""
    if x.ndim != 2 or bias.shape != (x.shape[1],) or x.dtype != np.float32 or bias.dtype != np.float32:
        raise DllamaError(f"add_bias shapes disagree: x {x.shape} {x.dtype}, bias {bias.shape} {bias.dtype}")
    _add_bias(x, bias)


def moe_route(logits: np.ndarray, k: int, normalize: bool, idx_out: np.ndarray, w_out: np.ndarray) -> None:
    """Router: per row of logits (B, E) float32, the k experts of largest softmax probability p in descending
    order (ties: lower expert first) into idx_out (B, k) int32, their p into w_out (B, k) float32, divided by
    the sum of the k chosen p when `normalize`."""
    n_b = logits.shape[0] if logits.ndim == 2 else -1
    if (
        n_b < 0
        or logits.dtype != np.float32
        or not isinstance(k, int | np.integer)
        or not 1 <= k <= logits.shape[1]
        or idx_out.shape != (n_b, k)
        or idx_out.dtype != np.int32
        or w_out.shape != (n_b, k)
        or w_out.dtype != np.float32
    ):
        raise DllamaError(
            f"moe_route shapes disagree: logits {logits.shape} {logits.dtype}, k {k!r}, "
            f"idx_out {idx_out.shape} {idx_out.dtype}, w_out {w_out.shape} {w_out.dtype}"
        )
    _moe_route(logits, int(k), bool(normalize), idx_out, w_out)


def moe_matmul(w: np.ndarray, wtype: str, x: np.ndarray, idx: np.ndarray, out: np.ndarray) -> None:
    """out[b, s*rows + r] = sum_c W[idx[b, s], r, c] * x_{b,s}[c] for an expert stack w (E, rows, n) and
    float32 x: (B, cols), shared by the k slots, or (B, k*cols), one input per slot; idx (B, k) int32."""
    _moe(w, wtype, x, idx, out, False, "moe_matmul")


def moe_matmul_q80(w: np.ndarray, wtype: str, xq: np.ndarray, idx: np.ndarray, out: np.ndarray) -> None:
    """moe_matmul with Q80 activations xq uint8 (B, cols/32*34) or (B, k*cols/32*34), with matmul_q80's
    numerics (integer block dots for quantised experts, K-quant batches aside)."""
    _moe(w, wtype, xq, idx, out, True, "moe_matmul_q80")


def _moe(
    w: np.ndarray, wtype: str, x: np.ndarray, idx: np.ndarray, out: np.ndarray, q80x: bool, what: str
) -> None:
    """moe_matmul (x float32) or moe_matmul_q80 (x Q80 blocks); `what` names the function in errors."""
    t, wb, estride, rstride, rows, cols = _weight_view(w, wtype, experts=True)
    n_e = w.shape[0]
    _rows_contiguous(x, f"{what} input")
    _rows_contiguous(idx, f"{what} expert indices")
    _rows_contiguous(out, f"{what} output")
    n_b, k = idx.shape
    width = cols // 32 * _Q80_BYTES if q80x else cols  # x per slot
    if (
        idx.dtype != np.int32
        or k == 0
        or x.dtype != (np.uint8 if q80x else np.float32)
        or x.shape[0] != n_b
        or x.shape[1] not in (width, k * width)
        or (q80x and cols % 32)
        or out.shape != (n_b, k * rows)
        or out.dtype != np.float32
    ):
        raise DllamaError(
            f"{what} shapes disagree: {wtype} experts {n_e}x{rows}x{cols}, x {x.shape} {x.dtype}, "
            f"idx {idx.shape} {idx.dtype}, out {out.shape} {out.dtype}"
        )
    if n_b == 0 or rows == 0:
        return
    lo, hi = int(idx.min()), int(idx.max())
    if lo < 0 or hi >= n_e:
        raise DllamaError(f"expert index {lo if lo < 0 else hi} is outside the {n_e} experts (0..{n_e - 1})")
    per_slot = x.shape[1] != width
    if q80x and not (t.code in _LEGACY_CODES or (n_b == 1 and t.quantized)):
        xf = np.empty((n_b, x.shape[1] // _Q80_BYTES * 32), np.float32)
        _dequantize_q80(x, xf)
        x, q80x, width = xf, False, cols
    if n_b == 1:
        xstride = width * (1 if q80x else 4) if per_slot else 0
        _mv(t.code, q80x, wb, rstride, estride, idx[0], x[0].view(np.uint8), xstride, out[0], rows, cols)
        return
    # a batch: each expert's rows are decoded once for all the (token, slot) pairs routed to it
    flat = idx.reshape(-1)
    order = np.argsort(flat, kind="stable")
    experts, starts = np.unique(flat[order], return_index=True)
    ends = np.append(starts[1:], order.size)
    xs = x.reshape(n_b, k, width) if per_slot else x
    out_cols = np.arange(rows)
    for e, a, z in zip(experts, starts, ends, strict=True):
        sel = order[a:z]
        bb, ss = sel // k, sel % k
        xe = xs[bb, ss] if per_slot else xs[bb]
        ye = np.empty((sel.size, rows), np.float32)
        if sel.size == 1:
            xrow, expert = xe[0].view(np.uint8), np.full(1, e, np.int32)
            _mv(t.code, q80x, wb, rstride, estride, expert, xrow, 0, ye[0], rows, cols)
        elif q80x:
            base, chunks = int(e) * estride, _n_chunks(rows)
            _MM_Q80[t.code](wb, wb, wb, base, rstride, 0, 0, rows, 0, 0, xe, ye, ye, ye, chunks)
        else:
            _MM[t.code](wb, int(e) * estride, rstride, rows, xe, ye, _n_chunks(rows))
        out[bb[:, None], ss[:, None] * rows + out_cols] = ye


def moe_sum(ys: np.ndarray, w: np.ndarray, out: np.ndarray) -> None:
    """out[b] = sum over the k slots, in slot order, of w[b, s] * ys[b, s*n:(s+1)*n]; ys (B, k*n), w (B, k),
    out (B, n), float32."""
    if (
        ys.ndim != 2
        or w.ndim != 2
        or out.ndim != 2
        or w.shape[0] != out.shape[0]
        or ys.shape != (out.shape[0], w.shape[1] * out.shape[1])
        or not ys.dtype == w.dtype == out.dtype == np.float32
    ):
        raise DllamaError(
            f"moe_sum shapes disagree: ys {ys.shape} {ys.dtype}, w {w.shape} {w.dtype}, "
            f"out {out.shape} {out.dtype}"
        )
    _moe_sum(ys, w, out)


# ---------------------------------------------------------------------------------------------------------
# Bound steps: an op's buffers checked once (through the public function, on no rows), then a closure that
# calls the compiled kernel on the first n rows, with each n's row views made once. A decode pass runs ~600
# ops, where the per-call checks and slicing cost as much as the small kernels themselves.
# ---------------------------------------------------------------------------------------------------------


def _row_views(*arrays: np.ndarray) -> Callable[[int], tuple]:
    """n -> (a[:n] for each array), each tuple made once."""
    made: dict[int, tuple] = {}

    def views(n: int) -> tuple:
        v = made.get(n)
        if v is None:
            v = made[n] = tuple(a[:n] for a in arrays)
        return v

    return views


def bind_quantize_q80(x: np.ndarray, out: np.ndarray) -> Step:
    quantize_q80(x[:0], out[:0])
    rows = _row_views(x, out)
    return lambda n: _quantize_q80(*rows(n))


def bind_rmsnorm(x: np.ndarray, weight: np.ndarray, eps: float, out: np.ndarray) -> Step:
    rmsnorm(x[:0], weight, eps, out[:0])
    rows, eps = _row_views(x, out), float(eps)

    def step(n: int) -> None:
        xv, ov = rows(n)
        _rmsnorm(xv, weight, eps, ov)

    return step


def bind_rope(
    x: np.ndarray, positions: np.ndarray, cos: np.ndarray, sin: np.ndarray, head_dim: int, neox: bool
) -> Step:
    rope(x[:0], positions[:0], cos, sin, head_dim, neox)
    rows = _row_views(x, positions)

    def step(n: int) -> None:
        xv, pv = rows(n)
        _rope_done(_rope(xv, pv, cos, sin, head_dim, neox), pv, cos)

    return step


def bind_kv_store(
    k_cache: np.ndarray, v_cache: np.ndarray, positions: np.ndarray, k: np.ndarray, v: np.ndarray
) -> Step:
    kv_store(k_cache, v_cache, positions[:0], k[:0], v[:0])
    rows = _row_views(positions, k, v)

    def step(n: int) -> None:
        pv, kv, vv = rows(n)
        _kv_store_done(_kv_store(k_cache, v_cache, pv, kv, vv), pv, k_cache)

    return step


def bind_attention(
    q: np.ndarray,
    k_cache: np.ndarray,
    v_cache: np.ndarray,
    positions: np.ndarray,
    n_heads: int,
    n_kv_heads: int,
    head_dim: int,
    out: np.ndarray,
    scratch: np.ndarray,
    group: int,
    q_offset: int,
) -> Step:
    attention(
        q[:0],
        k_cache,
        v_cache,
        positions[:0],
        n_heads,
        n_kv_heads,
        head_dim,
        out[:0],
        scratch,
        group,
        q_offset,
    )
    if scratch.shape[0] < q.shape[0] * n_heads:
        raise DllamaError(f"attention scratch {scratch.shape} is short of {q.shape[0]} x {n_heads} rows")
    rows = _row_views(q, positions, out)

    def step(n: int) -> None:
        qv, pv, ov = rows(n)
        _attend_all(qv, k_cache, v_cache, pv, n_heads, group, q_offset, head_dim, ov, scratch)

    return step


def bind_silu_mul(gate: np.ndarray, up: np.ndarray) -> Step:
    silu_mul(gate[:0], up[:0])
    rows = _row_views(gate, up)
    return lambda n: _silu_mul(*rows(n))


def bind_silu_mul_q80(gate: np.ndarray, up: np.ndarray, gate_q: np.ndarray) -> Step:
    """silu_mul, then the Q80 blocks of gate into gate_q: one launch."""
    silu_mul(gate[:0], up[:0])
    quantize_q80(gate[:0], gate_q[:0])
    rows = _row_views(gate, up, gate_q)
    return lambda n: _silu_mul_q80(*rows(n))


def bind_rmsnorm_q80(
    x: np.ndarray, weight: np.ndarray, eps: float, out: np.ndarray, out_q: np.ndarray
) -> Step:
    """rmsnorm into out, then its Q80 blocks into out_q: one launch."""
    rmsnorm(x[:0], weight, eps, out[:0])
    quantize_q80(out[:0], out_q[:0])
    rows, eps = _row_views(x, out, out_q), float(eps)

    def step(n: int) -> None:
        xv, ov, qv = rows(n)
        _rmsnorm_q80(xv, weight, eps, ov, qv)

    return step


def bind_rope_kv_store(
    q: np.ndarray,
    k: np.ndarray,
    v: np.ndarray,
    positions: np.ndarray,
    cos: np.ndarray,
    sin: np.ndarray,
    head_dim: int,
    neox: bool,
    k_cache: np.ndarray,
    v_cache: np.ndarray,
    slots: tuple[np.ndarray, int, int] | None = None,
) -> Step:
    """RoPE of q and k by the rows' positions, then k and v into the cache: one launch. `slots`: (the
    per-row slot buffer, slots, rows per slot), row r of slot s going to cache row s * rows per slot + r."""
    rope(q[:0], positions[:0], cos, sin, head_dim, neox)
    rope(k[:0], positions[:0], cos, sin, head_dim, neox)
    kv_store(k_cache, v_cache, positions[:0], k[:0], v[:0])
    rows = _row_views(q, k, v, positions)
    zeros = np.zeros(q.shape[0], np.int64)
    span = k_cache.shape[0] if slots is None else slots[2]

    def step(n: int) -> None:
        qv, kv, vv, pv = rows(n)
        base = zeros[:n]
        if slots is not None:
            s = slots[0][:n, 0]
            if n and (s.min() < 0 or s.max() >= slots[1]):
                raise DllamaError(f"a KV slot outside 0..{slots[1] - 1}: {s.tolist()}")
            base = s.astype(np.int64) * span
        bad = _rope_qk_store(qv, kv, vv, pv, base, span, cos, sin, head_dim, neox, k_cache, v_cache)
        if bad >= 0:
            if not 0 <= pv[bad] < cos.shape[0]:
                _rope_done(bad, pv, cos)
            raise DllamaError(f"position {int(pv[bad])} is outside the KV cache ({span} rows)")

    return step


def bind_add(x: np.ndarray, ys: list[np.ndarray]) -> Step:
    """x += each of ys in order."""
    for y in ys:
        add(x[:0], y[:0])
    rows = _row_views(x, *ys)

    def step(n: int) -> None:
        xv, *yv = rows(n)
        for y in yv:
            _add(xv, y)

    return step


def bind_merge_add_q80(x: np.ndarray, slices_q80: np.ndarray) -> Step:
    merge_add_q80(x[:0], slices_q80[:0])
    rows = _row_views(x, slices_q80)
    return lambda n: _merge_add_q80(*rows(n))


def bind_add_bias(x: np.ndarray, bias: np.ndarray) -> Step:
    add_bias(x[:0], bias)
    rows = _row_views(x)
    return lambda n: _add_bias(rows(n)[0], bias)
