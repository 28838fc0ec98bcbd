"""Configuration: defaults (the manual), loading with BiaPy compatibility, checks, and derived values."""
from biapy.config.checks import check_config, ndim_of
from biapy.config.defaults import get_defaults
from biapy.config.derived import finalize
from biapy.config.load import dump_config, load_config

__all__ = ["check_config", "dump_config", "finalize", "get_defaults", "load_config", "ndim_of"]
