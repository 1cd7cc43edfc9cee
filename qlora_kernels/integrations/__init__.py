"""Bridges to the Hugging Face stack: `transformers` (a quantizer for ``from_pretrained``) and `peft`
(LoRA layers on `QuantLinear`). Each module imports its peer library, so nothing here is imported
by ``import qlora_kernels``; ``qlora_kernels.QLoRAKernelsConfig`` loads the transformers one on use."""
