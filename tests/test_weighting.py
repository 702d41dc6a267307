"""Each weighting method's defining property on cases small enough to check by hand, the
gradient contract (task-specific vs shared parameters), options, and a short training run."""

import math
from itertools import pairwise

import pytest
import torch
from torch import nn
from torchjd import aggregation

from mtl.engine import WEIGHTING_OPTIONS, archs, gradients, weighting
from mtl.engine.encoders import TabularEncoder, TabularPreprocessor
from mtl.engine.trainer import FitOptions, TaskData, fit
from mtl.engine.weighting import Step
from tests.test_engine import TASKS, make_table

GRADIENT_METHODS = ["mgda", "pcgrad", "cagrad", "imtl", "nash_mtl", "aligned_mtl", "upgrad"]
CONFLICTING = torch.tensor([[1.0, 0.0], [-1.0, 1.0]])  # g1 . g2 = -1


def build(name: str, k: int = 2, **options) -> weighting.Weighting:
    return weighting.build(name, [f"t{i}" for i in range(k)], options=options)


def shared_grad(name: str, grads: torch.Tensor, **options) -> tuple[torch.Tensor, torch.Tensor]:
    """Losses g_k . x over a shared vector x at 0; returns (x.grad, the weights used)."""
    x = nn.Parameter(torch.zeros(grads.shape[1]))
    used = build(name, len(grads), **options).backward(grads @ x, Step([x]))
    return x.grad, used


# --- loss weightings ------------------------------------------------------------------------------

def test_uw_weights_are_exp_minus_log_variance_and_learn_toward_the_inverse_loss():
    uw = build("uw")
    with torch.no_grad():
        uw.log_var.copy_(torch.tensor([0.5, -1.0]))
    losses = torch.tensor([2.0, 3.0], requires_grad=True)
    used = uw.backward(losses, Step([]))
    s = torch.tensor([0.5, -1.0])
    assert torch.allclose(used, torch.exp(-s))
    assert torch.allclose(losses.grad, torch.exp(-s))
    assert torch.allclose(uw.log_var.grad, 1 - torch.exp(-s) * torch.tensor([2.0, 3.0]))


@pytest.mark.parametrize("temperature", [2.0, 5.0])
def test_dwa_is_uniform_for_two_epochs_then_follows_the_loss_ratio(temperature):
    dwa = build("dwa", temperature=temperature)
    epoch_losses = {0: [[4.0, 2.0], [2.0, 2.0]], 1: [[2.0, 2.0], [1.0, 2.0]], 2: [[1.0, 1.0]],
                    3: [[1.0, 1.0]]}  # epoch means: (3, 2), (1.5, 2), (1, 1)
    used = {}
    for epoch, steps in epoch_losses.items():
        for values in steps:
            losses = torch.tensor(values, requires_grad=True)
            used[epoch] = dwa.backward(losses, Step([], epoch=epoch))
            assert torch.equal(losses.grad, used[epoch])
    assert used[0].tolist() == used[1].tolist() == [1.0, 1.0]
    ratio = torch.tensor([1.5 / 3, 2 / 2])
    assert torch.allclose(used[2], 2 * torch.softmax(ratio / temperature, dim=0))
    ratio = torch.tensor([1 / 1.5, 1 / 2])
    assert torch.allclose(used[3], 2 * torch.softmax(ratio / temperature, dim=0))


def test_rlw_weights_are_a_seeded_random_point_of_the_simplex():
    def draw() -> list[torch.Tensor]:
        torch.manual_seed(3)
        rlw, steps = build("rlw", 3), []
        for _ in range(2):
            losses = torch.ones(3, requires_grad=True)
            steps.append(rlw.backward(losses, Step([])))
            assert torch.equal(losses.grad, steps[-1])
        return steps

    first, second = draw()
    assert (first > 0).all() and math.isclose(float(first.sum()), 1.0, rel_tol=1e-6)
    assert not torch.equal(first, second)
    assert all(torch.equal(a, b) for a, b in zip(draw(), [first, second]))


