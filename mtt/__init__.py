"""mtt: Dataset Distillation by Matching Training Trajectories (Cazenavette et al., CVPR 2022)."""

__version__ = "0.2.0"
