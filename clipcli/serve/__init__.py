"""A warm model server for one-liners: ``clipcli serve`` and the client ``embed-*`` use.

- :mod:`clipcli.serve.protocol`: framing, socket naming and the private runtime directory
  (standard library and numpy only);
- :mod:`clipcli.serve.client`: finding and talking to a server (no torch, transformers or PIL:
  a client one-liner starts in a fraction of a second);
- :mod:`clipcli.serve.server`: the server loop, the request batcher (imports the pipeline; the
  model itself is handed in).

This package's ``__init__`` imports nothing, so the client stays light.
"""
