"""Engine profiles: the shape ranges a TensorRT engine accepts, in the WebUI's units.

Every conversion between what a user picks (images, pixels, 75-token prompt chunks) and what
an engine sees (batch rows, latent size, token count, blur-matrix sizes) lives in this file
and nowhere else:

- **Pixels → latent.** Sizes are in pixels and must be multiples of :data:`LATENT_SCALE` (8),
  the WebUI's slider step; the latent is ``pixels // 8``. Nothing stronger (such as multiples
  of 64) is required here because the blur-matrix sizes below are computed exactly for any
  latent size. A hires-fix target that is not a multiple of 8 still maps to a latent size
  (``int(512 * 1.3) // 8``), which is why a request is checked in latent units.
- **Token grid per level.** Level ``ℓ`` is the resolution after ``ℓ`` downsamplings (level 0
  is the latent itself). A UNet downsample is a stride-2 convolution with padding 1, so the grid
  at level ``ℓ`` is ``ceil(latent / 2**ℓ)`` (repeated ceil-halving equals one ceil-division).
  SD1.x attends at levels 0-3 (64/32/16/8 at 512 px), SDXL at levels 1-2 (64/32 at 1024 px).
  The exported graph has one pair of blur inputs per level: ``blur_h_<ℓ>`` of shape
  ``(rows, h_ℓ, h_ℓ)`` and ``blur_w_<ℓ>`` of shape ``(rows, w_ℓ, w_ℓ)``.
- **Prompt chunks → tokens.** The WebUI encodes a prompt in chunks of 75 tokens, each wrapped
  in BOS/EOS, so ``k`` chunks are ``77·k`` tokens of ``encoder_hidden_states``.
- **Images → batch rows.** One UNet call stacks rows per image: one cond row per AND
  sub-prompt, one uncond row when CFG runs, and one SEG row per blurred row (copies of the cond
  rows in mode "cond", of the uncond row in mode "uncond"). A plain prompt with CFG and SEG is
  3 rows per image; ``n`` AND sub-prompts with SEG on the cond rows are ``2n + 1``. The batch
  axis therefore runs from ``images.min`` (the smallest call the WebUI makes holds one row per
  image: cond only, when CFG is skipped or cond and uncond run separately) to
  ``images.max × rows_per_image``, optimised for ``images.opt × rows_per_image``.

Profiles are frozen; presets are module constants that nobody can mutate.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, NamedTuple

from ..extension.core.layers import grid_at_level

#: Pixels per latent cell (the VAE's downscale factor).
LATENT_SCALE = 8
#: Tokens the text encoder sees per 75-token prompt chunk (BOS + 75 + EOS).
TOKENS_PER_CHUNK = 77
#: The precisions an export and its engines can have: the one list (export, registry, tab, API).
PRECISIONS = ("fp32", "fp16")
#: Prompt tokens per chunk as the user counts them.
PROMPT_TOKENS_PER_CHUNK = 75
#: Rows per image with CFG and SEG on a plain prompt: cond, uncond, SEG copy.
DEFAULT_ROWS_PER_IMAGE = 3

#: Validation bounds (sanity limits, not TensorRT limits).
MIN_SIZE, MAX_SIZE = 64, 8192
MAX_IMAGES = 64
MAX_PROMPT_CHUNKS = 16
MAX_ROWS_PER_IMAGE = 16

_BLUR_INPUT = re.compile(r"^blur_([hw])_(\d+)$")


class ProfileError(ValueError):
    """A profile field out of range or of the wrong type; the message starts with the field name.

    Same contract as ``extension.core.settings.SettingsError`` (a ``ValueError`` whose message
    names the field), kept separate so this module imports nothing heavy.
    """


class AxisRange(NamedTuple):
    """``min ≤ opt ≤ max`` along one axis; TensorRT optimises kernels for ``opt``."""

    min: int
    opt: int
    max: int

    def contains(self, value: int) -> bool:
        return self.min <= value <= self.max

    def map(self, function) -> AxisRange:
        """The range of ``function`` applied to each bound (``function`` must be monotonic)."""
        return AxisRange(function(self.min), function(self.opt), function(self.max))

    def describe(self, unit: str = "") -> str:
        suffix = f" {unit}" if unit else ""
        if self.min == self.max:
            return f"{self.min}{suffix}"
        return f"{self.min}–{self.max}{suffix} (opt {self.opt})"


#: The default prompt range: exactly one 75-token chunk.
ONE_CHUNK = AxisRange(1, 1, 1)


def _parse_int(field: str, value: Any) -> int:
    if isinstance(value, bool) or value is None:
        raise ProfileError(f"{field}: expected an integer, got {value!r}")
    if isinstance(value, float):
        if not value.is_integer():
            raise ProfileError(f"{field}: expected an integer, got {value!r}")
        return int(value)
    if not isinstance(value, int):
        raise ProfileError(f"{field}: expected an integer, got {value!r}")
    return value


def parse_axis_range(field: str, value: Any, low: int, high: int, multiple_of: int = 1) -> AxisRange:
    """An :class:`AxisRange` from ``(min, opt, max)`` or a single integer (a static axis).

    Raises :class:`ProfileError` naming ``field`` when a bound is not an integer, lies outside
    ``[low, high]``, is not a multiple of ``multiple_of``, or the bounds are out of order.
    """
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        bounds = (value, value, value)
    elif isinstance(value, (tuple, list)) and len(value) == 3:
        bounds = tuple(value)
    else:
        raise ProfileError(f"{field}: expected (min, opt, max) or a single integer, got {value!r}")
    names = ("min", "opt", "max")
    parsed = [_parse_int(f"{field}.{name}", bound) for name, bound in zip(names, bounds, strict=True)]
    for name, bound in zip(names, parsed, strict=True):
        if not low <= bound <= high:
            raise ProfileError(f"{field}.{name}: must be in [{low}, {high}], got {bound}")
        if bound % multiple_of:
            raise ProfileError(f"{field}.{name}: must be a multiple of {multiple_of}, got {bound}")
    if not parsed[0] <= parsed[1] <= parsed[2]:
        raise ProfileError(f"{field}: need min ≤ opt ≤ max, got {parsed[0]}, {parsed[1]}, {parsed[2]}")
    return AxisRange(*parsed)


def grid_size(latent: int, level: int) -> int:
    """Token-grid side at UNet level ``level`` (0 = latent resolution); see ``grid_at_level``."""
    return grid_at_level((latent, latent), level)[0]


def latent_size(pixels: int) -> int:
    """The latent side the WebUI uses for an image side of ``pixels`` (``pixels // 8``)."""
    return pixels // LATENT_SCALE


def tokens_for_chunks(chunks: int) -> int:
    """``encoder_hidden_states`` length for ``chunks`` 75-token prompt chunks."""
    return TOKENS_PER_CHUNK * chunks


def chunks_for_prompt_tokens(prompt_tokens: int) -> int:
    """Chunks the WebUI needs for a prompt of ``prompt_tokens`` tokens (at least one)."""
    return max(1, math.ceil(prompt_tokens / PROMPT_TOKENS_PER_CHUNK))


@dataclass(frozen=True)
class EngineCall:
    """The shape of one UNet call, in engine units (what the runtime sees in the tensors)."""

    rows: int  #: batch rows (all images × rows per image in this call)
    latent_height: int
    latent_width: int
    tokens: int  #: ``encoder_hidden_states`` length (77 per prompt chunk)

    @classmethod
    def for_images(
        cls, images: int, height: int, width: int, prompt_chunks: int = 1, rows_per_image: int = DEFAULT_ROWS_PER_IMAGE
    ) -> EngineCall:
        """The call for ``images`` images of ``height × width`` pixels with ``rows_per_image`` rows each."""
        return cls(images * rows_per_image, latent_size(height), latent_size(width), tokens_for_chunks(prompt_chunks))


@dataclass(frozen=True)
class ShapeMismatch:
    """One axis of a call that an engine profile does not cover."""

    axis: str  #: "batch", "height", "width" or "tokens"
    value: int  #: the call's value in engine units
    allowed: AxisRange  #: the profile's range in engine units
    message: str  #: the same, in the user's units


@dataclass(frozen=True)
class EngineProfile:
    """Shape ranges of one TensorRT optimisation profile, in user units.

    ``images`` (per generation batch), ``height``/``width`` (pixels, multiples of 8) and
    ``prompt_chunks`` (75-token chunks) are ``(min, opt, max)`` ranges; a single integer makes
    the axis static. ``rows_per_image`` is the most rows one image adds to a call (3 = cond,
    uncond, SEG; more with AND prompts, see the module docstring).
    """

    images: AxisRange
    height: AxisRange
    width: AxisRange
    prompt_chunks: AxisRange = ONE_CHUNK
    rows_per_image: int = DEFAULT_ROWS_PER_IMAGE

    def __post_init__(self) -> None:
        set_field = object.__setattr__
        set_field(self, "images", parse_axis_range("images", self.images, 1, MAX_IMAGES))
        set_field(self, "height", parse_axis_range("height", self.height, MIN_SIZE, MAX_SIZE, LATENT_SCALE))
        set_field(self, "width", parse_axis_range("width", self.width, MIN_SIZE, MAX_SIZE, LATENT_SCALE))
        set_field(self, "prompt_chunks", parse_axis_range("prompt_chunks", self.prompt_chunks, 1, MAX_PROMPT_CHUNKS))
        rows = _parse_int("rows_per_image", self.rows_per_image)
        if not 1 <= rows <= MAX_ROWS_PER_IMAGE:
            raise ProfileError(f"rows_per_image: must be in [1, {MAX_ROWS_PER_IMAGE}], got {rows}")
        set_field(self, "rows_per_image", rows)

    # --- derived engine-axis ranges -------------------------------------------------------

    @property
    def batch_rows(self) -> AxisRange:
        """Engine batch axis: one row per image at least, ``rows_per_image`` per image at most."""
        return AxisRange(self.images.min, self.images.opt * self.rows_per_image, self.images.max * self.rows_per_image)

    @property
    def latent_height(self) -> AxisRange:
        return self.height.map(latent_size)

    @property
    def latent_width(self) -> AxisRange:
        return self.width.map(latent_size)

    @property
    def tokens(self) -> AxisRange:
        """``encoder_hidden_states`` length range (77 per chunk)."""
        return self.prompt_chunks.map(tokens_for_chunks)

    def grid_height(self, level: int) -> AxisRange:
        """Token-grid height range at UNet level ``level`` (ceil-halving is monotonic)."""
        return self.latent_height.map(lambda latent: grid_size(latent, level))

    def grid_width(self, level: int) -> AxisRange:
        return self.latent_width.map(lambda latent: grid_size(latent, level))

    def blur_matrix_shapes(self, level: int) -> dict[str, tuple[tuple[int, int, int], ...]]:
        """``{"blur_h_<level>": (min, opt, max) shapes, "blur_w_<level>": …}``, batch-first."""
        rows, grid_h, grid_w = self.batch_rows, self.grid_height(level), self.grid_width(level)
        return {
            f"blur_h_{level}": tuple((rows[i], grid_h[i], grid_h[i]) for i in range(3)),
            f"blur_w_{level}": tuple((rows[i], grid_w[i], grid_w[i]) for i in range(3)),
        }

    # --- coverage ---------------------------------------------------------------------------

    def mismatches(self, call: EngineCall) -> tuple[ShapeMismatch, ...]:
        """The axes of ``call`` outside this profile (empty when the engine can run it)."""
        found = []
        if not self.batch_rows.contains(call.rows):
            found.append(ShapeMismatch(
                "batch", call.rows, self.batch_rows,
                f"{call.rows} batch rows; this engine takes {self.batch_rows.describe('rows')} "
                f"({self.images.describe('images')} × up to {self.rows_per_image} rows each)",
            ))
        for axis, value, allowed, pixels in (
            ("height", call.latent_height, self.latent_height, self.height),
            ("width", call.latent_width, self.latent_width, self.width),
        ):
            if not allowed.contains(value):
                found.append(ShapeMismatch(
                    axis, value, allowed,
                    f"{axis} {value * LATENT_SCALE} px (latent {value}) is outside this engine's "
                    f"{pixels.describe('px')}",
                ))
        if not self.tokens.contains(call.tokens):
            found.append(ShapeMismatch(
                "tokens", call.tokens, self.tokens,
                f"prompt of {call.tokens} tokens ({-(-call.tokens // TOKENS_PER_CHUNK)} chunks of 75); "
                f"this engine takes {self.prompt_chunks.describe('chunks')}",
            ))
        return tuple(found)

    def covers(self, call: EngineCall) -> bool:
        return not self.mismatches(call)

    # --- (de)serialisation ------------------------------------------------------------------

    @property
    def key(self) -> str:
        """Compact, file-name-safe identity, e.g. ``i1-1-4x3_h512-512-768_w512-512-768_c1-1-3``."""

        def part(axis: AxisRange) -> str:
            return "-".join(str(bound) for bound in axis)

        return (
            f"i{part(self.images)}x{self.rows_per_image}_h{part(self.height)}"
            f"_w{part(self.width)}_c{part(self.prompt_chunks)}"
        )

    def describe(self) -> str:
        """One line for the UI, in user units."""
        return (
            f"{self.width.describe()} × {self.height.describe('px')}, {self.images.describe('images')} "
            f"× {self.rows_per_image} rows, {self.prompt_chunks.describe('prompt chunks of 75 tokens')}"
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "images": list(self.images),
            "height": list(self.height),
            "width": list(self.width),
            "prompt_chunks": list(self.prompt_chunks),
            "rows_per_image": self.rows_per_image,
        }

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> EngineProfile:
        """Inverse of :meth:`to_dict`; unknown keys are an error, ``rows_per_image`` and
        ``prompt_chunks`` may be omitted (defaults), the sizes and images may not."""
        if not isinstance(values, Mapping):
            raise ProfileError(f"profile: expected a dict, got {type(values).__name__}")
        known = {"images", "height", "width", "prompt_chunks", "rows_per_image"}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ProfileError(f"profile: unknown field(s) {unknown}; known: {sorted(known)}")
        missing = sorted({"images", "height", "width"} - set(values))
        if missing:
            raise ProfileError(f"{missing[0]}: missing from the profile")
        return cls(**dict(values))


# --- presets -----------------------------------------------------------------------------------

#: Built-in presets (immutable). SD1.x covers 512–768 px, e.g. 512 px with a 1.5× hires fix.
PRESETS: Mapping[str, EngineProfile] = MappingProxyType({
    "SD1.x 512-768": EngineProfile(
        images=AxisRange(1, 1, 4), height=AxisRange(512, 512, 768), width=AxisRange(512, 512, 768),
        prompt_chunks=AxisRange(1, 1, 3),
    ),
    "SDXL 768-1024": EngineProfile(
        images=AxisRange(1, 1, 4), height=AxisRange(768, 1024, 1024), width=AxisRange(768, 1024, 1024),
        prompt_chunks=AxisRange(1, 1, 3),
    ),
})


#: The model families each preset is made for (the sizes differ: SD1.x 512 px, SDXL 1024 px).
PRESET_FAMILIES: Mapping[str, tuple[str, ...]] = MappingProxyType({
    "SD1.x 512-768": ("sd1", "sd2"),
    "SDXL 768-1024": ("sdxl",),
})


def preset_for_family(family: str) -> str | None:
    """The preset made for ``family`` ("sd1", "sd2", "sdxl"), or ``None``."""
    return next((name for name, families in PRESET_FAMILIES.items() if family in families), None)


def preset_profile(name: str) -> EngineProfile:
    """The preset called ``name``; :class:`ProfileError` lists the valid names otherwise."""
    try:
        return PRESETS[name]
    except KeyError:
        raise ProfileError(f"preset: unknown preset {name!r}; choose one of {list(PRESETS)}") from None


# --- model families and TensorRT profile shapes ------------------------------------------------


@dataclass(frozen=True)
class ModelFamily:
    """The per-family sizes of the UNet's non-image inputs."""

    name: str
    context_dim: int  #: width of ``encoder_hidden_states``
    latent_channels: int = 4
    adm_dim: int | None = None  #: ldm/sgm ``y`` vector (SDXL: 1280 pooled text + 6 × 256 size/crop embeddings)
    text_embeds_dim: int | None = None  #: diffusers SDXL ``text_embeds`` (pooled text embedding)
    time_ids_dim: int | None = None  #: diffusers SDXL ``time_ids`` (original size, crop, target size)
    default_preset: str = "SD1.x 512-768"


FAMILIES: Mapping[str, ModelFamily] = MappingProxyType({
    "sd1": ModelFamily("sd1", context_dim=768),
    "sd2": ModelFamily("sd2", context_dim=1024),
    "sdxl": ModelFamily(
        "sdxl", context_dim=2048, adm_dim=2816, text_embeds_dim=1280, time_ids_dim=6, default_preset="SDXL 768-1024"
    ),
})


def model_family(name: str) -> ModelFamily:
    try:
        return FAMILIES[name]
    except KeyError:
        raise ProfileError(f"family: unknown model family {name!r}; choose one of {list(FAMILIES)}") from None


ShapeTriple = tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]


