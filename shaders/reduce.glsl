// Workgroup-wide sum / max. With USE_SUBGROUPS: subgroup arithmetic, then one partial per subgroup in shared
// memory; without: a shared-memory tree (the workgroup size must be a power of two). Every invocation of the
// workgroup must call these (they contain barriers) and every invocation gets the result.
shared vec4 red_buf[gl_WorkGroupSize.x];

#ifdef USE_SUBGROUPS
vec4 wg_sum4(vec4 v) {
    v = subgroupAdd(v);
    barrier();
    if (subgroupElect()) red_buf[gl_SubgroupID] = v;
    barrier();
    vec4 s = red_buf[0];
    for (uint i = 1u; i < gl_NumSubgroups; i++) s += red_buf[i];
    return s;
}

float wg_max(float v) {
    v = subgroupMax(v);
    barrier();
    if (subgroupElect()) red_buf[gl_SubgroupID].x = v;
    barrier();
    float s = red_buf[0].x;
    for (uint i = 1u; i < gl_NumSubgroups; i++) s = max(s, red_buf[i].x);
    return s;
}
#else
vec4 wg_sum4(vec4 v) {
    uint t = gl_LocalInvocationID.x;
    barrier();
    red_buf[t] = v;
    barrier();
    for (uint s = gl_WorkGroupSize.x >> 1; s > 0u; s >>= 1) {
        if (t < s) red_buf[t] += red_buf[t + s];
        barrier();
    }
    return red_buf[0];
}

float wg_max(float v) {
    uint t = gl_LocalInvocationID.x;
    barrier();
    red_buf[t].x = v;
    barrier();
    for (uint s = gl_WorkGroupSize.x >> 1; s > 0u; s >>= 1) {
        if (t < s) red_buf[t].x = max(red_buf[t].x, red_buf[t + s].x);
        barrier();
    }
    return red_buf[0].x;
}
#endif

float wg_sum(float v) { return wg_sum4(vec4(v, 0.0, 0.0, 0.0)).x; }
