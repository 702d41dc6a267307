"""Gradient methods: the shared parameters' update combines the per-task gradients (torchjd for
the Jacobians and most aggregators). ``mtl.engine.weighting.build`` imports this module only
when a run asks for one of them."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import replace

import numpy as np
import torch
from torch import nn
from torchjd import aggregation, autojac
from torchjd.aggregation import Aggregator

from mtl.engine.weighting import Step, Weighting, each_loss, sum_backward


def _jacobian_backward(losses: list[torch.Tensor], step: Step) -> None:
    """Each task-specific parameter gets its task's gradient in ``.grad``, each shared parameter
    the Jacobian of the K losses (one row per task) in ``.jac`` (torchjd).

    With the shared representation (``step.features``): K backward passes through the heads, then
    one batched (vmap) pass through the trunk. Without it: one batched pass for the Jacobian and
    one ordinary pass for the task-specific parameters."""
    if step.features is not None:
        # retain_graph: the K losses share nodes (at least the trainer's torch.stack), so the graph
        # must outlive the first head pass; it is freed when the step's tensors are dropped.
        autojac.mtl_backward(losses, features=step.features,
                             shared_params=step.shared_params, retain_graph=True)
        return
    autojac.backward(losses, inputs=step.shared_params, retain_graph=True)
    kept = [p.grad for p in step.shared_params]
    sum(losses).backward()
    for p, grad in zip(step.shared_params, kept):
        p.grad = grad  # the shared parameters get the aggregated Jacobian instead


LEVELS = ("params", "features")


def _checked_level(level: str) -> str:
    if level not in LEVELS:
        raise ValueError(f"level must be 'params' or 'features', not '{level}'")
    return level


def _features_gradients(losses: list[torch.Tensor], step: Step, others: Sequence[torch.Tensor] = ()
                        ) -> tuple[torch.Tensor, list[tuple[torch.Tensor | None, ...]]]:
    """Per task, its loss's gradient over the shared representation (zeros where the loss does
    not reach it), stacked [K, rows, ...], and its gradients over ``others`` (None where
    unused): one backward pass per task through the heads."""
    features = step.features
    if features is None:
        raise ValueError("level 'features' needs a model with one shared representation "
                         "(this architecture gives none); use level 'params'")
    per_task = [torch.autograd.grad(loss, [features, *others], retain_graph=True,
                                    allow_unused=True) for loss in losses]
    grads = torch.stack([torch.zeros_like(features) if g[0] is None else g[0] for g in per_task])
    return grads, [g[1:] for g in per_task]


def _features_gramian(grads: torch.Tensor, step: Step) -> torch.Tensor:
    """The whole batch's K x K Gramian of the representation gradients ``grads`` [K, rows, ...]
    (fp32, also under bf16). The rows of the whole batch's G are spread over the processes, each
    scaled by their number: its Gramian is the processes' mean Gramian over that number."""
    matrix = grads.flatten(1).float()
    gramian = matrix @ matrix.T
    step.mean_over_processes([gramian])
    return gramian / step.processes


def _params_gramian(losses: list[torch.Tensor], step: Step) -> torch.Tensor:
    """The whole batch's K x K Gramian of the task gradients over the shared parameters, from
    torchjd's batched Jacobian (averaged over the processes); ``.grad`` is left as it was."""
    autojac.backward(losses, inputs=step.shared_params, retain_graph=True)
    jacobians = [p.jac for p in step.shared_params]
    for p in step.shared_params:
        del p.jac
    step.mean_over_processes(jacobians)
    matrix = torch.cat([j.flatten(1) for j in jacobians], dim=1).float()
    return matrix @ matrix.T