def test_gradnorm_lowers_the_weight_of_the_task_with_the_larger_gradient():
    gradnorm = build("gradnorm")
    w = nn.Parameter(torch.zeros(1, 2))  # the last shared layer
    grads = torch.tensor([[3.0, 0.0], [0.0, 1.0]])  # |grad_W L_k| = 3 and 1
    used = gradnorm.backward((w @ grads.T)[0] + 1.0, Step([w], last_shared_layer=[w]))
    assert used.tolist() == [1.0, 1.0]
    assert torch.allclose(w.grad, grads.sum(0, keepdim=True))  # sum_k w_k grad_k
    # First step: r_k = 1, target = mean(G) = 2; d/dw sum|G_k - 2| = (3, -1); dw/dlogits =
    # K (diag(z) - z z^T) with z = (1/2, 1/2) gives (2, -2): task 0's logit is pushed down.
    assert torch.allclose(gradnorm.logits.grad, torch.tensor([2.0, -2.0]))
    with torch.no_grad():
        gradnorm.logits -= 0.5 * gradnorm.logits.grad
    used = gradnorm.backward((w @ grads.T)[0] + 1.0, Step([w], last_shared_layer=[w]))
    assert (used > 0).all() and math.isclose(float(used.sum()), 2.0, rel_tol=1e-6)
    assert used[0] < 1.0 < used[1]


def test_gradnorm_takes_the_norms_over_the_whole_last_shared_layer_and_nothing_else():
    """W = [w1, w2] (e.g. the last layer of two experts): G_k is the norm over both matrices;
    the shared matrix v outside the layer, whatever its gradients, plays no part."""
    gradnorm = build("gradnorm")
    w1, w2, v = (nn.Parameter(torch.zeros(1, 2)) for _ in range(3))
    losses = (w1 @ torch.tensor([[3.0, 0.0], [0.0, 1.0]]).T + w2 @ torch.tensor(
        [[4.0, 0.0], [0.0, 0.0]]).T + v @ torch.tensor([[0.0, 0.0], [0.0, 9.0]]).T)[0] + 1.0
    gradnorm.backward(losses, Step([w1, w2, v], last_shared_layer=[w1, w2]))
    # G = (|(3, 0, 4, 0)|, |(0, 1, 0, 0)|) = (5, 1); target mean(G) = 3; d/dw sum|G_k - 3| =
    # (5, -1); times K (diag(z) - z z^T) = [[1/2, -1/2], [-1/2, 1/2]]: (3, -3).
    assert torch.allclose(gradnorm.logits.grad, torch.tensor([3.0, -3.0]))
    with pytest.raises(ValueError, match="gradnorm needs a shared layer of weights"):
        build("gradnorm").backward(losses, Step([w1, w2, v]))


@pytest.mark.parametrize("alpha,logits_grad", [(0.5, [1.0, -1.0]), (1.5, [-1.0, 1.0])])
def test_gradnorm_alpha_sets_how_far_the_slower_task_is_pushed(alpha, logits_grad):
    """Loss ratios L/L(0) = (2, 0.5), so r = (1.6, 0.4); G = (1.5, 0.5), mean 1. The targets
    mean(G) r^alpha are (1.26, 0.63) for alpha 0.5, below task 0's G: its weight is lowered;
    and (2.02, 0.25) for alpha 1.5, above it: its weight is raised."""
    gradnorm = build("gradnorm", alpha=alpha)
    w = nn.Parameter(torch.zeros(1, 2))
    grads = torch.tensor([[1.5, 0.0], [0.0, 0.5]])
    for initial in ([1.0, 1.0], [2.0, 0.5]):
        gradnorm.logits.grad = None
        gradnorm.backward((w @ grads.T)[0] + torch.tensor(initial), Step([w], last_shared_layer=[w]))
    # d/dw sum|G_k - target_k| = sign(G - target) |g|, times [[1/2, -1/2], [-1/2, 1/2]]
    assert torch.allclose(gradnorm.logits.grad, torch.tensor(logits_grad))


@pytest.mark.parametrize("logit_lr", [0.025, 0.1])
def test_famo_updates_its_logits_from_the_change_in_log_loss(logit_lr):
    famo = build("famo", logit_lr=logit_lr)
    losses = torch.tensor([1.0, 1.0], requires_grad=True)
    assert famo.backward(losses, Step([])).tolist() == [0.5, 0.5]  # z / (c L), z = (1/2, 1/2)
    losses = torch.tensor([math.exp(-1), 1.0], requires_grad=True)
    used = famo.backward(losses, Step([]))
    # delta = log L(before) - log L(after) = (1, 0); the softmax's Jacobian gives the logits the
    # gradient (1/4, -1/4); Adam's first step moves each logit by lr against its gradient's sign.
    assert torch.allclose(famo.logits, torch.tensor([-logit_lr, logit_lr]))
    z = torch.softmax(torch.tensor([-logit_lr, logit_lr]), dim=0)
    expected = z / losses.detach()
    assert torch.allclose(used, expected / expected.sum())
    assert torch.allclose(losses.grad, used)
    assert math.isclose(float(used.sum()), 1.0, rel_tol=1e-6)


