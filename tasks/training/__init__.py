"""What fine-tuning trains and how: the LoRA adapter, checkpoints, the training loop and device
choice. Imports the packages below it.
"""
