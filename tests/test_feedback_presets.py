"""Feedback presets and per-rule feedback (dfa_core.feedback through init_feedback): shapes, defining
properties, seeds, the unchanged legacy draws, and clear errors."""

import math

import numpy as np
import pytest

from dfa_core import (
    FEEDBACK_DISTS,
    FEEDBACK_RULES,
    METHODS,
    Conv2d,
    Dense,
    Flatten,
    MaxPool2d,
    MLPSpec,
    ModelSpec,
    Residual,
    TransformerBlock,
    init_feedback,
)
from dfa_core.feedback import FEEDBACK_PRESETS, RULE_NEEDS

MLP = MLPSpec((6, 8, 5, 3), dtype="float64")
CONV = ModelSpec(
    (1, 8, 8),
    (Conv2d(2, 3, padding=1), MaxPool2d(2), Conv2d(3, 3), Flatten(), Dense(4), Dense(3)),
    dtype="float64",
)
OPTIONS = {"sparse": {"k": 2}, "ternary": {"density": 0.3}, "lowrank": {"rank": 2}}


def _legacy_init_feedback(spec, seed=1, dist="normal", scale=1.9, transform=None):
    """HEAD's draw before the presets: one default_rng(seed), N(0, scale^2) or U(-scale, scale) per
    hidden block in order, the transform applied to each float64 matrix, cast to the spec's dtype."""
    rng = np.random.default_rng(seed)
    out = []
    for shape in spec.feedback_shapes:
        m = rng.normal(0.0, scale, size=shape) if dist == "normal" else rng.uniform(-scale, scale, size=shape)
        out.append((m if transform is None else np.asarray(transform(m), np.float64)).astype(spec.dtype))
    return tuple(out)


LEGACY_CALLS = {
    "defaults": ((), {}),
    "seed": ((7,), {}),
    "positional": ((3, "normal", 0.5), {}),
    "normal_scale": ((), dict(dist="normal", scale=0.2)),
    "uniform_scale": ((), dict(dist="uniform", scale=0.7)),
    "uniform_1_9": ((2,), dict(dist="uniform", scale=1.9)),
    "transform": ((4,), dict(transform=np.tanh)),
}


@pytest.mark.parametrize("spec", [MLP, MLPSpec((20, 30, 10)), CONV], ids=["mlp64", "mlp32", "conv"])
@pytest.mark.parametrize("call", list(LEGACY_CALLS))
def test_old_calls_draw_what_head_drew(spec, call):
    """Every call that worked before gives the same arrays (computed here by the legacy path), with or
    without an explicit method='dfa'; 'drtp' reads the same B_l."""
    args, kwargs = LEGACY_CALLS[call]
    want = _legacy_init_feedback(spec, *args, **kwargs)
    for extra in ({}, {"method": "dfa"}, {"method": "drtp"}):
        got = init_feedback(spec, *args, **kwargs, **extra)
        assert len(got) == len(want)
        for g, w in zip(got, want):
            assert g.dtype == w.dtype and np.array_equal(g, w)


def test_rule_table_covers_every_rule():
    """Every learning rule of dfa_core.METHODS has a feedback entry, every preset a table entry."""
    assert set(RULE_NEEDS) == set(FEEDBACK_RULES) and set(METHODS) <= set(FEEDBACK_RULES)
    assert set(FEEDBACK_PRESETS) == set(FEEDBACK_DISTS)
    assert FEEDBACK_DISTS[:2] == ("normal", "uniform")


@pytest.mark.parametrize(
    "spec,rule,shapes",
    [
        (MLP, "dfa", [(8, 3), (5, 3)]),
        (MLP, "drtp", [(8, 3), (5, 3)]),
        (MLP, "fa", [(5, 8), (3, 5)]),
        (MLP, "kp", [(5, 8), (3, 5)]),
        (MLP, "frsf", [(5, 8), (3, 5)]),
        (CONV, "dfa", [(128, 3), (12, 3), (4, 3)]),
        (CONV, "fa", [(3, 2, 3, 3), (4, 12), (3, 4)]),
        (CONV, "frsf", [(3, 2, 3, 3), (4, 12), (3, 4)]),
    ],
)
def test_shapes_per_rule(spec, rule, shapes):
    """dfa/drtp: B_l (size of a_l, n_L); fa/kp/frsf: shaped like W_{l+1} (a kernel above a conv block)."""
    got = init_feedback(spec, seed=2, method=rule)
    assert [g.shape for g in got] == shapes and all(g.dtype == np.float64 for g in got)


