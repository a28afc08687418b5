"""T-SAM: align cross-attention with the text encoder's own self-attention (Kim et al., CVPR 2025).

T-SAM (arXiv 2411.15236) nudges the latent at early denoising steps so that the matrix ``S``
of pairwise similarities of the prompt tokens' cross-attention maps follows the matrix ``T``
of the text encoder's self-attention between the same tokens. This module holds the method's
math as pure functions, framework-free:

- **T** (:func:`text_attention_targets`): the encoder's attention probabilities, mean over
  layers and heads, rows/columns ``1 … eos−1`` (no BOS, EOS, padding), ``** power`` (3 in the
  official code, γ = 4 in the paper), each row divided by ``rowsum + 1e-7``. Causal, so lower
  triangular.
- **Chunks**: the WebUI encodes a long prompt as separate 77-token chunks (BOS, 75 tokens,
  EOS) whose states are concatenated, so T is block diagonal. :class:`ChunkTarget` pairs a
  chunk's T with the column of its first prompt token in the cross-attention context; the
  loss of a prompt is the **sum of the per-chunk losses**, each computed on that chunk's
  tokens alone with its own row numbering (cross-chunk pairs have no target).
- **Several encoders** (SDXL): :func:`combine_encoder_targets` averages the per-encoder T
  (each already powered and row-normalised, so the average is row-normalised too and each
  encoder weighs the same regardless of its layer or head count).
- **S** (:func:`map_similarity`): each token's cross-attention map (mean over heads and
  coarse layers, no re-softmax) smoothed by the Attend-and-Excite 3×3 Gaussian, then the
  cosine similarity of every pair of flattened maps.
- **Losses** (:func:`official_loss`, :func:`paper_loss`) and the **schedule**
  (:func:`step_size`, :func:`active_step_count`, :func:`is_active_step`, :func:`refinement_step_indices`,
  :func:`updates_at_step`), and the validated :class:`TsamSettings`.

Everything is computed in the dtype of its inputs; callers pass float32 (or float64 in
tests) tensors, never half precision.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from .blur import reflect_convolution_matrix
from . import fields
from .fields import Control, SettingsError, setting
from .settings import number_in, one_of, parse_flag, parse_number

#: Added to a row sum before dividing, as the official code does.
ROW_NORM_EPSILON = 1e-7
#: Lower bound on a vector norm in cosine similarities (``torch.nn.functional.cosine_similarity``'s).
COSINE_EPSILON = 1e-8
#: Tokens per encoded chunk: BOS, 75 prompt tokens, EOS (the CLIP context length).
CHUNK_TOKENS = 77
#: Prompt tokens per chunk.
CHUNK_PROMPT_TOKENS = CHUNK_TOKENS - 2

#: The official code's 50-step schedule (``configs/config.yaml``), expressed as fractions.
OFFICIAL_STEPS = 50
OFFICIAL_ACTIVE_STEPS = 30
OFFICIAL_REFINEMENT_STEPS = (0, 10, 20)
DEFAULT_ACTIVE_FRACTION = OFFICIAL_ACTIVE_STEPS / OFFICIAL_STEPS  # 0.6
DEFAULT_REFINEMENT_FRACTIONS = tuple(step / OFFICIAL_STEPS for step in OFFICIAL_REFINEMENT_STEPS)  # 0, .2, .4

LOSS_MODES = ("official", "paper")


# --------------------------------------------------------------------------------------------
# T: the text encoder's self-attention target
# --------------------------------------------------------------------------------------------


def mean_text_attention(attentions: Sequence[torch.Tensor]) -> torch.Tensor:
    """Mean over layers and heads of per-layer ``(B, heads, T, T)`` attentions → ``(B, T, T)`` float32.

    ``attentions`` is what a Hugging Face CLIP text model returns with ``output_attentions=True``
    (eager attention: probabilities, causal).
    """
    if len(attentions) == 0:
        raise ValueError("no attention maps: run the text encoder with output_attentions=True and eager attention")
    dtype = torch.promote_types(attentions[0].dtype, torch.float32)
    stacked = torch.stack([layer.to(dtype) for layer in attentions])  # (layers, B, heads, T, T)
    return stacked.mean(dim=(0, 2))


def prompt_token_target(mean_attention: torch.Tensor, eos_position: int, *, power: float = 3.0) -> torch.Tensor:
    """T of one prompt: ``(T', eos)`` → rows/columns ``1 … eos−1`` of ``T'``, ``** power``, row-normalised.

    ``mean_attention`` is one ``(T, T)`` slice of :func:`mean_text_attention`. The result is
    ``(L, L)`` with ``L = eos − 1`` prompt tokens; an empty prompt gives ``(0, 0)``.
    """
    if mean_attention.dim() != 2 or mean_attention.shape[0] != mean_attention.shape[1]:
        raise ValueError(f"expected a square (T, T) attention matrix, got {tuple(mean_attention.shape)}")
    if not 1 <= eos_position <= mean_attention.shape[0] - 1:
        raise ValueError(f"EOS position {eos_position} outside a sequence of {mean_attention.shape[0]} tokens")
    powered = mean_attention[1:eos_position, 1:eos_position] ** power  # (L, L)
    return powered / (powered.sum(dim=-1, keepdim=True) + ROW_NORM_EPSILON)


def text_attention_targets(
    attentions: Sequence[torch.Tensor], eos_positions: Sequence[int] | torch.Tensor, *, power: float = 3.0
) -> list[torch.Tensor]:
    """One T per batch row of the encoder call: ``(L_b, L_b)`` for row ``b`` whose EOS is at ``eos_positions[b]``."""
    mean_attention = mean_text_attention(attentions)  # (B, T, T)
    eos = [int(position) for position in (eos_positions.tolist() if torch.is_tensor(eos_positions) else eos_positions)]
    if len(eos) != mean_attention.shape[0]:
        raise ValueError(f"{mean_attention.shape[0]} encoded rows but {len(eos)} EOS positions")
    return [prompt_token_target(mean_attention[row], position, power=power) for row, position in enumerate(eos)]


def combine_encoder_targets(per_encoder: Sequence[torch.Tensor]) -> torch.Tensor:
    """Average the T of the same tokens from several text encoders (SDXL's two CLIPs)."""
    if not per_encoder:
        raise ValueError("no targets to combine")
    shapes = {tuple(target.shape) for target in per_encoder}
    if len(shapes) != 1:
        raise ValueError(f"the encoders tokenised the prompt differently: target shapes {sorted(shapes)}")
    return torch.stack(list(per_encoder)).mean(dim=0)


@dataclass(frozen=True)
class ChunkTarget:
    """T of one encoded chunk and where its tokens sit in the cross-attention context."""

    offset: int  #: context column of the chunk's first prompt token (``77·chunk + 1``)
    matrix: torch.Tensor  #: (L, L) T of the chunk's prompt tokens

    @property
    def tokens(self) -> int:
        return int(self.matrix.shape[0])


#: All chunk targets of one prompt (one image), in context order.
PromptTarget = tuple[ChunkTarget, ...]


def chunk_targets(chunk_matrices: Sequence[torch.Tensor], *, chunk_tokens: int = CHUNK_TOKENS) -> PromptTarget:
    """Place per-chunk T matrices at their context columns: chunk ``c`` starts at ``c·chunk_tokens + 1``."""
    return tuple(
        ChunkTarget(offset=index * chunk_tokens + 1, matrix=matrix) for index, matrix in enumerate(chunk_matrices)
    )


# --------------------------------------------------------------------------------------------
# S: similarity of smoothed cross-attention maps
# --------------------------------------------------------------------------------------------


def smoothing_taps(sigma: float = 0.5, size: int = 3, *, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """1D weights of the Attend-and-Excite Gaussian: ``exp(−(x / 2σ)²)`` at ``x = −(size−1)/2 …``, normalised.

    Note the ``2σ`` (not ``σ√2``): A&E's kernel, which the T-SAM code reuses, is a standard
    Gaussian of std ``σ·√2``. For σ = 0.5, size 3: ``[e⁻¹, 1, e⁻¹] / (1 + 2e⁻¹)`` =
    ``[0.2119416, 0.5761169, 0.2119416]``; the 3×3 kernel is their outer product (it sums to 1).
    """
    if size < 1 or size % 2 == 0:
        raise ValueError(f"smoothing kernel size must be odd and ≥ 1, got {size}")
    if not sigma > 0:
        raise ValueError(f"smoothing sigma must be > 0, got {sigma}")
    offsets = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    weights = torch.exp(-((offsets / (2.0 * sigma)) ** 2))
    return (weights / weights.sum()).to(dtype)


def smoothing_matrix(axis_len: int, taps: torch.Tensor) -> torch.Tensor:
    """``(n, n)`` matrix of a 1D convolution with ``taps`` after reflect padding (no edge repeat).

    An axis too short to reflect the kernel's radius (``n ≤ radius``, e.g. a 1-token axis) is
    left unsmoothed (identity).
    """
    if axis_len <= (taps.numel() - 1) // 2:
        return torch.eye(axis_len, dtype=taps.dtype, device=taps.device)
    return reflect_convolution_matrix(axis_len, taps)


@functools.lru_cache(maxsize=64)
def _smoothing_matrices(
    height: int, width: int, sigma: float, size: int, dtype: torch.dtype, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    taps = smoothing_taps(sigma, size, dtype=dtype).to(device)
    return smoothing_matrix(height, taps), smoothing_matrix(width, taps)


def smooth_maps(maps: torch.Tensor, *, sigma: float = 0.5, size: int = 3) -> torch.Tensor:
    """Smooth ``(L, h, w)`` maps with the separable A&E Gaussian and reflect padding: ``A_h · M · A_wᵀ``.

    The same as A&E's ``conv2d(pad(M, 1, "reflect"), outer(taps, taps))`` on every grid of at
    least 2×2 tokens.
    """
    if maps.dim() != 3:
        raise ValueError(f"expected (tokens, h, w) maps, got {tuple(maps.shape)}")
    a_h, a_w = _smoothing_matrices(maps.shape[1], maps.shape[2], float(sigma), size, maps.dtype, maps.device)
    return a_h @ maps @ a_w.transpose(0, 1)  # (h,h) @ (L,h,w) @ (w,w) → (L, h, w)


def token_maps(probabilities: torch.Tensor, grid: tuple[int, int], chunk: ChunkTarget) -> torch.Tensor:
    """The chunk's tokens' maps from ``(N, context)`` cross-attention probabilities → ``(L, h, w)``.

    ``N = h·w`` queries in row-major grid order (diffusers flattens ``(C, h, w)`` that way).
    """
    height, width = grid
    queries, context = probabilities.shape
    if queries != height * width:
        raise ValueError(f"grid {height}×{width} does not hold {queries} query tokens")
    end = chunk.offset + chunk.tokens
    if chunk.offset < 1 or end > context:
        raise ValueError(
            f"prompt tokens at context columns {chunk.offset}…{end - 1} but the conditioning has only "
            f"{context} tokens (a prompt chunk without conditioning: encode every chunk or limit the chunks)"
        )
    columns = probabilities[:, chunk.offset : end]  # (N, L)
    return columns.transpose(0, 1).reshape(chunk.tokens, height, width)  # (L, h, w)


def map_similarity(maps: torch.Tensor) -> torch.Tensor:
    """``S[r, c]`` = cosine similarity of the flattened maps of tokens ``r`` and ``c``; diagonal exactly 1.

    Symmetric ``(L, L)``; the losses read only ``c ≤ r``.
    """
    flat = maps.reshape(maps.shape[0], -1)  # (L, h·w)
    unit = flat / flat.norm(dim=-1, keepdim=True).clamp_min(COSINE_EPSILON)
    similarity = unit @ unit.transpose(0, 1)  # (L, L)
    eye = torch.eye(similarity.shape[0], dtype=torch.bool, device=similarity.device)
    return torch.where(eye, torch.ones_like(similarity), similarity)


def chunk_similarity(
    probabilities: torch.Tensor, grid: tuple[int, int], chunk: ChunkTarget
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(smoothed maps (L, h, w), S (L, L))`` of one chunk's tokens."""
    smoothed = smooth_maps(token_maps(probabilities, grid, chunk))
    return smoothed, map_similarity(smoothed)


# --------------------------------------------------------------------------------------------
# Losses
# --------------------------------------------------------------------------------------------


def official_loss(target: torch.Tensor, similarity: torch.Tensor) -> torch.Tensor:
    """The official code's default: ``Σ_{r=1}^{L−1} 0.2·r·(1 − cos(T[r, :r], S[r, :r]))``.

    Rows are 0-indexed prompt tokens; row ``r`` compares its entries for the earlier tokens
    ``c < r`` (diagonal excluded). Row 0 has no entries and is left out. Per-row scale
    invariant, so T's row normalisation does not matter here.
    """
    tokens = target.shape[0]
    if tokens < 2:
        return target.new_zeros(())
    before = torch.ones(tokens, tokens, dtype=torch.bool, device=target.device).tril(-1)  # c < r
    t = torch.where(before, target, torch.zeros_like(target))[1:]  # (L−1, L)
    s = torch.where(before, similarity, torch.zeros_like(similarity))[1:]  # (L−1, L)
    norms = (t.norm(dim=-1) * s.norm(dim=-1)).clamp_min(COSINE_EPSILON)
    cosine = (t * s).sum(dim=-1) / norms  # (L−1,)
    weights = 0.2 * torch.arange(1, tokens, dtype=target.dtype, device=target.device)
    return (weights * (1.0 - cosine)).sum()


def paper_loss(target: torch.Tensor, similarity: torch.Tensor) -> torch.Tensor:
    """The paper's L1 form as the official code sums it: ``Σ_{i=2}^{L} Σ_{j≤i} (i/L)·|T_ij − S̄_ij|``,
    ``S̄_ij = S_ij / Σ_{k≤i} S_ik``.

    ``i = 1 … L`` counts prompt tokens from 1 (0-indexed row ``r`` weighs ``(r+1)/L``), the
    diagonal is included (``S_ii = 1``). The official code
    (``_compute_self_attn_loss_cos_attn_like``) starts at the second token: the first row
    holds only its diagonal, a constant ``|T_11 − 1|/L`` with no gradient, and is not counted.
    ``T`` is the target as built here: the power applied before the row normalisation (as the
    official code's variant; the paper writes the power of an already normalised T). Use
    ``power=4`` for the paper's γ.
    """
    tokens = target.shape[0]
    if tokens < 2:
        return target.new_zeros(())
    upto = torch.ones(tokens, tokens, dtype=torch.bool, device=target.device).tril()  # j ≤ i
    s = torch.where(upto, similarity, torch.zeros_like(similarity))
    s_normalised = s / s.sum(dim=-1, keepdim=True)  # row sums ≥ 1 (diagonal 1, cosines ≥ 0)
    t = torch.where(upto, target, torch.zeros_like(target))
    weights = torch.arange(1, tokens + 1, dtype=target.dtype, device=target.device) / tokens
    return (weights * (t - s_normalised).abs().sum(dim=-1))[1:].sum()


_LOSSES = {"official": official_loss, "paper": paper_loss}


def alignment_loss(target: torch.Tensor, similarity: torch.Tensor, mode: str = "official") -> torch.Tensor:
    """The loss named ``mode`` (``"official"`` or ``"paper"``) of one chunk."""
    try:
        loss = _LOSSES[mode]
    except KeyError:
        raise ValueError(f"unknown T-SAM loss {mode!r}; use one of {', '.join(LOSS_MODES)}") from None
    return loss(target.to(similarity.dtype), similarity)


def prompt_loss_and_maps(
    probabilities: torch.Tensor, grid: tuple[int, int], prompt: PromptTarget, mode: str = "official"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Loss of one image (the sum over its prompt's chunks, each on its own tokens) and the
    smoothed maps of all its prompt tokens, chunks concatenated: ``(scalar, (ΣL, h, w))``.

    ``probabilities`` is the image's ``(N, context)`` cross-attention at the coarse level.
    """
    total = probabilities.new_zeros(())
    maps = [probabilities.new_zeros((0, *grid))]
    for chunk in prompt:
        smoothed, similarity = chunk_similarity(probabilities, grid, chunk)
        total = total + alignment_loss(chunk.matrix, similarity, mode)
        maps.append(smoothed)
    return total, torch.cat(maps)


def prompt_loss(
    probabilities: torch.Tensor, grid: tuple[int, int], prompt: PromptTarget, mode: str = "official"
) -> torch.Tensor:
    """Loss of one image; see :func:`prompt_loss_and_maps`."""
    return prompt_loss_and_maps(probabilities, grid, prompt, mode)[0]


# --------------------------------------------------------------------------------------------
# Schedule
# --------------------------------------------------------------------------------------------


def step_size(scale: float, step: int, total_steps: int) -> float:
    """``α_i = scale · sqrt(linspace(1, 0.5, N)[i])`` (the A&E/CONFORM/T-SAM schedule).

    ``N = total_steps`` is the length of the sampler's schedule, so α falls from ``scale`` at
    the first step to ``scale·√0.5`` at the last, whatever the step count.
    """
    if not 0 <= step < total_steps:
        raise ValueError(f"step {step} outside a schedule of {total_steps} steps")
    fraction = 1.0 if total_steps == 1 else 1.0 - 0.5 * step / (total_steps - 1)
    return scale * math.sqrt(fraction)


def active_step_count(requested_steps: int, active_fraction: float) -> int:
    """How many steps update the latent: the steps ``i`` with ``i / requested_steps < active_fraction``.

    Counted against the step count the user asked for, not the sampler's timestep count: the
    official code updates at ``i < 30`` of a 50-step run whose PNDM scheduler yields 51
    timesteps, exactly 30 updates, which ``active_fraction = 0.6`` of 50 requested steps gives
    on a 50- or a 51-timestep schedule alike. With 20 steps that is steps 0…11.
    """
    if requested_steps <= 0 or active_fraction <= 0:
        return 0
    return sum(1 for step in range(requested_steps) if step / requested_steps < active_fraction)


def is_active_step(step: int, total_steps: int, active_fraction: float, requested_steps: int | None = None) -> bool:
    """Whether step ``step`` (0-based) of a ``total_steps``-timestep schedule updates the latent:
    ``step < active_step_count(requested_steps, active_fraction)`` (``requested_steps`` defaults to
    ``total_steps``)."""
    requested = total_steps if requested_steps is None else requested_steps
    return 0 <= step < total_steps and step < active_step_count(requested, active_fraction)


def refinement_step_indices(fractions: Sequence[float], total_steps: int) -> frozenset[int]:
    """Steps that run the refinement loop: the nearest step ``⌊f·N + ½⌋`` to each fraction ``f``
    of ``N = total_steps`` (pass the requested step count, see :func:`active_step_count`).

    The official steps 0, 10, 20 of 50 are the fractions 0, 0.2, 0.4 (:data:`DEFAULT_REFINEMENT_FRACTIONS`);
    with 20 steps they land on 0, 4, 8.
    """
    indices = (math.floor(fraction * total_steps + 0.5) for fraction in fractions)
    return frozenset(index for index in indices if 0 <= index < total_steps)


def updates_at_step(
    step: int,
    total_steps: int,
    *,
    active_fraction: float,
    iterations: int,
    refinement_fractions: Sequence[float],
    refinement_iterations: int,
    requested_steps: int | None = None,
) -> int:
    """Gradient updates of the latent at ``step``: 0 outside the active part, else ``iterations``,
    plus ``refinement_iterations`` at refinement steps.

    ``total_steps`` is the sampler's timestep count, ``requested_steps`` the step count the user
    asked for (default: the same); the active part and the refinement steps are counted against
    the latter. The official code runs, at its refinement steps, an inner loop (20–30 updates;
    we use a fixed count instead of its token-count-specific thresholds) and then its regular update.
    """
    requested = total_steps if requested_steps is None else requested_steps
    if not is_active_step(step, total_steps, active_fraction, requested):
        return 0
    refine = step in refinement_step_indices(refinement_fractions, requested)
    return iterations + (refinement_iterations if refine else 0)


# --------------------------------------------------------------------------------------------
# Settings
# --------------------------------------------------------------------------------------------

MAX_STRENGTH = 1000.0
MAX_ITERATIONS = 50
MAX_REFINEMENT_ITERATIONS = 100
MAX_POWER = 16.0
_NO_REFINEMENT_WORDS = ("", "none", "off")


def parse_count(field: str, value: Any, low: int, high: int) -> int:
    """A whole number in ``[low, high]`` from an int, an integral float or a numeric string."""
    number = parse_number(field, value)
    if not math.isfinite(number) or number != int(number):
        raise SettingsError(f"{field}: expected a whole number, got {fields.shown(value)}")
    if not low <= number <= high:
        raise SettingsError(f"{field}: must be in [{low}, {high}], got {int(number)}")
    return int(number)


def parse_refinement_steps(value: Any) -> tuple[float, ...]:
    """Fractions of the schedule in ``[0, 1)`` from ``"0,0.2,0.4"``, a list of numbers, or ``"none"``."""
    if isinstance(value, str):
        text = value.strip().lower()
        items = [] if text in _NO_REFINEMENT_WORDS else [item for item in text.replace(" ", "").split(",") if item]
    elif isinstance(value, (list, tuple)):
        items = list(value)
    else:
        raise SettingsError(
            f"refinement_steps: expected fractions such as '0,0.2,0.4' or 'none', got {fields.shown(value)}"
        )
    fractions = sorted({parse_number("refinement_steps", item) for item in items})
    for fraction in fractions:
        if not 0.0 <= fraction < 1.0:
            raise SettingsError(
                f"refinement_steps: each entry is a fraction of the steps in [0, 1), got {fraction:g}"
            )
    return tuple(fractions)


def format_refinement_steps(fractions: Sequence[float]) -> str:
    return ",".join(f"{fraction:g}" for fraction in fractions) if fractions else "none"


@dataclass(frozen=True)
class TsamStepPlan:
    """What T-SAM does at one step: ``updates`` gradient steps of size ``step_size`` (0 = none)."""

    updates: int
    step_size: float


def count_in(field: str, low: int, high: int) -> Any:
    return lambda value: parse_count(field, value, low, high)


def parse_active_fraction(value: Any) -> float:
    active = parse_number("active_fraction", value)
    if not 0.0 <= active <= 1.0:
        raise SettingsError(f"active_fraction: must be a fraction of the steps in [0, 1], got {active:g}")
    return active


def parse_power(value: Any) -> float:
    power = parse_number("power", value)
    if not 0.0 < power <= MAX_POWER:
        raise SettingsError(f"power: must be in (0, {MAX_POWER:g}] (official 3, paper 4), got {power:g}")
    return power


@dataclass(frozen=True)
class TsamSettings:
    """T-SAM settings; defaults are the official code's (``configs/config.yaml``).

    The paper's variant is ``loss="paper", power=4`` with a larger ``strength`` (α = 10 on the
    Attend-and-Excite prompts, 40 on TIFA) over the first half of the steps.
    """

    METHOD: ClassVar[str] = "T-SAM"  #: how messages, infotext switches and X/Y/Z axes name the method
    #: What it does and what it costs, in one line (the accordion shows it).
    DESCRIPTION: ClassVar[str] = (
        "Nudges the starting latent so that each word's attention follows how the prompt's words belong "
        "together (an adjective with its noun). Expensive: every latent update costs about two UNet passes, "
        "and the defaults make 1 per step in the first 60 % of the steps plus 20 at three refinement steps "
        "(90 updates for 50 steps); the progress bar shows the count.")

    enabled: bool = setting(
        False, label="T-SAM alignment", control=Control("checkbox"), parse=parse_flag("enabled"),
        info="On/off. Off by default, so requests that do not mention T-SAM are unchanged.")
    strength: float = setting(
        5.0, label="Strength", control=Control("slider", 0.0, 100.0, 0.5), parse=number_in("strength", 0, MAX_STRENGTH),
        infotext="T-SAM strength", axis="[T-SAM] Strength", api_note="The API accepts up to 1000.",
        info="Step size of each latent update: α_i = strength·sqrt(linspace(1, 0.5, N)[i]). The official code uses 5.")
    active_fraction: float = setting(
        DEFAULT_ACTIVE_FRACTION, label="Active fraction of steps", control=Control("slider", 0.0, 1.0, 0.05),
        parse=parse_active_fraction, infotext="T-SAM active fraction", axis="[T-SAM] Active fraction",
        info="The latent is updated during the first ⌈fraction·steps⌉ steps (0.6: 30 of 50, the official schedule).")
    iterations: int = setting(
        1, label="Iterations per step", control=Control("slider", 1, 10, 1), parse=count_in("iterations", 1, MAX_ITERATIONS),
        infotext="T-SAM iterations", axis="[T-SAM] Iterations", api_note="The API accepts up to 50.",
        info="Gradient updates at each active step; each costs about two UNet passes.")
    refinement_steps: str = setting(
        format_refinement_steps(DEFAULT_REFINEMENT_FRACTIONS), label="Refinement steps", control=Control("text"),
        parse=lambda value: format_refinement_steps(parse_refinement_steps(value)),
        infotext="T-SAM refinement steps", axis="[T-SAM] Refinement steps",
        info="Fractions of the steps that get extra refinement iterations, e.g. 0,0.2,0.4 (steps 0, 10, 20 of "
             "50), or none.")
    refinement_iterations: int = setting(
        20, label="Refinement iterations", control=Control("slider", 0, 50, 1),
        parse=count_in("refinement_iterations", 0, MAX_REFINEMENT_ITERATIONS), infotext="T-SAM refinement iterations",
        axis="[T-SAM] Refinement iterations", api_note="The API accepts up to 100.",
        info="Extra updates at each refinement step: the most expensive part of T-SAM.")
    loss: str = setting(
        "official", label="Loss", control=Control("radio", choices=LOSS_MODES), parse=one_of("loss", LOSS_MODES),
        infotext="T-SAM loss", axis="[T-SAM] Loss",
        info="official: the official code's row-cosine loss; paper: the paper's L1 form (use power 4 with it).")
    power: float = setting(
        3.0, label="Target sharpness (power on T)", control=Control("slider", 0.5, 8.0, 0.5), parse=parse_power,
        infotext="T-SAM power", axis="[T-SAM] Power", api_note="The API accepts up to 16.",
        info="Exponent on the text encoder's attention before it becomes the target: 3 in the official code, "
             "4 in the paper.")
    show_maps: bool = setting(
        False, label="Show maps", control=Control("checkbox"), parse=parse_flag("show_maps"),
        info="Add one image per picture: the text target T, the attention similarity S before and after, and "
             "each token's attention map.")

    def __post_init__(self) -> None:
        fields.validate_fields(self)

    @property
    def refinement_fractions(self) -> tuple[float, ...]:
        return parse_refinement_steps(self.refinement_steps)

    @property
    def has_effect(self) -> bool:
        """False when T-SAM would change nothing (off, strength 0 or no active step)."""
        return self.enabled and self.strength > 0 and self.active_fraction > 0

    def step_plan(self, step: int, total_steps: int, requested_steps: int | None = None) -> TsamStepPlan:
        """Updates and step size at ``step`` (0-based) of a ``total_steps``-timestep schedule run for
        ``requested_steps`` requested steps (default: ``total_steps``; see :func:`active_step_count`).
        The step size follows the official ``linspace`` over all ``total_steps`` timesteps."""
        if not self.has_effect:
            return TsamStepPlan(0, 0.0)
        updates = updates_at_step(
            step,
            total_steps,
            active_fraction=self.active_fraction,
            iterations=self.iterations,
            refinement_fractions=self.refinement_fractions,
            refinement_iterations=self.refinement_iterations,
            requested_steps=requested_steps,
        )
        return TsamStepPlan(updates, step_size(self.strength, step, total_steps) if updates else 0.0)

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any], *, enabled_default: bool = True) -> TsamSettings:
        """Build from a named dict (API form); unknown keys are an error, missing ones default."""
        return fields.from_mapping(cls, values, enabled_default=enabled_default)

    def to_infotext(self) -> dict[str, Any]:
        """Infotext entries; empty when T-SAM is off. "Show maps" is a display choice, not written."""
        return fields.to_infotext(self)

    @classmethod
    def from_infotext(cls, params: Mapping[str, Any]) -> TsamSettings:
        """Settings from parsed infotext (``{"T-SAM strength": "5.0", …}``); off without T-SAM keys."""
        return fields.from_infotext(cls, params)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)
