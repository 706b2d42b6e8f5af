"""3D representations that can be rendered differentiably (installed as ``dreamlab.renderers``)."""
