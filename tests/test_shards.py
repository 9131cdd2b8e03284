"WebDataset shards: every rank and worker gets its own samples, ranks get equally many, shuffling is seeded."
import os

import pytest
import torch
import torch.multiprocessing as mp

from vlwb.shards import ShardWriter, ShardedPairs
from vlwb.data import PairDataModule
from vlwb.images import encode_png
import numpy as np


def _write(folder, sizes):
    "Shards holding len(sizes) files of sizes[k] samples; sample n's caption is 'sample n'."
    folder.mkdir(parents=True, exist_ok=True)
    png = encode_png(np.full((8, 8, 3), 120, np.uint8))
    n = 0
    for k, size in enumerate(sizes):
        with ShardWriter(folder / f"part-{k:03d}.tar") as w:
            for _ in range(size):
                w.write(f"s{n:05d}", {"png": png, "txt": f"sample {n}"})
                n += 1
    return n


def _captions(ds, workers=0):
    loader = torch.utils.data.DataLoader(ds, batch_size=None, num_workers=workers,
                                         collate_fn=lambda it: it["captions"][0])
    return list(loader)


@pytest.mark.parametrize("sizes", [[10] * 4, [10] * 6, [7, 10, 3], [25]])
@pytest.mark.parametrize("world,workers", [(1, 1), (2, 1), (2, 2), (3, 2)])
def test_ranks_and_workers_partition_the_samples(tmp_path, sizes, world, workers):
    n = _write(tmp_path, sizes)
    per_rank = []
    for rank in range(world):
        ds = ShardedPairs(tmp_path, preprocess=8, rank=rank, world_size=world)
        got = _captions(ds, workers if workers > 1 else 0)
        assert len(got) == len(set(got)) == len(ds) == n // world
        per_rank.append(set(got))
    union = set().union(*per_rank)
    assert sum(map(len, per_rank)) == len(union) # disjoint
    assert len(union) == world * (n // world) # everything but the remainder n % world


def test_shuffle_buffer_is_seeded_and_loses_nothing(tmp_path):
    n = _write(tmp_path, [20, 20])
    order = lambda seed: _captions(ShardedPairs(tmp_path, preprocess=8, shuffle_buffer=8, seed=seed, rank=0,
                                                world_size=1))
    a, b, c = order(0), order(0), order(1)
    assert a == b and a != c and sorted(a) == sorted(c) == sorted(f"sample {i}" for i in range(n))
    assert a != sorted(a, key=lambda s: int(s.split()[1]))


def test_next_epoch_reshuffles(tmp_path):
    _write(tmp_path, [16])
    ds = ShardedPairs(tmp_path, preprocess=8, shuffle_buffer=16, seed=0, rank=0, world_size=1)
    assert _captions(ds) != _captions(ds) # a new pass (epoch) is a new order


def _ddp_worker(rank, world, folder, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=os.environ["VLWB_TEST_PORT"])
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world)
    dm = PairDataModule(str(folder), batch_size=4, shuffle_buffer=6, seed=0)
    dm.setup("fit")
    caps = [c for b in dm.train_dataloader() for c in b.meta] # meta: the records
    torch.save([m["captions"][0] for m in caps], f"{out}/rank{rank}.pt")
    torch.distributed.destroy_process_group()


def test_under_torch_distributed_each_rank_reads_its_own_share(tmp_path):
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ["VLWB_TEST_PORT"] = str(port)
    _write(tmp_path / "shards", [9, 9, 9])
    mp.spawn(_ddp_worker, args=(2, tmp_path / "shards", tmp_path), nprocs=2, join=True)
    got = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    assert len(got[0]) == len(got[1]) == 12 # 27 // 2 = 13 each, in whole batches of 4 (drop_last): 12
    assert not set(got[0]) & set(got[1])
