"""The learner registry: lookup, unknown names, and third-party entry points."""
import sys
import textwrap

import pytest
import torch

from fewshot.errors import ConfigError
from fewshot.learners import Learner, LearnerConfig, get_learner, list_learners, register_learner
from fewshot.learners import registry

pytestmark = pytest.mark.usefixtures("one_thread")

CLASSIC = ["maml", "fomaml", "reptile", "protonet", "relationnet", "transfer"]


def test_classic_learners_registered_with_metadata():
    known = list_learners()
    for name in CLASSIC:
        cls = known[name]
        assert cls.name == name
        assert issubclass(cls, Learner) and issubclass(cls.Config, LearnerConfig)
        assert cls.description and cls.paper and cls.input_kind in ("episodes", "pairs",
                                                                    "supervised")
    assert known["fomaml"].Config().first_order is True
    assert known["maml"].Config().first_order is False
    assert list(known) == sorted(known)


def test_unknown_name_lists_known_and_closest():
    with pytest.raises(ConfigError) as e:
        get_learner("protonets")
    msg = str(e.value)
    assert "unknown learner 'protonets'" in msg and "Did you mean 'protonet'?" in msg
    known_part = msg.split("Known: ")[1]
    for name in CLASSIC:
        assert name in known_part


def test_register_refuses_non_learner_and_taken_name():
    with pytest.raises(ConfigError, match="Learner subclass"):
        register_learner("not-a-learner")(object)

    class Other(Learner):
        pass

    with pytest.raises(ConfigError, match="taken"):
        register_learner("protonet")(Other)
    assert get_learner("protonet").__name__ == "ProtoNet"


PLUGIN = '''
"""A third-party learner: nearest class mean after a linear embedding."""
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from fewshot.learners.base import Learner, LearnerConfig, accuracy


class TinyMean(Learner):
    description = "linear embedding + nearest class mean (test plug-in)"
    paper = "none"

    @dataclass
    class Config(LearnerConfig):
        dim: int = 4

    def __init__(self, config=None, *, in_channels, image_size, num_classes=None, backbone=None):
        super().__init__(config, in_channels=in_channels, image_size=image_size)
        self.embed = torch.nn.Linear(in_channels * image_size * image_size, self.config.dim)
        self.optimizers["meta"] = torch.optim.SGD(self.embed.parameters(), lr=self.config.lr)

    def predict(self, ep):
        zs = self.embed(ep.support_x.flatten(1))
        zq = self.embed(ep.query_x.flatten(1))
        protos = torch.stack([zs[ep.support_y == k].mean(0) for k in range(ep.ways)])
        return -torch.cdist(zq, protos) ** 2

    def train_step(self, batch):
        self.optimizers["meta"].zero_grad()
        ep = batch[0]
        logits = self.predict(ep)
        loss = F.cross_entropy(logits, ep.query_y)
        loss.backward()
        self.outer_step("meta")
        return {"loss": loss.detach(), "acc": accuracy(logits.detach(), ep.query_y)}
'''


def test_third_party_learner_through_entry_point(tmp_path, make_episode):
    pkg = tmp_path / "fewshot_tinymean"
    pkg.mkdir()
    (pkg / "__init__.py").write_text(textwrap.dedent(PLUGIN))
    dist = tmp_path / "fewshot_tinymean-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: fewshot-tinymean\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text(
        "[fewshot.learners]\ntiny_mean = fewshot_tinymean:TinyMean\n")
    with pytest.raises(ConfigError, match="unknown learner 'tiny_mean'"):
        get_learner("tiny_mean")
    sys.path.insert(0, str(tmp_path))
    try:
        registry.reload_entry_points()
        cls = get_learner("tiny_mean")
        assert cls.__module__ == "fewshot_tinymean" and cls.name == "tiny_mean"
        assert "tiny_mean" in list_learners()
        torch.manual_seed(0)
        learner = cls(cls.Config(lr=0.1), in_channels=1, image_size=8)
        ep = make_episode(ways=3, shots=2, queries=2)
        w0 = learner.embed.weight.detach().clone()
        # the SGD step it takes is -lr * grad of its loss: recompute the gradient by hand
        learner.zero_grad()
        F = torch.nn.functional
        F.cross_entropy(learner.predict(ep), ep.query_y).backward()
        expected = w0 - 0.1 * learner.embed.weight.grad
        metrics = learner.train_step([ep])
        assert metrics["loss"].dim() == 0 and torch.isfinite(metrics["loss"])
        torch.testing.assert_close(learner.embed.weight.detach(), expected)
    finally:
        sys.path.remove(str(tmp_path))
        registry._REGISTRY.pop("tiny_mean", None)
        sys.modules.pop("fewshot_tinymean", None)
    with pytest.raises(ConfigError):
        get_learner("tiny_mean")


@pytest.mark.parametrize("name", ["maml", "fomaml", "reptile", "mltp", "mltp_fo", "l2g+protonet",
                                  "mtl+maml"])
def test_learners_that_differentiate_through_gradients_refuse_autocast(name):
    assert not get_learner(name).supports_autocast


def test_fewshot_learners_states_every_learners_test_time_behaviour(capsys):
    """`fewshot learners` gives each registered learner a 'test time:' line that says whether it
    fine-tunes on the support set and whether transductive [eval] inference applies."""
    from fewshot.cli import main
    from fewshot.transductive import supports

    assert main(["learners"]) == 0
    lines = capsys.readouterr().out.splitlines()
    learners = list_learners()
    test_lines = {}
    for i, line in enumerate(lines):
        name = line.split(" ", 1)[0]
        if name in learners:
            test_lines[name] = next(l for l in lines[i + 1:i + 4] if "test time:" in l)
    assert set(test_lines) == set(learners)
    for name, cls in learners.items():
        line = test_lines[name]
        if cls.input_kind != "supervised":
            assert ("fine-tunes on the support set" in line) == cls.fine_tunes_at_test, name
        assert ("bd-cspn" in line) == supports(cls), name
