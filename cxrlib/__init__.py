"""cxrlib: the package behind the M4CXR notebooks.

Modules: ``config`` (presets), ``constants`` (prompt strings, labels), ``data`` (reports, PhantomCXR,
instruction dataset), ``model`` (encoder, C-Abstractor, Mistral + LoRA), ``tokenizer``, ``train``,
``inference``, ``labeler``, ``metrics``, ``evaluate``, ``plotting``, ``notebook``, ``utils``.
"""

__version__ = "0.1.0"
