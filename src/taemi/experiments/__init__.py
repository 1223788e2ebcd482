"""Experiments over trained runs and the training recipe: the paper's ablation grid
(:mod:`~taemi.experiments.ablate`), the robustness suite (:mod:`~taemi.experiments.robustness`),
paired comparison of two runs (:mod:`~taemi.experiments.compare`) and reports
(:mod:`~taemi.experiments.report`)."""
