"""ringserve's model side: config, decoder, rolling KV cache, loaders, tokenizers, engine.

Nothing here imports Ray; the serving layer lives in ``app/``.
"""
