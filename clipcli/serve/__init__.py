"""A warm model server for one-liners: ``clipcli serve`` and the client ``embed-*`` use.

- :mod:`clipcli.serve.protocol`: framing, socket naming and the private runtime directory
  (standard library and numpy only);
- :mod:`clipcli.serve.client`: finding and talking to a server (no torch, transformers or PIL:
  a client one-liner starts in a fraction of a second);
- :mod:`clipcli.serve.server`: listening, accepting within the slot limits, status, shutdown;
- :mod:`clipcli.serve.limits`: the options, connection pools and request checks (sizes,
  counts, text lengths) applied before memory or model time is spent;
- :mod:`clipcli.serve.connection`: one connection: the TCP token first, then requests;
- :mod:`clipcli.serve.session`: one embed conversation through the shared pipeline, with
  tokenizing taken in turns;
- :mod:`clipcli.serve.batcher`: the model thread, merging and (while others wait) splitting
  forward batches.

This package's ``__init__`` imports nothing, so the client stays light.
"""
