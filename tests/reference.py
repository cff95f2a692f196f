"""Independent float64 numpy forward pass of llama, qwen2, qwen3 and qwen3moe models: the yardstick the
engine's tests compare against.

It imports nothing from the project: gguf's own GGUFReader reads a GGUF and gguf.quants de-quantises it, or
`ref_model` takes float64 weights by GGUF tensor name (what tests/tinymodel.py's `.m` writer stored).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from gguf import GGUFReader
from gguf.quants import dequantize

NEOX_ARCHS = ("qwen2", "qwen3", "qwen3moe")  # architectures whose q/k rows use half-split (NeoX) RoPE pairs
Q80_BLOCK = 32


@dataclass
class RefModel:
    """Hyper-parameters and float64 weights (numpy order: [rows, cols]) keyed by GGUF tensor name."""

    arch: str
    dim: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    norm_eps: float
    rope_theta: float
    rope_neox: bool
    rope_scaling: tuple[float, float, float, int] | None  # llama3: (factor, low, high, original context)
    weights: dict[str, np.ndarray]  # expert stacks (ffn_*_exps) are [experts, rows, cols]
    n_experts: int = 0  # mixture of experts: router over n_experts, n_active_experts of them per token
    n_active_experts: int = 0
    moe_normalize: bool = True  # the chosen experts' probabilities are rescaled to sum to 1 (Qwen3-MoE)


def load_ref_model(path: str | Path) -> RefModel:
    """Read a llama-family GGUF and de-quantise every tensor to float64."""
    r = GGUFReader(str(path))
    arch = r.fields["general.architecture"].contents()

    def key(name: str, default: object = None) -> object:
        field = r.fields.get(f"{arch}.{name}")
        if field is None and default is None:
            raise ValueError(f"{path}: metadata key {arch}.{name} is missing")
        return default if field is None else field.contents()

    weights = {t.name: dequantize(t.data, t.tensor_type).astype(np.float64) for t in r.tensors}
    dim, n_heads = int(key("embedding_length")), int(key("attention.head_count"))
    scaling = None
    if key("rope.scaling.type", "none") == "llama3" and float(key("rope.scaling.factor", 1.0)) != 1.0:
        scaling = (
            float(key("rope.scaling.factor")),
            float(key("rope.scaling.low_freq_factor", 1.0)),
            float(key("rope.scaling.high_freq_factor", 4.0)),
            int(key("rope.scaling.original_context_length")),
        )
    return RefModel(
        arch=arch,
        dim=dim,
        n_layers=int(key("block_count")),
        n_heads=n_heads,
        n_kv_heads=int(key("attention.head_count_kv", n_heads)),
        head_dim=int(key("attention.key_length", dim // n_heads)),
        norm_eps=float(key("attention.layer_norm_rms_epsilon")),
        rope_theta=float(key("rope.freq_base", 10000.0)),
        rope_neox=arch in NEOX_ARCHS,
        rope_scaling=scaling,
        weights=weights,
        n_experts=int(key("expert_count", 0)),
        n_active_experts=int(key("expert_used_count", 0)),
    )


def ref_model(
    arch: str,
    weights: dict[str, np.ndarray],
    *,
    n_heads: int,
    n_kv_heads: int,
    norm_eps: float,
    rope_theta: float,
    head_dim: int | None = None,
    rope_neox: bool | None = None,
    rope_scaling: tuple[float, float, float, int] | None = None,
    n_experts: int = 0,
    n_active_experts: int = 0,
    moe_normalize: bool = True,
) -> RefModel:
    """A RefModel of float weights by GGUF tensor name; dim and layer count come from the weights, head_dim
    defaults to dim / n_heads and RoPE to the architecture's convention."""
    dim = weights["token_embd.weight"].shape[1]
    n_layers = sum(1 for name in weights if name.startswith("blk.") and name.endswith(".attn_norm.weight"))
    return RefModel(
        arch=arch,
        dim=dim,
        n_layers=n_layers,
        n_heads=n_heads,
        n_kv_heads=n_kv_heads,
        head_dim=head_dim or dim // n_heads,
        norm_eps=norm_eps,
        rope_theta=rope_theta,
        rope_neox=arch in NEOX_ARCHS if rope_neox is None else rope_neox,
        rope_scaling=rope_scaling,
        weights={name: np.asarray(t, dtype=np.float64) for name, t in weights.items()},
        n_experts=n_experts,
        n_active_experts=n_active_experts,
        moe_normalize=moe_normalize,
    )