@pytest.mark.parametrize("rule", ["bp", "usf", "brsf", "shallow"])
def test_rules_that_need_nothing_get_an_empty_tuple(rule):
    assert init_feedback(MLP, method=rule) == () and init_feedback(CONV, method=rule) == ()


def test_a_sequence_of_rules_gets_one_entry_per_hidden_block():
    """Entry l is block l's rule's feedback; a zero-size array where the rule needs none; the DFA
    projections are drawn first from the seed, then the FA-shaped matrices; all-'dfa' equals 'dfa'."""
    got = init_feedback(MLP, seed=5, method=("fa", "dfa", "bp"))
    assert [g.shape for g in got] == [(5, 8), (5, 3)]
    rng = np.random.default_rng(5)
    np.testing.assert_array_equal(got[1], rng.normal(0.0, 1.9, size=(5, 3)))  # projections first
    np.testing.assert_array_equal(got[0], rng.uniform(-1 / math.sqrt(8), 1 / math.sqrt(8), size=(5, 8)))
    nothing = init_feedback(MLPSpec((6, 8, 5, 3)), method=["bp", "shallow", "dfa"])
    assert [(g.shape, g.dtype) for g in nothing] == [((0,), np.float32), ((0,), np.float32)]
    all_dfa = init_feedback(CONV, seed=5, method=["dfa"] * 4)
    assert all(np.array_equal(a, b) for a, b in zip(all_dfa, init_feedback(CONV, seed=5)))


def test_fa_defaults_to_the_weights_own_distribution_and_frsf_to_its_magnitudes():
    """fa/kp draw U(+-1/sqrt(fan_in)) of W_{l+1} in block order (torch's default, like init_params);
    frsf returns |R| of the same draw; an explicit dist and scale apply too."""
    rng = np.random.default_rng(9)
    fa = init_feedback(CONV, seed=9, method="fa")
    for b, shape in zip(fa, [(3, 2, 3, 3), (4, 12), (3, 4)]):
        bound = 1 / math.sqrt(math.prod(shape[1:]))
        np.testing.assert_array_equal(b, rng.uniform(-bound, bound, size=shape))
    assert all(np.array_equal(a, b) for a, b in zip(fa, init_feedback(CONV, seed=9, method="kp")))
    frsf = init_feedback(CONV, seed=9, method="frsf")
    assert all(np.array_equal(np.abs(a), b) and (b >= 0).all() for a, b in zip(fa, frsf))
    normal = init_feedback(MLP, seed=9, dist="normal", scale=0.5, method="fa")
    rng = np.random.default_rng(9)
    assert all(np.array_equal(b, rng.normal(0.0, 0.5, size=b.shape)) for b in normal)


@pytest.mark.parametrize(
    "spec,fragment",
    [
        (
            ModelSpec((5,), (Dense(4), Residual(Dense(4), Dense(4)), Dense(3))),
            "fa needs the block above to be Dense or Conv2d, block 2 is a Residual",
        ),
        (
            ModelSpec((2, 4), (TransformerBlock(2, 8), TransformerBlock(2, 8), Flatten(), Dense(3))),
            "fa needs the block above to be Dense or Conv2d, block 2 is a TransformerBlock",
        ),
    ],
    ids=["residual", "transformer"],
)
def test_fa_below_a_composite_is_refused(spec, fragment):
    """FA's feedback is shaped like the weight above; a composite has none, so fa/kp/frsf are refused there."""
    with pytest.raises(ValueError) as err:
        init_feedback(spec, method="fa")
    assert fragment in str(err.value)
    rules = ["dfa"] * spec.num_layers
    assert len(init_feedback(spec, method=rules)) == spec.num_hidden  # DFA is fine there
    rules[-2] = "frsf"  # the block above the last hidden one is a Dense: fine
    assert init_feedback(spec, method=rules)[-1].shape == spec.param_shapes[-1][0]


