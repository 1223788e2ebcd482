"""taemi: text-anchored multimodal fusion for emotional mimicry intensity.

Implements TAEMI (Zhu et al., "Anchoring Emotions in Text: Robust Multimodal
Fusion for Mimicry Intensity Estimation", arXiv 2603.14976, ABAW 10th EMI
track, first place).

``import taemi`` is light: torch and the heavy parts load only when used.
"""

__version__ = "0.1.0"

#: The six emotions of the ABAW EMI (Hume-Vidmimic2) challenge, in label-file order.
EMI_EMOTIONS: tuple[str, ...] = (
    "Admiration",
    "Amusement",
    "Determination",
    "Empathic Pain",
    "Excitement",
    "Joy",
)

#: Modality names, in the order used for missing flags everywhere: (audio, vision, text).
MODALITIES: tuple[str, ...] = ("audio", "vision", "text")

__all__ = ["EMI_EMOTIONS", "MODALITIES", "__version__"]
