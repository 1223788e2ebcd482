"""Pretrained models by family (docs/method.md section 3), each frozen encoder next to its
trainable form.

- :mod:`.base`: one small interface per role of extraction, :class:`~.base.ModelLoadError`,
  ``SAMPLE_RATE``, the remote-code refusal and small shared checks.
- :mod:`.weights`: where weights come from and how they are pinned (the packaged offline
  models and their SHA-256; Hugging Face hub ids and local folders, downloads off).
- :mod:`.trainable`: what the trainable backbones share (:class:`~.trainable.AudioBackbone`).
- families: :mod:`.whisper`, :mod:`.wav2vec2`, :mod:`.dinov2`, :mod:`.vit`, :mod:`.text`.
- :mod:`.profiles`: which model fills each role in the ``offline`` and ``paper`` profiles.

Importing this package loads nothing heavy; a family module imports its libraries.
"""
