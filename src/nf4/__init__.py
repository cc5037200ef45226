"""nf4: NF4 (4-bit NormalFloat) quantization, byte-compatible with bitsandbytes, in PyTorch and Triton."""

from nf4.format import FormatError, QuantizedTensor, concat, dequantize, double_quantize, quantize

__all__ = ["FormatError", "QuantizedTensor", "concat", "dequantize", "double_quantize", "quantize"]
__version__ = "0.1.0"
from nf4.checkpoint import from_pretrained, load_float, load_tokenizer, save_pretrained  # noqa: E402
from nf4.nn import LinearNF4, fuse_projections, quantize_model  # noqa: E402

__all__ += [
    "LinearNF4",
    "from_pretrained",
    "fuse_projections",
    "load_float",
    "load_tokenizer",
    "quantize_model",
    "save_pretrained",
]
from nf4.lora import LoraConfig, add_lora, load_adapter, merge_lora, save_adapter  # noqa: E402
from nf4.train import TrainArgs, finetune  # noqa: E402

__all__ += ["LoraConfig", "TrainArgs", "add_lora", "finetune", "load_adapter", "merge_lora", "save_adapter"]
