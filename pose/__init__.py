"""Pose extraction and preparation for SteadyDancer (DWPose, alignment, augmentation, rendering).

Plain Python/NumPy/PyTorch; nothing here imports ComfyUI, nothing heavy happens at import.
"""
