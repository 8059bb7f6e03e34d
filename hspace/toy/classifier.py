"""Training the toy world's attribute classifier: one output per generating factor.

Binary factors get a logit, continuous ones a regression value in the factor's own units. The
paper scores samples with pretrained attribute classifiers (Sec. V, "Classifier annotation"); here
the classifier is trained on generated faces with their exact labels, so its readings can be
checked against the truth. The network is :class:`hspace.classifier.AttributeClassifier` (stored
as ``config.json`` + ``model.safetensors``, no pickle), re-exported here.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch
from torch import nn

from hspace.classifier import AttributeClassifier, score_images
from hspace.toy.world import BINARY_FACTORS, FACTORS, make_dataset

__all__ = ["AttributeClassifier", "evaluate_classifier", "train_classifier"]


def _augment(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Mild blur and noise so the classifier reads slightly imperfect model samples as well."""
    b = x.shape[0]
    blur = torch.rand(b, 1, 1, 1, generator=gen) < 0.5
    k = torch.tensor([1.0, 2.0, 1.0])
    k = (k[:, None] * k[None, :]) / 16
    blurred = nn.functional.conv2d(
        nn.functional.pad(x, (1, 1, 1, 1), mode="replicate"), k.expand(3, 1, 3, 3), groups=3
    )
    x = torch.where(blur, blurred, x)
    x = x + torch.randn(x.shape, generator=gen) * torch.rand(b, 1, 1, 1, generator=gen) * 0.06
    return x.clamp(0, 1)


def train_classifier(
    out: Path,
    n_train: int = 30_000,
    n_val: int = 2_000,
    epochs: int = 4,
    batch_size: int = 128,
    lr: float = 2e-3,
    seed: int = 0,
    train_seed_offset: int = 20_000_000,
) -> dict:
    """Train on freshly generated faces; returns held-out metrics (accuracy / MAE per factor)."""
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    images, labels = make_dataset(range(train_seed_offset, train_seed_offset + n_train + n_val))
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255.0
    y = torch.from_numpy(labels)
    xtr, ytr, xva, yva = x[:n_train], y[:n_train], x[n_train:], y[n_train:]
    binary = [f in BINARY_FACTORS for f in FACTORS]
    is_bin = torch.tensor(binary)
    model = AttributeClassifier(list(FACTORS), binary)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    n_steps = epochs * (n_train // batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=n_steps)
    t0 = time.time()
    model.train()
    for step in range(n_steps):
        idx = torch.randint(0, n_train, (batch_size,), generator=gen)
        pred = model(_augment(xtr[idx], gen))
        target = ytr[idx]
        bce = nn.functional.binary_cross_entropy_with_logits(pred[:, is_bin], target[:, is_bin])
        mse = nn.functional.mse_loss(pred[:, ~is_bin], target[:, ~is_bin])
        loss = bce + 4 * mse
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if step % 100 == 0:
            print(f"classifier step {step}/{n_steps} loss {loss.item():.4f} ({time.time() - t0:.0f}s)")
    model.eval()
    metrics = evaluate_classifier(model, xva, yva)
    model.save_pretrained(out)
    (Path(out) / "metrics.json").write_text(json.dumps(metrics, indent=2))
    return metrics


@torch.no_grad()
def evaluate_classifier(model: AttributeClassifier, images: torch.Tensor, labels: torch.Tensor) -> dict:
    """Accuracy for binary factors, mean absolute error for continuous ones."""
    pred = score_images(model, images)
    out: dict[str, float] = {}
    for j, (name, b) in enumerate(zip(model.attributes, model.binary, strict=True)):
        if b:
            out[f"{name}_accuracy"] = float(((pred[:, j] > 0).float() == labels[:, j]).float().mean())
        else:
            out[f"{name}_mae"] = float((pred[:, j] - labels[:, j]).abs().mean())
    return out


def main() -> None:
    import argparse

    p = argparse.ArgumentParser(description="Train the toy attribute classifier")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--n-train", type=int, default=30_000)
    a = p.parse_args()
    print(json.dumps(train_classifier(a.out, n_train=a.n_train, epochs=a.epochs), indent=2))


if __name__ == "__main__":
    main()
