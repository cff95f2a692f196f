#version 450
// Embedding lookup from a Q5_1 table into f32 rows.
#extension GL_GOOGLE_include_directive : require
#include "common.glsl"
#include "weights_head.glsl"
#include "wt_q51.glsl"
#include "embedding.glsl"
