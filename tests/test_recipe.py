"""The scaled recipe, SGD with a step schedule, and warm start (issue 19)."""
import numpy as np
import pytest
import torch

from tidal_ray.errors import BadInput
from tidal_ray.train.checkpoint import load_checkpoint, save_checkpoint
from tidal_ray.train.config import TrainConfig, scaled_epochs, validate_labels
from tidal_ray.train.loop import build_for_training, train_in_process


def test_scaled_epochs_at_least_e_epochs_and_never_fewer_than_s_steps():
    assert scaled_epochs(1000, 64, 5, 300) == 19      # 16 batches an epoch: 300 steps need 19 epochs
    assert scaled_epochs(6000, 64, 5, 300) == 5       # 94 batches: E wins (470 steps)
    assert scaled_epochs(21000, 64, 5, 300) == 5
    assert scaled_epochs(64, 64, 5, 300) == 300       # one batch an epoch
    assert scaled_epochs(6000, 64, 10, 0) == 10       # S = 0: plain epochs


def _data(n=40, seed=0):
    rng = np.random.default_rng(seed)
    y = np.arange(n) % 4
    x = rng.integers(0, 60, size=(n, 1, 8, 8)).astype(np.uint8)
    for i, c in enumerate(y):
        x[i, 0, 2 * c] = 250
    return np.arange(n), x, y


def _config(**kw):
    return TrainConfig(num_classes=4, input_shape=(1, 8, 8), epochs=2, batch_size=16, seed=3, **kw)


def _params(net):
    return {k: v.detach().clone() for k, v in net.named_parameters()}


def test_warm_start_begins_at_the_previous_checkpoint_weights(tmp_path):
    ids, x, y = _data()
    _, _, first = train_in_process(_config(), ids, x, y)
    uri = save_checkpoint(first.last_state, str(tmp_path / "c0"))
    previous = load_checkpoint(uri)["model"]
    # Built for training: the whole network (backbone and TD module) is the checkpoint's.
    warm = build_for_training(_config(init_checkpoint=uri))
    assert all(torch.equal(v, previous[k]) for k, v in warm.state_dict().items())
    # With a zero learning rate the weights a warm run trains from stay what it started at:
    # its first step saw the previous checkpoint's weights; a cold run's did not.
    frozen = dict(optimizer="sgd", lr=0.0, weight_decay=0.0)
    net, table, session = train_in_process(_config(init_checkpoint=uri, **frozen), ids, x, y)
    assert all(torch.equal(v, previous[k]) for k, v in _params(net).items())
    cold, _, _ = train_in_process(_config(**frozen), ids, x, y)
    assert not all(torch.equal(v, previous[k]) for k, v in _params(cold).items())
    # A fresh optimizer and an empty TD table: the dynamics are this run's only.
    assert session.last_state["optimizer"]["param_groups"][0]["lr"] == 0.0
    assert table.epoch == 2 and table.count.tolist() == [2] * len(ids)


def test_sgd_with_a_step_drop_at_80_percent_of_the_epochs():
    ids, x, y = _data()
    config = TrainConfig(num_classes=4, input_shape=(1, 8, 8), epochs=5, batch_size=16, optimizer="sgd",
                         lr=0.1, lr_drop_at=0.8)
    _, _, session = train_in_process(config, ids, x, y)
    state = session.last_state["optimizer"]
    assert "momentum_buffer" in next(iter(state["state"].values()))
    assert session.last_state["optimizer"]["param_groups"][0]["lr"] == pytest.approx(0.01)  # dropped at epoch 4


@pytest.mark.parametrize("bad, message", [(dict(optimizer="rmsprop"), "optimizer 'rmsprop'"),
                                          (dict(lr_drop_at=1.5), "lr_drop_at 1.5")])
def test_bad_optimizer_settings_are_one_line(bad, message):
    ids, _, y = _data()
    with pytest.raises(BadInput, match=message):
        validate_labels(_config(**bad), ids, y)
