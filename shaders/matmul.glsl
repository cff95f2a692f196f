// y[b, r] = sum_c W[r, c] * x[b, c] for the n live batch rows, a 32-value block at a time. Included after
// common.glsl, reduce.glsl, weights_head.glsl and one wt_<type>.glsl (load_block / wvec / wscale [/ wmin]).
// Output rows come in groups of R. SPLIT = 1 (GPUs): a workgroup owns one row group and its lanes stride
// over the rows' block quarters (coalesced loads; see matvec_split), or with MT > 0 (prefill) a tile of
// rows x batch rows in shared memory (matmat). SPLIT = 0 (CPU implementations such as lavapipe, where every
// buffer load is expensive and barriers more so): each invocation owns a row group and walks whole rows.
// In the mat-vec paths the x blocks of TB batch rows are loaded once and serve the R rows, and each weight
// block is loaded once for the TB batch rows.
// ACT_Q80: x is Q80 blocks (34 bytes: fp16 d, 32 int8); the block dot product is done on the integer
// values, d_w * d_x * sum(q_w * q_x) [+ m_w * d_x * sum(q_x)], as distributed-llama's Q80 kernels do.
// INT_DOT (with ACT_Q80, 32-value block weights whose wt_<type>.glsl has wcodes, on a device created with
// shaderIntegerDotProduct): the mat-vec paths keep both sides' codes packed 4 per word and sum a block in
// int32 with 8 packed 4x8 dot products (exact), less W_OFFSET * sum(q_x) for Q4_0/Q5_0; the block is then
// (d_w * d_x) * s [+ (m_w * d_x) * sum(q_x)], as the CPU backend's integer kernels compute it. With SPLIT = 1
// a lane takes whole blocks (j = t, t + WG, ...) so that each block's sum stays one exact integer.
// MOE (moe_matmul): the weight is a stack of EXPERTS matrices per layer and the batch rows are the n * SLOTS
// (token, slot) pairs: pair q = b * SLOTS + s multiplies expert moe_idx[q] by x row b (or row q when x holds
// one input per slot) into y row q, i.e. y[b, s * OUT_ROWS + OUT0 + r]. Pairs use different experts, so TB
// is 1 there.
// GATE_UP (matmul): the FFN's gate and up projections of one x in one dispatch. The up weight, of the gate's
// type and shape, is bound after the gate's buffers (weights_up.glsl: load_block_up, wpart_up); each row's two
// products are summed exactly as two matmul dispatches sum them, and y gets silu(gate) * up (swiglu(), as
// silu_mul.comp computes it).
layout(constant_id = 2) const uint R = 1;       // output rows per row group (1..4)
layout(constant_id = 3) const uint SPLIT = 1;   // 1: a workgroup shares a row group; 0: an invocation owns one
layout(constant_id = 4) const uint TB = 1;      // batch rows per pass (1..4)
// The weight may be one row range (piece) of a matrix too large for one buffer: its rows are output values
// OUT0 .. OUT0 + pc.rows of rows of OUT_ROWS values.
layout(constant_id = 5) const uint OUT_ROWS = 1;
layout(constant_id = 6) const uint OUT0 = 0;
// MT > 0 (SPLIT = 1, prefill): the mat-mat path, tiles of TR rows x MT batch rows staged in shared memory.
layout(constant_id = 7) const uint MT = 0;
const uint TR = 16u;
shared vec4 wsh[MT > 0u ? TR * 8u : 1u];
#ifdef GATE_UP
shared vec4 wshu[MT > 0u ? TR * 8u : 1u];
#endif
shared vec4 xsh[MT > 0u ? MT * 9u : 1u];   // rows padded to 9 vec4 against bank conflicts

#ifdef ACT_Q80
layout(std430, binding = 0) readonly buffer X { uint xq[]; };
#else
layout(std430, binding = 0) readonly buffer X { vec4 x4[]; };
#endif
layout(std430, binding = 1) writeonly buffer Y { float y[]; };
#ifdef MOE
layout(std430, binding = 2) readonly buffer I { int moe_idx[]; };
layout(constant_id = 8) const uint SLOTS = 1;        // experts per token
layout(constant_id = 9) const uint EXPERTS = 1;      // matrices per layer in the weight buffer
layout(constant_id = 10) const uint X_PER_SLOT = 0;   // 1: x has one row per (token, slot) pair
const uint PAIRS = SLOTS;
#else
const uint PAIRS = 1u;
#endif

// The x row and the first weight row of batch row (or pair) q.
uint x_row(uint q) {
#ifdef MOE
    return X_PER_SLOT != 0u ? q : q / SLOTS;
#else
    return q;
#endif
}

