"""Samples/s of an end-to-end fine-tuning step (audio + text backbones + TAEMI fusion)
against the frozen-feature step (the fusion model alone on stored features), in one run.

Runners, each a full training step as ``taemi train`` takes it (``--mode frozen`` or
``--mode finetune``): the batch moved to the device, ``zero_grad``, forward under the
trainer's ``autocast``, MSE in float32, backward through ``GradScaler`` (enabled for fp16),
``unscale_``, the trainer's gradient clipping (by value, 100), AdamW from the trainer's
``make_optimizer`` (fine-tuning: two parameter groups, fusion and backbones), LR
scheduler, ``loss.item()``:

- ``frozen_offline``: the fusion model on random features of the offline profile's sizes
  (audio 384 at 50 frames/s, vision 384, text 384);
- ``finetune_offline``: the offline backbones with their real weights, as
  ``--set finetune.audio_backbone=offline`` loads them: Whisper tiny.en (torch port,
  ``window="clip"``: every clip padded to a fixed 12 s window) + all-MiniLM-L6-v2 (mean
  pooled, normalised) + the fusion model at (384, 384, 384);
- ``finetune_offline_ckpt``: the same with gradient checkpointing in both backbones;
- ``frozen_paper``: the fusion model on random features of the paper's sizes (1027, 768, 768);
- ``finetune_paper``: paper-size backbones with RANDOM weights (the step's cost does not
  depend on the values): a wav2vec2-large-robust with 12 transformer layers laid out as
  audeering's ``wav2vec2-large-robust-12-ft-emotion-msp-dim`` (hidden 1024, 16 heads, FFN
  4096, the wav2vec2-large conv stack with layer norm, stable layer norm, SpecAugment time
  masking p=0.05 as in its config, LayerDrop 0 as the backbone requires), wrapped in
  ``Wav2Vec2Backbone`` (1024 + 3 = 1027 per frame); a GTE-base-sized BERT (hidden 768, 12
  layers, 12 heads, FFN 3072; CLS pooled) with the MiniLM (bert-base-uncased) tokenizer,
  wrapped in ``TextBackbone``; + the fusion model at (1027, 768, 768). ``--skip-paper``
  leaves out both paper runners; ``--gradient-checkpointing`` adds
  ``finetune_paper_ckpt``.

Every clip of a batch lasts ``--seconds`` (default 6.9 s, the corpus's mean duration):
waveforms of that many 16 kHz samples, audio features of as many frames as the backbone
gives for it (Whisper 345, wav2vec2 344 at 6.9 s), vision 30 fps x 0.8 faces found = 166
frames, a ~17-word transcript (2.5 words/s), every modality present. The feature encoder
(conv front end) of the audio backbones is frozen by default, as in the fine-tuning
config (``--no-freeze-feature-encoder`` trains it too). Dropout, modality dropout and
SpecAugment act as in training (train mode).

Runners are timed round-robin in one process (one step of each per round, after
``--warmup`` untimed rounds), so load changes on a shared machine hit all of them alike;
each fine-tuning runner is compared with its frozen runner of the same sizes per round
(the median of the per-round ratios); each step's time is split into forward, backward
and optimiser (clipping + AdamW + scheduler). Memory, after the timed rounds (one more step per
runner, every runner's gradients freed first): what a step adds to the memory in use
before it (activations, gradients, temporaries), on CPU from RSS and VmHWM (reset
through ``/proc/self/clear_refs``, glibc's free memory handed back first, see
:class:`StepMemory`), on CUDA from ``memory_allocated`` / ``max_memory_allocated``;
"weights+Adam" = parameters + AdamW's two moments of the trainable ones (float32); their
sum estimates the peak of a process training that configuration alone (plus the
runtime's own few hundred MiB on CPU). The process's own peak (all runners' models
together) is printed after the timed rounds.

Usage::

    python benchmarks/finetune_throughput.py                    # CPU, batch 2, ~3-4 min on 2 cores
    python benchmarks/finetune_throughput.py --skip-paper --batch-size 8
    python benchmarks/finetune_throughput.py --device cuda --precision fp16 --batch-size 32 --steps 10
"""

from __future__ import annotations

import argparse
import copy
import gc
import math
import os
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace

import torch
import torch.nn.functional as F
from torch import nn

