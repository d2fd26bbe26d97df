"""TD table bookkeeping: the running mean, its checkpoint, and the merge across ranks."""
import os
import socket

import numpy as np
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from tidal_ray.method.dynamics import TDTable


def random_probs(rng, n, c):
    return torch.from_numpy(rng.dirichlet(np.ones(c), size=n))


def test_target_is_running_mean_including_current_observation():
    table = TDTable(3, 2)
    p1, p2, p3 = torch.tensor([[0.9, 0.1]]), torch.tensor([[0.5, 0.5]]), torch.tensor([[0.2, 0.8]])
    idx = torch.tensor([1])
    torch.testing.assert_close(table.target(idx, p1), p1)            # t = 0: the observation itself
    table.record(idx, p1); table.end_epoch()
    torch.testing.assert_close(table.target(idx, p2), (p1 * 1 + p2) / 2)
    table.record(idx, p2); table.end_epoch()
    torch.testing.assert_close(table.target(idx, p3), ((p1 + p2) / 2 * 2 + p3) / 3)
    assert table.count.tolist() == [0, 2, 0] and table.epoch == 2


def test_state_dict_round_trip():
    rng = np.random.default_rng(0)
    table = TDTable(10, 4)
    for _ in range(3):
        idx = torch.from_numpy(rng.choice(10, 6, replace=False))
        table.record(idx, random_probs(rng, 6, 4))
        table.end_epoch()
    loaded = TDTable.from_state_dict(table.state_dict())
    torch.testing.assert_close(loaded.mean, table.mean)
    assert torch.equal(loaded.count, table.count) and loaded.epoch == 3


def _rank_main(rank, world, port, epochs_of_rank, num_samples, num_classes, out_dir):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    table = TDTable(num_samples, num_classes)
    for idx, probs in epochs_of_rank[rank]:
        table.record(torch.tensor(idx), torch.tensor(probs, dtype=torch.float64))
        table.end_epoch()
    torch.save(table.state_dict(), os.path.join(out_dir, f"rank{rank}.pt"))
    dist.destroy_process_group()


def test_per_rank_partial_sums_merge_to_single_process_table(tmp_path):
    """Two real gloo ranks each see half of every epoch (one rank drops some samples
    in some epochs); after the epoch-end all-reduce both hold the single-process table."""
    rng = np.random.default_rng(1)
    n, c, epochs = 40, 5, 3
    per_rank = [[], []]
    single = TDTable(n, c)
    for _ in range(epochs):
        order = rng.permutation(n)[: n - rng.integers(0, 5)]          # a shard may drop rows
        probs = random_probs(rng, len(order), c).numpy()
        halves = np.array_split(np.arange(len(order)), 2)
        for r, h in enumerate(halves):
            per_rank[r].append((order[h].tolist(), probs[h].tolist()))
        single.record(torch.tensor(order), torch.tensor(probs))
        single.end_epoch()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0)); port = s.getsockname()[1]
    mp.spawn(_rank_main, args=(2, port, per_rank, n, c, str(tmp_path)), nprocs=2, join=True)
    for r in range(2):
        state = torch.load(tmp_path / f"rank{r}.pt", weights_only=True)
        merged = TDTable.from_state_dict(state)
        assert torch.equal(merged.count, single.count)
        assert torch.equal(merged.sum, single.sum)  # exact, not just close
        assert merged.epoch == epochs
