"""3D Gaussian splatting: the model (a dreamlab Renderer), the pure-PyTorch rasterizer, densify strategy.

``reference`` (the brute-force rasterizer) is for tests and is not imported here.
"""

from dreamlab.renderers.gaussians.model import (
    GaussianConfig,
    GaussianRenderer,
    SplatArrays,
    eval_sh,
)
from dreamlab.renderers.gaussians.rasterize import (
    RasterAux,
    project_gaussians,
    rasterize_gaussians,
    select_backend,
)
from dreamlab.renderers.gaussians.strategy import (
    DensifyConfig,
    DensifyReport,
    DensifyStrategy,
    replace_rows,
)

__all__ = [
    "DensifyConfig",
    "DensifyReport",
    "DensifyStrategy",
    "GaussianConfig",
    "GaussianRenderer",
    "RasterAux",
    "SplatArrays",
    "eval_sh",
    "project_gaussians",
    "rasterize_gaussians",
    "replace_rows",
    "select_backend",
]