uint weight_base(uint q) {
#ifdef MOE
    return (pc.aux * EXPERTS + uint(clamp(moe_idx[q], 0, int(EXPERTS) - 1))) * pc.rows;
#else
    return pc.aux * pc.rows;
#endif
}

#ifdef INT_DOT
struct XBlock { uint v[8]; float d; int sum; };

// The x block j of batch row b as packed codes, with their sum where the weight type needs it (SHARE_X: see
// the float load_xblock below).
XBlock load_xblock(uint b, uint j) {
    XBlock x;
    uint off = (b * NB + j) * 34u;
    x.d = half_at(xq[off >> 2], off & 2u);
#ifdef SHARE_X
    uint mine = LOAD_U32_2A(xq, off + 2u + 4u * (gl_SubgroupInvocationID & 7u));
    for (uint k = 0u; k < 8u; k++) x.v[k] = subgroupBroadcast(mine, k);
#else
    for (uint k = 0u; k < 8u; k++) x.v[k] = LOAD_U32_2A(xq, off + 2u + 4u * k);
#endif
    x.sum = 0;
#if defined(HAS_MIN) || defined(W_OFFSET)
    for (uint k = 0u; k < 8u; k++) x.sum = idot4(x.v[k], 0x01010101u, x.sum);
#endif
    return x;
}

// A weight block as packed codes (wcodes) with its scale d and minimum m.
struct WDec { uint v[8]; float d; float m; };

WDec decode(WBlock w) {
    WDec o;
    for (uint k = 0u; k < 8u; k++) o.v[k] = wcodes(w, k);
    o.d = wscale(w);
#ifdef HAS_MIN
    o.m = wmin(w);
#else
    o.m = 0.0;
#endif
    return o;
}

float block_dot(WDec w, XBlock x) {
    int s = 0;
    for (uint k = 0u; k < 8u; k++) s = idot4(w.v[k], x.v[k], s);
#ifdef W_OFFSET
    s -= W_OFFSET * x.sum;
#endif
#ifdef HAS_MIN
    return (w.d * x.d) * float(s) + (w.m * x.d) * float(x.sum);
#else
    return (w.d * x.d) * float(s);
#endif
}
#else
struct XBlock { vec4 v[8]; float d; float sum; };

// The x block j of batch row b. SHARE_X (CPU implementations with SPLIT = 0, whose lanes all walk the same
// block): lane l of each 8 loads only the l-th quarter-word group and the others receive it by broadcast,
// which cuts the expensive buffer loads eightfold there.
XBlock load_xblock(uint b, uint j) {
    XBlock x;
#ifdef SHARE_X
    uint lane = gl_SubgroupInvocationID & 7u;
#endif
#ifdef ACT_Q80
    uint off = (b * NB + j) * 34u;
    x.d = half_at(xq[off >> 2], off & 2u);
#ifdef SHARE_X
    uint o = off + 2u + 4u * lane;
    uint mine = LOAD_U32_2A(xq, o);
    for (uint k = 0u; k < 8u; k++) x.v[k] = i8x4(subgroupBroadcast(mine, k));
#else
    for (uint k = 0u; k < 8u; k++) {
        uint o = off + 2u + 4u * k;
        x.v[k] = i8x4(LOAD_U32_2A(xq, o));
    }
#endif
#else
    uint o = 8u * (b * NB + j);
#ifdef SHARE_X
    vec4 mine = x4[o + lane];
    for (uint k = 0u; k < 8u; k++) x.v[k] = subgroupBroadcast(mine, k);
#else
    for (uint k = 0u; k < 8u; k++) x.v[k] = x4[o + k];
#endif
    x.d = 1.0;
#endif
    x.sum = 0.0;
#ifdef HAS_MIN
    for (uint k = 0u; k < 8u; k++) x.sum += dot(x.v[k], vec4(1.0));
#endif
    return x;
}

// A weight block decoded once: value = d * v + m at block positions 4k..4k+3 of v[k].
struct WDec { vec4 v[8]; float d; float m; };

WDec decode(WBlock w) {
    WDec o;
    for (uint k = 0u; k < 8u; k++) o.v[k] = wvec(w, k);
    o.d = wscale(w);
#ifdef HAS_MIN
    o.m = wmin(w);
#else
    o.m = 0.0;
#endif
    return o;
}

float block_dot(WDec w, XBlock x) {
    float s = 0.0;
    for (uint k = 0u; k < 8u; k++) s += dot(w.v[k], x.v[k]);
#ifdef HAS_MIN
    return x.d * (w.d * s + w.m * x.sum);
#else
    return x.d * w.d * s;
#endif
}

#endif