class GradientMethod(Weighting):
    """Base of the gradient methods: task-specific parameters get their own task's gradient, the
    shared parameters an aggregation (a torchjd ``Aggregator``) of the per-task gradients.
    Returns the aggregator's weights of the task gradients. Without shared parameters (STL) the
    losses are summed.

    ``level="params"``: the aggregator combines the Jacobian of the losses over the shared
    parameters. ``level="features"``: the weights come from the gradients over the shared
    representation (the heads' input), as MGDA-UB does (Sener, Koltun 2018) and LibMTL's
    ``rep_grad`` offers for every method: K passes through the heads, one through the trunk,
    and a K x K Gramian instead of a K x (trunk parameters) Jacobian. It needs a model with one
    shared representation (``hps``) and an aggregator that weighs the Gramian."""

    loss_backward = False

    def __init__(self, task_names: Sequence[str], aggregator: Aggregator, level: str = "params"):
        super().__init__(task_names)
        self.aggregator = aggregator
        self.level = _checked_level(level)

    def backward(self, losses: torch.Tensor, step: Step) -> torch.Tensor:
        if not step.shared_params:
            return sum_backward(losses)
        if self.level == "features":
            return self._features_backward(losses, step)
        _jacobian_backward(each_loss(losses, step), step)
        step.mean_over_processes([p.jac for p in step.shared_params])
        return autojac.jac_to_grad(step.shared_params, self.aggregator).detach()

    def _features_backward(self, losses: torch.Tensor, step: Step) -> torch.Tensor:
        """Weights from the Gramian of the representation gradients G_k = d L_k / d features;
        the trunk then gets sum_k w_k G_k, each head its own loss's gradient. One backward pass
        per task through the heads (for G_k and the heads' gradients together), one through the
        trunk."""
        grads, head_grads = _features_gradients(each_loss(losses, step), step, step.head_params)
        weights = self.aggregator.gramian_weighting(_features_gramian(grads, step))
        for i, p in enumerate(step.head_params):
            for grad in (g[i] for g in head_grads if g[i] is not None):
                p.grad = grad if p.grad is None else p.grad + grad
        step.features.backward(torch.tensordot(weights.to(grads.dtype), grads, dims=1))
        return weights.detach()


class MGDA(GradientMethod):
    """MGDA (Désidéri 2012, "Multiple-gradient descent algorithm (MGDA) for multiobjective
    optimization"; as MTL: Sener, Koltun 2018, "Multi-Task Learning as Multi-Objective
    Optimization"): the minimum-norm point of the convex hull of the task gradients (torchjd's
    Frank-Wolfe solver, the paper's Algorithm 2). Unless it is zero (a Pareto-stationary
    point), it decreases every task loss. ``level="features"`` is the paper's MGDA-UB. No
    gradient normalisation (the official code's optional "l2"/"loss+" modes)."""

    def __init__(self, task_names: Sequence[str], *, level: str):
        super().__init__(task_names, aggregation.MGDA(), level)


class PCGrad(GradientMethod):
    """PCGrad (Yu, Kumar, Gupta, Levine, Hausman, Finn 2020, "Gradient Surgery for Multi-Task
    Learning"): each task gradient, in turn and in random order (torch's global generator),
    loses its component along every other task gradient it conflicts with (negative inner
    product); the update is the sum of the projected gradients (torchjd, as the paper)."""

    def __init__(self, task_names: Sequence[str], *, level: str):
        super().__init__(task_names, aggregation.PCGrad(), level)


class CAGradWeights(aggregation.Weighting):
    """The weights of CAGrad's update for the Gramian M = G G^T of the task gradients: w* =
    argmin over the simplex of g_w . g0 + sqrt(phi) |g_w| (g_w = G^T w, g0 = G^T 1/K, sqrt(phi)
    = c |g0|), solved with scipy's SLSQP as the official code does; the update g0 + (sqrt(phi) /
    |g_w*|) g_w* has the weights 1/K + (sqrt(phi) / |g_w*|) w*, or none at all when |g_w*| is
    below 1e-4 (relative to the mean task gradient's norm: a Pareto-stationary point).

    Own solver, not torchjd's CAGrad weighting: that one solves the same problem with cvxpy's
    Clarabel, which takes 7.7 ms a step for K = 3 against 1.1 ms here (measured), with the
    same updates within 1e-4 (tested)."""

    def __init__(self, c: float):
        super().__init__()
        self.c = c

    def forward(self, gramian: torch.Tensor, /) -> torch.Tensor:
        from scipy.optimize import minimize  # 0.4 s to import: only for runs that use CAGrad

        m = gramian.detach().cpu().double().numpy()
        k = len(m)
        m = m / max(np.trace(m) / k, 1e-30)  # the weights do not depend on the scale
        mean = np.full(k, 1 / k)
        b = m @ mean
        sqrt_phi = self.c * math.sqrt(max(mean @ b, 0.0))

        def cost(w: np.ndarray) -> tuple[float, np.ndarray]:
            norm = math.sqrt(max(w @ m @ w, 1e-30))
            return w @ b + sqrt_phi * norm, b + sqrt_phi * (m @ w) / norm

        w = minimize(cost, mean, jac=True, method="SLSQP", bounds=[(0, 1)] * k,
                     constraints={"type": "eq", "fun": lambda w: w.sum() - 1,
                                  "jac": lambda w: np.ones(k)},
                     options={"ftol": 1e-12, "maxiter": 200}).x
        norm = math.sqrt(max(w @ m @ w, 0.0))
        weights = mean + sqrt_phi / norm * w if norm >= 1e-4 else np.zeros(k)
        return torch.from_numpy(weights).to(gramian)


