"""numba kernels of the CPU backend: matmul over native weight blocks, Q80 codec, norms, RoPE, attention.

Hot loops use 8-lane float32 vectors built from numba intrinsics (explicit LLVM vector IR), so the weight
stream is decoded with SIMD whatever LLVM's loop vectoriser decides. Every kernel writes into preallocated
outputs; the Python wrappers only check shapes and pick the compiled kernel.
"""

from __future__ import annotations

import numba
import numpy as np
from llvmlite import ir
from numba import njit, prange, types
from numba.extending import intrinsic, models, register_model

from engine.errors import DllamaError

_FAST = {"reassoc", "contract", "nsz"}  # lets LLVM vectorise float reductions; no NaN/Inf assumptions

# error_model="numpy": float division by zero gives inf/nan instead of a Python exception, whose check would
# keep LLVM from vectorising any loop that divides. Kernels are cached on disk; helpers compile into them.
_helper = njit(error_model="numpy")
_fast_helper = njit(error_model="numpy", fastmath=_FAST)
_kernel = njit(error_model="numpy", cache=True)
_fast_kernel = njit(error_model="numpy", cache=True, fastmath=_FAST)
_parallel_kernel = njit(error_model="numpy", cache=True, parallel=True)

# ---------------------------------------------------------------------------------------------------------
# 8-lane float32 vectors: a numba type whose LLVM representation is <8 x float>, and the few operations the
# kernels need. Loads take an array and an offset counted in that array's elements (bytes for uint8 arrays);
# the elements from the offset on must be contiguous, which holds for every row of a row-major buffer.
# ---------------------------------------------------------------------------------------------------------

_F32 = ir.FloatType()
_I8, _I16, _I32 = ir.IntType(8), ir.IntType(16), ir.IntType(32)
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


_ld_f32x8 = _vec_loader(_cvt_f32, _V8F, "8 float32")
_ld_f16x8 = _vec_loader(_cvt_f16, ir.VectorType(_I16, 8), "8 IEEE halves")
_ld_bf16x8 = _vec_loader(_cvt_bf16, ir.VectorType(_I16, 8), "8 bfloat16 bit patterns")
_ld_lo4x8 = _vec_loader(_cvt_lo4, ir.VectorType(_I8, 8), "low nibbles of 8 bytes, 0..15")
_ld_hi4x8 = _vec_loader(_cvt_hi4, ir.VectorType(_I8, 8), "high nibbles of 8 bytes, 0..15")
_ld_i8x8 = _vec_loader(_cvt_i8, ir.VectorType(_I8, 8), "8 signed bytes")


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


# ---------------------------------------------------------------------------------------------------------
# Weight types. Kernels see every weight as uint8 (rows, row_bytes); the code picks the decoder.
# ---------------------------------------------------------------------------------------------------------

_F32_T, _F16_T, _BF16_T, _Q40_T, _Q41_T, _Q80_T = range(6)
_CODES = {"f32": _F32_T, "f16": _F16_T, "bf16": _BF16_T, "q40": _Q40_T, "q41": _Q41_T, "q80": _Q80_T}
_ELEM_BYTES = {_F32_T: 4, _F16_T: 2, _BF16_T: 2}
_QBLOCK_BYTES = {_Q40_T: 18, _Q41_T: 20, _Q80_T: 34}
_Q80_BYTES = 34


@_helper
def _block_bytes(code):
    if code == _Q40_T:
        return 18
    if code == _Q41_T:
        return 20
    return 34


@_helper
def _wload8(code, wr, i):
    """8 float-typed weights from element i of a byte row."""
    if code == _F32_T:
        return _ld_f32x8(wr, 4 * i)
    if code == _F16_T:
        return _ld_f16x8(wr, 2 * i)
    return _ld_bf16x8(wr, 2 * i)


@_helper
def _wload1(code, wr, i):
    if code == _F32_T:
        return _ld_f32(wr, 4 * i)
    if code == _F16_T:
        return _ld_f16(wr, 2 * i)
    return _ld_bf16(wr, 2 * i)


