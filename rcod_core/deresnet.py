"""S3Diff's degradation estimator (DEResNet), the RCOD_S input of the guided LoRA and of MEM.

Two independent ResNet branches on the LR image (blur and noise), each → pooled 128-d feature →
MLP → sigmoid score. Key layout of ``de_net.pth`` (``conv_first.{d}``, ``body.{d}.{i}``,
``fc_degree.{d}``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class ResidualBlockNoBN(nn.Module):
    """``x + conv2(relu(conv1(x)))`` (basicsr's block, res_scale 1)."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, 1, 1)
        self.conv2 = nn.Conv2d(channels, channels, 3, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv2(F.relu(self.conv1(x)))


class DEResNet(nn.Module):
    """Degradation estimator; ``forward`` → scores (B, num_degradation) in [0, 1]."""

    def __init__(self, num_degradation: int = 2, num_feats=(64, 64, 64, 128), num_blocks=(2, 2, 2, 2),
                 downscales=(1, 1, 2, 1), in_channels: int = 3):
        super().__init__()
        self.num_degradation = num_degradation
        self.conv_first = nn.ModuleList(nn.Conv2d(in_channels, num_feats[0], 3, 1, 1) for _ in range(num_degradation))
        self.body = nn.ModuleList(self._make_body(num_feats, num_blocks, downscales) for _ in range(num_degradation))
        self.fc_degree = nn.ModuleList(
            nn.Sequential(nn.Linear(num_feats[-1], 512), nn.ReLU(inplace=True), nn.Linear(512, 1), nn.Sigmoid())
            for _ in range(num_degradation)
        )
        self.feature_dim = num_feats[-1] * num_degradation

    @staticmethod
    def _make_body(num_feats, num_blocks, downscales) -> nn.Sequential:
        layers: list[nn.Module] = []
        stages = len(num_feats)
        for stage in range(stages):
            layers.extend(ResidualBlockNoBN(num_feats[stage]) for _ in range(num_blocks[stage]))
            nxt = num_feats[min(stage + 1, stages - 1)]
            if downscales[stage] == 2:
                layers.append(nn.Conv2d(num_feats[stage], nxt, 3, 2, 1))
            elif stage < stages - 1 and num_feats[stage] != nxt:
                layers.append(nn.Conv2d(num_feats[stage], nxt, 3, 1, 1))
        return nn.Sequential(*layers)

    def forward_features(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(scores (B, D), pooled features (B, D · C)) — branch-major: [branch0 | branch1]."""
        scores, feats = [], []
        for conv, body, fc in zip(self.conv_first, self.body, self.fc_degree):
            feat = F.adaptive_avg_pool2d(body(conv(x)), 1).flatten(1)
            feats.append(feat)
            scores.append(fc(feat).squeeze(-1))
        return torch.stack(scores, dim=1), torch.cat(feats, dim=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_features(x)[0]