@pytest.mark.parametrize("gamma", [0.001, 0.5])
def test_famo_decays_its_logits_by_gamma_as_adam_weight_decay(gamma):
    """The official code steps the logits with Adam(lr=logit_lr, weight_decay=gamma): from the
    third step on, when the logits are no longer 0, gamma changes them."""
    famo = build("famo", gamma=gamma)
    reference = torch.zeros(2, requires_grad=True)
    adam = torch.optim.Adam([reference], lr=0.025, weight_decay=gamma)
    log_losses = torch.tensor([[0.0, 0.0], [-1.0, 0.0], [-1.5, -0.2], [-1.6, -0.9]])
    famo.backward(log_losses[0].exp().requires_grad_(), Step([]))
    for before, after in pairwise(log_losses):
        famo.backward(after.exp().requires_grad_(), Step([]))
        z = torch.softmax(reference.detach(), dim=0)
        delta = before - after
        reference.grad = z * (delta - (z * delta).sum())
        adam.step()
    assert torch.allclose(famo.logits, reference.detach(), atol=1e-6)


@pytest.mark.parametrize("beta,beta_sigma,first,second", [
    (0.9, 0.0, 0.1, 0.19),  # rate 0.9: 0.1 g, then 0.9 * 0.1 g + 0.1 g
    (0.5, 0.0, 0.5, 0.75),  # rate 0.5: 0.5 g, then 0.5 * 0.5 g + 0.5 g
    (0.9, 1.0, 0.1, 0.595),  # rate 0.9 / t: 0.1 g, then 0.45 * 0.1 g + 0.55 g
])
def test_db_mtl_balances_the_moving_average_of_the_log_loss_gradients(beta, beta_sigma, first,
                                                                      second):
    db = build("db_mtl", beta=beta, beta_sigma=beta_sigma)
    x, head = nn.Parameter(torch.zeros(2)), nn.Parameter(torch.zeros(1))
    grads = torch.tensor([[3.0, 0.0], [0.0, 1.0]])
    scales = torch.tensor([5.0, 0.1])  # log(c e^{g.x}) has gradient g whatever the scale c

    def step() -> torch.Tensor:
        x.grad = head.grad = None
        losses = scales * torch.exp(grads @ x + torch.cat([head, torch.zeros(1)]))
        return db.backward(losses, Step([x]))

    assert torch.allclose(step(), torch.tensor([1.0, 3.0]))  # max norm / own norm
    assert torch.allclose(x.grad, first * (grads[0] + 3 * grads[1]))  # average = (1 - rate) g
    assert torch.allclose(head.grad, torch.ones(1))  # the log loss's own gradient
    step()
    assert torch.allclose(x.grad, second * (grads[0] + 3 * grads[1]))


# --- gradient methods -----------------------------------------------------------------------------

@pytest.mark.parametrize("grads", [CONFLICTING, torch.tensor([[1.0, 1.0], [2.0, 2.0]]),
                                   torch.tensor([[2.0, 0.0], [0.0, 1.0]])])
def test_mgda_matches_the_two_task_min_norm_closed_form(grads):
    g1, g2 = grads
    alpha = ((g2 - g1) @ g2 / (g1 - g2).square().sum()).clamp(0, 1)
    grad, used = shared_grad("mgda", grads)
    assert torch.allclose(used, torch.stack([alpha, 1 - alpha]), atol=1e-5)
    assert torch.allclose(grad, alpha * g1 + (1 - alpha) * g2, atol=1e-5)


def test_mgda_over_the_features_weighs_the_representation_gradients():
    x = nn.Parameter(torch.ones(2))
    heads = nn.Parameter(torch.ones(2))
    features = 2 * x  # the shared representation
    h = torch.tensor([[2.0, 0.0], [0.0, 1.0]])  # d L_k / d features = h_k
    losses = heads * (h @ features)
    used = build("mgda", level="features").backward(losses, Step([x], features, head_params=[heads]))
    alpha = torch.tensor([0.2, 0.8])  # closed form: ((h2 - h1) . h2) / |h1 - h2|^2 = 1/5
    assert torch.allclose(used, alpha, atol=1e-5)
    assert torch.allclose(x.grad, 2 * alpha @ h, atol=1e-5)  # through the trunk: 2 sum alpha_k h_k
    assert torch.allclose(heads.grad, h @ features.detach())  # each head: its own loss, unweighted
    with pytest.raises(ValueError, match="level 'features' needs a model"):
        build("mgda", level="features").backward(h @ x, Step([x]))


