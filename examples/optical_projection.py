"""DFA with its error projection on a (simulated) optical co-processor, plugged in as a projection device.

An optical processing unit shines the error, imprinted on a light beam, through a scattering medium:
the field at the camera is e R, with R a fixed complex Gaussian transmission matrix, and the camera
records only the intensity |e R|^2. The linear projection DFA needs is recovered from intensities
alone with a fixed anchor input a and three measurements,

    (|e R|^2 + |a R|^2 - |(e - a) R|^2) / (2 |a R|) = Re(e R * conj(a R) / |a R|) = e B_eff,

B_eff = Re(R diag(conj(a R) / |a R|)) a real matrix with i.i.d. Gaussian entries: the method of
LightOn's "Linear optical random projections without holography" (Hesslow et al., Opt. Express 31(16),
25881, 2023; arXiv:2305.12988). |a R|^2 depends only on the anchor, so a real device measures it once.
The simulator below is that device: ``Projection(device=opu)`` hands it the (optionally ternarised)
error of every step, and it answers (e B_1^T, ..., e B_{L-1}^T) by slicing the camera's pixels per
hidden layer. Given ``opu.feedback()`` as feedback, the in-program step computes the same thing, which
this script checks before training.

    python examples/optical_projection.py --backend torch                 # XOR, 2-8-8-1
    python examples/optical_projection.py --backend jax --ternary         # ternarised error, as LightOn's OPU
    python examples/optical_projection.py --backend jax --mnist 2000 --camera-bits 8 --epochs 3
"""

from __future__ import annotations

import argparse
import time
from typing import Optional, Sequence, Tuple

import numpy as np

from dfa_core import MLPSpec, get_backend, init_params
from dfa_core.hardware import Projection


class OpticalProjector:
    """A simulated optical random projection with linear recovery: a projection device for DFA.

    Args:
      n_out: n_L, the length of the error (the number of input pixels used).
      sizes: (n_1, ..., n_{L-1}), the hidden widths (camera pixels per layer, taken in order).
      seed: draws R (n_L, H) complex Gaussian, H = n_1 + ... + n_{L-1}, and the anchor a (n_L,).
      scale: standard deviation of B_eff's entries.
      camera_bits: None for an ideal camera; else intensities are rounded to this many bits of a
        full scale fixed at calibration (4x the anchor frame's peak; brighter pixels saturate), as a
        camera at fixed exposure does: the recovery is then only approximately linear.
    """

    def __init__(
        self, n_out: int, sizes: Sequence[int], seed: int = 0, scale: float = 1.0, camera_bits: Optional[int] = None
    ):
        rng = np.random.default_rng(seed)
        width = int(sum(sizes))
        # Re and Im of each entry ~ N(0, scale^2): Re(R_ij * unit phase) ~ N(0, scale^2) as well.
        self.r_OxH = scale * (rng.standard_normal((n_out, width)) + 1j * rng.standard_normal((n_out, width)))
        self.anchor_O = rng.standard_normal(n_out)
        self.splits = np.cumsum(sizes)[:-1]
        self.camera_bits = camera_bits
        self.calls = 0
        # Calibration: the anchor's frame, averaged over many exposures (so taken as exact here), and the
        # camera's full scale.
        self.anchor_intensity_H = np.abs(self.anchor_O @ self.r_OxH) ** 2
        self.full_scale = 4.0 * float(self.anchor_intensity_H.max())

    def intensity(self, x_KxO: np.ndarray) -> np.ndarray:
        """What the camera records, |x R|^2 per input row, (K, H)."""
        y = np.abs(x_KxO @ self.r_OxH) ** 2
        if self.camera_bits is not None:
            step = self.full_scale / (2**self.camera_bits - 1)
            y = np.round(np.minimum(y, self.full_scale) / step) * step
        return y

    def __call__(self, e_KxO: np.ndarray) -> Tuple[np.ndarray, ...]:
        """(e B_1^T, ..., e B_{L-1}^T) from two intensity frames (and the calibrated anchor frame)."""
        self.calls += 1
        e = np.asarray(e_KxO, np.float64)
        ia = self.anchor_intensity_H[None, :]
        linear_KxH = (self.intensity(e) + ia - self.intensity(e - self.anchor_O[None, :])) / (2 * np.sqrt(ia))
        return tuple(np.split(linear_KxH.astype(e_KxO.dtype), self.splits, axis=1))

    def feedback(self) -> Tuple[np.ndarray, ...]:
        """The effective (B_1, ..., B_{L-1}), B_l (n_l, n_L): what the device computes, for in-program DFA."""
        field_H = self.anchor_O @ self.r_OxH
        b_OxH = np.real(self.r_OxH * (np.conj(field_H) / np.abs(field_H))[None, :])
        return tuple(b.T.copy() for b in np.split(b_OxH, self.splits, axis=1))