// Quarter k (values 4k..4k+3) of the weight block j of row r, with its scale d and minimum m. Types whose
// blocks are large define HAS_WPART and load only that quarter; the others decode the whole block.
#ifndef HAS_WPART
vec4 block_part(WBlock b, uint k, out float d, out float m) {
    d = wscale(b);
#ifdef HAS_MIN
    m = wmin(b);
#else
    m = 0.0;
#endif
    return wvec(b, k);
}

vec4 wpart(uint r, uint j, uint k, out float d, out float m) { return block_part(load_block(r, j), k, d, m); }
#ifdef GATE_UP
vec4 wpart_up(uint r, uint j, uint k, out float d, out float m) {
    return block_part(load_block_up(r, j), k, d, m);
}
#endif
#endif

// Output r of batch row (or pair) q from its sum g: g, or with GATE_UP silu(g) * u (u: the up weight's sum).
void put(uint q, uint r, float g, float u) {
#ifdef GATE_UP
    y[q * OUT_ROWS + OUT0 + r] = swiglu(g, u);
#else
    y[q * OUT_ROWS + OUT0 + r] = g;
#endif
}

// Quarter k of the x block j of batch row b and its scale.
vec4 xpart(uint b, uint j, uint k, out float d) {
#ifdef ACT_Q80
    uint off = (b * NB + j) * 34u;
    d = half_at(xq[off >> 2], off & 2u);
    return i8x4(LOAD_U32_2A(xq, off + 2u + 4u * k));
#else
    d = 1.0;
    return x4[8u * (b * NB + j) + k];
#endif
}

float part_dot(vec4 w, float d, float m, vec4 x, float xd) {
#ifdef HAS_MIN
    return xd * (d * dot(w, x) + m * dot(x, vec4(1.0)));
#else
    return xd * d * dot(w, x);
#endif
}

// A workgroup of one subgroup reduces with subgroupAdd alone (no shared memory, no barrier).
vec4 mv_sum4(vec4 v) {
#ifdef USE_SUBGROUPS
    if (gl_NumSubgroups == 1u) return subgroupAdd(v);
#endif
    return wg_sum4(v);
}

// SPLIT = 1 mat-vec: lane t takes the block quarters t, t + WG, ... of the row group's rows, so neighbouring
// lanes read neighbouring words of the weight rows and of x (coalesced), several blocks per lane.
void matvec_split() {
    uint t = gl_LocalInvocationID.x, row0 = wg_index() * R;
    if (row0 >= pc.rows) return;    // the whole workgroup (no barrier is skipped)
    uint nq = pc.n * PAIRS;
    for (uint b0 = 0u; b0 < nq; b0 += TB) {
        uint nb = min(TB, nq - b0), base = weight_base(b0);
        vec4 acc[4] = vec4[4](vec4(0.0), vec4(0.0), vec4(0.0), vec4(0.0));   // [row][batch row]
        vec4 accu[4] = acc;   // GATE_UP: the up weight's
#ifdef INT_DOT
        for (uint j = t; j < NB; j += gl_WorkGroupSize.x) {
            XBlock xb[4];
            for (uint c = 0u; c < TB; c++) {
                if (c < nb) xb[c] = load_xblock(x_row(b0 + c), j);
            }
            for (uint i = 0u; i < R; i++) {
                uint r = base + min(row0 + i, pc.rows - 1u);
                WDec w = decode(load_block(r, j));
                for (uint c = 0u; c < TB; c++) {
                    if (c < nb) acc[i][c] += block_dot(w, xb[c]);
                }
#ifdef GATE_UP
                WDec u = decode(load_block_up(r, j));
                for (uint c = 0u; c < TB; c++) {
                    if (c < nb) accu[i][c] += block_dot(u, xb[c]);
                }
#endif
            }
        }
#else
        for (uint p = t; p < NB * 8u; p += gl_WorkGroupSize.x) {
            uint j = p >> 3, k = p & 7u;
            vec4 xv[4];
            float xd[4];
            for (uint c = 0u; c < TB; c++) {
                if (c < nb) xv[c] = xpart(x_row(b0 + c), j, k, xd[c]);
            }
            for (uint i = 0u; i < R; i++) {
                float d, m;
                uint r = base + min(row0 + i, pc.rows - 1u);
                vec4 wv = wpart(r, j, k, d, m);
                for (uint c = 0u; c < TB; c++) {
                    if (c < nb) acc[i][c] += part_dot(wv, d, m, xv[c], xd[c]);
                }
#ifdef GATE_UP
                wv = wpart_up(r, j, k, d, m);
                for (uint c = 0u; c < TB; c++) {
                    if (c < nb) accu[i][c] += part_dot(wv, d, m, xv[c], xd[c]);
                }
#endif
            }
        }
#endif
        for (uint i = 0u; i < R; i++) {
            vec4 tot = mv_sum4(acc[i]), totu = tot;
#ifdef GATE_UP
            totu = mv_sum4(accu[i]);
#endif
            if (t == 0u && row0 + i < pc.rows) {
                for (uint c = 0u; c < nb; c++) put(b0 + c, row0 + i, tot[c], totu[c]);
            }
        }
    }
}

