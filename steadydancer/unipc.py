"""The reference's sampler: multistep UniPC (B(h) = e^h - 1, "bh2") for flow matching.

Written from the UniPC method (Zhao et al. 2023, predictor UniP + corrector UniC, data
prediction) with the choices of the reference's flow scheduler (docs/REFERENCE.md,
"Sampling"): order 2, the last step at order 1, the corrector on every step after the
first, a final sigma of 0. With x_t = (1 - sigma) x0 + sigma noise, alpha = 1 - sigma and
lambda = log(alpha / sigma). Scalar coefficients are computed in float32 as the reference
computes them, so that the same model gives the same latents.

`denoise(x, sigma)` returns the model's x0 prediction at (x, sigma) (ComfyUI's
"denoised"); the sampler never sees the model's timestep, which is the model's business.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

Denoise = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
StepCallback = Callable[[int, torch.Tensor, torch.Tensor], None]
REFERENCE_ORDER = 2


def check_sigmas(sigmas: torch.Tensor) -> torch.Tensor:
    """The schedule as float32 on the CPU; refuses what UniPC cannot step through."""
    values = torch.as_tensor(sigmas).detach().to("cpu", torch.float32).flatten()
    if values.numel() < 2:
        raise ValueError(f"flow UniPC needs at least 2 sigmas (1 step); got {values.numel()}")
    if not torch.isfinite(values).all() or values.min() < 0 or values.max() > 1:
        raise ValueError(f"flow UniPC needs flow-matching sigmas in [0, 1]; got {values.tolist()}")
    if not (values[1:] < values[:-1]).all():
        raise ValueError(
            "flow UniPC needs strictly decreasing sigmas (each step must lower the noise); got "
            f"{values.tolist()}"
        )
    return values


def _lambda(sigma: torch.Tensor) -> torch.Tensor:
    return torch.log(1 - sigma) - torch.log(sigma)


def _phi_terms(h: torch.Tensor, order: int) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
    """(e^-h - 1, B(h), b) for data prediction: hh = -h, b_k = k! phi_{k+1}(hh) / B(h)."""
    hh = -h
    h_phi_1 = torch.expm1(hh)
    b_h = torch.expm1(hh)
    h_phi_k = h_phi_1 / hh - 1
    factorial = 1
    b = []
    for k in range(1, order + 1):
        b.append(h_phi_k * factorial / b_h)
        factorial *= k + 1
        h_phi_k = h_phi_k / hh - 1 / factorial
    return h_phi_1, b_h, b


class _History:
    """The x0 predictions of the last steps, newest last, with their sigmas' lambdas."""

    def __init__(self, order: int) -> None:
        self.order = order
        self.x0: list[torch.Tensor] = []
        self.lambdas: list[torch.Tensor] = []

    def push(self, x0: torch.Tensor, lam: torch.Tensor) -> None:
        self.x0 = [*self.x0, x0][-self.order :]
        self.lambdas = [*self.lambdas, lam][-self.order :]


def _predict(x: torch.Tensor, history: _History, sigma_s: torch.Tensor, sigma_t: torch.Tensor, order: int) -> torch.Tensor:
    """UniP: from x at sigma_s (its x0 is history's newest) to sigma_t."""
    m0, lam_s, lam_t = history.x0[-1], history.lambdas[-1], _lambda(sigma_t)
    h = lam_t - lam_s
    alpha_t = 1 - sigma_t
    h_phi_1, b_h, _ = _phi_terms(h, order)
    x_t = (sigma_t / sigma_s) * x - (alpha_t * h_phi_1) * m0
    if order == 2:
        rk = (history.lambdas[-2] - lam_s) / h
        d1 = (history.x0[-2] - m0) / rk
        x_t = x_t - (alpha_t * b_h) * (0.5 * d1)
    return x_t


def _correct(
    x_prev: torch.Tensor, x0_new: torch.Tensor, history: _History,
    sigma_prev: torch.Tensor, sigma_now: torch.Tensor, order: int,
) -> torch.Tensor:
    """UniC: redo the last step from x_prev (at sigma_prev) with x0_new, the model's x0 at
    the predicted sample (sigma_now), which replaces that sample; `order` is the order the
    predictor used."""
    m0, lam_s, lam_t = history.x0[-1], history.lambdas[-1], _lambda(sigma_now)
    h = lam_t - lam_s
    alpha_t = 1 - sigma_now
    h_phi_1, b_h, b = _phi_terms(h, order)
    if order == 1:
        rhos = [torch.tensor(0.5)]
        earlier = []
    else:
        rks = [(history.lambdas[-2] - lam_s) / h]
        earlier = [(history.x0[-2] - m0) / rks[0]]
        matrix = torch.stack([torch.pow(torch.tensor([*rks, 1.0]), k) for k in range(order)])
        rhos = list(torch.linalg.solve(matrix, torch.tensor(b)))
    x_t = (sigma_now / sigma_prev) * x_prev - (alpha_t * h_phi_1) * m0
    residual = x0_new - m0
    correction = rhos[-1] * residual if not earlier else rhos[0] * earlier[0] + rhos[-1] * residual
    return x_t - (alpha_t * b_h) * correction


def sample_flow_unipc(
    denoise: Denoise,
    x: torch.Tensor,
    sigmas: torch.Tensor,
    *,
    order: int = REFERENCE_ORDER,
    callback: StepCallback | None = None,
) -> torch.Tensor:
    """Sample from x at sigmas[0] down to sigmas[-1] (normally 0); returns the last sample.

    `callback(i, x, x0)` after step i with the new sample and that step's x0 prediction.
    """
    if order not in (1, 2):
        raise ValueError(f"order must be 1 or 2 (the reference uses 2); got {order!r}")
    sig = check_sigmas(sigmas)
    steps = len(sig) - 1
    history = _History(order)
    x_prev: torch.Tensor | None = None
    previous_order = 0
    for i in range(steps):
        x0 = denoise(x, sigmas[i])
        if x_prev is not None:
            x = _correct(x_prev, x0, history, sig[i - 1], sig[i], previous_order)
        history.push(x0, _lambda(sig[i]))
        this_order = min(order, steps - i, i + 1)
        x_prev = x
        x = _predict(x, history, sig[i], sig[i + 1], this_order).to(x_prev.dtype)
        previous_order = this_order
        if callback is not None:
            callback(i, x, x0)
    return x