def xor_data() -> Tuple[np.ndarray, np.ndarray]:
    x = np.array([[0.0, 0.0], [0.0, 1.0], [1.0, 0.0], [1.0, 1.0]])
    return x, np.array([[0.0], [1.0], [1.0], [0.0]])


def mnist_data(limit: int) -> Tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    from dfa_train.data import find_mnist_slice, load_mnist

    data = load_mnist(find_mnist_slice(), "float64")
    return data.x_train[:limit], data.y_train[:limit], data.x_test, data.y_test


def accuracy(be, spec, params, x, y) -> float:
    with be.precision_scope(spec.dtype):
        y_hat = be.to_numpy(be.forward(spec, params, be.asarray(x)))
    if y.shape[1] == 1:
        return float(np.mean((y_hat[:, 0] > 0.5) == (y[:, 0] > 0.5)))
    return float(np.mean(np.argmax(y_hat, axis=1) == np.argmax(y, axis=1)))


def train(be, spec, x, y, opu, projection, epochs, batch, lr, seed=0):
    """Plain SGD on DFA gradients whose projection runs on the device; returns params and seconds per step."""
    params = be.asarray(init_params(spec, seed=seed))
    feedback = be.asarray(opu.feedback())  # checked for shape only: the device does the projecting
    rng = np.random.default_rng(seed)
    start = time.perf_counter()
    with be.precision_scope(spec.dtype):  # JAX computes float64 only inside it
        params = _epochs(be, spec, params, feedback, x, y, projection, epochs, batch, lr, rng)
    be.to_numpy(params)
    return params, (time.perf_counter() - start) / max(epochs * -(-len(x) // batch), 1)


def _epochs(be, spec, params, feedback, x, y, projection, epochs, batch, lr, rng):
    for _ in range(epochs):
        order = rng.permutation(len(x))
        for i in range(0, len(x), batch):
            idx = order[i : i + batch]
            grads = be.dfa_grads(spec, params, feedback, x[idx], y[idx], projection=projection, check_values=False)
            params = tuple(tuple(p - lr * g for p, g in zip(pair, gpair)) for pair, gpair in zip(params, grads))
    return params


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backend", choices=("torch", "jax"), default="torch")
    parser.add_argument("--mnist", type=int, default=0, help="train on this many MNIST (bundled slice) images")
    parser.add_argument("--epochs", type=int, default=0, help="default: 400 (XOR) or 2 (MNIST)")
    parser.add_argument("--lr", type=float, default=0.0, help="default: 0.5 (XOR) or 0.01 (MNIST)")
    parser.add_argument("--ternary", action="store_true", help="ternarise the error first (threshold 0.1)")
    parser.add_argument("--camera-bits", type=int, default=None, help="camera precision (default: ideal)")
    args = parser.parse_args(argv)
    be = get_backend(args.backend)
    if args.mnist:
        x, y, x_test, y_test = mnist_data(args.mnist)
        spec = MLPSpec((784, 128, 10), activation="tanh", output="sigmoid", dtype="float64")
        epochs, lr, batch, scale = args.epochs or 2, args.lr or 0.01, 32, 1.9
    else:
        x, y = xor_data()
        x_test, y_test = x, y
        spec = MLPSpec((2, 8, 8, 1), activation="tanh", output="sigmoid", dtype="float64")
        epochs, lr, batch, scale = args.epochs or 400, args.lr or 0.5, 4, 1.0
    opu = OpticalProjector(spec.n_out, spec.hidden_sizes, seed=1, scale=scale, camera_bits=args.camera_bits)
    projection = Projection(quantize="ternary" if args.ternary else None, device=opu)

    # The device is the in-program projection with B = opu.feedback(), up to the camera's rounding.
    params, feedback = be.asarray(init_params(spec, seed=0)), be.asarray(opu.feedback())
    on_device = be.to_numpy(be.dfa_grads(spec, params, feedback, x[:8], y[:8], projection=projection))
    in_program = Projection(quantize=projection.quantize) if args.ternary else None
    exact = be.to_numpy(be.dfa_grads(spec, params, feedback, x[:8], y[:8], projection=in_program))
    diff = max(
        float(np.max(np.abs(a - b)) / (np.max(np.abs(b)) + 1e-300))
        for p, q in zip(on_device, exact)
        for a, b in zip(p, q)
    )
    print(f"device vs in-program grads with its effective feedback: max relative difference {diff:.2e}")

    params, per_step = train(be, spec, x, y, opu, projection, epochs, batch, lr)
    acc = accuracy(be, spec, params, x_test, y_test)
    what = "ternarised" if args.ternary else "exact"
    if args.mnist:
        print(
            f"MNIST ({len(x)} images) by DFA through the optical device ({what} error) on {args.backend}: "
            f"test accuracy {acc:.3f} after {epochs} epochs"
        )
    else:
        print(
            f"XOR by DFA through the optical device ({what} error) on {args.backend}: "
            f"{round(4 * acc)}/4 correct after {epochs} epochs"
        )
    print(f"{opu.calls} device calls, {1e3 * per_step:.2f} ms per training step")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
