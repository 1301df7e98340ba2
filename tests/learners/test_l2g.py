"""L2G + X and MAML + X (Lee et al., L2G paper, Algorithm 1, eqs. 3-5).

The meta-gradient is checked against an independent torch.func computation of eq. 4 (its own
ProtoNet loss, functional_call + grad, no ``higher``), in float64 with a tight tolerance.
"""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

import pytest
import torch
from torch import nn
from torch.func import functional_call, grad

from fewshot.data.episodes import Episode
from fewshot.errors import ConfigError, DataError
from fewshot.learners import get_learner

sys.path.insert(0, str(Path(__file__).resolve().parent))
from conftest import random_episode  # noqa: E402

REPO = Path(__file__).resolve().parents[2]


class MLP(nn.Module):
    """Flatten - Linear - Tanh - Linear: smooth, so second derivatives are not trivially zero."""

    def __init__(self, d_in=16, hidden=12, d_out=6):
        super().__init__()
        self.fc1 = nn.Linear(d_in, hidden)
        self.fc2 = nn.Linear(hidden, d_out)
        self.out_features = d_out

    def forward(self, x):
        return self.fc2(torch.tanh(self.fc1(x.flatten(1))))


def _episode(g, ways=3, shots=2, queries=2, offset=0):
    e = random_episode(ways=ways, shots=shots, queries=queries, size=4, generator=g, noise=1.0)
    e = Episode(*(t.double() if t.is_floating_point() else t for t in
                  (e.support_x, e.support_y, e.query_x, e.query_y)),
                classes=torch.arange(ways) + offset)
    return e


def _ref_loss(encoder, params, task):
    """ProtoNet loss written out independently: class means, squared distances, mean CE."""
    z_s = functional_call(encoder, params, (task.support_x,))
    z_q = functional_call(encoder, params, (task.query_x,))
    protos = torch.stack([z_s[task.support_y == c].mean(0) for c in range(task.ways)])
    d = ((z_q[:, None, :] - protos[None]) ** 2).sum(-1)
    return -(-d).log_softmax(-1).gather(1, task.query_y[:, None]).mean()


def _ref_meta_grad(encoder, params, pairs, alpha, first_order=False):
    """∇_θ mean_pairs L_Tj(θ − α ∇_θ L_Ti(θ)) (eq. 4) with torch.func."""

    def meta(p):
        total = 0.0
        for t_i, t_j in pairs:
            g = grad(lambda q: _ref_loss(encoder, q, t_i))(p)
            if first_order:
                g = {k: v.detach() for k, v in g.items()}
            total = total + _ref_loss(encoder, {k: p[k] - alpha * g[k] for k in p}, t_j)
        return total / len(pairs)

    return grad(meta)(params)


def _captured_grads(learner, batch):
    grads = {}

    def capture(name="meta", params=None):
        for n, p in learner.scorer.named_parameters():
            grads[n] = p.grad.detach().clone()
        for n, p in learner.inner.named_parameters():
            grads["inner." + n] = p.grad.detach().clone()

    learner.outer_step = capture
    learner.train_step(batch)
    return grads


@pytest.mark.parametrize("first_order", [False, True])
def test_l2g_meta_gradient_matches_torch_func(first_order):
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(3)
    enc = MLP().double()
    learner = get_learner("l2g+protonet")(
        get_learner("l2g+protonet").Config(inner_lr=0.3, first_order=first_order),
        in_channels=1, image_size=4, backbone=enc)
    pairs = [(_episode(g, offset=0), _episode(g, ways=4, shots=1, queries=3, offset=10)),
             (_episode(g, offset=20), _episode(g, offset=30))]
    params = {n: p.detach().clone() for n, p in enc.named_parameters()}
    ref = _ref_meta_grad(enc, params, pairs, 0.3, first_order)
    got = _captured_grads(learner, pairs)
    for n in params:
        torch.testing.assert_close(got["encoder." + n], ref[n], rtol=1e-10, atol=1e-12)
    # the second-order term matters on this model: first and second order differ
    other = _ref_meta_grad(enc, params, pairs, 0.3, not first_order)
    assert max((other[n] - ref[n]).abs().max().item() for n in params) > 1e-4


