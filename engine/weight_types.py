"""The one registry of weight encodings: block geometry, GGML and distributed-llama ids, kernel codes.

Every reader, writer, slicer and backend looks a type up here by name; an unknown name or id is a clear
DllamaError everywhere instead of falling into some default branch. Adding a type is one row here, its codec
in engine/quants.py and a kernel per backend.
"""

from __future__ import annotations

from dataclasses import dataclass

from engine.errors import DllamaError


@dataclass(frozen=True)
class WeightType:
    """How `block_values` consecutive values of a row are stored in `block_bytes` bytes."""

    name: str  # dllama's name: f32, f16, bf16, q40, q41, q50, q51, q80, q4k, q5k, q6k
    ggml_name: str  # GGML's spelling, as GGUF tools print it
    ggml_id: int  # GGMLQuantizationType value in GGUF files
    block_values: int  # 1 for plain floats, 32 for legacy quants, 256 for K-quant super-blocks
    block_bytes: int
    m_code: int | None = None  # distributed-llama .m weights_float_type (F32 0, F16 1, Q40 2, Q80 3)

    @property
    def quantized(self) -> bool:
        return self.block_values > 1

    @property
    def code(self) -> int:
        """A small integer that kernels compiled per type (numba, GLSL defines) switch on."""
        return _ORDER.index(self.name)

    def row_bytes(self, cols: int) -> int:
        """Bytes of `cols` values; they must be whole blocks."""
        if cols % self.block_values:
            raise DllamaError(
                f"{cols} values is not a whole number of {self.ggml_name} blocks "
                f"({self.block_values} values each)"
            )
        return cols // self.block_values * self.block_bytes


_TYPES = (
    WeightType("f32", "F32", 0, 1, 4, m_code=0),
    WeightType("f16", "F16", 1, 1, 2, m_code=1),
    WeightType("bf16", "BF16", 30, 1, 2),
    WeightType("q40", "Q4_0", 2, 32, 18, m_code=2),
    WeightType("q41", "Q4_1", 3, 32, 20),
    WeightType("q50", "Q5_0", 6, 32, 22),
    WeightType("q51", "Q5_1", 7, 32, 24),
    WeightType("q80", "Q8_0", 8, 32, 34, m_code=3),
    WeightType("q4k", "Q4_K", 12, 256, 144),
    WeightType("q5k", "Q5_K", 13, 256, 176),
    WeightType("q6k", "Q6_K", 14, 256, 210),
)
_ORDER = tuple(t.name for t in _TYPES)
WEIGHT_TYPES: dict[str, WeightType] = {t.name: t for t in _TYPES}
_BY_GGML = {t.ggml_id: t for t in _TYPES}
_BY_M = {t.m_code: t for t in _TYPES if t.m_code is not None}


def weight_type(name: str) -> WeightType:
    """The type called `name`; anything else is refused with the list of known ones."""
    t = WEIGHT_TYPES.get(name)
    if t is None:
        raise DllamaError(f"unknown weight type {name!r} (supported: {', '.join(WEIGHT_TYPES)})")
    return t


def from_ggml(ggml_id: int, what: str) -> WeightType:
    """The type of a GGUF tensor; `what` names the tensor in the error for an unsupported id."""
    t = _BY_GGML.get(ggml_id)
    if t is None:
        supported = ", ".join(t.ggml_name for t in _TYPES)
        label = _ggml_label(ggml_id)
        raise DllamaError(f"{what} has GGML type {label}, which is not supported ({supported})")
    return t


def from_m_code(code: int, what: str) -> WeightType:
    """The weight type of a `.m` header's weights_float_type."""
    t = _BY_M.get(code)
    if t is None:
        raise DllamaError(f"{what}: unsupported weights_float_type {code} (0 F32, 1 F16, 2 Q40, 3 Q80)")
    return t


def _ggml_label(ggml_id: int) -> str:
    from gguf import GGMLQuantizationType

    try:
        return f"{GGMLQuantizationType(ggml_id).name} ({ggml_id})"
    except ValueError:
        return str(ggml_id)


def row_bytes(dtype: str, cols: int) -> int:
    """Bytes of one row of `cols` values stored as `dtype`."""
    return weight_type(dtype).row_bytes(cols)
