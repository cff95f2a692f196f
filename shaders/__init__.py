"""GLSL compute shaders for the Vulkan backend (one .comp file per op and weight type)."""
