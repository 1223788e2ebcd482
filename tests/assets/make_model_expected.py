"""Regenerate ``tests/assets/model_expected.json``: stored outputs of tiny TAEMI models.

``tests/test_model.py::test_stored_expected_outputs`` rebuilds every preset at the tiny
sizes stored in the JSON, initialised after ``torch.manual_seed(SEED)``, feeds it the
stored inputs in eval mode and compares with the stored outputs (atol 1e-5). Any
change of architecture, parameter order or initialisation makes it fail, which is the
point: it guards against accidental changes.

Regenerate ONLY after an intended change of the model, from the repository root, and
say why in the commit message::

    .venv/bin/python tests/assets/make_model_expected.py
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch

from taemi.config import PRESETS, preset
from taemi.data.batch import Batch
from taemi.model.taemi import TAEMI

OUT = Path(__file__).with_name("model_expected.json")
SEED = 0  # torch.manual_seed before building each model
INPUT_SEED = 1234  # generator seed of the stored inputs
NUM_OUTPUTS = 6
TINY = {
    "audio_dim": 7,
    "vision_dim": 5,
    "text_dim": 6,
    "hidden": 8,
    "heads": 2,
    "sa_ffn": 16,
    "head_hidden": 8,
}


def make_inputs() -> dict[str, list]:
    """Three clips: padded audio/vision of different lengths, some modalities missing."""
    g = torch.Generator().manual_seed(INPUT_SEED)
    B, T_a, T_v, T_t = 3, 5, 4, 3
    return {
        "audio": torch.randn(B, T_a, TINY["audio_dim"], generator=g).tolist(),
        "audio_mask": (torch.arange(T_a) < torch.tensor([[5], [2], [3]])).tolist(),
        "vision": torch.randn(B, T_v, TINY["vision_dim"], generator=g).tolist(),
        "vision_mask": (torch.arange(T_v) < torch.tensor([[4], [4], [1]])).tolist(),
        "text": torch.randn(B, TINY["text_dim"], generator=g).tolist(),
        "text_tokens": torch.randn(B, T_t, TINY["text_dim"], generator=g).tolist(),
        "text_tokens_mask": (torch.arange(T_t) < torch.tensor([[3], [1], [2]])).tolist(),
        "missing": [[False, False, False], [False, True, False], [True, False, True]],
    }


def batch_from(inputs: dict[str, list], *, text_tokens: bool) -> Batch:
    return Batch(
        audio=torch.tensor(inputs["audio"], dtype=torch.float32),
        audio_mask=torch.tensor(inputs["audio_mask"]),
        vision=torch.tensor(inputs["vision"], dtype=torch.float32),
        vision_mask=torch.tensor(inputs["vision_mask"]),
        text=torch.tensor(inputs["text"], dtype=torch.float32),
        missing=torch.tensor(inputs["missing"]),
        text_tokens=torch.tensor(inputs["text_tokens"], dtype=torch.float32)
        if text_tokens
        else None,
        text_tokens_mask=torch.tensor(inputs["text_tokens_mask"]) if text_tokens else None,
    )


def build(name: str, tiny: dict[str, int], seed: int, num_outputs: int) -> TAEMI:
    cfg = dataclasses.replace(preset(name).model, **tiny)
    torch.manual_seed(seed)
    return TAEMI(cfg, num_outputs=num_outputs).eval()


def main() -> None:
    inputs = make_inputs()
    presets = {}
    for name in PRESETS:
        model = build(name, TINY, SEED, NUM_OUTPUTS)
        with torch.no_grad():
            out = {
                "outputs": model(batch_from(inputs, text_tokens=False)).tolist(),
                "outputs_text_tokens": model(batch_from(inputs, text_tokens=True)).tolist(),
            }
        out["param_shapes"] = {k: list(v.shape) for k, v in model.named_parameters()}
        presets[name] = out
    data = {
        "generated_by": "tests/assets/make_model_expected.py",
        "torch_version": torch.__version__,
        "seed": SEED,
        "num_outputs": NUM_OUTPUTS,
        "tiny": TINY,
        "inputs": inputs,
        "presets": presets,
    }
    OUT.write_text(json.dumps(data, indent=1) + "\n", encoding="utf-8")
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
