"""Views made where the images are decoded: in DataLoader workers, from the whole image, on the CPU.

    WithViews(dataset, policy, views, seed, k)[i]   stage one: sample i's clean image, its K stored views'
                                                    records (K, nbytes) and their pixels (K, 3, S, S)
    DrawnViews(dataset, policy, index, records)[j]  stage two: draw j's view of sample index[j], replayed from
                                                    its stored record (or drawn fresh when records is None)

Each image is decoded once per use; the replay is the policy's (richkd_cache/views.py), so stage two's pixels
are those the teacher saw.
"""

from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import Dataset

from richkd_cache.data._base import ImageDataset
from richkd_cache.views import ViewPolicy, sample_generator, stored_views


class WithViews(Dataset):
    """Stage one's samples with their K views of `policy` (`views`: clean, all or K draws from `seed`)."""

    def __init__(self, dataset: ImageDataset, policy: ViewPolicy, views: str | int, seed: int, k: int) -> None:
        self.dataset, self.policy, self.views, self.seed, self.k = dataset, policy, views, seed, k

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int) -> dict:
        whole = self.dataset.whole(i)  # (3, H, W) uint8
        records = stored_views(self.views, self.policy, self.seed, i, self.k, *whole.shape[-2:])  # (K, nbytes)
        pixels = self.policy.replay_packed(whole[None].expand(len(records), -1, -1, -1), records)
        return {"image": self.dataset.clean(whole), "label": int(self.dataset.labels[i]), "index": int(i),
                "views": pixels, "records": torch.from_numpy(records)}


class DrawnViews(Dataset):
    """One epoch's draws for stage two: item j is the view `records[j]` of sample `index[j]` ((n, nbytes)
    uint8, gathered from the cache for the epoch), or with `records` None a fresh view drawn from
    (`seed`, the sample): a run without stored views still sees the policy's augmentation."""

    def __init__(self, dataset: ImageDataset, policy: ViewPolicy, index: np.ndarray,
                 records: np.ndarray | None = None, seed: int = 0) -> None:
        self.dataset, self.policy, self.index, self.records, self.seed = dataset, policy, index, records, seed

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, j: int) -> dict:
        return self.__getitems__([j])[0]

    def __getitems__(self, draws: list[int]) -> list[dict]:
        """A batch of draws: the DataLoader's fetcher asks for a whole batch when this exists, so the batch's
        records are unpacked at once (unpacking takes ~20 small tensor ops, ~0.07 ms: per draw, ~3 % of its
        cost)."""
        fields = None if self.records is None else self.policy.record.unpack(self.records[draws])  # {name: (B,)}
        items = []
        for k, j in enumerate(draws):
            i = int(self.index[j])
            whole = self.dataset.whole(i)  # (3, H, W) uint8
            if fields is None:
                view = self.policy.draw(sample_generator(self.seed, self.policy.stream, i), 1, *whole.shape[-2:])
            else:
                view = {name: v[k : k + 1] for name, v in fields.items()}
            items.append({"image": self.policy.replay(whole[None], view)[0], "label": int(self.dataset.labels[i]),
                          "index": i})
        return items
