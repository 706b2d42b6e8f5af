"""Exact geometry of the world's objects as signed distance functions (torch, batched over points).

Every function takes the point coordinates as three 1-D float tensors ``x, y, z`` (contiguous
tensors are much faster than strided columns of an ``[N, 3]`` array) and returns ``[N]``
distances, negative inside. Primitive SDFs are exact (Inigo Quilez's formulas, solids of
revolution via exact 2-D profile distances); unions are ``min`` and intersections ``max``, which
are exact outside or lower bounds of the distance — both safe for sphere tracing, and their zero
sets (the surfaces) are exact. The polyhedra (pyramid, octahedron) use the max of their face
planes: a lower bound off the surface, exact on it.

World conventions (dreamlab.types): Y up, the front faces +Z. Every object is centred near the
origin and lies inside a ball of radius ``WorldObject.bound_radius`` (<= 0.56); the sizes are
listed in docs/world.md.

Each object also maps surface points to part ids (``WorldObject.parts``): 0 = the body, > 0 =
features with fixed colours (``dreamlab.world.catalog.PARTS``).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import lru_cache

import torch
from torch import Tensor

from dreamlab.world.catalog import COMPOSITES, PRIMITIVES, SHAPES, num_parts

SDF = Callable[[Tensor, Tensor, Tensor], Tensor]


# ----------------------------------------------------------------------------- building blocks


def _length2(a: Tensor, b: Tensor) -> Tensor:
    return torch.sqrt(a * a + b * b)


def _length3(a: Tensor, b: Tensor, c: Tensor) -> Tensor:
    return torch.sqrt(a * a + b * b + c * c)


def sd_sphere(x: Tensor, y: Tensor, z: Tensor, centre=(0.0, 0.0, 0.0), radius: float = 0.5) -> Tensor:
    return _length3(x - centre[0], y - centre[1], z - centre[2]) - radius


def sd_box(x: Tensor, y: Tensor, z: Tensor, centre=(0.0, 0.0, 0.0), half=(0.5, 0.5, 0.5)) -> Tensor:
    """Exact distance to an axis-aligned box."""
    qx = (x - centre[0]).abs() - half[0]
    qy = (y - centre[1]).abs() - half[1]
    qz = (z - centre[2]).abs() - half[2]
    outside = _length3(qx.clamp_min(0.0), qy.clamp_min(0.0), qz.clamp_min(0.0))
    inside = torch.maximum(torch.maximum(qx, qy), qz).clamp_max(0.0)
    return outside + inside


def _combine_2d(a: Tensor, b: Tensor) -> Tensor:
    """Exact distance of an intersection of two orthogonal slabs-like distances (extrusion)."""
    return torch.maximum(a, b).clamp_max(0.0) + _length2(a.clamp_min(0.0), b.clamp_min(0.0))


def sd_cylinder_y(
    x: Tensor, y: Tensor, z: Tensor, centre=(0.0, 0.0, 0.0), radius=0.5, half_height=0.5
) -> Tensor:
    """Exact distance to a capped cylinder along Y."""
    dr = _length2(x - centre[0], z - centre[2]) - radius
    dy = (y - centre[1]).abs() - half_height
    return _combine_2d(dr, dy)


def sd_capsule(x: Tensor, y: Tensor, z: Tensor, a, b, radius: float) -> Tensor:
    """Exact distance to the capsule around segment a-b."""
    bax, bay, baz = b[0] - a[0], b[1] - a[1], b[2] - a[2]
    pax, pay, paz = x - a[0], y - a[1], z - a[2]
    inv = 1.0 / (bax * bax + bay * bay + baz * baz)
    h = ((pax * bax + pay * bay + paz * baz) * inv).clamp(0.0, 1.0)
    return _length3(pax - bax * h, pay - bay * h, paz - baz * h) - radius


def sd_torus_y(
    x: Tensor, y: Tensor, z: Tensor, centre=(0.0, 0.0, 0.0), major=0.35, minor=0.12
) -> Tensor:
    """Exact distance to a torus lying flat (its hole along Y)."""
    q = _length2(x - centre[0], z - centre[2]) - major
    return _length2(q, y - centre[1]) - minor


def sd_torus_z(
    x: Tensor, y: Tensor, z: Tensor, centre=(0.0, 0.0, 0.0), major=0.35, minor=0.12
) -> Tensor:
    """Exact distance to a torus standing in the XY plane (its hole along Z)."""
    q = _length2(x - centre[0], y - centre[1]) - major
    return _length2(q, z - centre[2]) - minor


def sd_polygon(u: Tensor, v: Tensor, vertices: Sequence[tuple[float, float]]) -> Tensor:
    """Exact signed distance to a simple 2-D polygon (Quilez's sdPolygon), negative inside."""
    ax0, ay0 = vertices[0]
    d2 = (u - ax0) ** 2 + (v - ay0) ** 2
    inside = torch.zeros(u.shape, dtype=torch.bool, device=u.device)
    n = len(vertices)
    for i in range(n):
        ax, ay = vertices[i]
        bx, by = vertices[i - 1]
        ex, ey = bx - ax, by - ay
        wx, wy = u - ax, v - ay
        t = ((wx * ex + wy * ey) * (1.0 / (ex * ex + ey * ey))).clamp(0.0, 1.0)
        dx, dy = wx - ex * t, wy - ey * t
        d2 = torch.minimum(d2, dx * dx + dy * dy)
        c1 = v >= ay
        c2 = v < by
        c3 = ex * wy > ey * wx
        inside ^= (c1 & c2 & c3) | ~(c1 | c2 | c3)
    dist = torch.sqrt(d2)
    return torch.where(inside, -dist, dist)


def sd_cone_y(x: Tensor, y: Tensor, z: Tensor, base_y: float, tip_y: float, radius: float) -> Tensor:
    """Exact distance to a solid cone along Y (base disc at ``base_y``, apex at ``tip_y``)."""
    rho = _length2(x, z)
    return sd_polygon(rho, y, [(-radius, base_y), (radius, base_y), (0.0, tip_y)])


def sd_cone_z(
    x: Tensor, y: Tensor, z: Tensor, axis_xy, base_z: float, tip_z: float, radius: float
) -> Tensor:
    """Exact distance to a solid cone along Z through (axis_xy[0], axis_xy[1])."""
    rho = _length2(x - axis_xy[0], y - axis_xy[1])
    return sd_polygon(rho, z, [(-radius, base_z), (radius, base_z), (0.0, tip_z)])


def sd_square_pyramid(
    x: Tensor, y: Tensor, z: Tensor, base_y: float, tip_y: float, half: float
) -> Tensor:
    """Square pyramid (base half-side ``half`` at ``base_y``): max of its five face planes."""
    h = tip_y - base_y
    inv = 1.0 / math.hypot(h, half)
    yy = (y - base_y) * half - half * h
    side_x = (x.abs() * h + yy) * inv
    side_z = (z.abs() * h + yy) * inv
    return torch.maximum(torch.maximum(side_x, side_z), base_y - y)


def sd_octahedron(x: Tensor, y: Tensor, z: Tensor, size: float) -> Tensor:
    """Regular octahedron with vertices at distance ``size`` on the axes: max of its face planes."""
    return (x.abs() + y.abs() + z.abs() - size) * (1.0 / math.sqrt(3.0))


# ----------------------------------------------------------------------------- objects


@dataclass(frozen=True)
class WorldObject:
    """One shape: SDF components (each belonging to one part), a bound and optional decals."""

    name: str
    components: tuple[SDF, ...]
    component_parts: tuple[int, ...]
    bound_radius: float
    """Radius of a ball at the origin containing the whole object (rays are clipped to it)."""
    decal: Callable[[Tensor, Tensor, Tensor, Tensor], Tensor] | None = None
    """(x, y, z, part) -> part: paints parts onto surface points (e.g. the mug's logo)."""

    @property
    def num_parts(self) -> int:
        return num_parts(self.name)

    def sdf(self, x: Tensor, y: Tensor, z: Tensor) -> Tensor:
        dist = self.components[0](x, y, z)
        for comp in self.components[1:]:
            dist = torch.minimum(dist, comp(x, y, z))
        return dist

    def sdf_points(self, points: Tensor) -> Tensor:
        """SDF of ``[N, 3]`` points."""
        p = points.float()
        return self.sdf(p[:, 0].contiguous(), p[:, 1].contiguous(), p[:, 2].contiguous())

    def parts(self, x: Tensor, y: Tensor, z: Tensor) -> Tensor:
        """Part id [N] (long) of the component nearest to each (surface) point."""
        if len(self.components) == 1:
            part = torch.zeros(x.shape, dtype=torch.long, device=x.device)
        else:
            dists = torch.stack([comp(x, y, z) for comp in self.components], dim=0)
            lookup = torch.tensor(self.component_parts, dtype=torch.long, device=x.device)
            part = lookup[dists.argmin(dim=0)]
        if self.decal is not None:
            part = self.decal(x, y, z, part)
        return part


def _unit(*v: float) -> tuple[float, ...]:
    n = math.sqrt(sum(c * c for c in v))
    return tuple(c / n for c in v)


def _on_sphere(centre, radius: float, direction) -> tuple[float, float, float]:
    d = _unit(*direction)
    return tuple(c + radius * k for c, k in zip(centre, d))  # type: ignore[return-value]


def _snowman() -> WorldObject:
    body_c, body_r = (0.0, -0.22, 0.0), 0.28
    head_c, head_r = (0.0, 0.17, 0.0), 0.22
    eyes = [_on_sphere(head_c, head_r - 0.02, (s * 0.1, 0.1, 0.19)) for s in (-1.0, 1.0)]
    buttons = [_on_sphere(body_c, body_r - 0.01, (0.0, dy, 1.0)) for dy in (0.45, 0.08, -0.28)]
    eye_r, button_r = 0.06, 0.055

    def eyes_sdf(x, y, z):
        # the two eyes are mirror images in x
        return sd_sphere(x.abs(), y, z, (abs(eyes[0][0]), eyes[0][1], eyes[0][2]), eye_r)

    def buttons_sdf(x, y, z):
        d = sd_sphere(x, y, z, buttons[0], button_r)
        for c in buttons[1:]:
            d = torch.minimum(d, sd_sphere(x, y, z, c, button_r))
        return d

    return WorldObject(
        "snowman",
        (
            lambda x, y, z: sd_sphere(x, y, z, body_c, body_r),
            lambda x, y, z: sd_sphere(x, y, z, head_c, head_r),
            lambda x, y, z: sd_cone_z(x, y, z, (0.0, 0.14), 0.12, 0.5, 0.13),  # carrot nose
            eyes_sdf,
            buttons_sdf,
        ),
        (0, 0, 1, 2, 3),
        bound_radius=0.53,
    )


def _house() -> WorldObject:
    roof_profile = [(-0.31, 0.04), (0.31, 0.04), (0.0, 0.34)]  # (z, y), ridge along X

    def roof(x, y, z):
        return _combine_2d(sd_polygon(z, y, roof_profile), x.abs() - 0.36)

    def windows(x, y, z):
        return sd_box(x.abs(), y, z, (0.2, -0.13, 0.25), (0.075, 0.075, 0.012))

    return WorldObject(
        "house",
        (
            lambda x, y, z: sd_box(x, y, z, (0.0, -0.17, 0.0), (0.31, 0.21, 0.25)),  # walls
            roof,
            lambda x, y, z: sd_box(x, y, z, (0.0, -0.235, 0.25), (0.1, 0.145, 0.015)),  # door
            windows,
            lambda x, y, z: sd_box(x, y, z, (0.17, 0.27, -0.1), (0.045, 0.09, 0.045)),  # chimney
        ),
        (0, 1, 2, 3, 4),
        bound_radius=0.56,
    )


def _mug() -> WorldObject:
    outer_r, half_h, wall, floor = 0.30, 0.32, 0.04, 0.06
    inner_r = outer_r - wall
    inner_bottom = -half_h + floor
    coffee_top = 0.20
    logo_r = 0.17

    def ceramic(x, y, z):
        outer = sd_cylinder_y(x, y, z, (0.0, 0.0, 0.0), outer_r, half_h)
        top = half_h + 0.2
        cavity_c = (0.0, 0.5 * (inner_bottom + top), 0.0)
        cavity = sd_cylinder_y(x, y, z, cavity_c, inner_r, 0.5 * (top - inner_bottom))
        return torch.maximum(outer, -cavity)

    def handle(x, y, z):
        ring = sd_torus_z(x, y, z, (outer_r, 0.0, 0.0), 0.14, 0.045)
        return torch.maximum(ring, (outer_r - 0.5 * wall) - x)

    def coffee(x, y, z):
        centre = (0.0, 0.5 * (inner_bottom + coffee_top), 0.0)
        return sd_cylinder_y(x, y, z, centre, inner_r, 0.5 * (coffee_top - inner_bottom))

    def logo(x, y, z, part):
        outer_wall = x * x + z * z > (outer_r - 0.5 * wall) ** 2
        on_front = (z > 0.0) & outer_wall & (x * x + y * y < logo_r**2)
        return torch.where(on_front & (part == 0), torch.ones_like(part), part)

    return WorldObject("mug", (ceramic, handle, coffee), (0, 0, 2), bound_radius=0.50, decal=logo)


def _head() -> WorldObject:
    skull_c, skull_r = (0.0, 0.08, 0.0), 0.36
    eye = _on_sphere(skull_c, skull_r - 0.03, (0.36, 0.22, 0.9))
    nose = _on_sphere(skull_c, skull_r - 0.005, (0.0, -0.11, 1.0))
    mouth_y = skull_c[1] - 0.17
    mouth_z = math.sqrt(skull_r**2 - 0.17**2) - 0.015
    hair_n = _unit(0.0, -1.0, 1.2)

    def skin(x, y, z):
        d = sd_sphere(x, y, z, skull_c, skull_r)
        d = torch.minimum(d, sd_cylinder_y(x, y, z, (0.0, -0.36, 0.0), 0.14, 0.14))  # neck
        return torch.minimum(d, sd_sphere(x, y, z, nose, 0.07))

    def mouth(x, y, z):
        return sd_capsule(x, y, z, (-0.12, mouth_y, mouth_z), (0.12, mouth_y, mouth_z), 0.05)

    def hair(x, y, z):
        cap = sd_sphere(x, y, z, skull_c, skull_r + 0.03)
        plane = hair_n[1] * (y - skull_c[1]) + hair_n[2] * z - 0.09
        return torch.maximum(cap, plane)

    return WorldObject(
        "head",
        (
            skin,
            lambda x, y, z: sd_sphere(x.abs(), y, z, eye, 0.08),
            mouth,
            hair,
        ),
        (0, 1, 2, 3),
        bound_radius=0.53,
    )


_O = (0.0, 0.0, 0.0)
_PRIMITIVE_SDFS: dict[str, tuple[SDF, float]] = {
    # shape: (sdf, bound radius) -- sizes in docs/world.md
    "sphere": (lambda x, y, z: sd_sphere(x, y, z, _O, 0.42), 0.43),
    "cube": (lambda x, y, z: sd_box(x, y, z, _O, (0.3, 0.3, 0.3)), 0.53),
    "cylinder": (lambda x, y, z: sd_cylinder_y(x, y, z, _O, 0.3, 0.38), 0.49),
    "cone": (lambda x, y, z: sd_cone_y(x, y, z, -0.36, 0.5, 0.38), 0.53),
    "torus": (lambda x, y, z: sd_torus_y(x, y, z, _O, 0.33, 0.14), 0.48),
    "capsule": (lambda x, y, z: sd_capsule(x, y, z, (0.0, -0.28, 0.0), (0.0, 0.28, 0.0), 0.2), 0.49),
    "pyramid": (lambda x, y, z: sd_square_pyramid(x, y, z, -0.3, 0.42, 0.34), 0.57),
    "octahedron": (lambda x, y, z: sd_octahedron(x, y, z, 0.5), 0.51),
}
_COMPOSITE_BUILDERS: dict[str, Callable[[], WorldObject]] = {
    "snowman": _snowman,
    "house": _house,
    "mug": _mug,
    "head": _head,
}


@lru_cache(maxsize=None)
def get_object(shape: str) -> WorldObject:
    """The geometry of one shape word (``dreamlab.world.catalog.SHAPES``)."""
    if shape in _PRIMITIVE_SDFS:
        fn, bound = _PRIMITIVE_SDFS[shape]
        return WorldObject(shape, (fn,), (0,), bound)
    if shape in _COMPOSITE_BUILDERS:
        return _COMPOSITE_BUILDERS[shape]()
    raise ValueError(f"unknown shape {shape!r}; shapes are {', '.join(SHAPES)}")


assert set(_PRIMITIVE_SDFS) == set(PRIMITIVES) and set(_COMPOSITE_BUILDERS) == set(COMPOSITES)
