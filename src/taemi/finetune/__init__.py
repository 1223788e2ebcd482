"""End-to-end fine-tuning (``taemi train --mode finetune``): trainable audio and text
backbones run on raw waveforms and transcripts jointly with the fusion model (docs/method.md
section 6: "the audio backbone and the GTE text encoder are fine-tuned end to end").
"""
