"""An independent re-implementation of the reference's sampling, for tests.

Written from the reference's inference code as it behaves (image-to-video generation with
its flow UniPC scheduler): 1000 training sigmas 1 - linspace(1, 1/1000) stored in float32,
the step sigmas spaced linearly in float64 from the first (0.999) to the last (0) training
sigma, shifted, the model called at the integer part of sigma * 1000, the sample starting as
the noise itself, and multistep UniPC (bh2, data prediction, order 2, the last step at order
1, the corrector on every step after the first) in its bookkeeping: a list of past model
outputs, predictor and corrector solved with einsum / linalg.solve as the reference does.
It shares no code with the package, so a test that compares the two checks the package.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

Velocity = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (sample, integer timestep) -> flow


def schedule(steps: int, shift: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(sigmas float32 [steps + 1] ending at 0, timesteps int64 [steps]) as the reference sets them."""
    training = torch.from_numpy(1.0 - np.linspace(1, 1 / 1000, 1000)[::-1].copy()).to(torch.float32)
    sigma_max, sigma_min = training[0].item(), training[-1].item()
    sigmas = np.linspace(sigma_max, sigma_min, steps + 1).copy()[:-1]
    sigmas = shift * sigmas / (1 + (shift - 1) * sigmas)
    timesteps = torch.from_numpy(sigmas * 1000).to(torch.int64)
    return torch.from_numpy(np.concatenate([sigmas, [0]]).astype(np.float32)), timesteps


class FlowUniPC:
    """The reference scheduler's state machine (solver_order 2, bh2, predict_x0)."""

    def __init__(self, sigmas: torch.Tensor, order: int = 2) -> None:
        self.sigmas = sigmas
        self.order = order
        self.outputs: list[torch.Tensor | None] = [None] * order
        self.lower_order_nums = 0
        self.last_sample: torch.Tensor | None = None
        self.this_order = 1
        self.index = 0

    def _alpha_sigma(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        sigma = self.sigmas[i]
        return 1 - sigma, sigma

    def _lam(self, i: int) -> torch.Tensor:
        alpha, sigma = self._alpha_sigma(i)
        return torch.log(alpha) - torch.log(sigma)

    def _coefficients(self, h: torch.Tensor, order: int) -> tuple[torch.Tensor, torch.Tensor, list]:
        hh = -h
        h_phi_1 = torch.expm1(hh)
        h_phi_k = h_phi_1 / hh - 1
        factorial_i = 1
        b_h = torch.expm1(hh)
        b = []
        for i in range(1, order + 1):
            b.append(h_phi_k * factorial_i / b_h)
            factorial_i *= i + 1
            h_phi_k = h_phi_k / hh - 1 / factorial_i
        return h_phi_1, b_h, b

    def _predictor(self, x: torch.Tensor, order: int) -> torch.Tensor:
        i = self.index
        m0 = self.outputs[-1]
        alpha_t, sigma_t = self._alpha_sigma(i + 1)
        _, sigma_s0 = self._alpha_sigma(i)
        h = self._lam(i + 1) - self._lam(i)
        d1s = []
        for k in range(1, order):
            rk = (self._lam(i - k) - self._lam(i)) / h
            d1s.append((self.outputs[-(k + 1)] - m0) / rk)
        h_phi_1, b_h, _ = self._coefficients(h, order)
        x_t_ = sigma_t / sigma_s0 * x - alpha_t * h_phi_1 * m0
        if d1s:
            pred_res = torch.einsum("k,bkc...->bc...", torch.tensor([0.5], dtype=x.dtype), torch.stack(d1s, dim=1))
        else:
            pred_res = 0
        return (x_t_ - alpha_t * b_h * pred_res).to(x.dtype)

    def _corrector(self, model_t: torch.Tensor, last: torch.Tensor, order: int) -> torch.Tensor:
        i = self.index
        m0 = self.outputs[-1]
        alpha_t, sigma_t = self._alpha_sigma(i)
        _, sigma_s0 = self._alpha_sigma(i - 1)
        h = self._lam(i) - self._lam(i - 1)
        rks, d1s = [], []
        for k in range(1, order):
            rk = (self._lam(i - (k + 1)) - self._lam(i - 1)) / h
            rks.append(rk)
            d1s.append((self.outputs[-(k + 1)] - m0) / rk)
        rks.append(1.0)
        rks = torch.tensor(rks)
        h_phi_1, b_h, b = self._coefficients(h, order)
        r = torch.stack([torch.pow(rks, k - 1) for k in range(1, order + 1)])
        if order == 1:
            rhos = torch.tensor([0.5], dtype=last.dtype)
        else:
            rhos = torch.linalg.solve(r, torch.tensor(b)).to(last.dtype)
        x_t_ = sigma_t / sigma_s0 * last - alpha_t * h_phi_1 * m0
        corr = torch.einsum("k,bkc...->bc...", rhos[:-1], torch.stack(d1s, dim=1)) if d1s else 0
        return (x_t_ - alpha_t * b_h * (corr + rhos[-1] * (model_t - m0))).to(last.dtype)

    def step(self, flow: torch.Tensor, sample: torch.Tensor) -> torch.Tensor:
        x0 = sample - self.sigmas[self.index] * flow
        if self.index > 0 and self.last_sample is not None:
            sample = self._corrector(x0, self.last_sample, self.this_order)
        self.outputs = [*self.outputs[1:], x0]
        this_order = min(self.order, len(self.sigmas) - 1 - self.index)
        self.this_order = min(this_order, self.lower_order_nums + 1)
        self.last_sample = sample
        out = self._predictor(sample, self.this_order)
        self.lower_order_nums = min(self.lower_order_nums + 1, self.order)
        self.index += 1
        return out


def sample(velocity: Velocity, noise: torch.Tensor, steps: int, shift: float) -> tuple[torch.Tensor, list[int]]:
    """The reference's loop: (final latent, the integer timesteps the model was called with)."""
    sigmas, timesteps = schedule(steps, shift)
    solver = FlowUniPC(sigmas)
    latent = noise
    seen = []
    for t in timesteps:
        seen.append(int(t))
        latent = solver.step(velocity(latent, t), latent)
    return latent, seen