from taemi.config import ConfigError, RunConfig, build_config
from taemi.data.batch import Batch
from taemi.finetune.data import FinetuneBatch
from taemi.finetune.model import FinetuneModel, configure_backbones
from taemi.runtime import attention_backends, autocast, resolve_device, resolve_precision
from taemi.train.modes import backbone_sizes, build_model
from taemi.train.schedule import make_scheduler
from taemi.train.step import clip_gradients
from taemi.train.trainer import make_optimizer

EPOCH_CLIPS = 8072  # ABAW EMI training split (docs/method.md section 2)
SAMPLE_RATE = 16_000
VIDEO_FPS, FACE_FRACTION = 30.0, 0.8  # face frames per second of video, mean share found
WORDS_PER_SECOND = 2.5
OFFLINE_VISION_DIM = 384  # DINOv2 ViT-S/14 of the offline profile
PAPER_VISION_DIM = 768  # ViT-B/16 of the paper profile

#: audeering/wav2vec2-large-robust-12-ft-emotion-msp-dim's config.json (wav2vec2-large-robust
#: pruned to its first 12 transformer layers), LayerDrop 0 as Wav2Vec2Backbone requires.
WAV2VEC2_LARGE_ROBUST_12 = {
    "hidden_size": 1024,
    "num_hidden_layers": 12,
    "num_attention_heads": 16,
    "intermediate_size": 4096,
    "hidden_act": "gelu",
    "conv_dim": (512,) * 7,
    "conv_kernel": (10, 3, 3, 3, 3, 2, 2),
    "conv_stride": (5, 2, 2, 2, 2, 2, 2),
    "conv_bias": True,
    "feat_extract_norm": "layer",
    "feat_extract_activation": "gelu",
    "do_stable_layer_norm": True,
    "num_conv_pos_embeddings": 128,
    "num_conv_pos_embedding_groups": 16,
    "hidden_dropout": 0.1,
    "attention_dropout": 0.1,
    "activation_dropout": 0.1,
    "feat_proj_dropout": 0.1,
    "final_dropout": 0.1,
    "layer_norm_eps": 1e-5,
    "apply_spec_augment": True,
    "mask_time_prob": 0.05,
    "mask_time_length": 10,
    "mask_feature_prob": 0.0,
    "layerdrop": 0.0,
    "num_labels": 3,
    "id2label": {0: "arousal", 1: "dominance", 2: "valence"},
    "label2id": {"arousal": 0, "dominance": 1, "valence": 2},
    "vocab_size": 32,
}

#: A BERT of GTE-base's size (Alibaba-NLP/gte-en-mlm-base: hidden 768, 12 layers, 12 heads,
#: vocabulary 30528); GTE's own architecture (remote code) is not needed to time its size.
GTE_BASE_SIZE = {
    "vocab_size": 30528,
    "hidden_size": 768,
    "num_hidden_layers": 12,
    "num_attention_heads": 12,
    "intermediate_size": 3072,
    "max_position_embeddings": 512,
}

#: Words of the synthetic transcripts (~2.5 per second of speech).
_SENTENCE = (
    "i really think that we should go there today because it was such a good day and you know "
    "how much she loved the little house by the river when we were young"
)
WORDS = tuple(_SENTENCE.split())


# --------------------------------------------------------------------------- memory


def _proc_status() -> dict[str, int]:
    """VmHWM and VmRSS of this process in bytes (Linux)."""
    out = {}
    with open("/proc/self/status", encoding="ascii") as fh:
        for line in fh:
            key, _, rest = line.partition(":")
            if key in ("VmHWM", "VmRSS"):
                out[key] = int(rest.split()[0]) * 1024  # reported in kB
    return out


