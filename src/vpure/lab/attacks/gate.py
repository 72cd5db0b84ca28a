"""An adaptive attack on the detection gate: fool the recogniser while keeping the frame
classifier's per-frame labels consistent, so the exception index stays below gamma1 and
the clip takes the clean route straight to the fooled recogniser.

Loss to ascend: CE(recogniser(x), y) - beta * mean_t CE(frame_classifier(x)_t, c), where c
is the frame classifier's majority label on the clean clip (one label for every frame).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from vpure.lab.attacks.core import clip_loss


class GateOracle:
    def __init__(self, recognizer, frame_classifier, clean_clip: torch.Tensor, beta: float = 1.0):
        self.recognizer, self.frame_classifier, self.beta = recognizer, frame_classifier, beta
        with torch.inference_mode():
            per_frame = frame_classifier(clean_clip).argmax(-1)  # (B, T)
        self.target = per_frame.mode(dim=1).values  # (B,)

    def __call__(self, x: torch.Tensor, labels: torch.Tensor):
        x = x.detach().requires_grad_(True)
        with torch.enable_grad():
            fl = self.frame_classifier(x)  # (B, T, K)
            b, t, k = fl.shape
            keep = F.cross_entropy(fl.reshape(b * t, k), self.target.repeat_interleave(t),
                                   reduction="none").view(b, t).mean(1)
            loss = clip_loss(self.recognizer(x), labels) - self.beta * keep
            (grad,) = torch.autograd.grad(loss.sum(), x)
        return loss.detach(), grad
