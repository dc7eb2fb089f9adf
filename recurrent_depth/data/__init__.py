"""Data: tokenizers and the chat template, sources, packing and the dataset pipeline, the generated tasks (shell
game, synthetic), the offline corpus; it owns the batch contract (keys, the ignore index) that training consumes."""

from etils import epy

with epy.lazy_api_imports(globals()):
    from recurrent_depth.data.batch import BATCH_KEYS, IGNORE_INDEX
    from recurrent_depth.data.chat_template import render_chat
    from recurrent_depth.data.pipeline import make_dataset
    from recurrent_depth.data.prepare import prepare
    from recurrent_depth.data.tokenizer import Tokenizer, load_tokenizer
