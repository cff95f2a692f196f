"""The patched kp releases the GIL while Sequence.eval() waits on its fence: a cluster node's network threads
(heartbeats, the mesh) keep running while the device works."""

from __future__ import annotations

import threading
import time

import numpy as np

from shaders.backend import import_kompute

WORDS = 1 << 22  # 16 MiB copied per dispatch


def _timed_sequence(vk, kp, min_seconds: float):
    """A recorded sequence of copy dispatches that takes at least `min_seconds` to evaluate (more dispatches
    until it does: a real GPU copies far faster than lavapipe), and that time."""
    mgr = vk.manager
    src = mgr.tensor_t(np.arange(WORDS, dtype=np.uint32), kp.TensorTypes.storage)
    dst = mgr.tensor_t(np.zeros(WORDS, np.uint32), kp.TensorTypes.storage)
    spec, push = np.array([256], np.uint32), np.array([WORDS, 0, 0], np.uint32)
    algo = mgr.algorithm(
        [src, dst], vk.shader("copy_words"), (WORDS // 256, 1, 1), spec, np.zeros(3, np.uint32)
    )
    for n in (16, 128, 1024, 8192):
        seq = mgr.sequence()
        for _ in range(n):
            seq.record(kp.OpAlgoDispatch(algo, push))
        seq.eval()  # warm-up
        t0 = time.perf_counter()
        seq.eval()
        if (seconds := time.perf_counter() - t0) >= min_seconds:
            return seq, seconds
    return seq, seconds


def test_eval_lets_other_python_threads_run(vk):
    kp = import_kompute()
    seq, _ = _timed_sequence(vk, kp, 0.1)
    count, done = [0], threading.Event()

    def spin() -> None:
        while not done.is_set():
            count[0] += 1

    t = threading.Thread(target=spin)
    t.start()
    try:
        c0, t0 = count[0], time.perf_counter()
        time.sleep(0.1)  # the main thread waits without the GIL: the spinner's free rate
        rate = (count[0] - c0) / (time.perf_counter() - t0)
        before, t0 = count[0], time.perf_counter()
        seq.eval()
        during, seconds = count[0] - before, time.perf_counter() - t0
    finally:
        done.set()
        t.join()
    # holding the GIL through the wait, the spinner would run only until the main thread takes it back (one
    # 5 ms switch interval, a few % of the eval); released, it runs for a good share of the eval
    assert seconds >= 0.1 and during >= 0.15 * rate * seconds, (during, rate, seconds)