# ---------------------------------------------------------------------------------------------
# Each preset's defining property

WIDE = MLPSpec((4, 40, 12, 6), dtype="float64")


def test_normal_and_uniform_defaults():
    """normal: the report's N(0, 1.9^2); uniform without a scale: U(+-1/sqrt(n_l)) (Nøkland 2016)."""
    rng = np.random.default_rng(1)
    assert all(np.array_equal(b, rng.normal(0, 1.9, size=b.shape)) for b in init_feedback(WIDE, dist="normal"))
    rng = np.random.default_rng(1)
    for b in init_feedback(WIDE, dist="uniform"):
        bound = 1 / math.sqrt(b.shape[0])
        np.testing.assert_array_equal(b, rng.uniform(-bound, bound, size=b.shape))


def test_shared_is_one_matrix_sliced_and_scaled_by_one_over_sqrt_width():
    """B_l = M[:n_l] / sqrt(width), M ~ U[-1, 1) of the widest block: slices agree across blocks."""
    b1, b2 = init_feedback(WIDE, seed=3, dist="shared")
    np.testing.assert_array_equal(b2, b1[:12])
    m = np.random.default_rng(3).uniform(-1, 1, size=(40, 6))
    np.testing.assert_array_equal(b1, (1 / math.sqrt(40)) * m)
    c1, c2 = init_feedback(WIDE, seed=3, dist="shared", scale=2.0)
    np.testing.assert_array_equal(c1, 2.0 * m)
    np.testing.assert_array_equal(c2, 2.0 * m[:12])
    conv = init_feedback(CONV, dist="shared")
    assert all(np.array_equal(b, conv[0][: b.shape[0]]) for b in conv)


def test_sparse_has_k_nonzeros_per_row():
    """ssdfa: each hidden unit (row of B_l) reads exactly k of the n_L error components,
    values in U(+-(n_L k)^(1/4)/sqrt(n_l)) by default."""
    for k in (1, 3, 6):
        for b in init_feedback(WIDE, seed=2, dist="sparse", k=k):
            assert ((b != 0).sum(axis=1) == k).all()
            assert np.abs(b).max() <= (6 * k) ** 0.25 / math.sqrt(b.shape[0])
    b = init_feedback(WIDE, seed=2, dist="sparse", k=2, scale=0.1)[0]
    assert np.abs(b).max() <= 0.1 and np.abs(b).max() > 0.05
    cols = (init_feedback(MLPSpec((4, 600, 6)), dist="sparse", k=1)[0] != 0).sum(axis=0)
    assert cols.min() > 60  # the chosen columns are spread over all n_L (600 / 6 = 100 expected each)


def test_ternary_values_and_density():
    """Values {-scale, 0, +scale}, exactly round(density * size) non-zeros, both signs."""
    for density in (0.05, 0.5, 1.0):
        for b in init_feedback(WIDE, dist="ternary", density=density):
            assert set(np.unique(b)) <= {-1.0, 0.0, 1.0}
            assert (b != 0).sum() == max(1, math.floor(density * b.size + 0.5))
            assert (b > 0).any() and (b < 0).any()
    b = init_feedback(CONV, dist="ternary", density=0.25, scale=0.3)[0]
    assert set(np.unique(b)) == {-0.3, 0.0, 0.3} and (b != 0).sum() == 96


def test_lowrank_has_rank_r_and_the_normal_presets_entry_std():
    for rank in (1, 2, 6):
        assert [np.linalg.matrix_rank(b) for b in init_feedback(WIDE, dist="lowrank", rank=rank)] == [rank, rank]
    b = init_feedback(MLPSpec((3, 300, 200), dtype="float64"), dist="lowrank", rank=4)[0]
    assert np.linalg.matrix_rank(b) == 4
    np.testing.assert_allclose(b.std(), 1.9, rtol=0.2)


