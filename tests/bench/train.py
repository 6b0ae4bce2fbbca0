"""Training and inference throughput of the registry's networks, in samples (slices) per second.

    .venv/bin/python tests/bench/train.py [--arch simplecnn,resnet18,densenet121] [--matrix 128] [--device auto]

Times optimizer steps (forward, backward, update, with the training
augmentation) and pure forward passes on random input of the demo model's
shape (3 channels: 2.5D context). On CUDA it uses bf16 autocast and
channels_last, as training does; quote the figures with the card's name.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from triagenode.inference.architectures import build_network
from triagenode.inference.device import resolve_device
from triagenode.inference.training import augment


def rate(step, batch: int, seconds: float = 5.0, device: torch.device | None = None) -> float:
    step()  # warm-up
    if device is not None and device.type == "cuda":
        torch.cuda.synchronize()
    count, started = 0, time.perf_counter()
    while time.perf_counter() - started < seconds:
        step()
        count += 1
    if device is not None and device.type == "cuda":
        torch.cuda.synchronize()
    return count * batch / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", default="simplecnn,resnet18,densenet121")
    parser.add_argument("--matrix", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--device", default="auto")
    args = parser.parse_args()
    device = resolve_device(args.device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(f"device: {name}; input {args.batch_size}x3x{args.matrix}x{args.matrix}")
    for arch in args.arch.split(","):
        train_rate, forward_rate = measure(arch, args.matrix, args.batch_size, device)
        print(f"{arch:12} training {train_rate:8.0f} samples/s   forward {forward_rate:8.0f} slices/s")


def measure(arch: str, matrix: int, batch_size: int, device: torch.device) -> tuple[float, float]:
    """(training samples/s, forward slices/s) of one architecture."""
    generator = torch.Generator().manual_seed(0)
    network = build_network(arch, 3).to(device).to(memory_format=torch.channels_last)
    optimizer = torch.optim.AdamW(network.parameters(), lr=1e-3)
    x = torch.rand(batch_size, 3, matrix, matrix, device=device)
    y = torch.randint(0, 2, (batch_size,), device=device)
    amp = device.type == "cuda"

    def train_step() -> None:
        network.train()
        batch = augment(x, generator).contiguous(memory_format=torch.channels_last)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            loss = F.cross_entropy(network(batch).float(), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    @torch.inference_mode()
    def forward() -> None:
        network.eval()
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            network(x.contiguous(memory_format=torch.channels_last))

    return rate(train_step, batch_size, device=device), rate(forward, batch_size, device=device)


if __name__ == "__main__":
    main()