class StepMemory:
    """Memory in use before a step and the peak during it (bytes), ``None`` where unknown.

    CUDA: ``memory_allocated`` and ``max_memory_allocated`` (reset before the step).
    CPU (Linux, glibc): RSS and VmHWM, reset by writing 5 to ``/proc/self/clear_refs``.
    glibc keeps freed memory for reuse, so the RSS before a step would include what earlier
    steps freed; :meth:`start` therefore hands free pages back (``malloc_trim``) and, from
    the first call on, has allocations of 128 KiB and more mapped and unmapped one by one
    (``mallopt(M_MMAP_THRESHOLD)``), so that RSS follows the live tensors. That slows
    allocation: measure after the timed rounds.
    """

    M_MMAP_THRESHOLD = -3  # glibc malloc.h

    def __init__(self, device: torch.device):
        self.device = device
        self.libc = None
        if device.type == "cpu":
            import ctypes
            import ctypes.util

            try:
                self._reset_hwm()
                libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
                if libc.mallopt(self.M_MMAP_THRESHOLD, 128 * 1024) == 1:  # 1 = done (glibc)
                    self.libc = libc
            except (OSError, AttributeError):  # not Linux, or not glibc
                pass

    @staticmethod
    def _reset_hwm() -> None:
        with open("/proc/self/clear_refs", "w", encoding="ascii") as fh:
            fh.write("5")

    def start(self) -> int | None:
        """Reset the peak; return the memory in use now."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            return torch.cuda.memory_allocated(self.device)
        if self.libc is None:
            return None
        self.libc.malloc_trim(0)
        self._reset_hwm()
        return _proc_status()["VmRSS"]

    def peak(self) -> int | None:
        if self.device.type == "cuda":
            return torch.cuda.max_memory_allocated(self.device)
        return _proc_status()["VmHWM"] if self.libc is not None else None


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def process_peak(device: torch.device) -> str:
    """The process's peak so far: CPU VmHWM, CUDA max_memory_allocated."""
    if device.type == "cuda":
        return (
            f"CUDA max memory allocated {torch.cuda.max_memory_allocated(device) / 2**20:.0f} MiB"
        )
    try:
        return f"peak RSS (VmHWM) {_proc_status()['VmHWM'] / 2**20:.0f} MiB"
    except OSError:
        return "peak RSS unknown (no /proc)"


# --------------------------------------------------------------------------- models and batches


def paper_backbones(tokenizer) -> tuple[nn.Module, nn.Module]:
    """Random-weight backbones of the paper's sizes (see the module docstring)."""
    from transformers import BertConfig, BertModel, Wav2Vec2Config

    from taemi.backbones.text import TextBackbone
    from taemi.backbones.wav2vec2 import Wav2Vec2Backbone, Wav2Vec2EmotionModel

    audio = Wav2Vec2Backbone(
        Wav2Vec2EmotionModel(Wav2Vec2Config(**WAV2VEC2_LARGE_ROBUST_12)),
        normalize=True,
        max_seconds=12.0,
        name="random wav2vec2-large-robust-12 (audeering emotion layout)",
    )
    text = TextBackbone(
        BertModel(BertConfig(**GTE_BASE_SIZE), add_pooling_layer=False),
        tokenizer,
        pooling="cls",
        normalize=False,
        max_tokens=128,
        name="random BERT of GTE-base size",
    )
    return audio, text


def transcript(seconds: float, k: int) -> str:
    n = max(1, round(WORDS_PER_SECOND * seconds))
    return " ".join(WORDS[(k * 7 + i) % len(WORDS)] for i in range(n))


def finetune_batch(
    B: int, seconds: float, vision_dim: int, num_outputs: int, seed: int
) -> FinetuneBatch:
    """B clips of ``seconds`` each: waveforms, stored vision features, transcripts."""
    g = torch.Generator().manual_seed(seed)
    S, T_v = round(seconds * SAMPLE_RATE), vision_frames(seconds)
    return FinetuneBatch(
        waves=torch.randn(B, S, generator=g) * 0.1,  # (B, S)
        wave_lengths=torch.full((B,), S, dtype=torch.long),
        vision=torch.randn(B, T_v, vision_dim, generator=g),  # (B, T_v, D_v)
        vision_mask=torch.ones(B, T_v, dtype=torch.bool),
        texts=tuple(transcript(seconds, k) for k in range(B)),
        missing=torch.zeros(B, 3, dtype=torch.bool),
        target=torch.rand(B, num_outputs, generator=g),
        ids=tuple(f"{k:05d}" for k in range(B)),
    )