def test_orthogonal_columns_are_orthonormal_up_to_the_scale():
    for b in init_feedback(WIDE, dist="orthogonal", scale=0.5):
        np.testing.assert_allclose(b.T @ b, 0.25 * np.eye(6), atol=1e-12)
    (narrow,) = init_feedback(MLPSpec((3, 4, 9), dtype="float64"), dist="orthogonal")
    np.testing.assert_allclose(narrow @ narrow.T, np.eye(4), atol=1e-12)  # n_l < n_L: orthonormal rows


@pytest.mark.parametrize("dist", FEEDBACK_DISTS)
def test_every_preset_is_seeded_and_cast_to_the_specs_dtype(dist):
    opts = OPTIONS.get(dist, {})
    spec32 = MLPSpec((4, 40, 12, 6))
    a, b = init_feedback(spec32, 4, dist, **opts), init_feedback(spec32, 4, dist, **opts)
    assert all(x.dtype == np.float32 and np.array_equal(x, y) for x, y in zip(a, b))
    assert not np.array_equal(a[0], init_feedback(spec32, 5, dist, **opts)[0])
    want = init_feedback(WIDE, 4, dist, **opts)
    assert all(np.array_equal(x, y.astype(np.float32)) for x, y in zip(a, want))


# ---------------------------------------------------------------------------------------------
# Errors


@pytest.mark.parametrize(
    "kwargs,fragment",
    [
        (dict(dist="sparse"), "dist 'sparse' needs the option(s) ['k']"),
        (dict(dist="ternary"), "density= (a number in (0, 1])"),
        (dict(dist="lowrank", rank=None), "needs the option(s) ['rank']"),
        (dict(dist="normal", k=2), "['k'] do not apply to dist 'normal'"),
        (dict(density=0.5), "do not apply to the default dist"),
        (dict(dist="sparse", k=2, rank=1), "'rank' is an option of ['lowrank']"),
        (dict(dist="ternary", density=0.0), "ternary: density must be a number in (0, 1], got 0.0"),
        (dict(dist="ternary", density=float("nan")), "density must be a number in (0, 1]"),
        (dict(dist="sparse", k=2.0), "sparse: k must be an int >= 1, got 2.0"),
        (dict(dist="sparse", k=True), "k must be an int >= 1, got True"),
        (dict(dist="sparse", k=4), "k=4 non-zeros per row needs k <= n_L = 3"),
        (dict(dist="lowrank", rank=4), "rank=4 exceeds min(rows, columns) = 3"),
        (dict(dist="sparse", k=1, method="fa"), "needs one of ['normal', 'uniform', 'ternary']"),
        (dict(dist="cauchy"), "dist must be one of"),
        (dict(method="dfaa"), "method must be one of"),
        (dict(method=("dfa", "bp")), "method: expected 3 rules (one per block), got 2"),
        (dict(method=("dfa", "bp", 3)), "block 3's rule must be one of"),
        (dict(method="frsf", matrices=[-np.ones((5, 8)), np.ones((3, 5))]), "must be >= 0"),
        (dict(method="fa", matrices=[np.ones((8, 5)), np.ones((3, 5))]), "block 1's feedback must have shape (5, 8)"),
    ],
)
def test_bad_options_are_refused_clearly(kwargs, fragment):
    with pytest.raises(ValueError) as err:
        init_feedback(MLP, **kwargs)
    assert fragment in str(err.value)


def test_user_matrices_follow_the_rules_layout():
    mine = [np.full((5, 8), 0.5), np.ones((3, 5))]
    got = init_feedback(MLP, method="fa", matrices=mine, transform=lambda m: 2 * m)
    assert [g.tolist() for g in got] == [(2 * m).tolist() for m in mine]
    got = init_feedback(MLP, method=["bp", "dfa", "bp"], matrices=[np.zeros((0,)), np.ones((5, 3))])
    assert got[0].shape == (0,) and got[1].shape == (5, 3)
