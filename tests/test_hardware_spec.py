"""dfa_core.hardware: the Projection spec validates its fields with clear errors, is hashable, and its
helpers (noise shapes, noise source, device output) check what they are given. NumPy only."""

import numpy as np
import pytest

from dfa_core import Conv2d, Dense, Flatten, MLPSpec, ModelSpec
from dfa_core import hardware as hw
from dfa_core.hardware import Projection

BAD_PROJECTIONS = {
    "unknown quantiser": (dict(quantize="binary"), ValueError, "quantize must be None or one of"),
    "kbit without N": (dict(quantize="kbit:"), ValueError, "integer N of bits"),
    "kbit of 1 bit": (dict(quantize="kbit:1"), ValueError, r"\[2, 32\]"),
    "kbit of 40 bits": (dict(quantize="kbit:40"), ValueError, r"\[2, 32\]"),
    "quantize not a str": (dict(quantize=3), TypeError, "quantize must be None or a str"),
    "negative threshold": (dict(quantize="ternary", threshold=-0.1), ValueError, "threshold must be >= 0"),
    "threshold without ternary": (dict(quantize="sign", threshold=0.3), ValueError, "only read by quantize='ternary'"),
    "nan threshold": (dict(quantize="ternary", threshold=float("nan")), ValueError, "finite real number"),
    "unknown noise": (dict(noise="gaussian", sigma=0.1), ValueError, "noise must be None or one of"),
    "negative sigma": (dict(noise="additive", sigma=-0.1), ValueError, "sigma must be >= 0"),
    "sigma without noise": (dict(sigma=0.3), ValueError, "noise is None"),
    "mu without noise": (dict(mu=0.1), ValueError, "noise is None"),
    "bool sigma": (dict(noise="additive", sigma=True), ValueError, "finite real number"),
    "device not callable": (dict(device="opu"), TypeError, "device must be a callable"),
}


@pytest.mark.parametrize("case", BAD_PROJECTIONS, ids=list(BAD_PROJECTIONS))
def test_bad_projections_are_refused_with_a_clear_error(case):
    """Each invalid field raises the named error, with a message that says what was expected."""
    kwargs, error, message = BAD_PROJECTIONS[case]
    with pytest.raises(error, match=message):
        Projection(**kwargs)


def test_unhashable_device_is_refused():
    """The spec is a static argument of the compiled step, so its device must be hashable."""

    class Device:
        __hash__ = None  # type: ignore[assignment]

        def __call__(self, e):
            return ()

    with pytest.raises(TypeError, match="device must be hashable"):
        Projection(device=Device())


def test_projection_is_frozen_hashable_and_reports_its_levels():
    """Equal specs hash equally (one compiled program each); kbit:N reports N and m = 2^(N-1) - 1."""
    a, b = Projection(quantize="kbit:4", noise="additive", sigma=0.3), Projection("kbit:4", noise="additive", sigma=0.3)
    assert a == b and hash(a) == hash(b)
    assert (a.bits, a.levels) == (4, 7)
    assert Projection(quantize="ternary").bits is None and Projection(quantize="ternary").levels is None
    assert Projection().is_identity and not a.is_identity
    assert Projection(device=print).device is print
    with pytest.raises(AttributeError):
        a.sigma = 1.0  # type: ignore[misc]


def test_active_maps_the_identity_to_none_and_refuses_other_types():
    """A Projection() with nothing to do runs the plain step; anything but a Projection is a TypeError."""
    assert hw.active(None) is None and hw.active(Projection()) is None
    p = Projection(quantize="sign")
    assert hw.active(p) is p
    with pytest.raises(TypeError, match="dfa_core.hardware.Projection or None"):
        hw.active("ternary")  # type: ignore[arg-type]


def test_noise_source_must_be_exactly_one_when_the_projection_is_noisy():
    """noise= xor key= with projection noise; neither without it."""
    noisy, quiet = Projection(noise="additive", sigma=0.1), Projection(quantize="sign")
    hw.check_noise_source(noisy, (np.zeros((2, 3)),), None)
    hw.check_noise_source(noisy, None, 0)
    hw.check_noise_source(quiet, None, None)
    hw.check_noise_source(None, None, None)
    with pytest.raises(ValueError, match="not both"):
        hw.check_noise_source(noisy, (np.zeros((2, 3)),), 0)
    with pytest.raises(ValueError, match="needs its standard-normal draws"):
        hw.check_noise_source(noisy, None, None)
    with pytest.raises(ValueError, match="projection has no noise"):
        hw.check_noise_source(quiet, (np.zeros((2, 3)),), None)
    with pytest.raises(ValueError, match="key= was given but the projection has no noise"):
        hw.check_noise_source(None, None, 3)


def test_projection_shapes_and_noise_checks_follow_the_mode():
    """K is the batch, 1 or n_L by mode; a conv block's draws may come in its own (K, C, H, W) shape."""
    mlp = MLPSpec((6, 5, 7, 4))
    assert hw.projection_shapes(mlp, 9, "sample") == ((9, 5), (9, 7))
    assert hw.projection_shapes(mlp, 9, "batch_mean") == ((1, 5), (1, 7))
    assert hw.projection_shapes(mlp, 9, "class_mean") == ((4, 5), (4, 7))
    drawn = hw.draw_noise(mlp, 9, "sample", seed=0)
    assert [z.shape for z in drawn] == [(9, 5), (9, 7)] and drawn[0].dtype == np.float32
    np.testing.assert_array_equal(drawn[1], hw.draw_noise(mlp, 9, "sample", seed=0)[1])
    hw.check_noise(mlp, drawn, 9, "sample")
    with pytest.raises(ValueError, match="2 arrays"):
        hw.check_noise(mlp, drawn[:1], 9, "sample")
    with pytest.raises(ValueError, match=r"noise\[0\] must have shape \(4, 5\)"):
        hw.check_noise(mlp, drawn, 9, "class_mean")
    conv = ModelSpec((1, 6, 6), (Conv2d(2, 3, padding=1), Flatten(), Dense(4)))
    hw.check_noise(conv, (np.zeros((3, 2, 6, 6)),), 3, "sample")
    hw.check_noise(conv, (np.zeros((3, 72)),), 3, "sample")
    with pytest.raises(ValueError, match=r"must have shape \(3, 72\)"):
        hw.check_noise(conv, (np.zeros((3, 2, 6, 5)),), 3, "sample")


def test_device_output_is_checked():
    """A device must answer one (K, size_l) array per hidden block; (K, *a_shape) is reshaped."""
    shapes = ((2, 3), (2, 4))
    out = hw.check_device_output([np.ones((2, 3)), np.ones((2, 2, 2))], shapes)
    assert [p.shape for p in out] == [(2, 3), (2, 4)]
    with pytest.raises(ValueError, match="must return a tuple of 2 arrays"):
        hw.check_device_output(np.ones((2, 7)), shapes)
    with pytest.raises(ValueError, match="returned 1 arrays, expected 2"):
        hw.check_device_output((np.ones((2, 3)),), shapes)
    with pytest.raises(ValueError, match=r"output 1 has shape \(2, 5\), expected \(2, 4\)"):
        hw.check_device_output((np.ones((2, 3)), np.ones((2, 5))), shapes)
