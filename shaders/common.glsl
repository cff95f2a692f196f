// Shared by every shader: workgroup size (specialization constant 0), push constants, grid and number helpers.
// Buffers are plain uint/float arrays (no 8/16-bit storage features needed): fp16 values and Q80/Q4 bytes
// are unpacked from 32-bit words here.
#ifdef USE_SUBGROUPS
#extension GL_KHR_shader_subgroup_basic : require
#extension GL_KHR_shader_subgroup_arithmetic : require
#endif
#ifdef SHARE_X
#extension GL_KHR_shader_subgroup_basic : require
#extension GL_KHR_shader_subgroup_ballot : require
#endif
#ifdef INT_DOT
#extension GL_EXT_spirv_intrinsics : require
// The dot product of a and b read as four signed bytes each: OpSDot (SPV_KHR_integer_dot_product; capabilities
// DotProduct 6019 and DotProductInput4x8BitPacked 6018; format operand 0, PackedVectorFormat4x8Bit), declared
// through GL_EXT_spirv_intrinsics: glslang 13 has no GL_EXT_integer_dot_product (dotPacked4x8EXT). A block's
// sum stays far inside int32 (|sum| <= 32 * 128 * 128), so the plain add needs no saturating OpSDotAccSat,
// which lavapipe runs slower.
spirv_instruction(extensions = ["SPV_KHR_integer_dot_product"], capabilities = [6019, 6018], id = 4450)
int sdot4x8(uint a, uint b, spirv_literal int packed_format);
int idot4(uint a, uint b, int acc) { return acc + sdot4x8(a, b, 0); }
#endif

layout(local_size_x_id = 0) in;

// n: tokens in this forward pass (live rows of the batch); aux: the layer's index within a buffer that holds
// several layers (weights of one role, KV caches), or the destination word offset of copy_words; rows: the
// weight matrix's row count (matmul, embedding). Rows are a push constant rather than a specialisation
// constant so that matrices of equal width share one compiled pipeline.
layout(push_constant) uniform Push { uint n; uint aux; uint rows; } pc;

// Grids wider than 65535 workgroups are folded into y; this is the flat workgroup / invocation index.
uint wg_index() { return gl_WorkGroupID.y * gl_NumWorkGroups.x + gl_WorkGroupID.x; }
uint global_index() { return wg_index() * gl_WorkGroupSize.x + gl_LocalInvocationID.x; }

float half_lo(uint w) { return unpackHalf2x16(w).x; }
float half_at(uint w, uint hi) { return unpackHalf2x16(hi != 0u ? w >> 16 : w).x; }

// The four bytes of w as signed integers, lowest byte first.
vec4 i8x4(uint w) { return vec4(int(w << 24) >> 24, int(w << 16) >> 24, int(w << 8) >> 24, int(w) >> 24); }
int i8_at(uint w, uint k) { return int(w << (24u - 8u * k)) >> 24; }

// float -> fp16 bits, round to nearest even (numpy's rule), with overflow to infinity and fp16 subnormals.
uint f16_bits(float f) {
    uint x = floatBitsToUint(f);
    uint sign = (x >> 16) & 0x8000u;
    x &= 0x7FFFFFFFu;
    uint o;
    if (x >= 0x47800000u) {
        o = x > 0x7F800000u ? 0x7E00u : 0x7C00u;
    } else if (x < 0x38800000u) {
        o = floatBitsToUint(uintBitsToFloat(x) + 0.5) - 0x3F000000u;
    } else {
        o = (x + 0xC8000FFFu + ((x >> 13) & 1u)) >> 13;
    }
    return o | sign;
}

// SwiGLU's gating, silu(g) * u: silu_mul, silu_mul_q80 and the fused gate/up matmul share this arithmetic.
float swiglu(float g, float u) { return g / (1.0 + exp(-g)) * u; }

// Four bytes starting at a 2-byte aligned byte offset of a uint array (Q80 blocks are 34 bytes long).
#define LOAD_U32_2A(buf, off) ((((off) & 2u) == 0u) ? buf[(off) >> 2] \
    : ((buf[(off) >> 2] >> 16) | (buf[((off) >> 2) + 1u] << 16)))
#define LOAD_U8(buf, off) ((buf[(off) >> 2] >> (((off) & 3u) * 8u)) & 0xFFu)
