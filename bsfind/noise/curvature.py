"""B_noise = tr(HΣ)/(GᵀHG), the curvature-aware noise scale (McCandlish eq. 2.8).

The two-batch trick of B_simple applies to the quadratic form v ↦ vᵀHv
(DESIGN §2): for a random batch gradient G_B,

    E[G_Bᵀ H G_B] = GᵀHG + tr(HΣ)/B,

so with k micro-batch gradients g_j (b examples each) and their mean ḡ
(B = k·b), ``two_batch(b, mean_j g_jᵀHg_j, B, ḡᵀHḡ)`` gives unbiased
estimates of GᵀHG and tr(HΣ). H is the Hessian of the loss on an
*independent* batch each round (its expectation is the true Hessian, and
independence keeps E[G_Bᵀ Ĥ G_B] = E[G_Bᵀ H G_B]). Each round costs k
Hessian-vector products (double backward through the H-batch gradient);
ḡᵀHḡ comes free from them by linearity: Hḡ = mean_j Hg_j.

Early in training GᵀHG can be ≤ 0 (negative curvature along G); B_noise is
then reported unresolved rather than as a meaningless negative number.
"""

from __future__ import annotations

import math

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from bsfind.budget import Deadline, ProgressFn, now
from bsfind.noise.estimators import RatioAccumulator, two_batch
from bsfind.results import CurvatureResult, Interval
from bsfind.workload import Workload

# Micro-batches per round: k HVPs each. 8 balances the variance of the
# small-batch term against the cost of one HVP per micro-batch.
CURVATURE_MICROBATCHES = 8
MIN_CURVATURE_ROUNDS = 10


class CurvatureProbe:
    """Rounds of the two-batch estimate on Hessian quadratic forms."""

    def __init__(
        self,
        job: Workload,
        *,
        batch_size: int,
        microbatch_size: int | None = None,
        hessian_batch: int | None = None,
        seed: int = 0,
        target_rel_error: float = 0.1,
        progress: ProgressFn | None = None,
        step: int = 0,
    ) -> None:
        self.job = job
        self.params = job.trainable()
        self.k = CURVATURE_MICROBATCHES
        self.b = microbatch_size or max(1, batch_size // self.k)
        self.h_batch = hessian_batch or max(self.b * self.k, 64)
        self.gen = torch.Generator().manual_seed(seed)
        self.target = target_rel_error
        self.progress = progress
        self.step = step
        self.acc = RatioAccumulator()
        self.examples = 0

    def _grads(self, loss: torch.Tensor, create_graph: bool = False) -> tuple[torch.Tensor, ...]:
        return torch.autograd.grad(loss, self.params, create_graph=create_graph,
                                   allow_unused=True, materialize_grads=True)

    def one_round(self) -> tuple[float, float]:
        # Double backward through scaled_dot_product_attention exists only in
        # its math kernel on CPU (the flash kernel has no second derivative).
        with sdpa_kernel([SDPBackend.MATH]):
            return self._one_round()

    def _one_round(self) -> tuple[float, float]:
        n = len(self.job)
        h_idx = torch.randint(n, (self.h_batch,), generator=self.gen)
        idx = torch.randint(n, (self.k, self.b), generator=self.gen)
        gh = self._grads(self.job.loss(h_idx), create_graph=True)
        q_small = 0.0
        g_sum = [torch.zeros_like(p, dtype=torch.float64) for p in self.params]
        hg_sum = [torch.zeros_like(p, dtype=torch.float64) for p in self.params]
        for j in range(self.k):
            g = [t.detach() for t in self._grads(self.job.loss(idx[j]))]
            hg = torch.autograd.grad(gh, self.params, grad_outputs=g, retain_graph=True,
                                     allow_unused=True, materialize_grads=True)
            q_small += float(sum((a.double() * b.double()).sum() for a, b in zip(g, hg,
                                                                                   strict=True)))
            for s, a in zip(g_sum, g, strict=True):
                s += a.double()
            for s, a in zip(hg_sum, hg, strict=True):
                s += a.detach().double()
        q_big = float(sum((a * b).sum() for a, b in zip(g_sum, hg_sum, strict=True))) / self.k**2
        self.examples += self.k * self.b + self.h_batch
        gthg, tr_hs = two_batch(self.b, q_small / self.k, self.k * self.b, q_big)
        return tr_hs, gthg

    def run(self, deadline: Deadline) -> CurvatureResult:
        """Rounds until the interval is within the target or the deadline passes."""
        start = now()
        while not deadline.passed():
            tr_hs, gthg = self.one_round()
            if not (math.isfinite(tr_hs) and math.isfinite(gthg)):
                break
            self.acc.add(tr_hs, gthg, weight=1.0)
            value, ci, _, _ = self.acc.ratio()
            rel = ((ci.high - ci.low) / 2 / value) if value and ci.bounded else math.inf
            if self.progress is not None:
                shown = f"B_noise≈{value:.0f} ±{rel:.0%}" if value else "GᵀHG unresolved"
                frac = 0.0 if not math.isfinite(rel) else min(1.0, self.target / rel)
                self.progress("curv", frac, f"step {self.step}: {shown}")
            if len(self.acc) >= MIN_CURVATURE_ROUNDS and rel <= self.target:
                break
        self.job.model.zero_grad(set_to_none=True)
        seconds = now() - start
        if not len(self.acc):
            return CurvatureResult(None, Interval(0.0, math.inf), 0, seconds)
        value, ci, _, _ = self.acc.ratio()
        tr_hs, gthg = self.acc.moments()[:2]
        return CurvatureResult(value, ci, len(self.acc), seconds, trace_h_sigma=tr_hs, gthg=gthg)