def blur_input_level(name: str) -> int | None:
    """The level of a ``blur_h_<level>``/``blur_w_<level>`` input name, or ``None`` for other names."""
    match = _BLUR_INPUT.match(name)
    return int(match.group(2)) if match else None


def trt_profile_shapes(
    profile: EngineProfile, input_names: Sequence[str], family: ModelFamily, *, in_channels: int | None = None
) -> dict[str, ShapeTriple]:
    """TensorRT ``(min, opt, max)`` shapes for each graph input, in ``input_names`` order.

    Knows the UNet inputs ``sample``, ``timestep(s)``, ``encoder_hidden_states``, ``y`` (ldm/sgm
    SDXL), ``text_embeds``/``time_ids`` (diffusers SDXL) and the blur matrices
    ``blur_h_<level>``/``blur_w_<level>``. ``in_channels`` overrides the family's latent
    channels (9 for inpainting UNets). Raises ``ValueError`` for an input it cannot size.
    """
    rows = profile.batch_rows
    channels = family.latent_channels if in_channels is None else in_channels

    def per_row(width: int | None, input_name: str) -> ShapeTriple:
        if width is None:
            raise ValueError(f"graph input {input_name!r} is not an input of a {family.name} UNet")
        return tuple((rows[i], width) for i in range(3))  # type: ignore[return-value]

    shapes: dict[str, ShapeTriple] = {}
    for name in input_names:
        if name == "sample":
            latent_h, latent_w = profile.latent_height, profile.latent_width
            shapes[name] = tuple((rows[i], channels, latent_h[i], latent_w[i]) for i in range(3))  # type: ignore[assignment]
        elif name in ("timestep", "timesteps"):  # export/seg_unet.py says "timestep", ldm "timesteps"
            shapes[name] = tuple((rows[i],) for i in range(3))  # type: ignore[assignment]
        elif name == "encoder_hidden_states":
            tokens = profile.tokens
            shapes[name] = tuple((rows[i], tokens[i], family.context_dim) for i in range(3))  # type: ignore[assignment]
        elif name == "y":
            shapes[name] = per_row(family.adm_dim, name)
        elif name == "text_embeds":
            shapes[name] = per_row(family.text_embeds_dim, name)
        elif name == "time_ids":
            shapes[name] = per_row(family.time_ids_dim, name)
        elif (level := blur_input_level(name)) is not None:
            shapes[name] = profile.blur_matrix_shapes(level)[name]
        else:
            raise ValueError(
                f"graph input {name!r} has no profile rule; known: sample, timestep(s), encoder_hidden_states, "
                "y, text_embeds, time_ids, blur_h_<level>, blur_w_<level>"
            )
    return shapes
