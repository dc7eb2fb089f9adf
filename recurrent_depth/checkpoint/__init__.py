"""Checkpoints: the released Hugging Face format in and out, parameter checkpoints, train-state checkpoints, and
`load_model`, which opens any of them."""

from etils import epy

with epy.lazy_api_imports(globals()):
    from recurrent_depth.checkpoint.huggingface import from_huggingface, to_huggingface
    from recurrent_depth.checkpoint.loading import load_model, load_model_config
    from recurrent_depth.checkpoint.params import load_params, param_shardings, save_params
    from recurrent_depth.checkpoint.train_state import TrainCheckpointer
