"""Reference log-probs as a Ray Data ``map_batches`` callable class: one model load per actor.

The training workers never hold the reference model; they read these columns instead.
"""
from __future__ import annotations

import numpy as np
import torch

from raydpo.logprobs import model_sequence_logps, pair_batch
from raydpo.models import load_model, load_tokenizer


class ReferenceLogps:
    """Adds ``ref_chosen_logps`` and ``ref_rejected_logps`` (float32, summed over completion tokens)."""

    def __init__(self, model_path: str, gguf_file: str | None = None, dtype: str = "float32") -> None:
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.model = load_model(model_path, dtype, gguf_file).to(self.device).eval()
        self.pad_id = load_tokenizer(model_path, gguf_file).pad_token_id

    @torch.no_grad()
    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        n = len(batch["prompt_ids"])
        inputs = pair_batch(batch["prompt_ids"], batch["chosen_ids"], batch["rejected_ids"], self.pad_id)
        logps, _ = model_sequence_logps(self.model, {k: v.to(self.device) for k, v in inputs.items()})
        logps = logps.float().cpu().numpy()
        batch["ref_chosen_logps"] = logps[:n].astype(np.float32)
        batch["ref_rejected_logps"] = logps[n:].astype(np.float32)
        return batch