def frozen_batch(
    B: int, audio_frames: int, dims: dict[str, int], seconds: float, num_outputs: int, seed: int
) -> Batch:
    """B clips of stored features: audio (B, T_a, D_a), vision (B, T_v, D_v), text (B, D_t)."""
    g = torch.Generator().manual_seed(seed)
    T_v = vision_frames(seconds)
    return Batch(
        audio=torch.randn(B, audio_frames, dims["audio"], generator=g),
        audio_mask=torch.ones(B, audio_frames, dtype=torch.bool),
        vision=torch.randn(B, T_v, dims["vision"], generator=g),
        vision_mask=torch.ones(B, T_v, dtype=torch.bool),
        text=torch.randn(B, dims["text"], generator=g),
        missing=torch.zeros(B, 3, dtype=torch.bool),
        target=torch.rand(B, num_outputs, generator=g),
    )


def vision_frames(seconds: float) -> int:
    return min(400, max(1, round(VIDEO_FPS * seconds * FACE_FRACTION)))


# --------------------------------------------------------------------------- runners


@dataclass
class Runner:
    name: str
    what: str
    cfg: RunConfig
    model: nn.Module
    batch: Batch | FinetuneBatch
    frozen: str | None = None  # the frozen runner of the same sizes
    step_s: list[float] = field(default_factory=list)
    cpu_s: list[float] = field(default_factory=list)
    phases: list[tuple[float, float, float]] = field(
        default_factory=list
    )  # forward, backward, optimiser s
    backward_adds: int | None = None  # bytes added by the end of backward (activations, gradients)
    step_adds: int | None = None  # bytes a whole step adds at its peak (+ optimiser temporaries)

    def setup(self, device: torch.device, precision: str) -> None:
        self.device, self.precision = device, precision
        self.model.to(device).train()
        self.optimizer = make_optimizer(self.cfg, self.model)
        self.scheduler = make_scheduler(self.optimizer, 10, 10_000)
        self.scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")

    def step(self, after_backward: Callable[[], None] | None = None) -> float:
        """The trainer's optimiser step (train/step.py, EagerStep), one micro-batch; appends the
        seconds of its phases to ``self.last_phases`` (forward incl. the batch transfer and
        the loss, backward, clipping + optimiser + scheduler)."""
        t0 = time.perf_counter()
        batch = self.batch.to(self.device, non_blocking=True)
        self.optimizer.zero_grad(set_to_none=True)
        with attention_backends(self.device), autocast(self.device, self.precision):
            pred = self.model(batch)  # (B, E)
        loss = F.mse_loss(pred.float(), batch.target)
        t1 = self._now()
        self.scaler.scale(loss).backward()
        t2 = self._now()
        if after_backward is not None:
            after_backward()
        t2b = time.perf_counter()
        self.scaler.unscale_(self.optimizer)
        clip_gradients(self.model, self.cfg)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.scheduler.step()
        value = loss.item()  # waits for the device
        self.last_phases = (t1 - t0, t2 - t1, time.perf_counter() - t2b)
        return value

    def _now(self) -> float:
        if self.device.type == "cuda":  # phase boundaries: wait for the queued kernels
            torch.cuda.synchronize(self.device)
        return time.perf_counter()

    @property
    def batch_size(self) -> int:
        return (
            len(self.batch)
            if isinstance(self.batch, FinetuneBatch)
            else int(self.batch.text.shape[0])
        )

    @property
    def trainable(self) -> int:
        return sum(p.numel() for p in self.model.parameters() if p.requires_grad)

    @property
    def trainable_backbones(self) -> int:
        if not isinstance(self.model, FinetuneModel):
            return 0
        return sum(p.numel() for p in self.model.backbone_parameters())

    @property
    def state_bytes(self) -> int:
        """Parameters + AdamW moments of the trainable ones (float32)."""
        params = sum(p.numel() * p.element_size() for p in self.model.parameters())
        return params + 2 * 4 * self.trainable

    @property
    def median_step(self) -> float:
        return statistics.median(self.step_s)

    @property
    def samples_s(self) -> float:
        return self.batch_size / self.median_step


def fusion_config(args: argparse.Namespace, mode: str, dims: dict[str, int]) -> RunConfig:
    cfg = build_config(args.preset)
    ft = replace(cfg.finetune, freeze_feature_encoder=args.freeze_feature_encoder)
    model = replace(
        cfg.model, audio_dim=dims["audio"], vision_dim=dims["vision"], text_dim=dims["text"]
    )
    return replace(cfg, mode=mode, model=model, finetune=ft).validate()


