"""dreamlab's procedural 3-D world: the objects, exact renders and training data of the builtin prior.

* :mod:`dreamlab.world.catalog` — words (colours, shapes, composites), prompt grammar, parts.
* :mod:`dreamlab.world.sdf` — exact signed distance functions of every object.
* :mod:`dreamlab.world.render` — ground-truth sphere-traced renders (Lambert shading).
* :mod:`dreamlab.world.dataset` — the cached training views and caption/batch sampling.

See docs/world.md.
"""

from dreamlab.world.catalog import (
    COLOURS,
    COMPOSITES,
    PRIMITIVES,
    SHAPES,
    VOCABULARY,
    ObjectSpec,
    PromptFormatError,
    UnknownWordError,
    all_object_specs,
    benchmark_prompts,
    canonical_prompt,
    caption,
    front_parts,
    has_front,
    parse_prompt,
    parse_prompt_with_view,
    part_names,
)
from dreamlab.world.render import (
    GroundTruth,
    colourize,
    default_light_dir,
    part_albedos,
    render_ground_truth,
)

__all__ = [
    "COLOURS",
    "COMPOSITES",
    "PRIMITIVES",
    "SHAPES",
    "VOCABULARY",
    "GroundTruth",
    "ObjectSpec",
    "PromptFormatError",
    "UnknownWordError",
    "all_object_specs",
    "benchmark_prompts",
    "canonical_prompt",
    "caption",
    "colourize",
    "default_light_dir",
    "front_parts",
    "has_front",
    "parse_prompt",
    "parse_prompt_with_view",
    "part_albedos",
    "part_names",
    "render_ground_truth",
]
