#version 450
// Matrix-vector / matrix-matrix product with Q5_1 weights; f32 activations, or Q80 ones with
// -DACT_Q80; an expert stack routed per token with -DMOE (moe_matmul).
#extension GL_GOOGLE_include_directive : require
#include "common.glsl"
#include "reduce.glsl"
#include "weights_head.glsl"
#include "wt_q51.glsl"
#include "matmul.glsl"
