"""Samplers and a resumable DataLoader shared by every DataModule.

Both samplers subclass `DistributedSampler`, so Lightning keeps them under DDP instead of replacing
them, and each one splits the data between processes itself.
"""
from __future__ import annotations

import math
from typing import Any, Callable, Iterator, Sequence

import torch
from torch.utils.data import DataLoader, DistributedSampler


class LengthGroupedSampler(DistributedSampler):
    """Training order with batches of similar length, reshuffled every epoch, split across processes.

    Each epoch (seeded by `seed + epoch`): shuffle all rows, cut them into mega-batches of
    `group_batches` global batches, sort each mega-batch by length, cut it into global batches
    (`batch_size * num_replicas` rows), shuffle the order of all global batches, and give rank r the
    rows r, r + R, ... of every global batch (similar lengths on every rank). Like DistributedSampler
    (drop_last=False), the index list is padded by repeating rows so every rank gets as many rows.

    `resume(epoch, batches_done)` skips the batches a checkpoint already trained on, once.
    """

    def __init__(self, lengths: Sequence[int], batch_size: int, num_replicas: int = 1, rank: int = 0,
                 seed: int = 42, group_batches: int = 64) -> None:
        super().__init__(range(len(lengths)), num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed)
        self.lengths = torch.tensor(list(lengths) if not hasattr(lengths, "dtype") else lengths.copy())
        self.batch_size = batch_size
        self.group_batches = group_batches
        self._skip_batches = 0
        self._resumed_from: tuple[int, int] | None = None

    def _global_order(self) -> list[int]:
        g = torch.Generator().manual_seed(self.seed + self.epoch)
        n, world = len(self.lengths), self.num_replicas
        perm = torch.randperm(n, generator=g)
        if self.total_size > n:  # pad so every rank gets num_samples rows
            perm = torch.cat([perm, perm[: self.total_size - n]])
        global_bs = self.batch_size * world
        mega = global_bs * self.group_batches
        batches = []
        for start in range(0, len(perm), mega):
            chunk = perm[start:start + mega]
            chunk = chunk[torch.argsort(self.lengths[chunk], descending=True, stable=True)]
            batches.extend(chunk[i:i + global_bs] for i in range(0, len(chunk), global_bs))
        # Only the last mega-batch can end in a partial global batch; it holds a multiple of `world`
        # rows (the list is padded) and goes last, so every rank's rows cut into whole batches.
        partial = [batches.pop()] if len(batches[-1]) < global_bs else []
        order = torch.randperm(len(batches), generator=g).tolist()
        return [int(i) for b in [batches[j] for j in order] + partial for i in b[self.rank::world]]

    def __iter__(self) -> Iterator[int]:
        indices = self._global_order()
        assert len(indices) == self.num_samples
        skip = self._skip_batches * self.batch_size
        self._skip_batches = 0
        return iter(indices[skip:])

    def resume(self, epoch: int, batches_done: int, epoch_finished: bool = False) -> None:
        if self._resumed_from == (epoch, batches_done):  # Lightning may hand the same state over twice
            return
        self._resumed_from = (epoch, batches_done)
        # `epoch_finished` also covers epochs shortened by the trainer's limit_train_batches
        if epoch_finished or batches_done >= math.ceil(self.num_samples / self.batch_size):
            epoch, batches_done = epoch + 1, 0
        self.set_epoch(epoch)
        self._skip_batches = batches_done


class EvalSampler(DistributedSampler):
    """Evaluation order without duplicates: rows sorted by length, rank r takes rows r, r + R, ...

    DistributedSampler would repeat rows to even out the ranks, which changes metrics; here ranks
    may differ by one row, and torchmetrics gathers the uneven states exactly.
    """

    def __init__(self, lengths: Sequence[int], num_replicas: int = 1, rank: int = 0) -> None:
        super().__init__(range(len(lengths)), num_replicas=num_replicas, rank=rank, shuffle=False)
        order = torch.argsort(torch.tensor(list(lengths) if not hasattr(lengths, "dtype") else lengths.copy()),
                              descending=True, stable=True).tolist()
        self.indices = order[rank::num_replicas]
        self.num_samples = len(self.indices)

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices)

    def __len__(self) -> int:
        return self.num_samples


class ResumableDataLoader(DataLoader):
    """A DataLoader whose position in the epoch goes into Lightning checkpoints.

    The DataModule saves and restores this state itself (LightningDataModule.state_dict): Lightning
    restores the loop's loader states only when it builds the train loader after the loops are
    restored, which `trainer.estimated_stepping_batches` (used to size the LR schedule) prevents.

    `progress` returns (batches of the current epoch that training has consumed, batches in the
    epoch), from the trainer's counters: this loader itself is read one batch ahead by Lightning.
    """

    def __init__(self, *args: Any, progress: Callable[[], tuple[int, float]] | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.progress = progress

    def state_dict(self) -> dict[str, int]:
        done, total = self.progress() if self.progress else (0, float("inf"))
        return {"epoch": int(self.sampler.epoch), "batches_done": int(done), "epoch_finished": bool(done >= total)}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.sampler.resume(state["epoch"], state["batches_done"], state.get("epoch_finished", False))


class PositivePairSampler(LengthGroupedSampler):
    """Training order whose batches are made of pairs of rows with the same label, so every row of a batch
    has a positive (contrastive losses). Each epoch (seeded by `seed + epoch`) the rows of each label are
    shuffled and paired (a label with an odd count repeats one of its rows; a label with one row pairs it
    with itself), the pairs are shuffled and cut into global batches of `batch_size * num_replicas` rows,
    and rank r takes the pairs r, r + R, ... of every global batch. `batch_size` must be even."""

    def __init__(self, labels: Sequence[int], batch_size: int, num_replicas: int = 1, rank: int = 0, seed: int = 42) -> None:
        if batch_size % 2:
            raise ValueError(f"data.positive_pairs builds batches of pairs: data.batch_size must be even, got {batch_size}.")
        super().__init__([0] * len(labels), batch_size, num_replicas=num_replicas, rank=rank, seed=seed)
        self.labels = [int(v) for v in labels]
        counts: dict[int, int] = {}
        for v in self.labels:
            counts[v] = counts.get(v, 0) + 1
        pairs = sum(math.ceil(c / 2) for c in counts.values())
        self.num_pairs = math.ceil(pairs / num_replicas) * num_replicas  # padded by repeating pairs
        self.num_samples = 2 * self.num_pairs // num_replicas
        self.total_size = self.num_samples * num_replicas

    def _global_order(self) -> list[int]:
        g = torch.Generator().manual_seed(self.seed + self.epoch)
        rows: dict[int, list[int]] = {}
        for i, v in enumerate(self.labels):
            rows.setdefault(v, []).append(i)
        pairs = []
        for v in sorted(rows):
            idx = [rows[v][j] for j in torch.randperm(len(rows[v]), generator=g).tolist()]
            if len(idx) % 2:
                idx.append(idx[0] if len(idx) == 1 else idx[int(torch.randint(len(idx) - 1, (1,), generator=g))])
            pairs += [idx[j:j + 2] for j in range(0, len(idx), 2)]
        pairs = [pairs[j] for j in torch.randperm(len(pairs), generator=g).tolist()]
        while len(pairs) < self.num_pairs:  # pad (cyclically) so every rank gets as many pairs
            pairs += pairs[: self.num_pairs - len(pairs)]
        world = self.num_replicas
        per_batch = self.batch_size // 2 * world
        out = []
        for start in range(0, len(pairs), per_batch):
            for pair in pairs[start:start + per_batch][self.rank::world]:
                out += pair
        return out
