"""The procedural world's words: colours, shapes, composite objects, and the prompt grammar.

Prompts of the builtin prior are a closed language (docs/world.md)::

    [a|an] [colour] shape [, {front|side|back|overhead} view]

* ``shape`` is one of :data:`PRIMITIVES` (symmetric solids) or :data:`COMPOSITES` (objects with a
  front on one side only, facing +Z like every dreamlab asset).
* A primitive without a colour word ("a cube") is allowed and means the default colour,
  :data:`DEFAULT_PRIMITIVE_COLOUR` (grey). A composite without a colour word ("a snowman") has
  its own default colours; a colour word ("a red house") recolours its main body (part 0) only,
  its features keep their fixed colours.
* Canonical text (captions, :func:`caption`) uses "an" before a vowel ("an orange cube"); the
  parser accepts "a", "an" or no article, any case, extra spaces, "gray" for "grey", a missing
  comma before the view phrase and a trailing full stop.

Words outside the vocabulary raise :class:`UnknownWordError`, whose message lists every known
word and points to the open-vocabulary Stable Diffusion priors.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from dreamlab.prompts import view_prompt
from dreamlab.types import VIEW_NAMES

COLOURS: dict[str, tuple[float, float, float]] = {
    "red": (0.85, 0.10, 0.10),
    "orange": (0.95, 0.50, 0.05),
    "yellow": (0.95, 0.88, 0.12),
    "green": (0.15, 0.65, 0.20),
    "blue": (0.15, 0.30, 0.85),
    "purple": (0.55, 0.20, 0.75),
    "pink": (0.95, 0.50, 0.70),
    "white": (0.92, 0.92, 0.92),
    "brown": (0.50, 0.30, 0.12),
    "grey": (0.50, 0.50, 0.50),
}
"""Named albedos (linear values used as-is as display RGB). Pairwise RGB distance >= 0.38."""

PRIMITIVES: tuple[str, ...] = (
    "sphere",
    "cube",
    "cylinder",
    "cone",
    "torus",
    "capsule",
    "pyramid",
    "octahedron",
)
"""Symmetric solids, one body part each (no front). Sizes: dreamlab/world/sdf.py, docs/world.md."""

COMPOSITES: tuple[str, ...] = ("snowman", "house", "mug", "head")
"""Objects whose front (facing +Z, azimuth 0) differs from their back:

* snowman: two snowballs; big orange carrot nose, coal eyes and three coal buttons on the front.
* house: walls, gable roof (ridge along X), dark door and two windows on the front wall only,
  a chimney on the back slope.
