__version__ = "0.1.0"


def __getattr__(name):
    # vla_nb.load_pretrained('tabletop') without importing torch at `import vla_nb`: the model loads on first use.
    if name == 'load_pretrained':
        from .model import load_pretrained

        return load_pretrained
    raise AttributeError(f"module 'vla_nb' has no attribute {name!r}")
