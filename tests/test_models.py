"""Backbones, the TD module, the user-model wrapper, and checkpoints."""
import pytest
import torch
from torch import nn

from tidal_ray.train.checkpoint import load_checkpoint, model_from_checkpoint, save_checkpoint
from tidal_ray.data.datasets import DIGITS_SHAPE, load_digits
from tidal_ray.models import HookedModel, TDModule, TiDALNet, build_backbone, build_model, prepare_input
from tidal_ray.train.config import TrainConfig
from tidal_ray.train.loop import train_in_process


@pytest.mark.parametrize("name,shape,dims", [
    ("resnet18", (3, 32, 32), [64, 128, 256, 512]),
    ("resnet18", (1, 8, 8), [64, 128, 256, 512]),
    ("small_cnn", (1, 8, 8), [32, 64, 128]),
    ("small_cnn", (3, 32, 32), [32, 64, 128]),
    ("mlp", (64,), [256, 128]),
])
def test_backbones_return_logits_and_stage_features(name, shape, dims):
    net = build_model(name, 7, shape).eval()
    logits, features = net.backbone(torch.rand(3, *shape))
    assert logits.shape == (3, 7)
    assert [f.shape[1] for f in features] == dims
    logits2, td_logits = net(torch.rand(3, *shape))
    assert logits2.shape == td_logits.shape == (3, 7)


def test_td_module_structure():
    module = TDModule([4, 6], num_classes=3, hidden_dim=5)
    assert [s[0].in_features for s in module.stages] == [4, 6]
    assert module.out.in_features == 10 and module.out.out_features == 3
    conv_map, vector = torch.rand(2, 4, 5, 5), torch.rand(2, 6)
    expected = module.out(torch.cat([module.stages[0](conv_map.mean((2, 3))), module.stages[1](vector)], 1))
    torch.testing.assert_close(module([conv_map, vector]), expected)


@pytest.mark.parametrize("args,message", [
    (("vgg", 10, (3, 32, 32)), "unknown model 'vgg'"),
    (("mlp", 10, (3, 32, 32)), "takes feature vectors"),
    (("resnet18", 10, (64,)), "takes images"),
    (("small_cnn", 1, (1, 8, 8)), "at least 2"),
])
def test_bad_backbone_requests_are_named(args, message):
    with pytest.raises(ValueError, match=message):
        build_backbone(*args)


class UserNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 16, 3, padding=1), nn.ReLU())
        self.fc = nn.Linear(16, 10)

    def forward(self, x):
        return self.fc(self.body(x).mean((2, 3)))


def test_wrapped_user_model_feeds_named_layers_to_td_module():
    user = UserNet().eval()
    wrapped = HookedModel(user, ["body.1", "body.3"], input_shape=(1, 8, 8))
    assert wrapped.feature_dims == [8, 16]
    net = TiDALNet(wrapped, num_classes=10).eval()
    x = torch.rand(4, 1, 8, 8)
    logits, td_logits = net(x)
    torch.testing.assert_close(logits, user(x))
    first = torch.relu(user.body[0](x))
    second = user.body[3](user.body[2](first))
    torch.testing.assert_close(td_logits, net.td_module([first, second]))


def test_wrapper_names_unknown_layers():
    with pytest.raises(ValueError, match=r"unknown layer\(s\) \['body.9'\]"):
        HookedModel(UserNet(), ["body.9"], input_shape=(1, 8, 8))


def test_checkpoint_round_trip_reproduces_logits(tmp_path):
    ids, pixels, labels = load_digits()
    config = TrainConfig(num_classes=10, input_shape=DIGITS_SHAPE, epochs=2, seed=0)
    net, table, session = train_in_process(config, ids[:100], pixels[:100], labels[:100])
    path = save_checkpoint(session.last_state, str(tmp_path / "ckpt"))
    state = load_checkpoint(str(tmp_path / "ckpt"))
    assert state["epoch"] == 2 and state["labeled_ids"] == list(range(100))
    assert torch.equal(state["td_table"]["count"], table.count)
    loaded = model_from_checkpoint(state)
    x = prepare_input(torch.from_numpy(pixels[100:120]))
    torch.testing.assert_close(loaded(x), net.eval()(x))
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="not a tidal-ray checkpoint"):
        load_checkpoint(str(tmp_path / "junk.pt"))
    assert path.endswith("model.pt")
