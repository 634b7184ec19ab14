"""fid_fmnist table: the train-vs-test floor, then each given run folder's samples vs the test set.

    python bench/fid_fmnist.py runs/vae-quick runs/autoencoder-quick

fid_fmnist is the Fréchet distance on our Fashion-MNIST CNN's 128-d penultimate features (not Inception FID).
Sets of 5,000 images; the floor is 5,000 training images vs 5,000 test images.
"""
from __future__ import annotations

import sys

import torch

from dreamlab.data import load_dataset
from generators.classifiers import fid_fmnist
from generators.trainer import load_run

N = 5000


def main(runs: list[str]) -> None:
    test = load_dataset("fashion_mnist", "test")["x"][:N]
    train = load_dataset("fashion_mnist", "train")["x"][:N]
    rows = [("train set (floor)", fid_fmnist(train, test))]
    noise = torch.rand_like(test)
    rows.append(("uniform noise (ceiling)", fid_fmnist(noise, test)))
    for run in runs:
        m = load_run(run, device="cpu")
        g = torch.Generator().manual_seed(0)
        s = torch.cat([m.sample(500, generator=g) for _ in range(N // 500)])
        rows.append((f"{m.name} samples ({run})", fid_fmnist(s, test)))
    floor = rows[0][1]
    print(f"{'set vs 5k test images':<48} {'fid_fmnist':>10} {'x floor':>8}")
    for name, v in rows:
        print(f"{name:<48} {v:>10.3f} {v / floor:>8.1f}")


if __name__ == "__main__":
    main(sys.argv[1:])
