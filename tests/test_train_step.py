"""The training step: CE + lambda * KL lowers both losses, and the TD table is a running mean."""
import numpy as np
import torch
import torch.nn.functional as F

from tidal_ray.data.datasets import DIGITS_SHAPE, load_digits
from tidal_ray.method.dynamics import TDTable
from tidal_ray.models import build_model, prepare_input
from tidal_ray.train.config import TrainConfig
from tidal_ray.train.loop import train_in_process, train_step


def fixed_batch(n=64):
    ids, pixels, labels = load_digits()
    return torch.from_numpy(pixels[:n]), torch.from_numpy(labels[:n]), torch.arange(n)


def losses(net, table, x, y, idx):
    with torch.no_grad():  # train mode (batch statistics), as the step itself sees the batch
        logits, td_logits = net(prepare_input(x))
        target = table.target(idx, logits.softmax(1))
        return F.cross_entropy(logits, y).item(), F.kl_div(td_logits.log_softmax(1), target, reduction="batchmean").item()


def test_one_step_lowers_both_losses_on_a_fixed_batch():
    torch.manual_seed(0)
    x, y, idx = fixed_batch()
    net = build_model("small_cnn", 10, DIGITS_SHAPE)
    net.backbone.head[0].p = 0.0  # deterministic forward
    net.train()
    # A history of earlier epochs, so the TD target is far from the module's output.
    table = TDTable(len(y), 10)
    for _ in range(5):
        table.record(idx, torch.from_numpy(np.random.default_rng(0).dirichlet(np.ones(10) * 0.3, len(y))))
        table.end_epoch()
    optimizer = torch.optim.Adam(net.parameters(), lr=1e-3)
    ce0, kl0 = losses(net, table, x, y, idx)
    step = train_step(net, table, optimizer, x, y, idx, lam=1.0)
    ce1, kl1 = losses(net, table, x, y, idx)
    assert ce1 < ce0 and kl1 < kl0, (ce0, ce1, kl0, kl1)
    assert abs(step["ce"] / step["n"] - ce0) < 1e-5 and abs(step["kl"] / step["n"] - kl0) < 1e-5
    assert table.pending_count.tolist() == [1] * len(y)


def test_td_table_matches_hand_computed_running_mean():
    torch.manual_seed(0)
    x, y, idx = fixed_batch(16)
    x = x.reshape(16, 64)
    net = build_model("mlp", 10, (64,))
    net.backbone.head[0].p = 0.0  # no dropout: the step's forward pass can be replayed exactly
    table = TDTable(16, 10)
    optimizer = torch.optim.SGD(net.parameters(), lr=0.1)
    seen = []
    for _ in range(4):
        net.train()
        with torch.no_grad():  # what the step is about to observe, before its update
            seen.append(net(prepare_input(x))[0].softmax(1).double())
        train_step(net, table, optimizer, x, y, idx, lam=1.0)
        table.end_epoch()
    assert table.count.tolist() == [4] * 16
    assert not torch.allclose(seen[0], seen[-1])  # the model moved, so the mean is not trivial
    hand = (seen[0] + seen[1] + seen[2] + seen[3]) / 4
    torch.testing.assert_close(table.mean, hand, atol=1e-6, rtol=0)


def test_in_process_training_learns_digits():
    ids, pixels, labels = load_digits()
    config = TrainConfig(num_classes=10, input_shape=DIGITS_SHAPE, epochs=15, batch_size=32, seed=0)
    net, table, session = train_in_process(config, ids[:300], pixels[:300], labels[:300])
    assert session.history[-1]["train_accuracy"] > 0.9
    assert session.history[-1]["kl"] < session.history[0]["kl"]
    assert table.count.tolist() == [15] * 300 and table.epoch == 15
    with torch.no_grad():
        logits, _ = net.eval()(prepare_input(torch.from_numpy(pixels[300:600])))
    assert (logits.argmax(1).numpy() == labels[300:600]).mean() > 0.8



def test_resumed_run_continues_exactly_as_the_uninterrupted_run():
    import io

    from tidal_ray.train.loop import LocalSession, run_training

    class Killed(Exception):
        pass

    def kill_at_epoch_2(metrics):
        if metrics["epoch"] == 2:
            raise Killed  # right after the epoch-2 checkpoint

    ids, pixels, labels = load_digits()
    ids, pixels, labels = ids[:200], pixels[:200], labels[:200]
    config = TrainConfig(num_classes=10, input_shape=DIGITS_SHAPE, epochs=4, batch_size=32, seed=3,
                         checkpoint_every=2, augment=True)
    whole, _, whole_session = train_in_process(config, ids, pixels, labels)

    killed = LocalSession(ids, pixels, labels, config.batch_size, config.seed, on_epoch=kill_at_epoch_2)
    try:
        run_training(config, killed)
    except Killed:
        pass
    buf = io.BytesIO()  # the checkpoint as a file gives it back: a copy, loaded as load_checkpoint does
    torch.save(killed.last_state, buf)
    state = torch.load(io.BytesIO(buf.getvalue()), map_location="cpu", weights_only=True)
    assert state["epoch"] == 2 and [m["epoch"] for m in killed.history] == [1, 2]

    resumed, _, resumed_session = train_in_process(config, ids, pixels, labels, resume=state)
    assert [m["epoch"] for m in resumed_session.history] == [3, 4]
    for mine, uninterrupted in zip(resumed_session.history, whole_session.history[2:]):
        assert (mine["loss"], mine["ce"], mine["kl"]) == (uninterrupted["loss"], uninterrupted["ce"],
                                                          uninterrupted["kl"])
    for name, tensor in whole.state_dict().items():
        assert torch.equal(tensor, resumed.state_dict()[name]), name
