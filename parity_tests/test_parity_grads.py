"""torch vs JAX vs the NumPy closed form: every building block and dfa_grads / bp_grads.

Grid (every mode in each case): the full product activation x output x reduction at depth 1 in
float64 (rtol 1e-10, atol 1e-12); every pair of (activation, output, reduction) at depth 3 in
float64 and in float32 (rtol 1e-5, atol 1e-6; float32 checks the precision handling); every
(output, reduction) at depth 0, which has no hidden activation. The full product at every depth
(120 cases per test) added suite time, not coverage: depth chains the same layer math, which the
depth-1 product already exercises in every combination.
"""

import itertools

import numpy as np
import pytest

from dfa_core import ACTIVATIONS, MODES, OUTPUTS, REDUCTIONS
from parity_tests import numpy_reference as ref
from parity_tests.helpers import BACKENDS, DEPTHS, TOLERANCES, assert_tree_close, backend, make_case


def _pairwise():
    """(activation, output, reduction) covering every pair: each (activation, output) once, the
    reduction alternating so that each activation and each output meets both reductions."""
    n = len(REDUCTIONS)
    return [(a, o, REDUCTIONS[(i + j) % n]) for i, a in enumerate(ACTIVATIONS) for j, o in enumerate(OUTPUTS)]


DEEP = max(DEPTHS)
GRID = (
    [(*c, 1, "float64") for c in itertools.product(ACTIVATIONS, OUTPUTS, REDUCTIONS)]
    + [(*c, DEEP, dtype) for c in _pairwise() for dtype in ("float64", "float32")]
    + [(ACTIVATIONS[0], o, r, 0, "float64") for o, r in itertools.product(OUTPUTS, REDUCTIONS)]
)
assert {(a, r) for a, _, r in _pairwise()} == set(itertools.product(ACTIVATIONS, REDUCTIONS))
assert {(o, r) for _, o, r in _pairwise()} == set(itertools.product(OUTPUTS, REDUCTIONS))


def _id(case):
    return "-".join(str(c) for c in case)


@pytest.mark.parametrize("activation,output,reduction,depth,dtype", GRID, ids=[_id(c) for c in GRID])
def test_dfa_grads_match_closed_form_in_every_mode(activation, output, reduction, depth, dtype):
    """dfa_grads of both backends equal the NumPy closed form for all three modes."""
    spec, params, feedback, x, y = make_case(depth, activation, output, reduction, dtype)
    rtol, atol = TOLERANCES[dtype]
    for mode in MODES:
        want = ref.dfa_grads(spec, params, feedback, x, y, mode)
        for name in BACKENDS:
            be = backend(name)
            got = be.to_numpy(be.dfa_grads(spec, be.asarray(params), be.asarray(feedback), x, y, mode=mode))
            assert_tree_close(got, want, rtol, atol, f"{name} dfa_grads mode={mode}")


@pytest.mark.parametrize("activation,output,reduction,depth,dtype", GRID, ids=[_id(c) for c in GRID])
def test_bp_grads_and_loss_match_closed_form(activation, output, reduction, depth, dtype):
    """bp_grads (autodiff) equals the hand-written backward recursion; loss equals the closed form."""
    spec, params, _, x, y = make_case(depth, activation, output, reduction, dtype)
    rtol, atol = TOLERANCES[dtype]
    want = ref.bp_grads(spec, params, x, y)
    want_loss = ref.loss(spec, params, x, y)
    for name in BACKENDS:
        be = backend(name)
        P = be.asarray(params)
        assert_tree_close(be.to_numpy(be.bp_grads(spec, P, x, y)), want, rtol, atol, f"{name} bp_grads")
        with be.precision_scope(dtype):
            got_loss = be.to_numpy(be.loss(spec, P, be.asarray(x), be.asarray(y)))
        np.testing.assert_allclose(got_loss, want_loss, rtol=rtol, atol=atol, err_msg=f"{name} loss")


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("output", OUTPUTS)
def test_building_blocks_match_closed_form(activation, output, dtype):
    """forward, forward_with_activations, group and feedback_projection, block by block."""
    spec, params, feedback, x, y = make_case(3, activation, output, "sum", dtype)
    rtol, atol = TOLERANCES[dtype]
    a, h, y_hat = ref.forward_with_activations(spec, params, x)
    for name in BACKENDS:
        be = backend(name)
        with be.precision_scope(dtype):
            P, F, X, Y = be.asarray(params), be.asarray(feedback), be.asarray(x), be.asarray(y)
            acts = be.forward_with_activations(spec, P, X)
            assert_tree_close(be.to_numpy(acts.a), a, rtol, atol, f"{name} a")
            assert_tree_close(be.to_numpy(acts.h), h, rtol, atol, f"{name} h")
            assert_tree_close(be.to_numpy(acts.y_hat), y_hat, rtol, atol, f"{name} y_hat")
            assert_tree_close(be.to_numpy(be.forward(spec, P, X)), y_hat, rtol, atol, f"{name} forward")
            for mode in MODES:
                a_g, h_g, e_g, count = ref.group(spec, params, x, y, mode)
                grouped = be.group(spec, acts, Y, mode)
                # JAX/torch keep a zero row for each absent class (static shapes); drop them.
                keep = np.abs(be.to_numpy(grouped.h[0])).sum(axis=1) > 0
                assert int(be.to_numpy(grouped.count)) == count
                assert_tree_close([t[keep] for t in be.to_numpy(grouped.a)], a_g, rtol, atol, f"{name} {mode} a'")
                assert_tree_close([t[keep] for t in be.to_numpy(grouped.h)], h_g, rtol, atol, f"{name} {mode} h'")
                assert_tree_close(be.to_numpy(grouped.e)[keep], e_g, rtol, atol, f"{name} {mode} e'")
                proj = be.to_numpy(be.feedback_projection(spec, F, grouped.e))
                want = ref.feedback_projection(feedback, e_g)
                assert_tree_close([p[keep] for p in proj], want, rtol, atol, f"{name} {mode} projection")
