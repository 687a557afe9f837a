"""Fine-tuning ST-LLM as the original does: the objective (dynamic video-token masking + MVM + LM loss), a typed
training config, clip augmentation ('rand' frames + RandomResizedCrop) and the training loop. The loop takes
decoded samples from its caller (`pipeline.training.train` reads a manifest through the pipeline's own decoders)."""

from stllm.training.objective import TrainingLoss, keep_index, sample_mask_ratio, training_loss

__all__ = ["TrainingLoss", "keep_index", "sample_mask_ratio", "training_loss"]
