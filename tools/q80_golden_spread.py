"""How far Q80 activations move SmolLM2's golden last logits, and how much of that is chance.

Q80 rounds every matmul input to 8 bits per value; a value near a rounding boundary flips with any change of
float32 rounding (summation order, fused multiply-adds), and one prompt can amplify such flips through the
layers. This prints, per golden case and over all cases (the figure tests/golden_checks.py bounds), the mean
|logit - golden| of the CPU backend as it is, then with every Q80 quantiser input scaled by (1 + eps * N(0,1))
for a few seeds (rounding-level noise: eps = 1e-7 is about one float32 ulp), and of the float64 Q80 reference
of tests/reference.py (exact arithmetic, the same roundings to Q80). The spread over seeds is what a kernel
change of rounding order alone can move the figure by; tests/golden_checks.py derives its bound from it.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

from cpu_fallback import kernels  # noqa: E402
from cpu_fallback.backend import CpuBackend  # noqa: E402
from engine.catalog import resolve_model  # noqa: E402
from engine.model_file import open_model  # noqa: E402
from engine.runner import Runner  # noqa: E402

REFERENCE = REPO.parent / "shared" / "reference"


def case_errors(forward, npz: dict, n_cases: int) -> list[float]:
    """Mean |logit error| of each golden case's last logits."""
    return [
        float(np.abs(forward(list(npz[f"case{i}_prompt_ids"])) - npz[f"case{i}_last_logits"]).mean())
        for i in range(n_cases)
    ]


def perturbed_quantiser(eps: float, rng: np.random.Generator):
    """kernels._quantize_q80 with its float32 input scaled by (1 + eps * N(0,1)) first."""
    quantize = kernels._quantize_q80

    def noisy(x: np.ndarray, out: np.ndarray) -> None:
        scale = 1.0 + eps * rng.standard_normal(x.shape)
        quantize((x * scale).astype(np.float32), out)

    return noisy


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seeds", type=int, default=8, help="perturbed runs")
    ap.add_argument("--eps", type=float, nargs="+", default=[1e-7, 1e-6], help="relative noise levels")
    ap.add_argument("--reference", action="store_true", help="also the float64 Q80 reference (slow, ~2 GB)")
    args = ap.parse_args()
    meta = json.loads((REFERENCE / "smollm2_golden.json").read_text())
    npz = dict(np.load(REFERENCE / "smollm2_golden.npz"))
    n = len(meta["cases"])
    path = resolve_model("smollm2")
    runner = Runner(open_model(path), CpuBackend(2), "q80", max_seq_len=512)

    def report(label: str, errs: list[float]) -> None:
        print(f"{label:<22} " + " ".join(f"{e:6.3f}" for e in errs) + f"   all {np.mean(errs):6.3f}")

    print(f"{'':<22} " + " ".join(f"case{i}" for i in range(n)) + "   (mean |logit error|)")
    report("engine", case_errors(lambda ids: runner.forward(ids, 0), npz, n))
    quantize = kernels._quantize_q80
    try:
        for eps in args.eps:
            for seed in range(args.seeds):
                kernels._quantize_q80 = perturbed_quantiser(eps, np.random.default_rng(seed))
                report(f"eps {eps:g} seed {seed}", case_errors(lambda ids: runner.forward(ids, 0), npz, n))
    finally:
        kernels._quantize_q80 = quantize
    if args.reference:
        from reference import load_ref_model, ref_forward

        ref = load_ref_model(path)
        report("float64 Q80 reference", case_errors(lambda ids: ref_forward(ref, ids, q80=True)[-1], npz, n))


if __name__ == "__main__":
    main()
