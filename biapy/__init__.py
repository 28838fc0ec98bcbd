"""Self-supervised pretraining for 2D/3D microscopy images, BiaPy-compatible.

    from biapy import BiaPy
    BiaPy("config.yaml", result_dir="out", name="demo", run_id=1).run_job()
"""
__version__ = "0.1.0"


def __getattr__(name):
    # Lazy: `import biapy.config` stays cheap (no torch import) for config tooling and tests.
    if name == "BiaPy":
        from biapy.runner import BiaPy
        return BiaPy
    raise AttributeError(name)


__all__ = ["BiaPy", "__version__"]