def test_meta_sgd_step_size_gradient():
    """Learnable per-layer α (Meta-SGD): ∂L_Tj/∂α_l = −⟨∇_{θ'_l} L_Tj, ∇_{θ_l} L_Ti⟩."""
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(4)
    enc = MLP().double()
    cls = get_learner("l2g+protonet")
    learner = cls(cls.Config(inner_lr=0.2, learn_inner_lr=True), in_channels=1, image_size=4,
                  backbone=enc)
    t_i, t_j = _episode(g), _episode(g, offset=10)
    params = {n: p.detach().clone() for n, p in enc.named_parameters()}
    g_i = grad(lambda q: _ref_loss(enc, q, t_i))(params)
    adapted = {k: params[k] - 0.2 * g_i[k] for k in params}
    g_j = grad(lambda q: _ref_loss(enc, q, t_j))(adapted)
    got = _captured_grads(learner, [(t_i, t_j)])
    alpha_grad = got["inner.alpha"]
    assert alpha_grad.shape == (2,)  # one α per layer (fc1, fc2), not per tensor
    for k, layer in enumerate(("fc1", "fc2")):
        expect = -sum((g_j[f"{layer}.{w}"] * g_i[f"{layer}.{w}"]).sum() for w in ("weight", "bias"))
        torch.testing.assert_close(alpha_grad[k], expect, rtol=1e-10, atol=1e-12)


def test_maml_x_is_maml_on_the_metric_loss():
    """MAML + ProtoNet (T_j = T_i, one inner step) = MAML's meta-gradient of ProtoNet's loss."""
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(5)
    enc = MLP().double()
    cls = get_learner("maml+protonet")
    assert cls.input_kind == "episodes"
    learner = cls(cls.Config(inner_lr=0.25), in_channels=1, image_size=4, backbone=enc)
    eps = [_episode(g), _episode(g, ways=2, shots=3, queries=1)]
    params = {n: p.detach().clone() for n, p in enc.named_parameters()}
    ref = _ref_meta_grad(enc, params, [(e, e) for e in eps], 0.25)
    got = _captured_grads(learner, eps)
    for n in params:
        torch.testing.assert_close(got["encoder." + n], ref[n], rtol=1e-10, atol=1e-12)
    with pytest.raises(ConfigError, match="episodes, not pairs"):
        learner.train_step([(eps[0], eps[1])])


def test_update_is_adam_on_the_meta_gradient_and_lr_halves():
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(6)
    enc = MLP().double()
    cls = get_learner("l2g+protonet")
    learner = cls(cls.Config(lr=0.01, lr_halve_every=2), in_channels=1, image_size=4, backbone=enc)
    pairs = [(_episode(g), _episode(g, offset=10))]
    before = {n: p.detach().clone() for n, p in enc.named_parameters()}
    ref = _ref_meta_grad(enc, before, pairs, 1e-2)
    learner.train_step(pairs)
    # Adam's first step moves every coordinate by lr · g/(|g| + eps) ≈ lr · sign(g)
    for n, p in enc.named_parameters():
        step = before[n] - p.detach()
        expect = 0.01 * ref[n] / (ref[n].abs() + 1e-8)
        torch.testing.assert_close(step, expect, rtol=1e-6, atol=1e-9)
    assert learner.optimizers["meta"].param_groups[0]["lr"] == pytest.approx(0.01)
    learner.train_step(pairs)
    assert learner.optimizers["meta"].param_groups[0]["lr"] == pytest.approx(0.005)


def test_predict_uses_theta_as_is():
    """No fine-tuning at test: predict = ProtoNet logits at θ, and θ does not move."""
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(7)
    enc = MLP().double()
    learner = get_learner("l2g+protonet")(in_channels=1, image_size=4, backbone=enc)
    assert learner.fine_tunes_at_test is False
    e = _episode(g, ways=5, shots=3, queries=4)
    before = [p.detach().clone() for p in enc.parameters()]
    logits = learner.predict(e)
    z_s, z_q = enc(e.support_x), enc(e.query_x)
    protos = torch.stack([z_s[e.support_y == c].mean(0) for c in range(5)])
    expect = -torch.cdist(z_q, protos) ** 2
    assert logits.shape == (20, 5)
    torch.testing.assert_close(logits, expect, rtol=1e-9, atol=1e-9)
    assert all(torch.equal(a, b) for a, b in zip(before, enc.parameters()))


