"""3D Gaussian splatting: model, pure-PyTorch rasterizer, densify strategy."""
