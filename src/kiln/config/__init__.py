"""kiln.yaml: schema, loading, defaults and precise validation errors.

Use :func:`load_project` to read a project; it raises one :class:`ConfigError`
listing every problem (file, line, field, fix) or returns a :class:`Project`
whose paths are absolute and whose defaults are filled in.
"""

from kiln.config.errors import ConfigError, ConfigIssue
from kiln.config.loader import CONFIG_NAMES, find_config_file, load_project
from kiln.config.project import Project
from kiln.config.schema import (
    RESERVED_NAMES,
    RUNTIMES,
    ApiSpec,
    Auth,
    Autoscaling,
    BatchApiSpec,
    Batching,
    Compute,
    Deployment,
    OnnxBlock,
    PredictorBlock,
    PythonBlock,
    ServingOptions,
    SklearnBlock,
    TensorflowBlock,
    TorchBlock,
    Tracker,
)
from kiln.quantities import parse_bytes, parse_cpu, parse_duration

__all__ = [
    "CONFIG_NAMES",
    "RESERVED_NAMES",
    "RUNTIMES",
    "ApiSpec",
    "Auth",
    "Autoscaling",
    "BatchApiSpec",
    "Batching",
    "Compute",
    "ConfigError",
    "ConfigIssue",
    "Deployment",
    "OnnxBlock",
    "PredictorBlock",
    "Project",
    "PythonBlock",
    "ServingOptions",
    "SklearnBlock",
    "TensorflowBlock",
    "TorchBlock",
    "Tracker",
    "find_config_file",
    "load_project",
    "parse_bytes",
    "parse_cpu",
    "parse_duration",
]