// Mat-mat (not MOE): a workgroup owns TR rows and walks the batch in tiles of MT rows. Per block, the TR
// weight blocks are decoded once into shared memory (value = d * q + m) with the tile's x blocks beside
// them; lane t then sums the outputs (row t / MT + i * WG / MT, batch row t % MT).
void matmat() {
    uint t = gl_LocalInvocationID.x, row0 = wg_index() * TR, wg = gl_WorkGroupSize.x;
    if (row0 >= pc.rows) return;
    uint c = t % MT, per = TR * MT / wg;
    for (uint b0 = 0u; b0 < pc.n; b0 += MT) {
        float acc[16], accu[16];   // accu: GATE_UP's up weight
        for (uint i = 0u; i < per; i++) acc[i] = accu[i] = 0.0;
        for (uint j = 0u; j < NB; j++) {
            for (uint p = t; p < TR * 8u; p += wg) {
                float d, m;
                uint r = pc.aux * pc.rows + min(row0 + (p >> 3), pc.rows - 1u);
                vec4 wv = wpart(r, j, p & 7u, d, m);
                wsh[p] = d * wv + m;
#ifdef GATE_UP
                wv = wpart_up(r, j, p & 7u, d, m);
                wshu[p] = d * wv + m;
#endif
            }
            for (uint p = t; p < MT * 8u; p += wg) {
                uint b = b0 + (p >> 3);
                float xd;
                vec4 xv = b < pc.n ? xpart(b, j, p & 7u, xd) : vec4(0.0);
                xsh[(p >> 3) * 9u + (p & 7u)] = b < pc.n ? xd * xv : vec4(0.0);
            }
            barrier();
            for (uint i = 0u; i < per; i++) {
                uint r = t / MT + i * (wg / MT);
                float s = 0.0;
                for (uint k = 0u; k < 8u; k++) s += dot(wsh[r * 8u + k], xsh[c * 9u + k]);
                acc[i] += s;
#ifdef GATE_UP
                s = 0.0;
                for (uint k = 0u; k < 8u; k++) s += dot(wshu[r * 8u + k], xsh[c * 9u + k]);
                accu[i] += s;
#endif
            }
            barrier();
        }
        for (uint i = 0u; i < per; i++) {
            uint r = row0 + t / MT + i * (wg / MT);
            if (r < pc.rows && b0 + c < pc.n) put(b0 + c, r, acc[i], accu[i]);
        }
    }
}

void main() {
    if (SPLIT != 0u) {
#ifndef MOE
        if (MT > 0u) {
            matmat();
            return;
        }
#endif
        matvec_split();
        return;
    }
    uint row0 = global_index() * R;   // SPLIT = 0: this invocation's row group
#ifdef SHARE_X
    bool live = row0 < pc.rows;     // every lane must take part in the broadcasts
    row0 = min(row0, pc.rows - 1u);
#else
    if (row0 >= pc.rows) return;
    bool live = true;
#endif
    uint nq = pc.n * PAIRS;
    for (uint b0 = 0u; b0 < nq; b0 += TB) {
        uint nb = min(TB, nq - b0), base = weight_base(b0);
        vec4 acc[4] = vec4[4](vec4(0.0), vec4(0.0), vec4(0.0), vec4(0.0));   // [row][batch row]
        vec4 accu[4] = acc;   // GATE_UP: the up weight's
        for (uint j = 0u; j < NB; j++) {
            XBlock xb[4];
            for (uint c = 0u; c < TB; c++) {
                if (c < nb) xb[c] = load_xblock(x_row(b0 + c), j);
            }
            for (uint i = 0u; i < R; i++) {
                uint r = base + min(row0 + i, pc.rows - 1u);
                WDec w = decode(load_block(r, j));
                for (uint c = 0u; c < TB; c++) {
                    if (c < nb) acc[i][c] += block_dot(w, xb[c]);
                }
#ifdef GATE_UP
                WDec u = decode(load_block_up(r, j));
                for (uint c = 0u; c < TB; c++) {
                    if (c < nb) accu[i][c] += block_dot(u, xb[c]);
                }
#endif
            }
        }
        for (uint i = 0u; i < R; i++) {
            if (live && row0 + i < pc.rows) {
                for (uint c = 0u; c < nb; c++) put(b0 + c, row0 + i, acc[i][c], accu[i][c]);
            }
        }
    }
}
