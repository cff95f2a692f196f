#version 450
// Embedding lookup from a Q5_0 table into f32 rows.
#extension GL_GOOGLE_include_directive : require
#include "common.glsl"
#include "weights_head.glsl"
#include "wt_q50.glsl"
#include "embedding.glsl"