def test_shared_classes_in_a_pair_are_refused():
    g = torch.Generator().manual_seed(8)
    learner = get_learner("l2g+protonet")(in_channels=1, image_size=4, backbone=MLP().double())
    a, b = _episode(g, offset=0), _episode(g, offset=2)  # classes 0..2 and 2..4 share class 2
    with pytest.raises(DataError, match=r"shares classes \[2\]"):
        learner.train_step([(a, b)])
    with pytest.raises(ConfigError, match="pairs"):
        learner.train_step([a])


@pytest.mark.parametrize("options,match", [
    ({"inner_lr": 0.0}, "inner_lr"),
    ({"inner_steps": 0}, "inner_steps"),
    ({"bn": "batch"}, "bn"),
    ({"lr_halve_every": -1}, "lr_halve_every"),
])
def test_bad_options(options, match):
    cls = get_learner("l2g+protonet")
    with pytest.raises(ConfigError, match=match):
        cls(cls.Config(**options), in_channels=1, image_size=4, backbone=MLP())


def _glyph_pairs(glyphs, ways, shots, queries, seed):
    """(T_i, T_j) on 2N distinct train classes of the test fixture's glyphs (sampler-free)."""
    g = torch.Generator().manual_seed(seed)

    def sample():
        classes = torch.randperm(glyphs.num_classes["train"], generator=g)[:2 * ways]
        return (glyphs.episode("train", classes[:ways], shots, queries, g),
                glyphs.episode("train", classes[ways:], shots, queries, g))

    return sample


@pytest.mark.slow
@pytest.mark.parametrize("name,steps", [("l2g+protonet", 60), ("maml+protonet", 60),
                                        ("l2g+relationnet", 30)])
def test_learns_glyphs(glyphs, one_thread, name, steps):
    """5-way 1-shot accuracy on unseen glyph classes rises well above chance (0.2)."""
    from conftest import fit_and_score

    cls = get_learner(name)
    torch.manual_seed(0)
    learner = cls(cls.Config(lr=3e-3, backbone_options={"hidden": 16}), in_channels=1,
                  image_size=28)
    if cls.input_kind == "pairs":
        pairs = _glyph_pairs(glyphs, 5, 1, 5, seed=0)
        original = learner.train_step
        learner.train_step = lambda batch: original([pairs() for _ in batch])
    before, after = fit_and_score(learner, glyphs, steps=steps, meta_batch=2)
    # an untrained Conv-4 gives ~0.52 on 5-way 1-shot glyphs (0.18 through RelationNet's
    # untrained module); measured on torch 2.14 CPU: L2G+ProtoNet 0.73, MAML+ProtoNet 0.69,
    # L2G+RelationNet 0.82. Half the smallest gain (0.17) is kept as margin for other torch
    # versions and devices
    assert after > 0.5 and after - before > 0.08, (before, after)


def _spec(name, quick=False):
    from fewshot.bench import load_spec

    return load_spec(REPO / "benchmarks" / f"{name}.toml", quick=quick)


@pytest.mark.slow
@pytest.mark.parametrize("table", ["l2g_table1", "l2g_table3"])
def test_paper_spec_learners_train_and_test_as_specified(table):
    """Every bilevel learner of an L2G spec (its --quick form), built from the spec, takes one
    meta-step on tasks of the spec's training shape (T_j of train.pair's shape for L2G) that
    moves θ by at most Adam's lr per coordinate, fixes α = 0.01 (eq. 3, not learned) and
    predicts every cell of the evaluation grid without fine-tuning."""
    from fewshot.config import config_from_dict

    spec = _spec(table, quick=True)
    g = torch.Generator().manual_seed(0)
    for e in spec.learners:
        cfg = config_from_dict(spec.run_config(e, 0))
        cls = get_learner(cfg.learner.name)
        if not cfg.learner.name.startswith(("l2g", "maml+")):
            continue
        opts = dict(cfg.learner.options, backbone_options={"hidden": 4})
        learner = cls(cls.Config(**opts), in_channels=1, image_size=28)
        t = cfg.train
        task = lambda ways, queries, off: random_episode(  # noqa: E731
            ways=ways, shots=t.shots, queries=queries, size=28, generator=g, num_base=100)
        ti = task(t.ways, t.queries, 0)
        ti.classes = torch.arange(t.ways)
        if cls.input_kind == "pairs":
            pw = (t.pair or {}).get("ways", t.ways)
            tj = task(pw if isinstance(pw, int) else pw[0], t.pair["queries"], 50)
            tj.classes = torch.arange(tj.ways) + 50
            batch = [(ti, tj)]
        else:
            batch = [ti]
        before = [p.detach().clone() for p in learner.scorer.parameters()]
        learner.train_step(batch)
        step = max((p.detach() - q).abs().max().item()
                   for p, q in zip(learner.scorer.parameters(), before))
        assert 0 < step <= opts.get("lr", 1e-3) * 1.01, (e.label, step)
        assert not learner.inner.alpha.requires_grad
        assert torch.allclose(learner.inner.alpha, torch.tensor(0.01, dtype=learner.inner.alpha.dtype))
        for ways in spec.base["eval"]["ways"]:
            ep = random_episode(ways=ways, shots=1, queries=2, size=28, generator=g)
            assert learner.predict(ep).shape == (2 * ways, ways), (e.label, ways)
    assert not learner.fine_tunes_at_test


