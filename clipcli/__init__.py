"""clipcli: CLIP embeddings for images and texts, from the shell or from Python.

The library API (the CLI is a thin layer over it)::

    from clipcli import Encoder, embed_images, embed_texts, ImageLoader, Writer

    enc = Encoder("openai/clip-vit-base-patch32", feature="projected", normalize=True)
    vectors = enc.encode_texts(["a photo of a cat"])          # (1, 512) float32
    for batch in embed_images(["cat.jpg", "https://example.com/dog.png"], enc, ImageLoader()):
        ...  # lists of Embedded(source, vector) / Failed(source, stage, reason), in input order

Heavy modules (torch, transformers) are imported only when a model is used.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

__all__ = [
    "ClipcliError",
    "Embedded",
    "Encoder",
    "Failed",
    "ImageLoader",
    "InputError",
    "ModelError",
    "PreprocessSpec",
    "Settings",
    "TextItem",
    "UsageError",
    "Writer",
    "__version__",
    "embed_images",
    "embed_texts",
]

_LAZY = {
    "Encoder": "clipcli.encoder",
    "Embedded": "clipcli.pipeline",
    "Failed": "clipcli.pipeline",
    "ImageLoader": "clipcli.pipeline",
    "TextItem": "clipcli.pipeline",
    "embed_images": "clipcli.pipeline",
    "embed_texts": "clipcli.pipeline",
    "PreprocessSpec": "clipcli.preprocess",
    "Settings": "clipcli.settings",
    "Writer": "clipcli.writers",
    "ClipcliError": "clipcli.errors",
    "InputError": "clipcli.errors",
    "ModelError": "clipcli.errors",
    "UsageError": "clipcli.errors",
}

if TYPE_CHECKING:
    from clipcli.encoder import Encoder
    from clipcli.errors import ClipcliError, InputError, ModelError, UsageError
    from clipcli.pipeline import Embedded, Failed, ImageLoader, TextItem, embed_images, embed_texts
    from clipcli.preprocess import PreprocessSpec
    from clipcli.settings import Settings
    from clipcli.writers import Writer


def __getattr__(name: str) -> Any:
    # Lazy: `import clipcli` stays instant; the heavy parts load on first use.
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'clipcli' has no attribute {name!r}")