def finetune_runner(
    name: str,
    what: str,
    args,
    audio: nn.Module,
    text: nn.Module,
    vision_dim: int,
    checkpointing: bool,
    frozen: str,
) -> Runner:
    cfg = fusion_config(
        args, "finetune", {"audio": audio.dim, "vision": vision_dim, "text": text.dim}
    )
    cfg = replace(cfg, finetune=replace(cfg.finetune, gradient_checkpointing=checkpointing))
    cfg = backbone_sizes(cfg, audio, text)
    configure_backbones(cfg, audio, text)  # freezing + checkpointing, as load_backbones does
    model = FinetuneModel(audio, text, build_model(cfg))
    batch = finetune_batch(
        args.batch_size, args.seconds, vision_dim, len(cfg.data.emotions), args.seed
    )
    return Runner(name, what, cfg, model, batch, frozen=frozen)


def frozen_runner(name: str, what: str, args, dims: dict[str, int], audio_frames: int) -> Runner:
    cfg = fusion_config(args, "frozen", dims)
    batch = frozen_batch(
        args.batch_size, audio_frames, dims, args.seconds, len(cfg.data.emotions), args.seed
    )
    return Runner(name, what, cfg, build_model(cfg), batch)


def build_runners(args: argparse.Namespace) -> list[Runner]:
    from taemi.backbones.profiles import load_audio_backbone
    from taemi.backbones.text import load_text_backbone

    torch.manual_seed(args.seed)
    S = torch.tensor([round(args.seconds * SAMPLE_RATE)])
    t0 = time.perf_counter()
    audio = load_audio_backbone("offline", window="clip", max_seconds=12.0)
    text = load_text_backbone("offline")
    print(
        f"offline backbones loaded in {time.perf_counter() - t0:.1f} s: {audio.name}; {text.name}"
    )
    t_a = int(audio.num_frames(S)[0])
    off = {"audio": audio.dim, "vision": OFFLINE_VISION_DIM, "text": text.dim}
    audio_ckpt, text_ckpt = copy.deepcopy(audio), copy.deepcopy(text)
    runners = [
        frozen_runner(
            "frozen_offline", f"fusion on stored features {tuple(off.values())}", args, off, t_a
        ),
        finetune_runner(
            "finetune_offline",
            "Whisper tiny.en (clip window 12 s) + MiniLM-L6 + fusion",
            args,
            audio,
            text,
            OFFLINE_VISION_DIM,
            False,
            "frozen_offline",
        ),
        finetune_runner(
            "finetune_offline_ckpt",
            "the same, gradient checkpointing in both backbones",
            args,
            audio_ckpt,
            text_ckpt,
            OFFLINE_VISION_DIM,
            True,
            "frozen_offline",
        ),
    ]
    if not args.skip_paper:
        t0 = time.perf_counter()
        p_audio, p_text = paper_backbones(text.tokenizer)
        print(f"paper-size backbones built (random weights) in {time.perf_counter() - t0:.1f} s")
        t_a = int(p_audio.num_frames(S)[0])
        pap = {"audio": p_audio.dim, "vision": PAPER_VISION_DIM, "text": p_text.dim}
        more = (
            [copy.deepcopy(p_audio), copy.deepcopy(p_text)] if args.gradient_checkpointing else []
        )
        runners += [
            frozen_runner(
                "frozen_paper", f"fusion on stored features {tuple(pap.values())}", args, pap, t_a
            ),
            finetune_runner(
                "finetune_paper",
                "wav2vec2-large-robust-12 + GTE-base-size BERT (random) + fusion",
                args,
                p_audio,
                p_text,
                PAPER_VISION_DIM,
                False,
                "frozen_paper",
            ),
        ]
        if more:
            runners.append(
                finetune_runner(
                    "finetune_paper_ckpt",
                    "the same, gradient checkpointing in both backbones",
                    args,
                    *more,
                    PAPER_VISION_DIM,
                    True,
                    "frozen_paper",
                )
            )
    return runners


