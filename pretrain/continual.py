"""Continual pretraining: carry on pretraining an exported encoder on a new domain, with replay.

A site that has an encoder pretrained on CT gets CBCT scans (or another scanner's CT): it
pretrains further on the new, unlabelled scans without starting over. Two things keep what the
encoder learned (the seed's continual-pretraining papers):

  * replay (data mixture): every training batch holds `replay_fraction` of crops from the earlier
    domain (Ibrahim et al., "Simple and Scalable Strategies to Continually Pre-train Large Language
    Models", 2024; Gupta et al., "Continual Pre-Training of Large Language Models: How to
    (re)warm your model?", 2023; the critical mixture ratio of the CMR scaling law). With small 3D
    batches a fraction rarely divides the batch: the number of replayed crops per batch follows an
    error accumulator, so it is exact on average (0.1 of 2 crops: one replayed batch in five) and
    never random.
  * a warmup-stable-decay schedule (`scheduler: wsd` of the task) that can be continued without
    re-warming: phase 2 starts at the stable learning rate (`warmup_steps: 0`) and decays only at
    its end ("Beyond Cosine Decay: Infinite Learning Rate Schedule", Singh et al. 2025; Wang et al.,
    "Efficient Continual Pre-training by Mitigating the Stability Gap", 2024, which measures the
    temporary drop on the old domain this reduces).

Any pretraining task does continual pretraining: give it `pretrained_encoder: ENC_DIR` (the
encoder card records the earlier phases as `extra.pretraining.earlier_phases`) and this data
module. bench/continual_pretrain.py measures the stability gap and forgetting per replay fraction.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from typing import Any

from torch.utils.data import ConcatDataset, DataLoader, Sampler

from medct.data import Datalist, PhantomCohort, VolumeDataModule, find_datalist, read_msd_datalist
from medct.errors import ConfigError, InputPathError
from medct.settings import Sampling, Split
from medct.transforms import Preprocessing


class ReplayBatchSampler(Sampler[list[int]]):
    """Batches of `batch_size` indices into ConcatDataset(new, old): each holds
    floor(accumulated replay_fraction x batch_size) old-domain indices (exact on average), the rest
    new-domain ones; `len(self)` = ceil(n_new / batch_size) batches per epoch, as without replay.
    Shuffled per epoch from (seed, epoch); under DDP each rank takes every world_size-th batch."""

    def __init__(self, n_new: int, n_old: int, batch_size: int, replay_fraction: float, seed: int = 0) -> None:
        if n_new < 1 or (replay_fraction > 0 and n_old < 1):
            raise InputPathError(
                "Continual pretraining needs volumes of the new domain and, with replay, of the earlier one."
            )
        self.n_new, self.n_old, self.batch_size = n_new, n_old, batch_size
        self.replay_fraction, self.seed, self.epoch = float(replay_fraction), seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _rank(self) -> tuple[int, int]:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            return dist.get_rank(), dist.get_world_size()
        return 0, 1

    def _all_batches(self) -> list[list[int]]:
        import torch

        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        n_batches = math.ceil(self.n_new / self.batch_size)
        new = torch.randperm(self.n_new, generator=g).tolist()
        old = torch.randperm(max(self.n_old, 1), generator=g).tolist() if self.n_old else []
        batches, carry, i_new, i_old = [], 0.0, 0, 0
        for _ in range(n_batches):
            carry += self.replay_fraction * self.batch_size
            k = min(int(math.floor(carry + 1e-9)), self.batch_size)
            carry -= k
            batch = []
            for _ in range(self.batch_size - k):
                batch.append(new[i_new % self.n_new])
                i_new += 1
            for _ in range(k):
                batch.append(self.n_new + old[i_old % self.n_old])
                i_old += 1
            batches.append(batch)
        return batches

    def __iter__(self) -> Iterator[list[int]]:
        rank, world = self._rank()
        yield from self._all_batches()[rank::world]
        self.epoch += 1  # a next epoch without set_epoch still reshuffles

    def __len__(self) -> int:
        rank, world = self._rank()
        return len(range(rank, math.ceil(self.n_new / self.batch_size), world))


class ContinualDataModule(VolumeDataModule):
    """`VolumeDataModule` of the new domain, with replayed crops of an earlier domain in every batch.

    Args (besides VolumeDataModule's, which describe the new domain):
        replay_data_dir / replay_datalist: the earlier domain's volumes (one of them, or a phantom).
        replay_phantom: write this cohort into replay_data_dir when it is empty.
        replay_fraction: share of every batch drawn from the earlier domain (0 = none). Defaults to 0.25.
        validate_on: "new", "old" or "both" domains' validation volumes. Defaults to "both".
    """

    def __init__(
        self,
        replay_data_dir: str | None = None,
        replay_datalist: str | None = None,
        replay_phantom: PhantomCohort | None = None,
        replay_fraction: float = 0.25,
        validate_on: str = "both",
        keys: Sequence[str] = ("image",),
        data_dir: str | None = None,
        datalist: str | None = None,
        preprocessing: Preprocessing = Preprocessing(),
        sampling: Sampling = Sampling(num_samples=1),
        split: Split = Split(),
        augment: bool = True,
        num_workers: int = 4,
        multiprocessing_context: str | None = None,
        cache_dir: str | None = None,
        phantom: PhantomCohort | None = None,
    ) -> None:
        super().__init__(
            keys,
            data_dir,
            datalist,
            preprocessing,
            sampling,
            split,
            augment,
            num_workers,
            multiprocessing_context,
            cache_dir,
            phantom,
        )
        if not 0.0 <= replay_fraction < 1.0:
            raise ConfigError(f"data.replay_fraction must lie in [0, 1), got {replay_fraction}.")
        if replay_fraction > 0 and (replay_data_dir is None) == (replay_datalist is None):
            raise InputPathError("Replay needs exactly one of data.replay_data_dir or data.replay_datalist.")
        if validate_on not in ("new", "old", "both"):
            raise ConfigError(f"data.validate_on must be new, old or both, got '{validate_on}'.")
        self.replay_data_dir, self.replay_datalist, self.replay_phantom = (
            replay_data_dir,
            replay_datalist,
            replay_phantom,
        )
        self.replay_fraction = float(replay_fraction)
        self.validate_on = validate_on
        self.old_train: Datalist = []
        self.old_val: Datalist = []

    def _old_split(self) -> tuple[Datalist, Datalist]:
        from medct.data import split_datalist

        if self.replay_datalist is not None:
            train = read_msd_datalist(self.replay_datalist, "training")
            if train is None:
                raise InputPathError(f"{self.replay_datalist} has no 'training' list.")
            val = read_msd_datalist(self.replay_datalist, "validation")
        elif self.replay_data_dir is not None:
            train, val = find_datalist(self.replay_data_dir, self.keys)
        else:
            return [], []
        return (train, val) if val else split_datalist(train, self.val_fraction, self.seed)

    def prepare_data(self) -> None:
        super().prepare_data()
        from pathlib import Path

        p = self.replay_phantom
        if (
            p is not None
            and self.replay_data_dir is not None
            and not (Path(self.replay_data_dir) / "dataset.json").is_file()
        ):
            from medct.phantom import write_cohort

            write_cohort(
                self.replay_data_dir,
                n=p.n,
                variant=p.variant,
                seed=p.seed,
                shape=tuple(p.shape),
                spacing=tuple(p.spacing),
            )

    def setup(self, stage: str | None = None) -> None:
        super().setup(stage)
        self.old_train, self.old_val = self._old_split()

    def train_dataloader(self) -> DataLoader:
        new, old = self._dataset(self.train_items, "train"), self._dataset(self.old_train, "train")
        sampler = ReplayBatchSampler(
            len(self.train_items), len(self.old_train), self.batch_size, self.replay_fraction, self.seed
        )
        return self.loader(ConcatDataset([new, old]), batch_sampler=sampler)

    def val_dataloader(self) -> Any:
        items = {"new": self.val_items, "old": self.old_val, "both": self.val_items + self.old_val}[self.validate_on]
        return self.loader(self._dataset(items, "val"), batch_size=1, shuffle=False)

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "replay_train": len(self.old_train), "replay_fraction": self.replay_fraction}
