"""One comparison of two training histories, shared by the tests of fit_many (members == single fits)."""

from __future__ import annotations

import numpy as np


def _close(a, b, what):
    np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-13, err_msg=what)


def assert_same_history(h, ref):
    """float64: losses, test accuracies, params, feedback (KP's trained B) and angles within rtol 1e-10;
    the same error counts, confusion (and its split), stop and config."""
    assert len(h.loss) == len(ref.loss) and h.stopped_early == ref.stopped_early
    np.testing.assert_allclose(h.loss, ref.loss, rtol=1e-10)
    assert h.train_error == ref.train_error
    np.testing.assert_allclose(h.test_accuracy, ref.test_accuracy, rtol=1e-10)
    np.testing.assert_array_equal(h.confusion, ref.confusion)
    assert h.confusion_split == ref.confusion_split
    for l, (leaves, leaves_ref) in enumerate(zip(h.params, ref.params, strict=True), start=1):
        for t, t_ref in zip(leaves, leaves_ref, strict=True):
            _close(t, t_ref, f"params of block {l}")
    for l, (f, f_ref) in enumerate(zip(h.feedback, ref.feedback, strict=True), start=1):
        _close(f, f_ref, f"feedback entry {l}")
    assert [(r.step, r.epoch) for r in h.alignment] == [(r.step, r.epoch) for r in ref.alignment]
    for r, r_ref in zip(h.alignment, ref.alignment):
        np.testing.assert_allclose(r.weights, r_ref.weights, rtol=1e-10, atol=1e-9)
        np.testing.assert_allclose(r.deltas, r_ref.deltas, rtol=1e-10, atol=1e-9)
    assert h.config == ref.config
