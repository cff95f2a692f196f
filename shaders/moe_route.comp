#version 450
// Mixture-of-experts router, one invocation per token: p = softmax(logits) (max subtracted), the K experts
// of largest p in descending order (ties: the lower expert first) into idx, and their weights p, divided by
// the sum of the K chosen p when NORMALIZE, into w. Each pick is the largest (p, -expert) pair below the
// previous pick, so nothing needs to be marked.
#extension GL_GOOGLE_include_directive : require
#include "common.glsl"
layout(constant_id = 1) const uint E = 1;          // experts
layout(constant_id = 2) const uint K = 1;          // experts per token
layout(constant_id = 3) const uint NORMALIZE = 0;

layout(std430, binding = 0) readonly buffer L { float logits[]; };
layout(std430, binding = 1) writeonly buffer I { int idx[]; };
layout(std430, binding = 2) buffer P { float w[]; };

void main() {
    uint b = global_index();
    if (b >= pc.n) return;
    uint base = b * E;
    float mx = logits[base];
    for (uint e = 1u; e < E; e++) mx = max(mx, logits[base + e]);
    float total = 0.0;
    for (uint e = 0u; e < E; e++) total += exp(logits[base + e] - mx);
    float prev = 2.0, chosen = 0.0;
    int prev_e = -1;
    for (uint s = 0u; s < K; s++) {
        float best = -1.0;
        int best_e = 0;
        for (uint e = 0u; e < E; e++) {
            float p = exp(logits[base + e] - mx) / total;
            bool below = p < prev || (p == prev && int(e) > prev_e);
            if (below && p > best) {
                best = p;
                best_e = int(e);
            }
        }
        idx[b * K + s] = best_e;
        w[b * K + s] = best;
        chosen += best;
        prev = best;
        prev_e = best_e;
    }
    if (NORMALIZE != 0u) {
        for (uint s = 0u; s < K; s++) w[b * K + s] /= chosen;
    }
}
