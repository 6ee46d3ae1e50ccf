"""bsfind: a batch-size advisor for PyTorch training.

    from bsfind import load_spec, recommend
    report = recommend(load_spec("configs/digits-mlp.yaml"))
"""

__version__ = "0.1.0"

from bsfind.api import measure, measure_noise_scale, recommend  # noqa: E402
from bsfind.report import Report, to_dict  # noqa: E402
from bsfind.results import NoiseEstimate, Recommendation  # noqa: E402
from bsfind.spec import load_spec, spec_from_dict  # noqa: E402

__all__ = [
    "NoiseEstimate",
    "Recommendation",
    "Report",
    "__version__",
    "load_spec",
    "measure",
    "measure_noise_scale",
    "recommend",
    "spec_from_dict",
    "to_dict",
]
