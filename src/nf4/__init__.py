"""nf4: NF4 (4-bit NormalFloat) quantization, byte-compatible with bitsandbytes, in PyTorch and Triton."""

from nf4.format import FormatError, QuantizedTensor, dequantize, double_quantize, quantize

__all__ = ["FormatError", "QuantizedTensor", "dequantize", "double_quantize", "quantize"]
__version__ = "0.1.0"
