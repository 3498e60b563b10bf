"""EasyOCR's second-generation recognizer (VGG features, two BiLSTMs, CTC head).

Module names follow EasyOCR's `model/vgg_model.py` so `english_g2.pth` loads
after its DataParallel `module.` prefix is removed.
"""

from __future__ import annotations

import torch
from torch import nn

# EasyOCR's English character list for the g2 recognizer; class 0 is the CTC blank.
EASYOCR_EN_CHARACTERS = (
    "0123456789"
    "!\"#$%&'()*+,-./:;<=>?@[\\]^_`{|}~ €"
    "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
)


class VGGFeatureExtractor(nn.Module):
    def __init__(self, in_ch: int = 1, out_ch: int = 256) -> None:
        super().__init__()
        c = [out_ch // 8, out_ch // 4, out_ch // 2, out_ch]
        self.ConvNet = nn.Sequential(
            nn.Conv2d(in_ch, c[0], 3, 1, 1), nn.ReLU(True), nn.MaxPool2d(2, 2),
            nn.Conv2d(c[0], c[1], 3, 1, 1), nn.ReLU(True), nn.MaxPool2d(2, 2),
            nn.Conv2d(c[1], c[2], 3, 1, 1), nn.ReLU(True),
            nn.Conv2d(c[2], c[2], 3, 1, 1), nn.ReLU(True), nn.MaxPool2d((2, 1), (2, 1)),
            nn.Conv2d(c[2], c[3], 3, 1, 1, bias=False), nn.BatchNorm2d(c[3]), nn.ReLU(True),
            nn.Conv2d(c[3], c[3], 3, 1, 1, bias=False), nn.BatchNorm2d(c[3]), nn.ReLU(True),
            nn.MaxPool2d((2, 1), (2, 1)),
            nn.Conv2d(c[3], c[3], 2, 1, 0), nn.ReLU(True),
        )  # fmt: skip

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.ConvNet(x)


class BidirectionalLSTM(nn.Module):
    def __init__(self, in_size: int, hidden: int, out_size: int) -> None:
        super().__init__()
        self.rnn = nn.LSTM(in_size, hidden, bidirectional=True, batch_first=True)
        self.linear = nn.Linear(hidden * 2, out_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        recurrent, _ = self.rnn(x)
        return self.linear(recurrent)


class CRNNRecognizer(nn.Module):
    """Grayscale word image (N, 1, 64, W) in [-1, 1] -> per-column class logits (N, T, classes)."""

    def __init__(self, num_classes: int = len(EASYOCR_EN_CHARACTERS) + 1, hidden: int = 256) -> None:
        super().__init__()
        self.FeatureExtraction = VGGFeatureExtractor(1, 256)
        self.SequenceModeling = nn.Sequential(
            BidirectionalLSTM(256, hidden, hidden), BidirectionalLSTM(hidden, hidden, hidden)
        )
        self.Prediction = nn.Linear(hidden, num_classes)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        features = self.FeatureExtraction(image)  # (N, C, H', W')
        # EasyOCR pools height away with AdaptiveAvgPool2d((None, 1)) over (N, W', C, H').
        sequence = features.permute(0, 3, 1, 2).mean(dim=3)  # (N, W', C)
        return self.Prediction(self.SequenceModeling(sequence))
