"""``mtl serve``: a trained variant behind HTTP (FastAPI on uvicorn), answering every task for
each row through the prediction path of ``mtl predict``.

- ``release``: the model files a server loads, copied into one folder that is swapped in whole,
  by ``mtl serve`` as it starts, by ``POST /reload`` and by the nightly flow;
- ``model``: a release -> a ``Served`` model (torch module or ONNX file) and its metadata;
- ``schema``: the request and response types, built from the model's columns;
- ``batching``: the queue that gathers the rows of concurrent requests into one pass;
- ``app``: the FastAPI application of one worker process;
- ``server``: the command's checks, and uvicorn.
"""