@_helper
def _qblock(code, wr, o, x0, x1, x2, x3, sx, dx):
    """One quantised weight block (bytes o..) dotted with x0..x3 (sx = their sum), times dx, as 8 lanes.

    Q40: d*sum((n-8)*x); Q41: d*sum(n*x) + m*sum(x); Q80: d*sum(q*x). With integer-valued x (Q80
    activations, dx = their scale) the inner sums are exact integers, i.e. an integer dot per block.
    """
    if code == _Q41_T:
        p = _vmul(_ld_lo4x8(wr, o + 4), x0)
        p = _vfma(_ld_lo4x8(wr, o + 12), x1, p)
        p = _vfma(_ld_hi4x8(wr, o + 4), x2, p)
        p = _vfma(_ld_hi4x8(wr, o + 12), x3, p)
        return _vfma(_vsplat(_ld_f16(wr, o) * dx), p, _vmul(_vsplat(_ld_f16(wr, o + 2) * dx), sx))
    if code == _Q40_T:
        m8 = _vsplat(np.float32(-8.0))
        p = _vmul(_vadd(_ld_lo4x8(wr, o + 2), m8), x0)
        p = _vfma(_vadd(_ld_lo4x8(wr, o + 10), m8), x1, p)
        p = _vfma(_vadd(_ld_hi4x8(wr, o + 2), m8), x2, p)
        p = _vfma(_vadd(_ld_hi4x8(wr, o + 10), m8), x3, p)
        return _vmul(_vsplat(_ld_f16(wr, o) * dx), p)
    p = _vmul(_ld_i8x8(wr, o + 2), x0)
    p = _vfma(_ld_i8x8(wr, o + 10), x1, p)
    p = _vfma(_ld_i8x8(wr, o + 18), x2, p)
    p = _vfma(_ld_i8x8(wr, o + 26), x3, p)
    return _vmul(_vsplat(_ld_f16(wr, o) * dx), p)


