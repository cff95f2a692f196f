#version 450
// Matrix-vector / matrix-matrix product with F16 weights; f32 activations, or Q80 ones with
// -DACT_Q80; an expert stack routed per token with -DMOE (moe_matmul); the FFN's gate and up
// weights with -DGATE_UP (silu(gate) * up, matmul.glsl).
#extension GL_GOOGLE_include_directive : require
#include "common.glsl"
#include "reduce.glsl"
#include "weights_head.glsl"
#include "wt_f16.glsl"
#ifdef GATE_UP
#include "weights_up.glsl"
#include "wt_f16.glsl"
#endif
#include "matmul.glsl"