@pytest.mark.parametrize("name", GRADIENT_METHODS)
def test_over_an_identity_trunk_both_levels_give_the_same_update(name):
    """With features = x, the gradients over the representation are those over the trunk's
    parameter, so level 'features' must give exactly the update of level 'params'."""
    h = torch.tensor([[2.0, 0.0, 1.0], [-1.0, 1.0, 0.5], [0.3, -2.0, 1.0]])

    def update(level: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        x, heads = nn.Parameter(torch.tensor([1.0, -0.5, 2.0])), nn.Parameter(torch.ones(3))
        features = x * 1.0
        torch.manual_seed(0)  # pcgrad's random order
        used = build(name, 3, level=level).backward(heads * (h @ features),
                                                 Step([x], features, head_params=[heads]))
        return x.grad, heads.grad, used

    (params_grad, params_heads, params_used), (grad, heads_grad, used) = update("params"), update("features")
    assert torch.allclose(grad, params_grad, atol=1e-5)
    assert torch.allclose(heads_grad, params_heads)
    assert torch.allclose(used, params_used, atol=1e-5)


@pytest.mark.parametrize("name", GRADIENT_METHODS)
def test_level_features_takes_the_weights_from_the_representation_gradients(name):
    """features = A x: the representation gradients are h_k, those over x are A^T h_k, whose
    Gramian differs; level 'features' must weigh the first, level 'params' the second."""
    h = torch.tensor([[2.0, 0.0, 1.0], [-1.0, 1.0, 0.5], [0.3, -2.0, 1.0]])
    a = torch.tensor([[1.0, 0.8, 0.0], [0.0, 1.0, 0.5], [0.3, 0.0, 2.0]])

    def used(level: str) -> torch.Tensor:
        x, heads = nn.Parameter(torch.tensor([1.0, -0.5, 2.0])), nn.Parameter(torch.ones(3))
        features = a @ x
        torch.manual_seed(0)  # pcgrad's random order
        return build(name, 3, level=level).backward(heads * (h @ features),
                                                    Step([x], features, head_params=[heads]))

    torch.manual_seed(0)
    assert torch.allclose(used("features"), shared_grad(name, h)[1], atol=1e-5)
    torch.manual_seed(0)
    assert torch.allclose(used("params"), shared_grad(name, h @ a)[1], atol=1e-5)
    assert not torch.allclose(used("features"), used("params"), atol=1e-3)


def test_pcgrad_removes_the_conflicting_components():
    g1, g2 = CONFLICTING
    grad, _ = shared_grad("pcgrad", CONFLICTING)
    # The paper's update is the sum (not the mean) of the projected gradients; so is torchjd's.
    expected = g1 - (g1 @ g2) / (g2 @ g2) * g2 + g2 - (g2 @ g1) / (g1 @ g1) * g1
    assert torch.allclose(grad, expected)


@pytest.mark.parametrize("seed", range(20))
def test_cagrad_updates_match_torchjds_cvxpy_solver(seed):
    g = torch.Generator().manual_seed(seed)
    k = 2 + seed % 4
    grads = torch.randn(k, 12, generator=g, dtype=torch.float64)
    grads[0] *= 0.1 + 10 * torch.rand(1, generator=g, dtype=torch.float64)
    if seed % 3 == 0:  # two strongly conflicting tasks
        grads[1] = -0.5 * grads[0] + 0.1 * torch.randn(12, generator=g, dtype=torch.float64)
    gramian = grads @ grads.T
    ours = build("cagrad", level="params").aggregator.gramian_weighting(gramian) @ grads
    reference = aggregation.CAGrad(c=0.4).gramian_weighting(gramian) @ grads
    assert torch.allclose(ours, reference, rtol=1e-3, atol=1e-3 * float(reference.norm()))


@pytest.mark.parametrize("c", [0.4, 0.8])
def test_cagrad_is_the_mean_gradient_for_c_zero_and_improves_the_worst_task_otherwise(c):
    mean = CONFLICTING.mean(0)
    grad, used = shared_grad("cagrad", CONFLICTING, c=0.0)
    assert torch.allclose(grad, mean, atol=1e-6) and torch.allclose(used, torch.full((2,), 0.5))
    grad, _ = shared_grad("cagrad", CONFLICTING, c=c)  # on the sphere of radius c |g0|
    assert math.isclose(float((grad - mean).norm()), c * float(mean.norm()), rel_tol=1e-4)
    assert (CONFLICTING @ grad).min() > (CONFLICTING @ mean).min() + 0.1


@pytest.mark.parametrize("loss_scale", [False, True])  # s = 0 at first: e^s L - s has L's gradient
def test_imtl_gives_equal_projections_on_every_unit_task_gradient(loss_scale):
    grads = torch.tensor([[1.0, 0.0, 0.0], [-1.0, 2.0, 0.0], [0.5, 0.5, 3.0]])
    grad, used = shared_grad("imtl", grads, loss_scale=loss_scale)
    projections = grads @ grad / grads.norm(dim=1)
    assert torch.allclose(projections, projections[0].expand(3), atol=1e-5)
    assert math.isclose(float(used.sum()), 1.0, rel_tol=1e-5)


@pytest.mark.parametrize("level", ["params", "features"])
def test_imtl_l_scales_each_loss_by_a_learned_e_to_the_s(level):
    """IMTL-L: the losses become e^{s_k} L_k - s_k; s_k gets e^{s_k} L_k - 1 (zero when the
    scaled loss is 1), each head its scaled loss's gradient, and IMTL-G weighs the scaled
    losses' gradients e^{s_k} g_k. Without loss_scale there is no s and no scaling."""
    grads = torch.tensor([[1.0, 0.0, 0.0], [-1.0, 2.0, 0.0], [0.5, 0.5, 3.0]])
    s = torch.tensor([0.5, -1.0, 0.2])
    imtl, plain = build("imtl", 3, level=level), build("imtl", 3, loss_scale=False, level=level)
    assert [n for n, _ in plain.named_parameters()] == []
    with torch.no_grad():
        imtl.log_scale.copy_(s)
    x, heads = nn.Parameter(torch.tensor([0.5, 1.0, -0.3])), nn.Parameter(torch.ones(3))
    features = x * 1.0
    losses = heads * torch.exp(grads @ features)  # positive; gradient L_k g_k over x
    used = imtl.backward(losses, Step([x], features, head_params=[heads]))
    values = losses.detach()
    assert torch.allclose(imtl.log_scale.grad, s.exp() * values - 1)
    assert torch.allclose(heads.grad, s.exp() * values)  # L_k / heads_k, heads = 1
    scaled = s.exp()[:, None] * values[:, None] * grads  # the scaled losses' gradients over x
    _, alpha = shared_grad("imtl", scaled, loss_scale=False)
    assert torch.allclose(used, alpha * s.exp(), atol=1e-5)
    assert torch.allclose(x.grad, alpha @ scaled, atol=1e-5)


def test_nash_mtl_solves_the_bargaining_condition():
    gram = CONFLICTING @ CONFLICTING.T
    grad, alpha = shared_grad("nash_mtl", CONFLICTING, max_norm=0.0)
    assert torch.allclose((gram @ alpha) * alpha, torch.ones(2), atol=1e-5)
    assert torch.allclose(grad, alpha @ CONFLICTING)
    with pytest.raises(RuntimeError, match="nash_mtl"):  # opposite gradients: no solution
        shared_grad("nash_mtl", torch.tensor([[1.0, 0.0], [-2.0, 0.0]]))


@pytest.mark.filterwarnings("ignore::UserWarning", "ignore::RuntimeWarning")  # cvxpy
@pytest.mark.parametrize("seed", range(8))
def test_nash_mtl_weights_are_the_official_codes_where_its_solver_converges(seed):
    """torchjd's port of the official solver (cvxpy, ECOS, the Gram matrix divided by its
    Frobenius norm n before solving, n multiplied back in its constraint) gives our weights,
    for gradients of any scale: the division does not change the solution."""
    g = torch.Generator().manual_seed(seed)
    grads = 10.0 ** (seed % 5 - 2) * torch.randn(2 + seed % 4, 20, generator=g, dtype=torch.float64)
    official = aggregation.NashMTL(n_tasks=len(grads), max_norm=0.0).weighting(grads)
    ours = gradients.nash_bargaining(grads @ grads.T)
    assert torch.allclose(ours, official, rtol=1e-4)


@pytest.mark.filterwarnings("ignore::UserWarning", "ignore::RuntimeWarning")  # cvxpy
def test_nash_mtl_differs_from_the_official_solver_where_that_one_fails():
    """On these two conflicting gradients ECOS fails and the official code keeps its initial
    weights (1, 1), far from the condition; ours solves it."""
    official = aggregation.NashMTL(n_tasks=2, max_norm=0.0).weighting(CONFLICTING.double())
    assert official.tolist() == [1.0, 1.0]
    _, alpha = shared_grad("nash_mtl", CONFLICTING, max_norm=0.0)
    assert not torch.allclose(alpha, torch.ones(2), atol=0.1)


@pytest.mark.parametrize("c", [0.01, 100.0])
def test_nash_mtl_update_does_not_depend_on_the_gradients_scale(c):
    """With G c times larger, (c^2 G G^T alpha') * alpha' = 1 gives alpha' = alpha / c, and
    the update (c G)^T alpha' = G^T alpha is the same (before clipping)."""
    grads = torch.tensor([[3.0, 0.0, 1.0], [1.0, 2.0, 0.0], [0.0, -1.0, 1.0]])
    grad, alpha = shared_grad("nash_mtl", grads, max_norm=0.0)
    scaled_grad, scaled_alpha = shared_grad("nash_mtl", c * grads, max_norm=0.0)
    assert torch.allclose(scaled_alpha, alpha / c, rtol=1e-4)
    assert torch.allclose(scaled_grad, grad, rtol=1e-4)


@pytest.mark.parametrize("level", ["params", "features"])
def test_nash_mtl_scales_the_heads_by_alpha_and_clips_only_the_shared_gradient(level):
    """As the official code: sum_k alpha_k L_k is backpropagated (heads get alpha_k times their
    gradient), then the shared gradient alone is clipped to max_norm."""
    x, heads = nn.Parameter(torch.tensor([1.0, 2.0])), nn.Parameter(torch.tensor([1.0, 2.0]))
    features = x * 1.0
    alpha = build("nash_mtl", level=level, max_norm=0.5).backward(
        heads * (CONFLICTING @ features), Step([x], features, head_params=[heads]))
    gram = CONFLICTING @ CONFLICTING.T  # heads (1, 2): the task gradients are (g1, 2 g2)
    gram = gram * torch.tensor([[1.0, 2.0], [2.0, 4.0]])
    assert torch.allclose((gram @ alpha) * alpha, torch.ones(2), atol=1e-5)  # not clipped
    assert torch.allclose(heads.grad, alpha * (CONFLICTING @ x.detach()))
    update = alpha @ (CONFLICTING * heads.detach()[:, None])
    assert update.norm() > 0.5
    assert torch.allclose(x.grad, 0.5 * update / update.norm(), atol=1e-5)


@pytest.mark.parametrize("every", [1, 2])
def test_nash_mtl_reuses_its_weights_between_updates(every):
    nash = build("nash_mtl", max_norm=0.0, update_weights_every=every)
    first, second = CONFLICTING, torch.tensor([[2.0, 0.5], [0.0, 1.0]])
    x = nn.Parameter(torch.zeros(2))
    alphas = []
    for grads in (first, second, second):
        x.grad = None
        alphas.append(nash.backward(grads @ x, Step([x])))
        assert torch.allclose(x.grad, alphas[-1] @ grads)
    solved = [shared_grad("nash_mtl", g, max_norm=0.0)[1] for g in (first, second)]
    expected = [solved[0], solved[0] if every == 2 else solved[1], solved[1]]
    assert all(torch.allclose(a, b) for a, b in zip(alphas, expected))
    with pytest.raises(ValueError, match="update_weights_every must be at least 1"):
        build("nash_mtl", update_weights_every=0)


@pytest.mark.parametrize("scale_mode", ["min", "median", "rmse"])
def test_aligned_mtl_averages_the_aligned_gradients_of_condition_number_one(scale_mode):
    grads = torch.tensor([[3.0, 0.0, 1.0], [1.0, 1.0, 0.0], [0.0, -1.0, 2.0]])
    u, s, vt = torch.linalg.svd(grads, full_matrices=False)
    # every singular value equal to the smallest, the middle, or the root mean square of G's
    scale = {"min": s.min(), "median": s.median(), "rmse": s.square().mean().sqrt()}[scale_mode]
    aligned = scale * u @ vt
    assert torch.allclose(torch.linalg.svdvals(aligned), scale.expand(3))
    grad, _ = shared_grad("aligned_mtl", grads, scale_mode=scale_mode)
    assert torch.allclose(grad, aligned.mean(0), atol=1e-5)


def test_upgrad_conflicts_with_no_task_and_is_the_mean_without_conflict():
    grads = torch.tensor([[1.0, 0.0, 0.0], [-2.0, 1.0, 0.0], [-1.0, -1.0, 0.5]])
    grad, _ = shared_grad("upgrad", grads)
    assert (grads @ grad >= -1e-5).all()
    assert (grads.mean(0) @ grads.T < 0).any()  # the mean would increase a loss
    grads = torch.tensor([[1.0, 0.0], [1.0, 1.0]])
    grad, _ = shared_grad("upgrad", grads)
    assert torch.allclose(grad, grads.mean(0), atol=1e-5)


@pytest.mark.parametrize("name", [n for n in GRADIENT_METHODS if n != "nash_mtl"] + ["db_mtl"])
def test_gradient_methods_give_task_parameters_their_own_gradient(name):
    """With or without the shared representation, the heads get their own loss's gradient and
    the shared parameter the same aggregated gradient (and no ``.jac`` left behind). Nash-MTL
    scales the heads' gradients by its weights (tested above)."""
    shared_grads = []
    for with_features in (True, False):
        x = nn.Parameter(torch.tensor([1.0, 2.0]))
        heads = nn.Parameter(torch.tensor([1.0, -1.0]))
        features = x * 1.0
        losses = torch.exp(heads * (CONFLICTING @ features))  # positive, for db_mtl's log
        build(name).backward(losses, Step([x], features if with_features else None))
        inner = (CONFLICTING @ x).detach()
        own = inner if name == "db_mtl" else inner * torch.exp(heads.detach() * inner)
        assert torch.allclose(heads.grad, own)
        assert not hasattr(x, "jac")
        shared_grads.append(x.grad)
    assert torch.isfinite(shared_grads[0]).all()
    assert torch.allclose(*shared_grads, atol=1e-5)


@pytest.mark.parametrize("name", GRADIENT_METHODS + ["gradnorm"])
def test_without_shared_parameters_the_losses_are_summed(name):
    losses = torch.tensor([1.0, 2.0], requires_grad=True)
    assert build(name).backward(losses, Step([])).tolist() == [1.0, 1.0]
    assert losses.grad.tolist() == [1.0, 1.0]


# --- options and training -------------------------------------------------------------------------

def test_options_reach_the_method_and_unknown_ones_raise():
    assert build("cagrad", c=0.1).aggregator.gramian_weighting.c == 0.1
    assert build("cagrad").aggregator.gramian_weighting.c == WEIGHTING_OPTIONS["cagrad"]["c"]
    assert build("dwa", temperature=5.0).temperature == 5.0
    with pytest.raises(ValueError, match="no option cc"):
        build("cagrad", cc=0.1)
    with pytest.raises(ValueError, match="level"):
        build("mgda", level="layers")
    with pytest.raises(ValueError, match="scale_mode"):
        build("aligned_mtl", scale_mode="max")


@pytest.mark.parametrize("name", [n for n in WEIGHTING_OPTIONS if n != "static"])
def test_every_method_trains_a_shared_model(name):
    table = make_table()
    prep = TabularPreprocessor.fit(table, ["x0", "x1"], ["colour"], indicators=[])
    data = TaskData.from_table(table, prep, TASKS)
    torch.manual_seed(0)
    model = archs.HPS(TabularEncoder(prep.num_dim, prep.cardinalities), TASKS, [16], [8], 0.0)
    logs = []
    method = weighting.build(name, [t.name for t in TASKS])
    fit(model, TASKS, method, data, data, FitOptions(epochs=6, batch_size=16, lr=1e-2),
        on_epoch=lambda epoch, log: logs.append(log))
    assert all(math.isfinite(v) for log in logs for k, v in log.items() if "auroc" not in k)
    total = [sum(log[f"val/loss/{t.name}"] for t in TASKS) for log in logs]
    assert total[-1] < 0.8 * total[0], total
