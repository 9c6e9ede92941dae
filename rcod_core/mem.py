"""MEM, the metric estimation module (paper Sec. 3.4): predicts an LR image's latent metric M_L.

The release's MEM is ``ReLU(Linear(256, 1))`` on DEResNet's pooled features (RCOD_S); adaptive
realism picks t from the prediction with the model's grouping rule (Eq. 5 / thresholds).
Training targets are M_L measured with the frozen base VAE (``trainer``).
"""

from __future__ import annotations

from typing import Mapping

import torch
import torch.nn.functional as F
from torch import nn


class MetricEstimator(nn.Module):
    """MEM (release): ``ReLU(Linear(256, 1))`` on the DEResNet pooled features → predicted M_L."""

    def __init__(self, in_features: int = 256):
        super().__init__()
        self.linear = nn.Linear(in_features, 1)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return F.relu(self.linear(features)).squeeze(-1)

    def load_release_state(self, state: Mapping[str, torch.Tensor]) -> None:
        """Our canonical keys ``weight``/``bias`` (the release's ``0.weight``/``0.bias``)."""
        self.linear.load_state_dict({"weight": state["weight"], "bias": state["bias"]})