def q80_roundtrip(a: np.ndarray) -> np.ndarray:
    """Quantise to Q80 blocks of 32 along the last axis (amax/127, half-to-even, fp16 scale) and back."""
    if a.shape[-1] % Q80_BLOCK:
        raise ValueError(f"Q80 needs a last dimension divisible by {Q80_BLOCK}, got {a.shape[-1]}")
    b = a.reshape(*a.shape[:-1], -1, Q80_BLOCK)
    d = np.abs(b).max(axis=-1, keepdims=True) / 127.0
    inv = np.divide(1.0, d, out=np.zeros_like(d), where=d != 0)
    q = np.round(b * inv)
    return (q * d.astype(np.float16).astype(np.float64)).reshape(a.shape)


def rope_frequencies(m: RefModel) -> np.ndarray:
    """Angle per position for each of the head_dim/2 rotated pairs, with Llama 3.1 scaling or rope_freqs."""
    freq = m.rope_theta ** (-np.arange(0, m.head_dim, 2, dtype=np.float64) / m.head_dim)
    if m.rope_scaling is not None:
        factor, low, high, orig = m.rope_scaling
        wavelen = 2 * np.pi / freq
        s = np.clip((orig / wavelen - low) / (high - low), 0.0, 1.0)
        scaled = (1 - s) * freq / factor + s * freq
        freq = np.where(wavelen < orig / high, freq, np.where(wavelen > orig / low, freq / factor, scaled))
    if "rope_freqs.weight" in m.weights:
        freq = freq / m.weights["rope_freqs.weight"]
    return freq


def _rope(x: np.ndarray, cos: np.ndarray, sin: np.ndarray, neox: bool) -> np.ndarray:
    """Rotate pairs of x [T, heads, head_dim]: (2i, 2i+1) interleaved, or (i, i + head_dim/2) for NeoX."""
    half = x.shape[-1] // 2
    if neox:
        x0, x1 = x[..., :half], x[..., half:]
    else:
        x0, x1 = x[..., 0::2], x[..., 1::2]
    c, s = cos[:, None, :], sin[:, None, :]
    r0, r1 = x0 * c - x1 * s, x0 * s + x1 * c
    return np.concatenate([r0, r1], axis=-1) if neox else np.stack([r0, r1], axis=-1).reshape(x.shape)


def _rmsnorm(x: np.ndarray, w: np.ndarray, eps: float) -> np.ndarray:
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * w


def _silu(x: np.ndarray) -> np.ndarray:
    return x / (1 + np.exp(-x))


def moe_route(logits: np.ndarray, k: int, normalize: bool) -> tuple[np.ndarray, np.ndarray]:
    """Router of each row of logits [T, experts]: the k experts of largest softmax probability, in descending
    order (ties: lower index first), and their weights (the probabilities, rescaled to sum 1 if normalize)."""
    z = np.exp(logits - logits.max(axis=-1, keepdims=True))
    p = z / z.sum(axis=-1, keepdims=True)
    top = np.argsort(-p, axis=-1, kind="stable")[:, :k]
    weight = np.take_along_axis(p, top, axis=-1)
    return top, weight / weight.sum(axis=-1, keepdims=True) if normalize else weight


Partial = Callable[[slice], np.ndarray]  # a residual update restricted to a range of its summed columns


def _linear(a: np.ndarray, weight: np.ndarray) -> Partial:
    return lambda cols: a[:, cols] @ weight[:, cols].T


def _dense_ffn(w: dict[str, np.ndarray], p: str, h: np.ndarray, qz: Callable) -> Partial:
    gate, up = h @ w[p + "ffn_gate.weight"].T, h @ w[p + "ffn_up.weight"].T
    return _linear(qz(_silu(gate) * up), w[p + "ffn_down.weight"])