def test_l2g_grid_larger_than_the_split_is_refused():
    """A 10-way grid on a split of 8 classes: ConfigError before any training (the runner's
    check of every grid, used for the L2G and MTL specs)."""
    from fewshot.evaluation import check_grid

    class Store:
        dataset, split, num_classes = "glyphs", "test", 8
        class_names = [str(i) for i in range(8)]

        def class_counts(self):
            return np.full(8, 20)

    with pytest.raises(ConfigError, match="10-way tasks need 10 classes"):
        check_grid(Store(), [5, 10], [1, 5], 15)


def _tiny_store(tmp_path, classes, per_class=6, size=4):
    from fewshot.data.store import ImageStore, write_store

    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (classes * per_class, size, size, 1), dtype=np.uint8)
    labels = np.repeat(np.arange(classes), per_class)
    path = write_store(tmp_path / "train.h5", images, labels, [f"c{i}" for i in range(classes)],
                       dataset="tiny", split="train", source="test")
    return ImageStore.open(path, in_memory=True)


def test_pairs_from_the_sampler_are_disjoint_and_accepted(tmp_path):
    """L2G's pairs come from DisjointPairSampler: over 300 draws (5-way T_i, any-way T_j on 13
    classes) no class is shared, and the learner trains on them (its own check passes)."""
    from fewshot.data.episodes import DisjointPairSampler

    store = _tiny_store(tmp_path, classes=13)
    sampler = DisjointPairSampler(store, {"ways": 5, "shots": 2, "queries": 2},
                                  {"ways": [3, 5, 8], "shots": [1, 3], "queries": 2}, seed=0)
    pairs = [sampler.sample() for _ in range(300)]
    for t_i, t_j in pairs:
        assert not set(t_i.classes.tolist()) & set(t_j.classes.tolist())
    assert {t_j.ways for _, t_j in pairs} == {3, 5, 8}  # 5 + 8 = all 13 classes used at times
    torch.manual_seed(0)
    learner = get_learner("l2g+protonet")(in_channels=1, image_size=4, backbone=MLP())
    check = learner._pairs(pairs)  # raises DataError on a shared class
    assert len(check) == 300
    out = learner.train_step(pairs[:3])
    assert torch.isfinite(out["loss"]) and out["acc"].shape == ()


def test_pair_request_beyond_the_split_fails_before_training(tmp_path):
    """Two disjoint 5-way tasks need 10 classes; a split of 8 is refused up front."""
    from fewshot.data.episodes import DisjointPairSampler

    store = _tiny_store(tmp_path, classes=8)
    with pytest.raises((ConfigError, DataError), match="5 \\+ 5 = 10 distinct classes"):
        DisjointPairSampler(store, {"ways": 5, "shots": 1, "queries": 2},
                            {"ways": 5, "shots": 1, "queries": 2}, seed=0)


