"""The networks' own promises: shapes, and that the segmenter's recurrent layer carries neighbouring slices.

The recurrent U-Net exists so that a slice's outline can use what the next
slice shows. Two tests hold that: a change on one slice changes the output
on every other slice (a plain 2D U-Net would leave them alone), and a small
task whose answer on slice k lies only on slice k + 1 is learnt by it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from triagenode.inference.architectures import SEGMENTERS, build_network


def test_the_recurrent_unet_keeps_the_slices_and_the_grid() -> None:
    torch.manual_seed(0)
    network = build_network("recurrentunet", 3, 2, {"width": 4}).eval()
    out = network(torch.randn(2, 5, 3, 24, 40))
    assert out.shape == (2, 5, 2, 24, 40)
    assert "recurrentunet" in SEGMENTERS


def test_every_slice_s_output_depends_on_the_slices_before_and_after_it() -> None:
    """Exactly zero for a network that sees one slice at a time; not zero through the recurrence."""
    torch.manual_seed(0)
    network = build_network("recurrentunet", 1, 2, {"width": 4}).eval()
    volume = torch.randn(1, 5, 1, 16, 16, requires_grad=True)
    network(volume)[0, 2].sum().backward()
    assert volume.grad is not None
    reach = volume.grad[0].abs().flatten(1).sum(dim=1)  # how much each input slice moves slice 2's output
    assert torch.all(reach > 0), f"slice 2 must see slices 0, 1, 3 and 4: {reach.tolist()}"


def test_a_lesion_seen_only_on_the_next_slice_is_learnt() -> None:
    """Each slice's label is 'the next slice has a bright square here': only the recurrence can know."""
    torch.manual_seed(0)
    generator = torch.Generator().manual_seed(0)

    def batch(size: int = 8, slices: int = 6) -> tuple[torch.Tensor, torch.Tensor]:
        x = torch.randn(size, slices, 1, 16, 16, generator=generator) * 0.3
        y = torch.zeros(size, slices, 16, 16, dtype=torch.long)
        for b in range(size):
            for k in range(1, slices):
                if torch.rand(1, generator=generator) < 0.5:
                    r, c = (int(v) for v in torch.randint(0, 12, (2,), generator=generator))
                    x[b, k, 0, r : r + 4, c : c + 4] += 2.0
                    y[b, k - 1, r : r + 4, c : c + 4] = 1  # the evidence for slice k - 1 lies on slice k
        return x, y

    network = build_network("recurrentunet", 1, 2, {"width": 8})
    optimizer = torch.optim.Adam(network.parameters(), lr=3e-3)
    for _ in range(150):
        x, y = batch()
        loss = F.cross_entropy(network(x).flatten(0, 1), y.flatten(0, 1), weight=torch.tensor([1.0, 4.0]))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    network.eval()
    x, y = batch(16)
    with torch.no_grad():
        predicted = network(x).argmax(dim=2)
    truth = y == 1
    dice = 2 * (predicted.bool() & truth).sum() / (predicted.bool().sum() + truth.sum())
    assert float(dice) > 0.7, f"Dice {float(dice):.2f}: the recurrent layer did not carry the next slice"
