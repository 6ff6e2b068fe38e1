"""Whole decoders on the spec: GPT-2 and Llama/Mistral, generating with or without a cache.

Pure array-API code: parameters are a dict of arrays of any library, and the
attention is ``refattn.attention`` over refattn's caches. ``from_hf`` copies
a Hugging Face model's weights (no framework is imported here; the model
brings its own).
"""

from refattn.caches import KINDS
from refattn.models.cache import LayerCaches
from refattn.models.decoder import Decoder
from refattn.models.gpt import GPT, GPTConfig
from refattn.models.hf import from_hf
from refattn.models.llama import Llama, LlamaConfig

__all__ = ["GPT", "KINDS", "Decoder", "GPTConfig", "LayerCaches", "Llama", "LlamaConfig", "from_hf"]