def run(runners: list[Runner], args: argparse.Namespace) -> None:
    """``--warmup`` untimed rounds, then ``--steps`` timed rounds: one step of each runner per round."""
    for rnd in range(args.warmup + args.steps):
        timed = rnd >= args.warmup
        parts = []
        for r in runners:
            w0, c0 = time.perf_counter(), time.process_time()
            loss = r.step()
            wall, cpu = time.perf_counter() - w0, time.process_time() - c0
            if not math.isfinite(loss):
                raise RuntimeError(f"{r.name}: the loss is {loss} at round {rnd + 1}")
            if timed:
                r.step_s.append(wall)
                r.cpu_s.append(cpu)
                r.phases.append(r.last_phases)
            parts.append(f"{r.name} {wall:.2f}s")
        label = (
            f"round {rnd + 1 - args.warmup}/{args.steps}"
            if timed
            else f"warm-up {rnd + 1}/{args.warmup}"
        )
        print(f"  {label}: " + ", ".join(parts), flush=True)


def measure_memory(runners: list[Runner], device: torch.device) -> None:
    """One more (untimed) step per runner, every runner's gradients freed first: the peak
    memory it adds over the weights and AdamW state by the end of backward (activations,
    gradients) and over the whole step (+ clipping and AdamW temporaries)."""
    for r in runners:
        r.optimizer.zero_grad(set_to_none=True)
    mem = StepMemory(device)
    for r in runners:
        gc.collect()
        before = mem.start()
        backward_peak: list[int | None] = []
        r.step(after_backward=lambda out=backward_peak: out.append(mem.peak()))
        peak = mem.peak()
        r.optimizer.zero_grad(set_to_none=True)
        if before is not None and peak is not None and backward_peak[0] is not None:
            r.backward_adds, r.step_adds = backward_peak[0] - before, peak - before


def paired_ratio(a: Runner, b: Runner) -> float:
    """Median over rounds of samples/s(a) / samples/s(b)."""
    return statistics.median(
        (a.batch_size / x) / (b.batch_size / y) for x, y in zip(a.step_s, b.step_s)
    )