class CAGrad(GradientMethod):
    """CAGrad (Liu, Liu, Jin, Stone, Liu 2021, "Conflict-Averse Gradient Descent for Multi-task
    Learning"): the update d = g0 + (c |g0| / |g_w|) g_w maximises the worst task's decrease
    within a ball of radius c |g0| around the mean gradient g0; c = 0 gives g0 (``CAGradWeights``).
    Unlike the official code, the update is not divided by 1 + c^2."""

    def __init__(self, task_names: Sequence[str], *, c: float, level: str):
        super().__init__(task_names, aggregation.GramianWeightedAggregator(CAGradWeights(c)), level)


class IMTL(GradientMethod):
    """IMTL (Liu, Li, Kuang, Xue, Chen, Yang, Liao, Zhang 2021, "Towards Impartial Multi-task
    Learning"), the paper's hybrid of its two halves.

    IMTL-L (``loss_scale``): a learnable s_k per task and the scaled losses e^{s_k} L_k - s_k,
    whose minimum over s_k is at e^{s_k} L_k = 1: every scaled loss tends to the same value. Like
    a head, s_k gets its own scaled loss's gradient (the trainer's optimizer steps it, without
    weight decay). IMTL-G: the shared parameters get sum_k alpha_k g_k of the scaled losses'
    gradients g_k, with alpha summing to 1 such that the update has the same projection on
    every unit task gradient (torchjd's IMTLG, which uses a pseudo-inverse so that linearly
    dependent gradients are allowed). ``loss_scale=False`` is IMTL-G alone. The paper applies
    IMTL-G to the gradients over the shared representation: ``level="features"``. Returns
    alpha_k e^{s_k}, the weights of the unscaled losses in the shared update."""

    def __init__(self, task_names: Sequence[str], *, loss_scale: bool, level: str):
        super().__init__(task_names, aggregation.IMTLG(), level)
        self.log_scale = nn.Parameter(torch.zeros(len(self.task_names))) if loss_scale else None

    def backward(self, losses: torch.Tensor, step: Step) -> torch.Tensor:
        if self.log_scale is None:
            return super().backward(losses, step)
        scales = torch.exp(self.log_scale)
        scaled = [scales[k] * loss - self.log_scale[k] for k, loss in enumerate(each_loss(losses, step))]
        step = replace(step, task_losses=scaled, head_params=[*step.head_params, self.log_scale])
        return super().backward(torch.stack(scaled), step) * scales.detach()


def nash_bargaining(gramian: torch.Tensor) -> torch.Tensor:
    """The weights alpha > 0 of the Nash bargaining solution for the Gramian M = G G^T of the
    task gradients: (M alpha) * alpha = 1. They minimise the strictly convex, self-concordant
    f(alpha) = alpha^T M alpha / 2 - sum log alpha, found by damped Newton steps (which keep
    alpha > 0)."""
    m = gramian.cpu().double()  # K x K: cheap on the CPU, and float64 (which MPS lacks)
    alpha = 1 / m.diagonal().sqrt()  # the solution when the gradients are orthogonal
    for _ in range(100):
        grad = m @ alpha - 1 / alpha
        newton, singular = torch.linalg.solve_ex(m + torch.diag(alpha ** -2), grad)
        decrement = float(grad @ newton) ** 0.5
        if singular or not math.isfinite(decrement):  # diverged: alpha grew without bound
            break
        alpha = alpha - newton / (1 + decrement)
        if decrement < 1e-9:
            break
    if not torch.allclose((m @ alpha) * alpha, torch.ones_like(alpha), atol=1e-6):
        raise RuntimeError("nash_mtl: no Nash bargaining solution: some non-negative "
                           "combination of the task gradients is zero (e.g. a task "
                           "without labelled rows in the batch)")
    return alpha.to(gramian)


