"""Everything clipcli knows about models: families, checkpoint layouts, loading, forward passes.

- :mod:`clipcli.model.runtime`: torch/transformers plumbing (quiet loading, devices, dtypes).
- :mod:`clipcli.model.family`: what a model family is, and the registry of families.
- :mod:`clipcli.model.clip`, :mod:`clipcli.model.siglip`: one module per family.
- :mod:`clipcli.model.loading`: configs, towers (every published layout), processors,
  tokenizers, int8 and compile.
- :mod:`clipcli.model.forward`: chunked forward passes with out-of-memory back-off.

Nothing here prints; errors are ``clipcli.errors`` exceptions.
"""
