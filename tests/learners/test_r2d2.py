"""R2-D2: the ridge solve against the primal closed form and least squares, the head against
its definition (Bertinetto et al. sec. 3.2), gradients against finite differences, learning,
checkpoints, errors."""
import pytest
import torch
from torch import nn

from fewshot.errors import ConfigError
from fewshot.learners import get_learner
from fewshot.learners.common import ridge_regression

pytestmark = pytest.mark.usefixtures("one_thread")


def build(tiny_net, **cfg):
    cls = get_learner("r2d2")
    return cls(cls.Config(**cfg), in_channels=1, image_size=8, backbone=tiny_net(1, 8))


@pytest.mark.parametrize("s, d", [(6, 10), (12, 4)])
def test_ridge_solve_equals_primal_form_and_least_squares(s, d):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(s, d, generator=g, dtype=torch.float64)
    y = torch.randn(s, 3, generator=g, dtype=torch.float64)
    lam = torch.tensor(0.7, dtype=torch.float64)
    w = ridge_regression(x, y, lam)
    primal = torch.linalg.inv(x.t() @ x + lam * torch.eye(d, dtype=torch.float64)) @ x.t() @ y
    assert w.shape == (d, 3)
    torch.testing.assert_close(w, primal, rtol=1e-8, atol=1e-8)
    # min ‖XW − Y‖² + λ‖W‖² is the least-squares problem [X; √λ I] W = [Y; 0]
    stacked_x = torch.cat([x, lam.sqrt() * torch.eye(d, dtype=torch.float64)])
    stacked_y = torch.cat([y, torch.zeros(d, 3, dtype=torch.float64)])
    torch.testing.assert_close(w, torch.linalg.lstsq(stacked_x, stacked_y).solution,
                               rtol=1e-8, atol=1e-8)


def test_predictions_equal_definition(tiny_net, make_episode):
    torch.manual_seed(1)
    learner = build(tiny_net, init_lambda=0.3, init_scale=2.0, init_bias=0.25)
    ep = make_episode(ways=4, shots=3, queries=2, noise=1.0)
    keep = torch.tensor([0, 1, 2, 3, 4, 5, 6, 7, 9])  # 3, 3, 2, 1 shots
    ep.support_x, ep.support_y = ep.support_x[keep], ep.support_y[keep]
    scores = learner.predict(ep)
    learner.eval()
    with torch.no_grad():
        zs, zq = learner.encoder(ep.support_x).double(), learner.encoder(ep.query_x).double()
    s = len(zs)
    x = torch.cat([zs, torch.ones(s, 1, dtype=torch.float64)], 1)
    y = torch.nn.functional.one_hot(ep.support_y, 4).double()
    # (1/S)‖XW − Y‖² + λ‖W‖², solved in the primal form: (XᵀX + Sλ I)⁻¹ XᵀY
    wb = torch.linalg.solve(x.t() @ x + s * 0.3 * torch.eye(x.shape[1], dtype=torch.float64),
                            x.t() @ y)
    expected = 2.0 * (torch.cat([zq, torch.ones(len(zq), 1, dtype=torch.float64)], 1) @ wb) + 0.25
    assert scores.shape == (8, 4)
    torch.testing.assert_close(scores.double(), expected, rtol=1e-4, atol=1e-4)


class Linear(nn.Module):
    """flatten - linear: a backbone small enough for gradcheck."""

    def __init__(self, features=6):
        super().__init__()
        self.fc = nn.Linear(64, features)
        self.out_features = features

    def forward(self, x):
        return self.fc(x.flatten(1))


def test_gradients_match_finite_differences(make_episode):
    """d loss / d (λ, α, β, backbone weights) against central differences (float64)."""
    torch.manual_seed(2)
    cls = get_learner("r2d2")
    learner = cls(cls.Config(init_lambda=0.5, init_scale=3.0, init_bias=0.1), in_channels=1,
                  image_size=8, backbone=Linear()).double()
    ep = make_episode(ways=3, shots=2, queries=2, noise=1.0)
    ep.support_x, ep.query_x = ep.support_x.double(), ep.query_x.double()
    names = ["lam", "scale", "bias", "encoder.fc.weight", "encoder.fc.bias"]
    params = dict(learner.named_parameters())
    assert sorted(params) == sorted(names)

    wrapper = LossOf(learner, ep)

    def loss(*values):
        return torch.func.functional_call(wrapper, {f"learner.{n}": v for n, v in zip(names, values)},
                                          ())

    inputs = tuple(params[n].detach().clone().requires_grad_(True) for n in names)
    assert torch.autograd.gradcheck(loss, inputs)
    # the substituted values are the ones used (a loss blind to them would pass with zeros),
    # except β: it shifts every score of a query equally, and the cross-entropy is blind to that
    grads = dict(zip(names, torch.autograd.grad(loss(*inputs), inputs)))
    assert abs(float(grads.pop("bias"))) < 1e-12
    assert all(float(g.abs().sum()) > 1e-6 for g in grads.values())
    torch.testing.assert_close(loss(*inputs), learner.episode_loss(ep)[0])


class LossOf(nn.Module):
    """The episode loss of ``learner`` as a module's forward (for functional_call)."""

    def __init__(self, learner, episode):
        super().__init__()
        self.learner, self.episode = learner, episode

    def forward(self):
        return self.learner.episode_loss(self.episode)[0]


def test_fixed_lambda_is_a_buffer_and_round_trips(tiny_net, make_episode):
    torch.manual_seed(3)
    fixed = build(tiny_net, learn_lambda=False, init_lambda=7.0)
    assert "lam" not in dict(fixed.named_parameters()) and float(fixed.lam) == 7.0
    fixed.train_step([make_episode()])
    assert float(fixed.lam) == 7.0
    a, b = build(tiny_net, init_scale=5.0), build(tiny_net, init_scale=5.0)
    a.train_step([make_episode()])
    assert float(a.lam.detach()) != 50.0 and float(a.scale.detach()) != 5.0  # λ and α moved with Adam
    b.load_state_dict(a.state_dict())
    ep = make_episode(generator=torch.Generator().manual_seed(9))
    torch.testing.assert_close(a.predict(ep), b.predict(ep))
    assert b.steps_done == 1 and torch.equal(b.lam, a.lam)


@pytest.mark.slow
def test_learns_glyphs(learn_glyphs):
    torch.manual_seed(0)
    cls = get_learner("r2d2")
    learner = cls(cls.Config(init_scale=10.0, backbone_options={"hidden": 16}), in_channels=1,
                  image_size=28)
    before, after = learn_glyphs(learner, steps=100)
    # 5-way 1-shot, chance 0.2; measured (torch 2.14 CPU): 0.29 -> 0.68 (the untrained
    # embedding's ridge scores are dot products, worse than ProtoNet's distances); the threshold
    # keeps half the measured gain as margin, as ProtoNet's test
    assert after - before > 0.20, (before, after)


def test_errors(tiny_net, make_episode):
    cls = get_learner("r2d2")
    with pytest.raises(ConfigError, match="'init_lambda' must be > 0"):
        cls.Config(init_lambda=0.0).validate()
    with pytest.raises(ConfigError, match="'learn_lambda' must be true or false"):
        cls.Config(learn_lambda=1).validate()
    with pytest.raises(ConfigError, match="'init_scale' must be > 0"):
        cls.Config(init_scale=-1.0).validate()
    with pytest.raises(ConfigError, match="lr_halve_every"):
        cls.Config(lr_halve_every=-1).validate()
    learner = build(tiny_net)
    with pytest.raises(ConfigError, match="built for 1x8x8"):
        learner.predict(make_episode(size=10))