class NashMTL(Weighting):
    """Nash-MTL (Navon, Shamsian, Achituve, Maron, Kawaguchi, Chechik, Fetaya 2022, "Multi-Task
    Learning as a Bargaining Game"), as the official code (AvivNavon/nash-mtl, ``NashMTL``)
    runs it. The weights alpha > 0 solve (G G^T alpha) * alpha = 1 for the task gradients G
    (``nash_bargaining``): along the shared update d = G^T alpha every task's directional
    derivative alpha_k g_k . d is 1, and d does not depend on the losses' scales (multiplying
    every gradient by c divides alpha by c). The network then descends sum_k alpha_k L_k, so
    the task-specific parameters (heads) get alpha-scaled gradients too. Every
    ``update_weights_every`` steps alpha is solved anew; the steps between reuse the last one
    (and need no per-task gradients). If ``max_norm`` > 0, the shared parameters' gradient (the
    whole batch's) is then clipped to that norm, as ``clip_grad_norm_`` right after
    ``loss.backward()`` does there: the shared update is min(1, max_norm / |d|) d, while the
    heads' gradients and the returned alpha are not clipped. ``train.clip_grad_norm`` clips
    again, after it; under gradient accumulation this clipping is per micro-batch.

    Differences from the official code. (1) The solver: theirs approximates the condition by at
    most 20 (``optim_niter``) convex-concave steps through cvxpy's ECOS from the last alpha and,
    when ECOS fails, silently keeps the last alpha (ones at first; on the gradients [1, 0] and
    [-1, 1] it returns (1, 1)). Here damped Newton steps solve the condition exactly, and an
    error is raised when no solution exists. Where theirs converges, the weights agree (tested
    against torchjd's port); the division of their Gram matrix by its Frobenius norm only
    rescales the problem, since their constraint multiplies alpha by the same norm. (2)
    ``level="features"`` (ours) solves for alpha from the gradients over the shared
    representation instead of the shared parameters."""

    loss_backward = False

    def __init__(self, task_names: Sequence[str], *, max_norm: float, update_weights_every: int,
                 level: str):
        if update_weights_every < 1:
            raise ValueError(f"nash_mtl: update_weights_every must be at least 1, "
                             f"not {update_weights_every}")
        super().__init__(task_names)
        self.max_norm, self.update_weights_every = max_norm, update_weights_every
        self.level = _checked_level(level)
        self.steps = 0
        self.alpha: torch.Tensor | None = None

    def get_extra_state(self) -> dict:
        return {"steps": self.steps, "alpha": self.alpha}

    def set_extra_state(self, state: dict) -> None:
        self.steps, self.alpha = state["steps"], state["alpha"]

    def backward(self, losses: torch.Tensor, step: Step) -> torch.Tensor:
        if not step.shared_params:
            return sum_backward(losses)
        each = each_loss(losses, step)
        if self.steps % self.update_weights_every == 0:
            self.alpha = nash_bargaining(self._gramian(each, step))
        self.steps += 1
        sum(a * loss for a, loss in zip(self.alpha, each)).backward()
        shared = [p.grad for p in step.shared_params if p.grad is not None]
        step.mean_over_processes(shared)
        if self.max_norm > 0:
            nn.utils.clip_grad_norm_(step.shared_params, self.max_norm)
        return self.alpha

    def _gramian(self, losses: list[torch.Tensor], step: Step) -> torch.Tensor:
        if self.level == "params":
            return _params_gramian(losses, step)
        return _features_gramian(_features_gradients(losses, step)[0], step)


