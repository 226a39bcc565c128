"""Tokenizers: sentencepiece ``tokenizer.model``, HF ``tokenizer.json`` and GGUF vocabularies.

:func:`load_tokenizer` picks the kind from what a checkpoint holds (loading.py). Every kind is a
:class:`Tokenizer` (base.py): sentencepiece_vocab.py runs a ``tokenizer.model``; hf_vocab.py runs
the ``tokenizers`` library, for a tokenizer.json or the byte-level BPE that gguf_vocab.py
rebuilds from GGUF metadata; templates.py finds and checks a checkpoint's chat template.
"""

from model.tokenizers.base import Tokenizer, TokenizerError, bytes_to_unicode
from model.tokenizers.hf_vocab import HFTokenizer
from model.tokenizers.loading import load_tokenizer
from model.tokenizers.sentencepiece_vocab import SentencePieceTokenizer

__all__ = ["HFTokenizer", "SentencePieceTokenizer", "Tokenizer", "TokenizerError",
           "bytes_to_unicode", "load_tokenizer"]
