"""Decoding: token-by-token generation with a KV cache, adaptive exit and self-speculation, the parallel sampler,
and chat sessions on top of them; sampling, exit criteria and the cache are their parts."""

from etils import epy

with epy.lazy_api_imports(globals()):
    from recurrent_depth.decoding.chat_session import ChatSession
    from recurrent_depth.decoding.generate import (
        GenerateOutput,
        SpeculativeOutput,
        generate,
        lower_generate,
        speculative_generate,
    )
    from recurrent_depth.decoding.parallel import ParallelOutput, parallel_generate