class AlignedMTL(GradientMethod):
    """Aligned-MTL (Senushkin, Patakin, Kuznetsov, Konushin 2023, "Independent Component
    Alignment for Multi-Task Learning"): the task gradients G = U S V^T are replaced by the
    aligned ones scale * U V^T, whose singular values are all equal (condition number 1, no
    dominating or conflicting component), and averaged (torchjd). ``scale_mode``: "min" (the
    smallest singular value, as LibMTL), "median" (the middle one, the lower of two middle ones:
    "min" for two tasks), or "rmse" (their root mean square, which torchjd says the original
    code used). torchjd averages the aligned gradients (preference 1/K) where LibMTL
    sums them: the update is K times smaller."""

    def __init__(self, task_names: Sequence[str], *, scale_mode: str, level: str):
        if scale_mode not in ("min", "median", "rmse"):
            raise ValueError(f"aligned_mtl: scale_mode must be 'min', 'median' or 'rmse', "
                             f"not '{scale_mode}'")
        super().__init__(task_names, aggregation.AlignedMTL(scale_mode=scale_mode), level)


class UPGrad(GradientMethod):
    """UPGrad (Quinton, Rey 2024, "Jacobian Descent for Multi-Objective Optimization"): each task
    gradient is projected onto the dual cone of all task gradients and the projections are
    averaged (torchjd). The update has a non-negative inner product with every task gradient
    (no task's loss increases to first order) and equals the mean gradient when no two task
    gradients conflict."""

    def __init__(self, task_names: Sequence[str], *, level: str):
        super().__init__(task_names, aggregation.UPGrad(), level)


class DualBalance(Aggregator):
    """DB-MTL's gradient balancing: an exponential moving average of the task gradients (zero at
    start, rate beta / t^beta_sigma at step t), each scaled to the largest average's norm, then
    summed. Keeps the weights it used in ``alphas``."""

    def __init__(self, beta: float, beta_sigma: float):
        super().__init__()
        self.beta, self.beta_sigma = beta, beta_sigma
        self.steps = 0
        self.average: torch.Tensor | None = None
        self.alphas: torch.Tensor | None = None

    def get_extra_state(self) -> dict:
        return {"steps": self.steps, "average": self.average}

    def set_extra_state(self, state: dict) -> None:
        self.steps, self.average = state["steps"], state["average"]

    def forward(self, matrix: torch.Tensor, /) -> torch.Tensor:
        self.steps += 1
        rate = self.beta / self.steps ** self.beta_sigma
        previous = torch.zeros_like(matrix) if self.average is None else self.average
        self.average = rate * previous + (1 - rate) * matrix
        norms = self.average.norm(dim=1)
        self.alphas = norms.max() / (norms + 1e-8)
        return self.alphas @ self.average


class DBMTL(GradientMethod):
    """DB-MTL (Lin, Jiang, Ye, Zhang, Chen, Chen, Liu, Kwok 2023, "Dual-Balancing for Multi-Task
    Learning"). Loss-scale balancing: every loss becomes log(L_k + eps), for all parameters.
    Gradient-magnitude balancing, over the shared parameters: the moving average g_k of each
    task's log-loss gradient (g_k <- beta_t g_k + (1 - beta_t) grad_k from g_k = 0, beta_t =
    beta / t^beta_sigma) is scaled to the largest norm, so the update sum_k (max_j |g_j| /
    |g_k|) g_k gives every task a gradient of the same magnitude. Returns those scales."""

    def __init__(self, task_names: Sequence[str], *, beta: float, beta_sigma: float):
        super().__init__(task_names, DualBalance(beta, beta_sigma))

    def backward(self, losses: torch.Tensor, step: Step) -> torch.Tensor:
        if not step.shared_params:
            return sum_backward(torch.log(losses + 1e-8))
        _jacobian_backward([torch.log(loss + 1e-8) for loss in each_loss(losses, step)], step)
        step.mean_over_processes([p.jac for p in step.shared_params])
        autojac.jac_to_grad(step.shared_params, self.aggregator)
        return self.aggregator.alphas.detach()


CLASSES: dict[str, type[Weighting]] = {
    "db_mtl": DBMTL,
    "mgda": MGDA,
    "pcgrad": PCGrad,
    "cagrad": CAGrad,
    "imtl": IMTL,
    "nash_mtl": NashMTL,
    "aligned_mtl": AlignedMTL,
    "upgrad": UPGrad,
}