def _moe_ffn(m: RefModel, p: str, h: np.ndarray, hq: np.ndarray, qz: Callable) -> Partial:
    """Routed SwiGLU experts; the router reads the unquantised h (distributed-llama and dllama both do)."""
    w = m.weights
    top, weight = moe_route(h @ w[p + "ffn_gate_inp.weight"].T, m.n_active_experts, m.moe_normalize)
    gate = np.einsum("tc,tsrc->tsr", hq, w[p + "ffn_gate_exps.weight"][top])  # [T, slots, expert rows]
    up = np.einsum("tc,tsrc->tsr", hq, w[p + "ffn_up_exps.weight"][top])
    act, down = qz(_silu(gate) * up), w[p + "ffn_down_exps.weight"][top]  # down: [T, slots, dim, rows]
    return lambda cols: np.einsum("ts,tsc,tsrc->tr", weight, act[..., cols], down[..., cols])


def ref_forward(
    m: RefModel,
    tokens: list[int],
    q80: bool = False,
    node_columns: tuple[list[tuple[int, int]], list[tuple[int, int]]] | None = None,
    kv_f16: bool = False,
) -> np.ndarray:
    """Causal forward over the whole sequence: float64 logits [T, vocab]; q80 mimics one dllama node with
    Q80 activations (every matmul input rounded through Q80, the residual stream and its updates in f32).

    node_columns = (attention-output columns, FFN columns) of each node mimics a cluster with Q80 sync
    (spec 4.6): every node's partial sum of a residual update goes through a Q80 round trip before the nodes
    add them up in node order. For experts the FFN columns are those of every expert's down matrix: a node's
    partial is the routing-weighted sum over the chosen experts of their column slices.

    kv_f16 mimics an f16 KV cache: keys (after RoPE) and values rounded to IEEE halves.
    """
    w, n_tok, hd = m.weights, len(tokens), m.head_dim
    qz = q80_roundtrip if q80 else (lambda a: a)

    def update(partial: Partial, part: int) -> np.ndarray:
        if node_columns is None:
            return partial(slice(None))
        return sum(q80_roundtrip(partial(slice(lo, hi))) for lo, hi in node_columns[part])

    angles = np.arange(n_tok, dtype=np.float64)[:, None] * rope_frequencies(m)[None, :]
    cos, sin = np.cos(angles), np.sin(angles)
    mask = np.triu(np.full((n_tok, n_tok), -np.inf), k=1)
    group = m.n_heads // m.n_kv_heads
    x = w["token_embd.weight"][np.asarray(tokens)]
    for layer in range(m.n_layers):
        p = f"blk.{layer}."
        h = qz(_rmsnorm(x, w[p + "attn_norm.weight"], m.norm_eps))
        qkv = []
        for t, heads in (("q", m.n_heads), ("k", m.n_kv_heads), ("v", m.n_kv_heads)):
            y = h @ w[f"{p}attn_{t}.weight"].T
            if f"{p}attn_{t}.bias" in w:  # Qwen2: q/k/v biases
                y = y + w[f"{p}attn_{t}.bias"]
            qkv.append(y.reshape(n_tok, heads, hd))
        q, k, v = qkv
        if p + "attn_q_norm.weight" in w:  # Qwen3: per-head RMSNorm of q and k before RoPE
            q = _rmsnorm(q, w[p + "attn_q_norm.weight"], m.norm_eps)
            k = _rmsnorm(k, w[p + "attn_k_norm.weight"], m.norm_eps)
        q, k = _rope(q, cos, sin, m.rope_neox), _rope(k, cos, sin, m.rope_neox)
        if kv_f16:
            k, v = k.astype(np.float16).astype(np.float64), v.astype(np.float16).astype(np.float64)
        k, v = np.repeat(k, group, axis=1), np.repeat(v, group, axis=1)  # q head h reads kv head h // group
        scores = np.einsum("thd,shd->hts", q, k) / np.sqrt(hd) + mask
        att = np.exp(scores - scores.max(axis=-1, keepdims=True))
        att /= att.sum(axis=-1, keepdims=True)
        o = qz(np.einsum("hts,shd->thd", att, v).reshape(n_tok, m.n_heads * hd))
        x = x + update(_linear(o, w[p + "attn_output.weight"]), 0)
        h = _rmsnorm(x, w[p + "ffn_norm.weight"], m.norm_eps)
        ffn = _moe_ffn(m, p, h, qz(h), qz) if m.n_experts else _dense_ffn(w, p, qz(h), qz)
        x = x + update(ffn, 1)
    h = qz(_rmsnorm(x, w["output_norm.weight"], m.norm_eps))
    return h @ w.get("output.weight", w["token_embd.weight"]).T