* mug: open cylinder filled with coffee; a big round logo on the front (+Z), the handle on the
  +X side (to the viewer's right seen from the front).
* head: a bust (head sphere on a neck); eyes, nose and mouth on the front, hair over the top
  and the back.
"""

SHAPES: tuple[str, ...] = PRIMITIVES + COMPOSITES

@dataclass(frozen=True)
class Part:
    """One coloured part of an object. Part 0 is always the body, coloured by the colour word."""

    name: str
    colour: tuple[float, float, float]
    """Fixed albedo (for part 0: the default body colour, used when the prompt has no colour word)."""
    alternate: tuple[float, float, float] | None = None
    """Used instead of ``colour`` when the body colour is closer than :data:`CLASH_DISTANCE` to it
    (e.g. the door of "a brown house"), so that a feature never vanishes into its body."""
    front: bool = False
    """True for a feature on the object's front only (visible from azimuth 0, hidden from 180)."""


CLASH_DISTANCE = 0.35
"""RGB distance below which a feature takes its alternate colour (see :class:`Part`)."""

_COAL = (0.06, 0.06, 0.06)
PARTS: dict[str, tuple[Part, ...]] = {
    "snowman": (
        Part("snow", COLOURS["white"]),
        Part("nose", (0.95, 0.45, 0.05), alternate=(0.80, 0.10, 0.10), front=True),
        Part("eyes", _COAL, front=True),
        Part("buttons", _COAL, front=True),
    ),
    "house": (
        Part("walls", (0.88, 0.78, 0.58)),
        Part("roof", (0.62, 0.22, 0.14), alternate=(0.30, 0.30, 0.33)),
        Part("door", (0.32, 0.16, 0.07), alternate=(0.10, 0.15, 0.40), front=True),
        Part("windows", (0.60, 0.82, 0.95), alternate=(0.20, 0.40, 0.70), front=True),
        Part("chimney", (0.62, 0.22, 0.14), alternate=(0.30, 0.30, 0.33)),
    ),
    "mug": (
        Part("ceramic", COLOURS["white"]),
        Part("logo", (0.85, 0.12, 0.12), alternate=(0.95, 0.85, 0.10), front=True),
        Part("coffee", (0.25, 0.13, 0.05), alternate=(0.06, 0.06, 0.06)),
    ),
    "head": (
        Part("skin", (0.92, 0.72, 0.58)),
        Part("eyes", _COAL, front=True),
        Part("mouth", (0.78, 0.12, 0.12), alternate=(0.35, 0.04, 0.04), front=True),
        Part("hair", (0.30, 0.17, 0.07), alternate=(0.08, 0.08, 0.08)),
    ),
}
"""Parts of every composite, indexed by part id (the ids the renderer's ``part`` maps carry).
Primitives have one part, the body."""


def part_names(shape: str) -> tuple[str, ...]:
    """Names of the shape's parts by part id ("body" for primitives)."""
    has_front(shape)  # validates the shape
    return tuple(p.name for p in PARTS[shape]) if shape in PARTS else ("body",)


def front_parts(shape: str) -> tuple[int, ...]:
    """Part ids of the features on the object's front only (empty for primitives)."""
    has_front(shape)
    return tuple(i for i, p in enumerate(PARTS.get(shape, ())) if p.front)


def num_parts(shape: str) -> int:
    return len(part_names(shape))


MAX_PARTS = max(len(parts) for parts in PARTS.values())
"""The largest number of parts of any object."""

"""Every shape word; a shape's index here is what caches store."""

DEFAULT_PRIMITIVE_COLOUR = "grey"
"""The colour of a primitive prompted without a colour word ("a cube")."""

VIEW_WORDS: tuple[str, ...] = VIEW_NAMES
ARTICLES: tuple[str, ...] = ("a", "an")

VOCABULARY: tuple[str, ...] = (
    *ARTICLES,
    *COLOURS,
    *PRIMITIVES,
    *COMPOSITES,
    ",",
    *VIEW_WORDS,
    "view",
)
"""Every word a prompt of the builtin world can contain, in a fixed order (tokenizers use it)."""

ALIASES: dict[str, str] = {"gray": "grey"}
"""Spellings the parser accepts and maps onto a vocabulary word (captions never use them)."""

PRIOR_HINT = (
    "Open-vocabulary prompts need a Stable Diffusion prior: --prior sd21-base "
    "(downloads the weights once) or --prior /path/to/a/local/diffusers/folder."
)


class UnknownWordError(ValueError):
    """A prompt uses words outside the builtin world's vocabulary."""


class PromptFormatError(ValueError):
    """A prompt uses only known words but not in the builtin world's prompt grammar."""


@dataclass(frozen=True)
class ObjectSpec:
    """One object of the world: a shape word and an optional colour word."""

    shape: str
    colour: str | None = None
    """None: the object's default colours (grey for primitives); for a composite a colour word
    recolours its main body only."""

    def __post_init__(self) -> None:
        if self.shape not in SHAPES:
            raise ValueError(f"unknown shape {self.shape!r}; shapes are {', '.join(SHAPES)}")
        if self.colour is not None and self.colour not in COLOURS:
            raise ValueError(f"unknown colour {self.colour!r}; colours are {', '.join(COLOURS)}")

    @property
    def prompt(self) -> str:
        """The canonical prompt, e.g. "a red cube", "an orange torus", "a snowman"."""
        return caption(self)

    @property
    def is_composite(self) -> bool:
        return self.shape in COMPOSITES

    @property
    def shape_index(self) -> int:
        return SHAPES.index(self.shape)


def has_front(shape: str) -> bool:
    """True for objects whose front (+Z) differs from their back: the composites."""
    if shape not in SHAPES:
        raise ValueError(f"unknown shape {shape!r}; shapes are {', '.join(SHAPES)}")
    return shape in COMPOSITES


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def caption(spec: ObjectSpec, view: str | None = None) -> str:
    """Canonical text for ``spec``, optionally with the view phrase: "a red cube, front view".

    The view phrase is ``dreamlab.prompts.view_prompt``'s template, so captions equal the
    prompts that view-dependent prompting builds at generation time.
    """
    words = [spec.colour, spec.shape] if spec.colour is not None else [spec.shape]
    text = f"{_article(words[0])} {' '.join(words)}"
    if view is not None:
        if view not in VIEW_WORDS:
            raise ValueError(f"unknown view {view!r}; views are {', '.join(VIEW_WORDS)}")
        text = view_prompt(text, view)
    return text


def known_words_message() -> str:
    """A one-line listing of everything the builtin world understands."""
    return (
        f"articles: {', '.join(ARTICLES)}; colours: {', '.join(COLOURS)}; "
        f"shapes: {', '.join(PRIMITIVES)}; objects with a front: {', '.join(COMPOSITES)}; "
        f"view phrases: ', front view', ', side view', ', back view', ', overhead view'"
    )


_FORMS = "'a red cube', 'a cube', 'a snowman', 'a blue house', 'a red cube, front view'"


def _tokens(prompt: str) -> list[str]:
    text = prompt.strip().lower()
    text = re.sub(r"\.\s*$", "", text)  # one trailing full stop
    return [ALIASES.get(tok, tok) for tok in re.findall(r"[^\s,]+|,", text)]


def parse_prompt_with_view(prompt: str) -> tuple[ObjectSpec, str | None]:
    """Parses a builtin-world prompt into (object, view word or None).

    Raises:
        UnknownWordError: the prompt contains words outside :data:`VOCABULARY` (all listed).
        PromptFormatError: known words in an order the grammar does not accept.
    """
    if not isinstance(prompt, str) or not prompt.strip():
        raise PromptFormatError(f"empty prompt {prompt!r}: describe an object, e.g. {_FORMS}")
    tokens = _tokens(prompt)
    known = set(VOCABULARY)
    unknown = [tok for tok in tokens if tok not in known]
    if unknown:
        listed = ", ".join(repr(w) for w in dict.fromkeys(unknown))
        raise UnknownWordError(
            f"the builtin world does not know the word(s) {listed} in prompt {prompt!r}. "
            f"It knows only these words: {known_words_message()}. Prompts look like {_FORMS}. "
            f"{PRIOR_HINT}"
        )

    def bad(why: str) -> PromptFormatError:
        return PromptFormatError(
            f"cannot read prompt {prompt!r}: {why}. The builtin world accepts "
            f"'[a|an] [colour] shape[, front|side|back|overhead view]', e.g. {_FORMS}; "
            f"{known_words_message()}. {PRIOR_HINT}"
        )

    rest = list(tokens)
    view = None
    if rest and rest[-1] == "view":
        if len(rest) < 2 or rest[-2] not in VIEW_WORDS:
            raise bad("'view' must follow one of front, side, back, overhead")
        view = rest[-2]
        rest = rest[:-2]
        if rest and rest[-1] == ",":
            rest = rest[:-1]
    if rest and rest[0] in ARTICLES:
        rest = rest[1:]
    colour = None
    if rest and rest[0] in COLOURS:
        colour, rest = rest[0], rest[1:]
    if len(rest) != 1 or rest[0] not in SHAPES:
        if not any(tok in SHAPES for tok in tokens):
            raise bad("it names no shape or object")
        raise bad("expected one optional colour word followed by exactly one shape")
    return ObjectSpec(rest[0], colour), view


def parse_prompt(prompt: str) -> ObjectSpec:
    """Parses "a {colour} {primitive}", "a {composite}", "a {colour} {composite}" (optionally
    followed by ", {front|side|back|overhead} view") into an :class:`ObjectSpec`.

    Case and whitespace tolerant; "an", no article, "gray" and a missing comma are accepted.

    Raises:
        UnknownWordError: unknown words (the message lists them, every known word, and that
            open-vocabulary prompts need a Stable Diffusion prior).
        PromptFormatError: known words in a form the grammar does not accept.
    """
    return parse_prompt_with_view(prompt)[0]


def canonical_prompt(prompt: str) -> str:
    """The canonical spelling of a builtin-world prompt ("A  Orange cube,front view" ->
    "an orange cube, front view"): what the training captions look like."""
    spec, view = parse_prompt_with_view(prompt)
    return caption(spec, view)


def all_object_specs() -> list[ObjectSpec]:
    """Every distinct promptable object: each shape uncoloured (default colours) and in every
    colour, shape-major in :data:`SHAPES` order (``len(SHAPES) * (len(COLOURS) + 1)`` specs).

    ("a cube" and "a grey cube" render identically but are different prompts.)
    """
    return [ObjectSpec(shape, colour) for shape in SHAPES for colour in (None, *COLOURS)]


def benchmark_prompts() -> list[str]:
    """A fixed benchmark set: 8 primitives with distinct shape/colour pairs, then every composite
    with its default colours."""
    primitives = [
        "a red cube",
        "a blue sphere",
        "a green cylinder",
        "a yellow cone",
        "a torus",
        "a purple capsule",
        "a pink pyramid",
        "an orange octahedron",
    ]
    return primitives + [caption(ObjectSpec(shape)) for shape in COMPOSITES]