@_helper
def _decode_row(code, wr, dst):
    """Full float32 values of one weight row into dst (cols,)."""
    cols = dst.shape[0]
    if code <= _BF16_T:
        i = 0
        while i + 8 <= cols:
            _st_f32x8(dst, i, _wload8(code, wr, i))
            i += 8
        for j in range(i, cols):
            dst[j] = _wload1(code, wr, j)
        return
    bs = _block_bytes(code)
    for k in range(cols // 32):
        o = bs * k
        d = _vsplat(_ld_f16(wr, o))
        if code == _Q41_T:
            m = _vsplat(_ld_f16(wr, o + 2))
            _st_f32x8(dst, 32 * k, _vfma(d, _ld_lo4x8(wr, o + 4), m))
            _st_f32x8(dst, 32 * k + 8, _vfma(d, _ld_lo4x8(wr, o + 12), m))
            _st_f32x8(dst, 32 * k + 16, _vfma(d, _ld_hi4x8(wr, o + 4), m))
            _st_f32x8(dst, 32 * k + 24, _vfma(d, _ld_hi4x8(wr, o + 12), m))
        elif code == _Q40_T:
            m8 = _vsplat(np.float32(-8.0))
            _st_f32x8(dst, 32 * k, _vmul(d, _vadd(_ld_lo4x8(wr, o + 2), m8)))
            _st_f32x8(dst, 32 * k + 8, _vmul(d, _vadd(_ld_lo4x8(wr, o + 10), m8)))
            _st_f32x8(dst, 32 * k + 16, _vmul(d, _vadd(_ld_hi4x8(wr, o + 2), m8)))
            _st_f32x8(dst, 32 * k + 24, _vmul(d, _vadd(_ld_hi4x8(wr, o + 10), m8)))
        else:
            for j in range(4):
                _st_f32x8(dst, 32 * k + 8 * j, _vmul(d, _ld_i8x8(wr, o + 2 + 8 * j)))


# ---------------------------------------------------------------------------------------------------------
# Matrix-vector (B = 1). Iteration g computes rows g, g+q, g+2q, g+3q (q = rows/4): the four rows share the
# activation loads, and each thread reads four long sequential streams, which the hardware prefetcher follows
# (four adjacent rows per iteration restart the streams every few cache lines and halve the bandwidth).
# Kernels are built per weight type so the type tests fold away at compile time.
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
def _xblock(x, k, q80x):
    """Block k of the activation row as four 8-lane vectors, their sum and the block scale.

    Float32 x: the values, scale 1. Q80 x: the integer codes as floats, scale d (fp16).
    """
    if q80x:
        o = _Q80_BYTES * k
        x0, x1 = _ld_i8x8(x, o + 2), _ld_i8x8(x, o + 10)
        x2, x3 = _ld_i8x8(x, o + 18), _ld_i8x8(x, o + 26)
        dx = _ld_f16(x, o)
    else:
        x0, x1 = _ld_f32x8(x, 32 * k), _ld_f32x8(x, 32 * k + 8)
        x2, x3 = _ld_f32x8(x, 32 * k + 16), _ld_f32x8(x, 32 * k + 24)
        dx = np.float32(1.0)
    return x0, x1, x2, x3, _vadd(_vadd(x0, x1), _vadd(x2, x3)), dx


def _make_mv_quant(code: int, q80x: bool):
    """B = 1 kernel for quantised weights; x float32 (cols,) or, with q80x, Q80 bytes."""

    @_parallel_kernel
    def mv_quant(w, x, out):
        rows = w.shape[0]
        bs = _block_bytes(code)
        q = (rows + 3) // 4
        for g in prange(q):
            r0, r1, r2, r3 = _quad(g, q, rows)
            w0, w1, w2, w3 = w[r0], w[r1], w[r2], w[r3]
            a0, a1, a2, a3 = _vzero(), _vzero(), _vzero(), _vzero()
            for k in range(w.shape[1] // bs):
                x0, x1, x2, x3, sx, dx = _xblock(x, k, q80x)
                o = bs * k
                a0 = _vadd(a0, _qblock(code, w0, o, x0, x1, x2, x3, sx, dx))
                a1 = _vadd(a1, _qblock(code, w1, o, x0, x1, x2, x3, sx, dx))
                a2 = _vadd(a2, _qblock(code, w2, o, x0, x1, x2, x3, sx, dx))
                a3 = _vadd(a3, _qblock(code, w3, o, x0, x1, x2, x3, sx, dx))
            out[r3], out[r2], out[r1], out[r0] = _vsum(a3), _vsum(a2), _vsum(a1), _vsum(a0)

    return mv_quant


def _make_mv_float(code: int):
    """B = 1 kernel for f32/f16/bf16 weights and float32 x (cols,)."""

    @_parallel_kernel
    def mv_float(w, x, out):
        rows, cols = w.shape[0], x.shape[0]
        q = (rows + 3) // 4
        for g in prange(q):
            r0, r1, r2, r3 = _quad(g, q, rows)
            w0, w1, w2, w3 = w[r0], w[r1], w[r2], w[r3]
            a0, a1, a2, a3 = _vzero(), _vzero(), _vzero(), _vzero()
            i = 0
            while i + 8 <= cols:
                xv = _ld_f32x8(x, i)
                a0 = _vfma(_wload8(code, w0, i), xv, a0)
                a1 = _vfma(_wload8(code, w1, i), xv, a1)
                a2 = _vfma(_wload8(code, w2, i), xv, a2)
                a3 = _vfma(_wload8(code, w3, i), xv, a3)
                i += 8
            s0, s1, s2, s3 = _vsum(a0), _vsum(a1), _vsum(a2), _vsum(a3)
            for j in range(i, cols):
                s0 += _wload1(code, w0, j) * x[j]
                s1 += _wload1(code, w1, j) * x[j]
                s2 += _wload1(code, w2, j) * x[j]
                s3 += _wload1(code, w3, j) * x[j]
            out[r3], out[r2], out[r1], out[r0] = s3, s2, s1, s0

    return mv_float


# ---------------------------------------------------------------------------------------------------------
# Matrix-matrix (B > 1, prefill): each chunk of quads decodes its four rows once into scratch, then dots them
# with the activation rows two at a time (eight independent accumulators keep both FMA pipes busy).
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


def _make_mm_float_x(code: int):
    """B > 1 kernel for float32 x (B, cols), any weight type."""

    @_parallel_kernel
    def mm_float_x(w, x, out, n_chunks):
        rows, n_b, cols = w.shape[0], x.shape[0], x.shape[1]
        q = (rows + 3) // 4
        for c in prange(n_chunks):
            buf = np.empty((4, cols), np.float32)
            for g in range(q * c // n_chunks, q * (c + 1) // n_chunks):
                r = _quad(g, q, rows)
                for i in range(4):
                    _decode_row(code, w[r[i]], buf[i])
                for b in range(0, n_b, 2):
                    b2 = min(b + 1, n_b - 1)
                    s = _dot4x2(buf, x[b], x[b2], cols)
                    for i in range(3, -1, -1):
                        out[b, r[i]] = s[i]
                        out[b2, r[i]] = s[4 + i]

    return mm_float_x


_QUANT_CODES = (_Q40_T, _Q41_T, _Q80_T)
_FLOAT_CODES = (_F32_T, _F16_T, _BF16_T)
_MV = {(c, False): _make_mv_quant(c, False) for c in _QUANT_CODES}
_MV.update({(c, True): _make_mv_quant(c, True) for c in _QUANT_CODES})
_MV.update({(c, False): _make_mv_float(c) for c in _FLOAT_CODES})
_MM = {c: _make_mm_float_x(c) for c in _QUANT_CODES + _FLOAT_CODES}


# ---------------------------------------------------------------------------------------------------------
# Q80 codec, embedding, merge-add
# ---------------------------------------------------------------------------------------------------------


@_kernel
def _quantize_q80(x, out):
    c127 = np.float32(127.0)
    for b in range(x.shape[0]):
        xr, orow = x[b], out[b]
        for k in range(x.shape[1] // 32):
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
def _dequantize_q80(xq, out):
    for b in range(xq.shape[0]):
        _decode_row(_Q80_T, xq[b], out[b])


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
def _embedding(w, code, tokens, out):
    """Returns the index of the first out-of-range token, or -1."""
    for b in range(tokens.shape[0]):
        t = tokens[b]
        if t < 0 or t >= w.shape[0]:
            return b
        _decode_row(code, w[t], out[b])
    return -1


@_kernel
def _kv_store(k_cache, v_cache, positions, k, v):
    """Returns the index of the first position outside the cache, or -1."""
    for b in range(positions.shape[0]):
        p = positions[b]
        if p < 0 or p >= k_cache.shape[0]:
            return b
        k_cache[p, :] = k[b]
        v_cache[p, :] = v[b]
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


@_fast_kernel
def _silu_mul(gate, up):
    one = np.float32(1.0)
    for b in range(gate.shape[0]):
        g, u = gate[b], up[b]
        for i in range(g.shape[0]):
            v = g[i]
            g[i] = v / (one + _expf(-v)) * u[i]


@_fast_kernel
def _add(x, y):
    for b in range(x.shape[0]):
        xr, yr = x[b], y[b]
        for i in range(xr.shape[0]):
            xr[i] += yr[i]


@_fast_kernel
def _rmsnorm(x, weight, eps, out):
    n = x.shape[1]
    for b in range(x.shape[0]):
        xr, orow = x[b], out[b]
        ss = np.float32(0.0)
        for i in range(n):
            ss += xr[i] * xr[i]
        inv = np.float32(1.0) / np.sqrt(ss / np.float32(n) + np.float32(eps))
        for i in range(n):
            orow[i] = weight[i] * (inv * xr[i])


@_kernel
def _rope(x, positions, cos, sin, head_dim, neox):
    """Returns the index of the first row whose position lies outside the table, or -1."""
    half = head_dim // 2
    step, span = (1, half) if neox else (2, 1)
    for b in range(x.shape[0]):
        p = positions[b]
        if p < 0 or p >= cos.shape[0]:
            return b
        c, s, xr = cos[p], sin[p], x[b]
        for h0 in range(0, x.shape[1], head_dim):
            for j in range(half):
                i0 = h0 + step * j
                v0, v1 = xr[i0], xr[i0 + span]
                xr[i0] = v0 * c[j] - v1 * s[j]
                xr[i0 + span] = v0 * s[j] + v1 * c[j]
    return -1


@_helper
def _dot(a, ao, b, bo, n):
    """Dot of n floats of a from offset ao with n floats of b from offset bo, in float32."""
    acc0, acc1 = _vzero(), _vzero()
    i = 0
    while i + 16 <= n:
        acc0 = _vfma(_ld_f32x8(a, ao + i), _ld_f32x8(b, bo + i), acc0)
        acc1 = _vfma(_ld_f32x8(a, ao + i + 8), _ld_f32x8(b, bo + i + 8), acc1)
        i += 16
    if i + 8 <= n:
        acc0 = _vfma(_ld_f32x8(a, ao + i), _ld_f32x8(b, bo + i), acc0)
        i += 8
    s = _vsum(_vadd(acc0, acc1))
    for j in range(i, n):
        s += _ld_f32(a, ao + j) * _ld_f32(b, bo + j)
    return s


@_helper
def _weighted_rows(p, n, rows, col, width, scale, out, ocol):
    """width floats of out from offset ocol = scale * sum_t p[t] * rows[t, col:col+width] over t < n."""
    stride = rows.strides[0] // 4
    c = 0
    while c + 32 <= width:
        a0, a1, a2, a3 = _vzero(), _vzero(), _vzero(), _vzero()
        for t in range(n):
            pt, o = _vsplat(p[t]), t * stride + col + c
            a0 = _vfma(pt, _ld_f32x8(rows, o), a0)
            a1 = _vfma(pt, _ld_f32x8(rows, o + 8), a1)
            a2 = _vfma(pt, _ld_f32x8(rows, o + 16), a2)
            a3 = _vfma(pt, _ld_f32x8(rows, o + 24), a3)
        sv = _vsplat(scale)
        _st_f32x8(out, ocol + c, _vmul(a0, sv))
        _st_f32x8(out, ocol + c + 8, _vmul(a1, sv))
        _st_f32x8(out, ocol + c + 16, _vmul(a2, sv))
        _st_f32x8(out, ocol + c + 24, _vmul(a3, sv))
        c += 32
    while c + 8 <= width:
        a0 = _vzero()
        for t in range(n):
            a0 = _vfma(_vsplat(p[t]), _ld_f32x8(rows, t * stride + col + c), a0)
        _st_f32x8(out, ocol + c, _vmul(a0, _vsplat(scale)))
        c += 8
    for j in range(c, width):
        s = np.float32(0.0)
        for t in range(n):
            s += p[t] * rows[t, col + j]
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
    stride = k_cache.strides[0] // 4
    t = 0
    if head_dim % 8 == 0:
        sv = _vsplat(scale)
        while t + 8 <= n:
            o = t * stride + ko
            a0, a1, a2, a3 = _vzero(), _vzero(), _vzero(), _vzero()
            a4, a5, a6, a7 = _vzero(), _vzero(), _vzero(), _vzero()
            for i in range(0, head_dim, 8):
                qv = _ld_f32x8(q, qo + i)
                a0 = _vfma(qv, _ld_f32x8(k_cache, o + i), a0)
                a1 = _vfma(qv, _ld_f32x8(k_cache, o + stride + i), a1)
                a2 = _vfma(qv, _ld_f32x8(k_cache, o + 2 * stride + i), a2)
                a3 = _vfma(qv, _ld_f32x8(k_cache, o + 3 * stride + i), a3)
                a4 = _vfma(qv, _ld_f32x8(k_cache, o + 4 * stride + i), a4)
                a5 = _vfma(qv, _ld_f32x8(k_cache, o + 5 * stride + i), a5)
                a6 = _vfma(qv, _ld_f32x8(k_cache, o + 6 * stride + i), a6)
                a7 = _vfma(qv, _ld_f32x8(k_cache, o + 7 * stride + i), a7)
            _st_f32x8(srow, t, _vmul(_vsum8(a0, a1, a2, a3, a4, a5, a6, a7), sv))
            t += 8
    for u in range(t, n):
        srow[u] = _dot(q, qo, k_cache, u * stride + ko, head_dim) * scale


@_helper
def _attend(q, k_cache, v_cache, pos, b, h, group, head_dim, out, srow):
    """One (row, head): softmax(q.k_t / sqrt(head_dim)) over t = 0..pos, weighted sum of v_t into out."""
    qo = b * (q.strides[0] // 4) + h * head_dim
    ko = (h // group) * head_dim
    _scores(q, qo, k_cache, ko, pos + 1, head_dim, np.float32(1.0) / np.sqrt(np.float32(head_dim)), srow)
    total = _softmax_inplace(srow, pos + 1)
    _weighted_rows(srow, pos + 1, v_cache, ko, head_dim, np.float32(1.0) / total, out, qo)


@_helper
def _attention_check(q, k_cache, v_cache, positions, n_heads, out, scratch):
    """-1 when all is well, -2 when a row is not contiguous, else the index of the first position outside the
    cache or the scratch."""
    if (q.strides[1] != 4 or out.strides[1] != 4 or k_cache.strides[1] != 4 or v_cache.strides[1] != 4
            or scratch.strides[1] != 4):
        return -2
    limit = min(k_cache.shape[0], scratch.shape[1])
    for b in range(q.shape[0]):
        if positions[b] < 0 or positions[b] >= limit:
            return b
    return -1


@_parallel_kernel
def _attention_par(q, k_cache, v_cache, positions, n_heads, group, head_dim, out, scratch):
    bad = _attention_check(q, k_cache, v_cache, positions, n_heads, out, scratch)
    if bad != -1:
        return bad
    for bh in prange(q.shape[0] * n_heads):
        b, h = bh // n_heads, bh % n_heads
        _attend(q, k_cache, v_cache, positions[b], b, h, group, head_dim, out, scratch[bh])
    return -1


@_kernel
def _attention_ser(q, k_cache, v_cache, positions, n_heads, group, head_dim, out, scratch):
    bad = _attention_check(q, k_cache, v_cache, positions, n_heads, out, scratch)
    if bad != -1:
        return bad
    for bh in range(q.shape[0] * n_heads):
        b, h = bh // n_heads, bh % n_heads
        _attend(q, k_cache, v_cache, positions[b], b, h, group, head_dim, out, scratch[bh])
    return -1



# ---------------------------------------------------------------------------------------------------------
# Public API
# ---------------------------------------------------------------------------------------------------------

_ATTENTION_PARALLEL_WORK = 2048  # (b, h, t) triples below which one thread beats a parallel launch


def set_threads(n: int) -> None:
    """Threads for the parallel kernels launched from the calling thread (numba's setting is per thread).

    n runs from 1 to the CPUs numba sees (NUMBA_NUM_THREADS).
    """
    limit = numba.config.NUMBA_NUM_THREADS
    if not isinstance(n, int) or not 1 <= n <= limit:
        raise DllamaError(f"thread count {n!r} must be an integer from 1 to {limit} (the CPUs numba can use)")
    numba.set_num_threads(n)


def _code(wtype: str) -> int:
    code = _CODES.get(wtype)
    if code is None:
        raise DllamaError(f"unknown weight type {wtype!r} (expected one of {', '.join(_CODES)})")
    return code


def _weight_bytes(w: np.ndarray, code: int) -> tuple[np.ndarray, int]:
    """The weight as uint8 (rows, row_bytes) and its column count."""
    if w.ndim == 1:
        w = w.reshape(1, -1)
    if w.strides[-1] != w.itemsize:
        raise DllamaError(f"weight rows must be contiguous (strides {w.strides})")
    w = np.asarray(w).view(np.uint8)
    if code in _QBLOCK_BYTES:
        bs = _QBLOCK_BYTES[code]
        if w.shape[1] % bs:
            raise DllamaError(f"weight row of {w.shape[1]} bytes is not a whole number of {bs}-byte blocks")
        return w, w.shape[1] // bs * 32
    return w, w.shape[1] // _ELEM_BYTES[code]


def _rows_contiguous(a: np.ndarray, what: str) -> None:
    if a.ndim != 2 or a.strides[1] != a.itemsize:
        raise DllamaError(f"{what} must be 2-D with contiguous rows (shape {a.shape}, strides {a.strides})")


def matmul(w: np.ndarray, wtype: str, x: np.ndarray, out: np.ndarray) -> None:
    """out[b, r] = sum_c W[r, c] * x[b, c] for float32 x (B, cols); W in its native encoding `wtype`."""
    code = _code(wtype)
    wb, cols = _weight_bytes(w, code)
    _rows_contiguous(x, "matmul input")
    _rows_contiguous(out, "matmul output")
    if x.shape[1] != cols or out.shape != (x.shape[0], wb.shape[0]) or x.dtype != np.float32:
        raise DllamaError(f"matmul shapes disagree: weight {wb.shape[0]}x{cols}, x {x.shape} {x.dtype}, "
                          f"out {out.shape}")
    if x.shape[0] == 1:
        _MV[code, False](wb, x[0], out[0])
    elif x.shape[0] > 1:
        _MM[code](wb, x, out, _n_chunks(wb.shape[0]))


def matmul_q80(w: np.ndarray, wtype: str, xq: np.ndarray, out: np.ndarray) -> None:
    """matmul with Q80 activations xq uint8 (B, cols/32*34), dllama's numerics.

    B = 1 with quantised W: an exact integer dot per block, d_w*d_x*sum(qw*qx) (+ m_w*d_x*sum(qx) for q41).
    Otherwise (prefill batches, float weights) the activations are de-quantised into a temporary (their exact
    values) and multiplied in float32, which differs from the integer form only by float32 rounding.
    """
    code = _code(wtype)
    wb, cols = _weight_bytes(w, code)
    _rows_contiguous(xq, "matmul_q80 input")
    _rows_contiguous(out, "matmul_q80 output")
    if (cols % 32 or xq.shape[1] != cols // 32 * _Q80_BYTES or out.shape != (xq.shape[0], wb.shape[0])
            or xq.dtype != np.uint8):
        raise DllamaError(f"matmul_q80 shapes disagree: weight {wb.shape[0]}x{cols}, "
                          f"xq {xq.shape} {xq.dtype}, out {out.shape}")
    if xq.shape[0] == 1 and code in _QUANT_CODES:
        _MV[code, True](wb, xq[0], out[0])
    elif xq.shape[0] > 0:
        x = np.empty((xq.shape[0], cols), np.float32)
        _dequantize_q80(xq, x)
        matmul(w, wtype, x, out)


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
    code = _code(wtype)
    wb, cols = _weight_bytes(w, code)
    _rows_contiguous(out, "embedding output")
    if out.shape != (tokens.shape[0], cols):
        raise DllamaError(f"embedding shapes disagree: table {wb.shape[0]}x{cols}, out {out.shape}")
    bad = _embedding(wb, code, tokens, out)
    if bad >= 0:
        raise DllamaError(f"token id {int(tokens[bad])} is outside the vocabulary (0..{wb.shape[0] - 1})")


def rmsnorm(x: np.ndarray, weight: np.ndarray, eps: float, out: np.ndarray) -> None:
    """Per row: out = weight * x / sqrt(mean(x^2) + eps)."""
    if weight.shape != (x.shape[1],) or out.shape != x.shape:
        raise DllamaError(f"rmsnorm shapes disagree: x {x.shape}, weight {weight.shape}, out {out.shape}")
    _rmsnorm(x, weight, float(eps), out)


def rope_table(head_dim: int, theta: float, neox: bool, scaling: tuple | None,
               freq_factors: np.ndarray | None, max_pos: int) -> tuple[np.ndarray, np.ndarray]:
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


def rope(x: np.ndarray, positions: np.ndarray, cos: np.ndarray, sin: np.ndarray, head_dim: int,
         neox: bool) -> None:
    """Rotate x (B, n_heads*head_dim) in place, row b by positions[b], in NeoX or interleaved pairs."""
    if x.shape[1] % head_dim or cos.shape[1] != head_dim // 2 or positions.shape[0] != x.shape[0]:
        raise DllamaError(f"rope shapes disagree: x {x.shape}, head_dim {head_dim}, table {cos.shape}")
    bad = _rope(x, positions, cos, sin, head_dim, neox)
    if bad >= 0:
        raise DllamaError(f"position {int(positions[bad])} is beyond the RoPE table "
                          f"({cos.shape[0]} positions)")


def attention(q: np.ndarray, k_cache: np.ndarray, v_cache: np.ndarray, positions: np.ndarray, n_heads: int,
              n_kv_heads: int, head_dim: int, out: np.ndarray, scratch: np.ndarray) -> None:
    """Causal multi-head attention of q (B, n_heads*head_dim) over cache rows 0..positions[b], into out.

    q head h reads kv head h // (n_heads // n_kv_heads). scratch is float32 (>= B*n_heads, > max position):
    row b*n_heads + h holds that head's scores.
    """
    n_b = q.shape[0]
    if (n_heads <= 0 or n_kv_heads <= 0 or n_heads % n_kv_heads or q.shape[1] != n_heads * head_dim
            or out.shape != q.shape or k_cache.shape[1] != n_kv_heads * head_dim
            or v_cache.shape != k_cache.shape
            or positions.shape[0] != n_b or scratch.shape[0] < n_b * n_heads):
        raise DllamaError(f"attention shapes disagree: q {q.shape}, heads {n_heads}/{n_kv_heads}x{head_dim}, "
                          f"cache {k_cache.shape}, out {out.shape}, scratch {scratch.shape}")
    last = int(positions[n_b - 1]) if n_b else 0  # the largest position in a prefill batch: sizes the work
    kernel = _attention_par if n_b * n_heads * (last + 1) >= _ATTENTION_PARALLEL_WORK else _attention_ser
    bad = kernel(q, k_cache, v_cache, positions, n_heads, n_heads // n_kv_heads, head_dim, out, scratch)
    if bad == -2:
        raise DllamaError("attention needs q, out, caches and scratch with contiguous rows")
    if bad >= 0:
        raise DllamaError(f"position {int(positions[bad])} is outside the KV cache ({k_cache.shape[0]} rows) "
                          f"or the attention scratch ({scratch.shape[1]} columns)")


def kv_store(k_cache: np.ndarray, v_cache: np.ndarray, positions: np.ndarray, k: np.ndarray,
             v: np.ndarray) -> None:
    """k_cache[positions[b]] = k[b] and v_cache[positions[b]] = v[b] for each batch row b."""
    if k.shape != v.shape or k_cache.shape != v_cache.shape or k.shape[1:] != k_cache.shape[1:] \
            or positions.shape[0] != k.shape[0]:
        raise DllamaError(f"kv_store shapes disagree: cache {k_cache.shape}, k {k.shape}, v {v.shape}")
    bad = _kv_store(k_cache, v_cache, positions, k, v)
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
