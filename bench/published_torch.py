"""A re-creation, written here, of the published ApproximateGreedyCoresetSampler's loop (torch):
a bias-free linear projection to 128 dims, squared norms by batched dot products, and per step a
`torch.cat` of the new distance column with the running minimum, then `min` over it. Used only as a
benchmark contender; it is not the published code itself."""

import numpy as np
import torch


def _batchwise_distances(a, b):
    a_sq = a.unsqueeze(1).bmm(a.unsqueeze(2)).reshape(-1, 1)
    b_sq = b.unsqueeze(1).bmm(b.unsqueeze(2)).reshape(1, -1)
    return (-2 * a.mm(b.T) + a_sq + b_sq).clamp(0, None).sqrt()


def approximate_greedy_coreset(features: torch.Tensor, num: int, *, dim: int = 128, num_starts: int = 10, seed: int = 0):
    torch.manual_seed(seed)
    with torch.no_grad():
        mapper = torch.nn.Linear(features.shape[1], dim, bias=False)
        reduced = mapper(features)
        starts = np.random.default_rng(seed).choice(len(features), num_starts, replace=False)
        dist = torch.mean(_batchwise_distances(reduced, reduced[starts]), dim=-1).reshape(-1, 1)
        chosen = []
        for _ in range(num):
            i = torch.argmax(dist).item()
            chosen.append(i)
            new = _batchwise_distances(reduced, reduced[i : i + 1])
            dist = torch.min(torch.cat([dist, new], dim=-1), dim=1).values.reshape(-1, 1)
    return np.array(chosen)
