"""vlwb: a notebook-first workbench for vision-language alignment research."""
__version__ = "0.1.0"

def __getattr__(name):
    # `vlwb.load(path)` and `vlwb.create_model(spec)` without importing torch at `import vlwb`
    if name in ("load", "create_model"):
        from vlwb import models
        return getattr(models, name)
    raise AttributeError(f"module 'vlwb' has no attribute {name!r}")
