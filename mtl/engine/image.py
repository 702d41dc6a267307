"""Image features: raw uint8 grey-scale pixels stored as Arrow binary (row-major, H*W bytes a
row), and a small convolutional encoder in the LeNet line (LeCun et al. 1998, "Gradient-Based
Learning Applied to Document Recognition")."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import torch
from torch import nn

from mtl.errors import UserError


@dataclass(frozen=True)
class ImageInput:
    """Image columns of one shape -> ``{"image": float32 [N, columns, H, W]}``, pixels scaled
    to [0, 1], each column a channel; a missing image is all zeros."""

    columns: tuple[str, ...]
    shape: tuple[int, int]

    def transform(self, table: pa.Table) -> dict[str, torch.Tensor]:
        images = np.zeros((table.num_rows, len(self.columns), *self.shape), dtype=np.float32)
        for c, column in enumerate(self.columns):
            for i, pixels in enumerate(table[column].to_pylist()):
                if pixels is not None:
                    images[i, c] = np.frombuffer(pixels, dtype=np.uint8).reshape(self.shape)
        return {"image": torch.from_numpy(images / np.float32(255))}


class SmallCNN(nn.Module):
    """Images [N, C, H, W] -> [N, dim]: per width in ``channels`` a 3x3 convolution, ReLU and
    2x2 max-pooling; then the feature maps, flattened, into a linear layer. Flattening keeps
    where things are (MultiFashion's tasks depend on it), and every layer has a deterministic
    backward pass on CUDA too."""

    def __init__(self, in_channels: int, shape: tuple[int, int], channels: Sequence[int], dim: int):
        super().__init__()
        height, width = shape[0] >> len(channels), shape[1] >> len(channels)
        if not height or not width:
            raise UserError(f"encoders.image_channels: {len(channels)} poolings halve a "
                            f"{shape[0]}x{shape[1]} image to nothing; use fewer widths")
        layers: list[nn.Module] = []
        for out_channels in channels:
            layers += [nn.Conv2d(in_channels, out_channels, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2)]
            in_channels = out_channels
        layers += [nn.Flatten(), nn.Linear(in_channels * height * width, dim)]
        self.net = nn.Sequential(*layers)
        self.out_dim = dim

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.net(images)
