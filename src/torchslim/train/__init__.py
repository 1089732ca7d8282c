"""The small training loops the transforms need: fine-tuning and baseline training."""
