"""Serving: an OpenAI-compatible HTTP server (`app`) over an engine of slots that requests join and leave between
decode steps (`engine`), with the contract between them (`requests`), the API's bodies (`protocol`), incremental
text and stop strings (`text`), Prometheus metrics (`metrics`) and the playground page (`static/`)."""

from etils import epy

with epy.lazy_api_imports(globals()):
    from recurrent_depth.serving.app import BackgroundServer, create_app
    from recurrent_depth.serving.engine import Engine
    from recurrent_depth.serving.requests import (
        DepthParams,
        Done,
        QueueFull,
        Request,
        RequestError,
        SamplingParams,
        Token,
    )
