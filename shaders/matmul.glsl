// y[b, r] = sum_c W[r, c] * x[b, c] for the n live batch rows, a 32-value block at a time. Included after
// common.glsl, reduce.glsl, weights_head.glsl and one wt_<type>.glsl (load_block / wvec / wscale [/ wmin]).
// Output rows come in groups of R. SPLIT = 1 (GPUs): a workgroup owns one row group, its invocations stride
// over the row's blocks and the partial sums are reduced across the workgroup. SPLIT = 0 (CPU
// implementations such as lavapipe, where every buffer load is expensive and barriers more so): each
// invocation owns a row group and walks whole rows. Either way the x blocks of TB batch rows are loaded once
// and serve the R rows, and each weight block is loaded once for the TB batch rows.
// ACT_Q80: x is Q80 blocks (34 bytes: fp16 d, 32 int8); the block dot product is done on the integer
// values, d_w * d_x * sum(q_w * q_x) [+ m_w * d_x * sum(q_x)], as distributed-llama's Q80 kernels do.
// MOE (moe_matmul): the weight is a stack of EXPERTS matrices per layer and the batch rows are the n * SLOTS
// (token, slot) pairs: pair q = b * SLOTS + s multiplies expert moe_idx[q] by x row b (or row q when x holds
// one input per slot) into y row q, i.e. y[b, s * OUT_ROWS + OUT0 + r]. Pairs use different experts, so TB
// is 1 there.
layout(constant_id = 2) const uint R = 1;       // output rows per row group (1..4)
layout(constant_id = 3) const uint SPLIT = 1;   // 1: a workgroup shares a row group; 0: an invocation owns one
layout(constant_id = 4) const uint TB = 1;      // batch rows per pass (1..4)
// The weight may be one row range (piece) of a matrix too large for one buffer: its rows are output values
// OUT0 .. OUT0 + pc.rows of rows of OUT_ROWS values.
layout(constant_id = 5) const uint OUT_ROWS = 1;
layout(constant_id = 6) const uint OUT0 = 0;

#ifdef ACT_Q80
layout(std430, binding = 0) readonly buffer X { uint xq[]; };
#else
layout(std430, binding = 0) readonly buffer X { vec4 x4[]; };
#endif
layout(std430, binding = 1) writeonly buffer Y { float y[]; };
#ifdef MOE
layout(std430, binding = 2) readonly buffer I { int moe_idx[]; };
layout(constant_id = 7) const uint SLOTS = 1;        // experts per token
layout(constant_id = 8) const uint EXPERTS = 1;      // matrices per layer in the weight buffer
layout(constant_id = 9) const uint X_PER_SLOT = 0;   // 1: x has one row per (token, slot) pair
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

void main() {
    uint t = gl_LocalInvocationID.x;
    uint row0 = (SPLIT != 0u ? wg_index() : global_index()) * R;
#ifdef SHARE_X
    bool live = row0 < pc.rows;     // every lane must take part in the broadcasts
    row0 = min(row0, pc.rows - 1u);
#else
    if (row0 >= pc.rows) return;    // the whole workgroup when SPLIT = 1 (no barrier is skipped)
    bool live = true;
#endif
    uint jstart = SPLIT != 0u ? t : 0u, jstep = SPLIT != 0u ? gl_WorkGroupSize.x : 1u;
    uint nq = pc.n * PAIRS;
    for (uint b0 = 0u; b0 < nq; b0 += TB) {
        uint nb = min(TB, nq - b0), base = weight_base(b0);
        vec4 acc[4] = vec4[4](vec4(0.0), vec4(0.0), vec4(0.0), vec4(0.0));   // [row][batch row]
        for (uint j = jstart; j < NB; j += jstep) {
            XBlock xb[4];
            for (uint c = 0u; c < TB; c++) {
                if (c < nb) xb[c] = load_xblock(x_row(b0 + c), j);
            }
            for (uint i = 0u; i < R; i++) {
                WDec w = decode(load_block(base + min(row0 + i, pc.rows - 1u), j));
                for (uint c = 0u; c < TB; c++) {
                    if (c < nb) acc[i][c] += block_dot(w, xb[c]);
                }
            }
        }
        for (uint i = 0u; i < R; i++) {
            vec4 tot = acc[i];
            if (SPLIT != 0u) tot = wg_sum4(tot);
            if ((SPLIT == 0u || t == 0u) && live && row0 + i < pc.rows) {
                for (uint c = 0u; c < nb; c++) y[(b0 + c) * OUT_ROWS + OUT0 + row0 + i] = tot[c];
            }
        }
    }
}
