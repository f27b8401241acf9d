"""Soft weight-sharing (Ullrich, Meeds & Welling 2017; docs/methods.md): ``regularizer=sws``.

A pre-trained network is retrained under a learned Gaussian-mixture prior over its weights,

    loss = mean cross-entropy + lam/P · (−log p(w) − Σ_j log Gamma(λ_j | α, β)),
    p(w) = Π_i Σ_{j=0..J} π_j N(w_i | μ_j, 1/λ_j),

P the number of weights under the prior: ``lam`` weighs the mean negative log-prior of a
weight against the mean cross-entropy of a sample, so its meaning depends neither on the
dataset's size nor on the model's. The paper writes the same term as τ/N · (−log p(w)), N
the training-set size: lam = τ·P/N (the authors' tutorial, τ = 0.003 with 642,460 weights
and 60,000 images, is lam = 0.032).

Component 0 is the zero component: μ_0 = 0 and π_0 fixed; the other means, the
log-precisions γ_j = log λ_j and the mixing logits are learned, each with its own learning
rate, as the authors' tutorial does. The weights cluster around the means and most of them
around zero, so ``compress=quantize`` can then snap every weight to a mean.

−log p(w) is computed with the log-sum-exp trick, and its gradient in the same pass
(:class:`_NegLogMixture`), chunk by chunk by ``torch.compile``'s kernel or eagerly, so memory
never holds (number of weights) × (J+1) terms (with ``native_kernels=true``, by the C kernel
of :mod:`compaware.native.mixture` on a CPU).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable

import torch
from matplotlib.figure import Figure
from torch import Tensor, nn
from torch.autograd.function import once_differentiable

from compaware import native
from compaware.config import UserError, check_choice, check_range
from compaware.data import DataInfo
from compaware.mixture import LOG_2PI, Mixture
from compaware.native import mixture as native_mixture
from compaware.regularizers.base import Regularizer

log = logging.getLogger(__name__)

KERNELS = ("compiled", "eager")  # what computes the prior: regularizer.kernel
EAGER_CHUNK, COMPILED_CHUNK = 16384, 1 << 17  # default weights per chunk
UNDERFLOW = 1e-30  # a shifted total Σ_j e^(q_j − shift) below this: shift each weight alone
# γ = log(1/σ²) stays within σ ∈ [1e-4, 10]. A component whose variance collapses onto its
# weights would send −log p to −∞; the Gamma hyper-prior pushes back, and the bound keeps every
# term finite (float32 holds e^γ and β·e^γ comfortably) whatever the optimizer does.
LOG_PRECISION_RANGE = (-2 * math.log(10.0), -2 * math.log(1e-4))
# The components' initial std, by default, as a share of the weights' standard deviation
# (SoftWeightSharing.initial_log_precisions says why narrow). The zero component then first
# claims the weights within about 4 × 0.4 = 1.6 stds, some 90 % of a trained network's.
INIT_STD_SHARE = 0.4


def _pair(option: str, value, what: str, strict: bool = False) -> tuple[float, float]:
    """Two numbers from a config list; with ``strict`` the first must be below the second."""
    try:
        first, second = (float(v) for v in value)
    except (TypeError, ValueError):
        raise UserError(f"{option}={value!r} is not a pair of numbers; {option} takes "
                        f"{what}.") from None
    if strict and not first < second:
        raise UserError(f"{option}={value!r} is not an increasing pair; {option} takes {what}.")
    return first, second


def _chunk_terms(w: Tensor, means: Tensor, precisions: Tensor, log_norms: Tensor,
                 own_shift: bool = False) -> tuple[Tensor, ...]:
    """For one chunk of weights: Σ_i log Σ_j π_j N(w_i | μ_j, 1/λ_j) and the sums its gradient
    needs (r: responsibilities, d = w − μ): r·d·λ per weight, Σ_i r, Σ_i r·d, Σ_i r·d²; and
    the smallest of the weights' shifted totals, to check the shift.

    Laid out components × weights, the layout ``torch.compile`` turns into one vectorised
    pass (weights × components compiles to a kernel 2× slower). The log-sum-exp is shifted
    by max_j log(π_j √(λ_j/2π)), a bound on every term (−½λ_j d² ≤ 0): no exponential
    overflows and no per-weight max pass is needed. Only a weight further than about ten
    standard deviations from every mean has all its terms underflow (a shifted total below
    UNDERFLOW); the caller then recomputes the chunk with each weight's own largest term as
    its shift (``own_shift``), the textbook log-sum-exp."""
    d = w - means[:, None]
    q = log_norms[:, None] - 0.5 * precisions[:, None] * d * d
    shift = q.amax(0) if own_shift else log_norms.max()
    e = (q - shift).exp()
    total = e.sum(0)
    r = e / total
    rd = r * d
    return ((total.log() + shift).sum(), (precisions[:, None] * rd).sum(0), r.sum(1),
            rd.sum(1), (rd * d).sum(1), total.amin())


def _compiled(kernel: Callable) -> Callable:
    """``kernel`` fused by ``torch.compile``; where compilation fails (no C++ compiler, an
    unsupported platform) a warning, and ``kernel`` itself from then on: same results."""
    compiled = torch.compile(kernel, dynamic=False)

    def run(*args: Tensor) -> tuple[Tensor, ...]:
        nonlocal compiled
        try:
            return compiled(*args)
        except torch._dynamo.exc.BackendCompilerFailed as e:
            inner = e.inner_exception
            reason = f"{type(inner).__name__}: {str(inner).strip()[:300]}"
            log.warning("torch.compile failed here (%s); the prior runs uncompiled (same "
                        "results, slower). Set regularizer.kernel=eager to skip the attempt.",
                        reason)
            compiled = kernel
            return kernel(*args)

    return run


def _chunked(kernel: Callable, chunk_size: int) -> Callable:
    """The prior's sums over ``weights`` (see :func:`mixture_sums`), all of them in one
    vector cut into chunks of ``chunk_size``, computed by ``kernel`` (:func:`_chunk_terms`,
    compiled or not: one compilation per chunk length, so whole chunks, not tensors)."""

    def sums(weights: list[Tensor], means: Tensor, precisions: Tensor, log_norms: Tensor):
        w = torch.cat([t.reshape(-1) for t in weights])
        log_total = w.new_zeros(())
        grad_w = torch.empty_like(w)
        sum_r, sum_rd, sum_rdd = (torch.zeros_like(means) for _ in range(3))
        for start in range(0, w.numel(), chunk_size):
            chunk = w[start:start + chunk_size]
            terms = kernel(chunk, means, precisions, log_norms)
            if terms[-1] < UNDERFLOW:  # a weight far from every component: shift each alone
                terms = _chunk_terms(chunk, means, precisions, log_norms, own_shift=True)
            lse, grad_chunk, r, rd, rdd, _ = terms
            log_total += lse
            grad_w[start:start + len(chunk)] = grad_chunk
            sum_r += r
            sum_rd += rd
            sum_rdd += rdd
        grads = [g.view_as(t) for g, t in zip(grad_w.split([t.numel() for t in weights]),
                                              weights, strict=True)]
        return log_total, grads, sum_r, sum_rd, sum_rdd

    return sums


def mixture_sums(kernel: str, chunk_size: int) -> Callable:
    """What computes the prior, by ``regularizer.kernel``: a function of (weights, a list of
    tensors, means, precisions, log_norms) returning Σ_i log Σ_j π_j N(w_i | μ_j, 1/λ_j) over
    every weight, the gradient Σ_j r_ij λ_j d_ij of each (a tensor per tensor), and per
    component Σ_i r_ij, Σ_i r_ij d_ij, Σ_i r_ij d_ij²
    (r the responsibilities, d = w − μ)."""
    torch_sums = _chunked(_chunk_terms if kernel == "eager" else _compiled(_chunk_terms),
                          chunk_size)

    def sums(weights: list[Tensor], means: Tensor, precisions: Tensor, log_norms: Tensor):
        if native.enabled():  # native_kernels=true: the C kernel, where it takes the weights
            done = native_mixture.sums(weights, means, precisions, log_norms)
            if done is not None:
                return done
        return torch_sums(weights, means, precisions, log_norms)

    return sums


class _NegLogMixture(torch.autograd.Function):
    """−Σ_i log Σ_j π_j N(w_i | μ_j, e^{−γ_j}) over the weights of every tensor in
    ``weights``, with gradients computed in the forward pass (by ``sums``, one of
    :func:`mixture_sums`): d/dw_i = Σ_j r_ij λ_j d_ij, d/dμ_j = −λ_j Σ_i r_ij d_ij,
    d/dγ_j = −½ Σ_i r_ij + ½ λ_j Σ_i r_ij d_ij², d/d(log π_j) = −Σ_i r_ij."""

    @staticmethod
    def forward(ctx, means: Tensor, log_precisions: Tensor, log_pis: Tensor, sums: Callable,
                *weights: Tensor) -> Tensor:
        precisions = log_precisions.exp()
        log_norms = log_pis + 0.5 * (log_precisions - LOG_2PI)
        log_total, grads, sum_r, sum_rd, sum_rdd = sums(list(weights), means, precisions,
                                                        log_norms)
        ctx.save_for_backward(-precisions * sum_rd,
                              -0.5 * sum_r + 0.5 * precisions * sum_rdd, -sum_r, *grads)
        return -log_total

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: Tensor):
        grad_means, grad_log_precisions, grad_log_pis, *grad_weights = ctx.saved_tensors
        return (grad * grad_means, grad * grad_log_precisions, grad * grad_log_pis, None,
                *(grad * g for g in grad_weights))


class SoftWeightSharing(Regularizer):
    """``regularizer=sws``: the mixture prior over the selected layers' weights (and biases).

    ``lam`` is the strength (see the module's docstring); ``components`` the number J of
    learned components besides the zero one, whose mixing proportion is fixed at ``pi_zero``.
    Means start evenly spaced over ``init_range`` (default: the range of the weights at the
    start of retraining), every std at ``init_std`` (default: INIT_STD_SHARE × the weights'
    standard deviation).
    ``gamma_zero`` and ``gamma`` are the (α, β) of the Gamma hyper-priors on the zero
    component's precision and the others'. The weights learn at the stage's lr
    (``schedule.lr``), the means, log-precisions and mixing logits at ``lr_means``,
    ``lr_log_precisions`` and ``lr_mixing``. ``kernel`` computes the prior: ``compiled``,
    fused by ``torch.compile`` (4–5× faster than ``eager`` after a few seconds of
    compilation; warns and runs eagerly where it cannot compile), or ``eager``. ``chunk_size``
    weights are processed at a time: by default 2^17 compiled and 16,384 eager, blocks that
    stay in cache (2^20 made the prior of ResNet-50's 23.5 M weights 2× slower).
    """

    every = "step"  # prox: keep the log-precisions within LOG_PRECISION_RANGE
    needs_pretrained = True
    publishes = ("mixture",)

    def __init__(self, lam: float = 1.0, components: int = 16, pi_zero: float = 0.99,
                 biases: bool = True, init_range: list[float] | None = None,
                 init_std: float | None = None, gamma_zero: list[float] = (5000.0, 2.0),
                 gamma: list[float] = (250.0, 0.1), lr_means: float = 1e-4,
                 lr_log_precisions: float = 3e-3, lr_mixing: float = 3e-3,
                 chunk_size: int | None = None, kernel: str = "compiled", layers: str = "all",
                 skip_first: bool = False, skip_last: bool = False) -> None:
        super().__init__(lam, layers, skip_first, skip_last)
        check_range("regularizer.components", components, 1, integer=True)
        check_range("regularizer.pi_zero", pi_zero, 0, 1, low_open=True)
        if pi_zero == 1:
            raise UserError("regularizer.pi_zero=1 leaves no mass to the learned components; "
                            "regularizer.pi_zero takes a number in (0, 1).")
        self.init_range = None if init_range is None else _pair(
            "regularizer.init_range", init_range, "[low, high] with low < high", strict=True)
        if init_std is not None:
            check_range("regularizer.init_std", init_std, 0, low_open=True)
        self.hyper_priors = [_pair(f"regularizer.{option}", value, "[alpha, beta] with "
                                   "alpha >= 1 and beta > 0 (a Gamma(alpha, beta) prior)")
                             for option, value in (("gamma_zero", gamma_zero), ("gamma", gamma))]
        for option, (alpha, beta) in zip(("gamma_zero", "gamma"), self.hyper_priors, strict=True):
            check_range(f"regularizer.{option}[0]", alpha, 1)
            check_range(f"regularizer.{option}[1]", beta, 0, low_open=True)
        for option, lr in (("lr_means", lr_means), ("lr_log_precisions", lr_log_precisions),
                           ("lr_mixing", lr_mixing)):
            check_range(f"regularizer.{option}", lr, 0)
        if kernel == "native":  # the C kernels are one switch for the whole run
            raise UserError("regularizer.kernel=native is not a choice: the C kernels are "
                            "switched on for the whole run by native_kernels=true; "
                            "regularizer.kernel takes compiled or eager.")
        check_choice("regularizer.kernel", kernel, KERNELS)
        if chunk_size is not None:
            check_range("regularizer.chunk_size", chunk_size, 1, integer=True)
        self.components, self.pi_zero = int(components), float(pi_zero)
        self.biases, self.init_std = bool(biases), init_std
        self.chunk_size = chunk_size or (EAGER_CHUNK if kernel == "eager" else COMPILED_CHUNK)
        self.lrs = (lr_means, lr_log_precisions, lr_mixing)
        self.sums = mixture_sums(kernel, self.chunk_size)
        self.num_weights = 0
        self.means = self.log_precisions = self.mixing_logits = None

    # ------------------------------------------------------------------ the weights and state

    def tensors(self, model: nn.Module) -> list[tuple[str, Tensor]]:
        """The parameters under the prior, by name: selected layers' weights (and biases)."""
        chosen = []
        for name, layer in self.select(model):
            chosen.append((f"{name}.weight", layer.weight))
            if self.biases and layer.bias is not None:
                chosen.append((f"{name}.bias", layer.bias))
        return chosen

    def flat_weights(self, model: nn.Module) -> Tensor:
        return torch.cat([t.reshape(-1) for _, t in self.tensors(model)])

    def setup(self, model: nn.Module, data: DataInfo) -> None:
        """A fresh mixture fitted to the range of the weights retraining starts from."""
        w = self.flat_weights(model).detach()
        low, high = self.init_range or (float(w.min()), float(w.max()))
        device = w.device
        self.num_weights = len(w)
        self.means = torch.linspace(low, high, self.components, device=device)
        self.log_precisions = self.initial_log_precisions(w).to(device)
        self.mixing_logits = torch.zeros(self.components, device=device)
        for t in self.state():
            t.requires_grad_()

    def initial_log_precisions(self, weights: Tensor) -> Tensor:
        """γ = log λ of every component at the start: from ``init_std``, or by default from
        INIT_STD_SHARE × the standard deviation of ``weights``.

        A start narrow against the weights' spread matters: from a std as wide as the spread
        (the tutorial's 0.25 on weights of std 0.05–0.09), the zero component, which holds π₀
        of the mass, claims every weight, and its std shrinks only as fast as the prior drags
        the weights to zero; meanwhile the wide learned components drift into it, and the
        quantizer sends almost every weight to zero. From a narrow start, weights beyond
        about four zero-component stds belong to the learned components from the first step,
        the rest are drawn to zero, and the mixture settles within a few epochs. Relative to
        the weights, not absolute, so that it means the same on every network."""
        std = self.init_std or INIT_STD_SHARE * float(weights.std())
        return torch.full((self.components + 1,), -2 * math.log(std)).clamp(
            *LOG_PRECISION_RANGE)

    def state(self) -> tuple[Tensor, Tensor, Tensor]:
        return self.means, self.log_precisions, self.mixing_logits

    def mixture(self) -> Mixture:
        """The current mixture, zero component first (a detached copy)."""
        with torch.no_grad():
            return self._mixture()

    def artifacts(self, model: nn.Module) -> dict:
        """The learned mixture and the parameters it covers (``compress=quantize`` snaps
        them to its means)."""
        return {"mixture": self.mixture(), "parameters": [name for name, _ in self.tensors(model)]}

    def _mixture(self) -> Mixture:
        means = torch.cat([self.means.new_zeros(1), self.means])
        log_pis = torch.cat([self.means.new_tensor([math.log(self.pi_zero)]),
                             math.log1p(-self.pi_zero) + self.mixing_logits.log_softmax(0)])
        return Mixture(means, self.log_precisions.clamp(*LOG_PRECISION_RANGE), log_pis)

    def param_groups(self, model: nn.Module) -> list[dict]:
        return [{"params": [t], "lr": lr, "weight_decay": 0.0}
                for t, lr in zip(self.state(), self.lrs, strict=True)]

    def state_dict(self) -> dict:
        names = ("means", "log_precisions", "mixing_logits")
        return {n: t.detach().clone() for n, t in zip(names, self.state(), strict=True)}

    def load_state_dict(self, state: dict) -> None:
        """In place: the optimizer already holds these tensors."""
        with torch.no_grad():
            for name, t in zip(("means", "log_precisions", "mixing_logits"), self.state(),
                               strict=True):
                t.copy_(state[name])

    # ---------------------------------------------------------------------- the loss terms

    def negative_log_prior(self, model: nn.Module) -> Tensor:
        """−log p(w) − Σ_j log Gamma(λ_j | α, β), up to constants (before the τ/N scaling)."""
        mixture = self._mixture()
        nll = _NegLogMixture.apply(mixture.means, mixture.log_precisions, mixture.log_pis,
                                   self.sums, *(t for _, t in self.tensors(model)))
        gamma = mixture.log_precisions
        (alpha0, beta0), (alpha, beta) = self.hyper_priors
        alphas = gamma.new_tensor([alpha0] + [alpha] * self.components)
        betas = gamma.new_tensor([beta0] + [beta] * self.components)
        # −log Gamma(λ | α, β) = (1 − α) log λ + β λ + const
        return nll + ((1 - alphas) * gamma + betas * gamma.exp()).sum()

    def penalty(self, model: nn.Module) -> Tensor:
        return self.ramp * self.lam / self.num_weights * self.negative_log_prior(model)

    @torch.no_grad()
    def prox(self, model: nn.Module, step: float) -> None:
        self.log_precisions.clamp_(*LOG_PRECISION_RANGE)

    # ---------------------------------------------------------------------------- logging

    @torch.no_grad()
    def stats(self, model: nn.Module) -> dict[str, float]:
        if self.means is None:
            return {}
        mixture = self.mixture()
        assigned = mixture.assign(self.flat_weights(model), self.chunk_size)
        stats = {"zero_share": float((assigned == 0).float().mean()),
                 "neg_log_prior": float(self.negative_log_prior(model))}
        for j in range(len(mixture.means)):
            stats[f"mean/{j:02d}"] = float(mixture.means[j])
            stats[f"std/{j:02d}"] = float(mixture.stds[j])
            stats[f"pi/{j:02d}"] = float(mixture.log_pis[j].exp())
        return stats

    @torch.no_grad()
    def figures(self, model: nn.Module) -> dict[str, Figure]:
        """A histogram of the weights (log scale) with each mixture component overlaid,
        scaled to the histogram's counts: how this method is usually looked at."""
        if self.means is None:
            return {}
        w = self.flat_weights(model).float().cpu()
        current = self.mixture()
        mixture = Mixture(*(t.float().cpu() for t in (current.means, current.log_precisions,
                                                       current.log_pis)))
        figure = Figure(figsize=(8, 4), layout="constrained")
        axes = figure.add_subplot()
        counts, edges, _ = axes.hist(w.numpy(), bins=200, color="0.7", log=True,
                                     label=f"{len(w):,} weights")
        x = torch.linspace(float(edges[0]), float(edges[-1]), 1000)
        scale = len(w) * float(edges[1] - edges[0])
        densities = mixture.log_weighted_densities(x).exp() * scale
        for j in range(densities.shape[1]):
            axes.plot(x.numpy(), densities[:, j].numpy(), lw=1,
                      color="C3" if j == 0 else "C0", label="zero component" if j == 0 else
                      ("other components" if j == 1 else None))
        axes.set_ylim(0.5, max(float(counts.max()), 1.0) * 2)
        axes.set_xlabel("weight")
        axes.set_ylabel("count")
        axes.legend(loc="upper right", fontsize="small")
        return {"mixture": figure}