def test_l2g_with_vanishing_step_is_protonet_on_t_j(one_thread):
    """α → 0 makes θ' = θ, so L2G + ProtoNet must train exactly as ProtoNet on the T_j episodes:
    same weights, same BatchNorm running statistics (updated by the outer forward only) and
    same test logits after 3 steps from the same initialisation (Conv-4 with BatchNorm)."""
    g = torch.Generator().manual_seed(0)
    pairs = []
    for _ in range(2):
        t_i, t_j = random_episode(size=28, generator=g), random_episode(size=28, generator=g)
        t_j.classes = t_i.classes + 100
        pairs.append((t_i, t_j))
    torch.manual_seed(0)
    proto_cls = get_learner("protonet")
    proto = proto_cls(proto_cls.Config(backbone_options={"hidden": 8}), in_channels=1, image_size=28)
    torch.manual_seed(0)
    cls = get_learner("l2g+protonet")
    l2g = cls(cls.Config(inner_lr=1e-30, backbone_options={"hidden": 8}), in_channels=1,
              image_size=28)
    for _ in range(3):
        proto.train_step([t_j for _, t_j in pairs])
        l2g.train_step(pairs)
    a, b = proto.encoder.state_dict(), l2g.scorer.encoder.state_dict()
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    proto.eval(), l2g.eval()
    assert torch.equal(proto.predict(pairs[0][0]), l2g.predict(pairs[0][0]))


def _batch_stats_copy(module):
    """A copy whose BatchNorm layers use batch statistics and keep no running ones
    (what the learner's training forwards compute under bn='transductive')."""
    import copy

    module = copy.deepcopy(module)
    for m in module.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.track_running_stats = False
            m.running_mean = m.running_var = m.num_batches_tracked = None
    return module


def test_l2g_relationnet_meta_gradient_matches_torch_func():
    """L2G + RelationNet: ∇_θ mean_pairs L_Tj(θ − α ∇_θ L_Ti(θ)) (eq. 4, second order) for the
    embedding *and* the relation module, against torch.func on an independent write-out of
    eqs. 9-11 (class sums, concatenated pairs, sigmoid relation scores, MSE to one-hot)."""
    cls = get_learner("l2g+relationnet")
    torch.manual_seed(0)
    learner = cls(cls.Config(inner_lr=0.3, bn="transductive", grad_clip=0.0, relation_hidden=4,
                             backbone_options={"hidden": 4}), in_channels=1, image_size=28).double()
    g = torch.Generator().manual_seed(5)

    def task(ways, offset):
        e = random_episode(ways=ways, shots=2, queries=2, size=28, generator=g, noise=1.0)
        return Episode(e.support_x.double(), e.support_y, e.query_x.double(), e.query_y,
                       classes=torch.arange(ways) + offset)

    pairs = [(task(3, 0), task(2, 10)), (task(2, 20), task(3, 30))]
    enc, rel = _batch_stats_copy(learner.scorer.encoder), _batch_stats_copy(learner.scorer.relation)

    def loss(p, t):
        z = functional_call(enc, {k[8:]: v for k, v in p.items() if k.startswith("encoder.")},
                            (torch.cat([t.support_x, t.query_x]),))
        s = len(t.support_y)
        protos = [z[:s][t.support_y == c].sum(0) for c in range(t.ways)]
        pairs_ = torch.stack([torch.cat([protos[c], q]) for q in z[s:] for c in range(t.ways)])
        scores = functional_call(rel, {k[9:]: v for k, v in p.items() if k.startswith("relation.")},
                                 (pairs_,)).view(-1, t.ways)
        target = torch.zeros_like(scores)
        target[torch.arange(len(t.query_y)), t.query_y] = 1.0
        return ((scores - target) ** 2).mean()

    def meta(p):
        total = 0.0
        for t_i, t_j in pairs:
            gi = grad(lambda q: loss(q, t_i))(p)
            total = total + loss({k: p[k] - 0.3 * gi[k] for k in p}, t_j)
        return total / len(pairs)

    params = {n: p.detach().clone() for n, p in learner.scorer.named_parameters()}
    ref = grad(meta)(params)
    got = _captured_grads(learner, pairs)
    for n in params:
        # (float64; BatchNorm over 6-8 images leaves ~1e-6 relative round-off on a few entries)
        torch.testing.assert_close(got[n], ref[n], rtol=1e-5, atol=1e-8, msg=lambda m: f"{n}: {m}")
    assert ref["relation.fc1.weight"].abs().max() > 1e-4
    assert ref["encoder.blocks.0.conv.weight"].abs().max() > 1e-4