def report(runners: list[Runner], device: torch.device) -> None:
    mib = 1 << 20
    by = {r.name: r for r in runners}
    kind = "CUDA memory allocated" if device.type == "cuda" else "RSS"

    def m(x: int | None) -> str:
        return "n/a" if x is None else f"{x / mib:.0f}"

    print(
        f"\n{'runner':<22} {'batch':>5} {'s/step':>7} {'samples/s':>9} {'x frozen':>8} {'paired':>7} "
        f"{'trainable':>10} {'backbones':>10} {'w+Adam MiB':>10} {'bwd+ MiB':>8} {'step+ MiB':>9} "
        f"{'sum MiB':>8} {'epoch h':>8} {'CPU share':>9}"
    )
    for r in runners:
        ref = by.get(r.frozen) if r.frozen else None
        x = f"{r.samples_s / ref.samples_s:.3f}" if ref else "-"
        paired = f"{paired_ratio(r, ref):.3f}" if ref else "-"
        total = None if r.step_adds is None else r.state_bytes + r.step_adds
        epoch_h = EPOCH_CLIPS / r.samples_s / 3600
        share = (
            sum(r.cpu_s) / sum(r.step_s) / torch.get_num_threads()
            if device.type == "cpu"
            else float("nan")
        )
        print(
            f"{r.name:<22} {r.batch_size:>5} {r.median_step:>7.3f} {r.samples_s:>9.3f} {x:>8} {paired:>7} "
            f"{r.trainable / 1e6:>9.2f}M {r.trainable_backbones / 1e6:>9.2f}M {m(r.state_bytes):>10} "
            f"{m(r.backward_adds):>8} {m(r.step_adds):>9} {m(total):>8} {epoch_h:>8.2f} {share:>9.2f}"
        )
    print(
        f"\ns/step: median over the timed steps; samples/s = batch / s/step; x frozen: samples/s over the "
        f"frozen runner's of the same sizes; paired: the median of that ratio per round; trainable: parameters "
        f"with gradients (backbones: of which in the backbones); w+Adam: parameters + AdamW moments (float32); "
        f"bwd+ / step+: the peak {kind} by the end of backward / over the whole step, minus the {kind} before "
        f"the step (gradients freed); sum: w+Adam + step+; epoch h: hours for {EPOCH_CLIPS:,} clips at this "
        f"samples/s (batch as timed); CPU share: process CPU s / wall s / threads."
    )
    print(f"\n{'runner':<22} {'forward s':>14} {'backward s':>14} {'optimiser s':>14}")
    for r in runners:
        med = [statistics.median(p[i] for p in r.phases) for i in range(3)]
        cells = [f"{v:.3f} ({v / sum(med):.0%})" for v in med]
        print(f"{r.name:<22} " + " ".join(f"{c:>14}" for c in cells))
    print(
        "medians over the timed steps (share of their sum); forward includes the batch transfer and the "
        "loss; optimiser = unscale_ + clip_grad_value_ + AdamW + scheduler.\n"
    )
    for r in runners:
        print(f"  {r.name}: {r.what}")
    for a, b in (
        ("finetune_offline_ckpt", "finetune_offline"),
        ("finetune_paper_ckpt", "finetune_paper"),
    ):
        if a in by and b in by:
            A, B = by[a], by[b]
            line = (
                f"gradient checkpointing ({a} vs {b}): samples/s x{paired_ratio(A, B):.3f} (paired)"
            )
            if A.backward_adds is not None and B.backward_adds is not None:
                line += (
                    f"; memory by the end of backward {m(A.backward_adds)} vs {m(B.backward_adds)} MiB "
                    f"(x{A.backward_adds / B.backward_adds:.2f}), whole step {m(A.step_adds)} vs "
                    f"{m(B.step_adds)} MiB"
                )
            print(line)


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N")
    ap.add_argument(
        "--precision",
        default="auto",
        choices=("auto", "fp32", "bf16", "fp16"),
        help="auto: fp16 (+ GradScaler) on CUDA, fp32 on CPU, as the trainer resolves it",
    )
    ap.add_argument(
        "--batch-size", type=int, default=2, help="clips per step, every runner (default 2)"
    )
    ap.add_argument("--steps", type=int, default=3, help="timed steps per runner, one per round")
    ap.add_argument("--warmup", type=int, default=1, help="untimed rounds first")
    ap.add_argument(
        "--seconds", type=float, default=6.9, help="clip length in s (default: the corpus mean 6.9)"
    )
    ap.add_argument(
        "--freeze-feature-encoder",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="keep the audio backbones' conv front end fixed (the finetune config's default)",
    )
    ap.add_argument(
        "--gradient-checkpointing",
        action="store_true",
        help="also time the paper configuration with gradient checkpointing (offline: always both)",
    )
    ap.add_argument("--skip-paper", action="store_true", help="leave out the paper-size runners")
    ap.add_argument("--preset", default="paper", help="fusion model preset (default paper)")
    ap.add_argument("--threads", type=int, help="torch.set_num_threads (default: torch's choice)")
    ap.add_argument("--seed", type=int, default=3407)
    args = ap.parse_args()
    if not 0 < args.seconds <= 12.0:
        ap.error(
            f"--seconds must be in (0, 12] (the backbones keep the first 12 s), got {args.seconds}"
        )
    if args.batch_size < 1 or args.steps < 1 or args.warmup < 0:
        ap.error("--batch-size and --steps must be >= 1, --warmup >= 0")
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        device = resolve_device(args.device)
        precision = resolve_precision(args.precision, device)
    except ConfigError as exc:
        ap.error(str(exc))

    import transformers

    transformers.logging.set_verbosity_error()  # the load report of MiniLM's unused pooler
    transformers.logging.disable_progress_bar()
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_name()
    print(
        f"torch {torch.__version__}, transformers {transformers.__version__}, {where}, {os.cpu_count()} CPUs, "
        f"torch threads {torch.get_num_threads()}; device {device}, precision {precision}; load average "
        f"{' '.join(f'{x:.2f}' for x in os.getloadavg())}"
    )
    print(
        f"batch {args.batch_size} clips of {args.seconds} s ({round(args.seconds * SAMPLE_RATE)} samples, vision "
        f"{vision_frames(args.seconds)} frames, ~{round(WORDS_PER_SECOND * args.seconds)} words); preset "
        f"{args.preset}; feature encoder {'frozen' if args.freeze_feature_encoder else 'trained'}; "
        f"{args.warmup} warm-up + {args.steps} timed rounds"
    )
    runners = build_runners(args)
    for r in runners:
        r.setup(device, precision)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    run(runners, args)
    print(
        f"load average at end {' '.join(f'{x:.2f}' for x in os.getloadavg())}; {process_peak(device)} "
        f"(all runners' models in one process)"
    )
    measure_memory(runners, device)
    report(runners, device)


if __name__ == "__main__":
    main()
